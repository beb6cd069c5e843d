"""`imret study RECIPE` and `imret demo`: every stage of the study, each skipped when its complete output exists.

shards (built from `data.source` when missing) -> train each recipe (a finished run says so; a partial one
resumes) -> embed every compared model, train split (gallery) and query split (test when the shards have one,
else val), original and with the background zeroed by the segmentation run -> report.md -> retrieval.json
(last: it marks the stage done).
Under `accelerate launch` the training and embedding stages use every process, and scoring and the report run
on rank 0; the shards must exist already (the study prints the `imret shards build` command when they don't).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from imret.config import TrainConfig, bounds, load_recipe, parse_yaml, recipe_from_dict
from imret.data import storage
from imret.data.manifest import MANIFEST, load_manifest, write_json_atomic
from imret.errors import ImretError

log = logging.getLogger("imret.study")
RANDOM = "random"
VARIANTS = ("original", "masked")


@dataclass
class StudySection:
    out: str = "studies/study"
    queries: int = field(default=500, metadata=bounds(1))
    k: int = field(default=5, metadata=bounds(1, 1000))
    seed: int = 0
    bootstrap_resamples: int = field(default=10_000, metadata=bounds(100))
    faiss_device: Literal["auto", "gpu", "cpu"] = "auto"  # auto: every GPU when there are CUDA GPUs


@dataclass
class StudyData:
    shards: str = "shards/imaterialist"
    source: str | None = None  # built into `shards` when they are missing
    format: Literal["folder", "imaterialist", "ccp"] = "folder"
    max_side: int | None = field(default=None, metadata=bounds(16))
    samples_per_shard: int = field(default=1000, metadata=bounds(1))
    val_fraction: float = field(default=0.1, metadata=bounds(0.0, 1.0, lo_open=True, hi_open=True))
    test_fraction: float = field(default=0.0, metadata=bounds(0.0, 1.0, hi_open=True))  # held-out queries
    split_seed: int = 0


@dataclass
class StudyTrain:
    recipes: list[str] = field(default_factory=list)  # trained in this order, each on data.shards
    overrides: list[str] = field(default_factory=list)  # --set items applied to every recipe


@dataclass
class StudyCompare:
    # row name -> a training recipe (its run is compared), a run directory, or imagenet-resnet18
    models: dict[str, str] = field(default_factory=dict)
    segmentation: str | None = None  # recipe or run directory of the U-Net that masks the background


@dataclass
class StudyEmbed:
    batch_size: int = field(default=256, metadata=bounds(1))
    workers: int | None = field(default=None, metadata=bounds(0))  # decoding processes per rank; default: its cores
    decode: Literal["auto", "cpu", "gpu"] = "auto"  # where JPEGs are decoded, as data.decode in a training recipe
    # row name -> the layer to embed instead of the one the model declares (pooled | head), e.g. the study's control:
    # the triplet model's pooled 512-d features, the layer the original study evaluated by mistake
    layer: dict[str, str] = field(default_factory=dict)


@dataclass
class StudyRecipe:
    study: StudySection = field(default_factory=StudySection)
    data: StudyData = field(default_factory=StudyData)
    train: StudyTrain = field(default_factory=StudyTrain)
    compare: StudyCompare = field(default_factory=StudyCompare)
    embed: StudyEmbed = field(default_factory=StudyEmbed)


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyRecipe:
    study = load_recipe(path, overrides, root=StudyRecipe)
    if not study.compare.models:
        raise ImretError(f"{path}: compare.models is empty: name at least one model to compare")
    for name, layer in study.embed.layer.items():
        if name not in study.compare.models:
            raise ImretError(f"{path}: embed.layer names '{name}', which is not a row of compare.models")
        if layer not in ("pooled", "head"):
            raise ImretError(f"{path}: embed.layer.{name}: '{layer}' is not one of pooled, head")
    return study


def training_recipe(path: str, study: StudyRecipe, train_sets: Sequence[str] = ()):
    """A training recipe as the study trains it: on the study's shards, with train.overrides and then the command
    line's --train-set items applied."""
    return load_recipe(path, [f"data.shards={study.data.shards}", *study.train.overrides, *train_sets])


def moved_runs(study: StudyRecipe, train_sets: Sequence[str]) -> dict[str, str]:
    """Each training recipe's run directory as the recipe alone names it -> where this study trains it (its overrides,
    --train-set and --debug can move it). A recipe that starts from another's weights (model.init: run) and a row
    naming a run directory follow that run there, rather than read an older run at the recipe's own path."""
    moved = {}
    for path in study.train.recipes:
        trained = training_recipe(path, study, train_sets)  # first: a broken recipe gets its one-line error here
        # the file alone, without the consistency checks only the study's overrides may make it pass
        own = recipe_from_dict(parse_yaml(Path(path).read_text(encoding="utf-8")))
        moved[str(own.run_dir)] = str(trained.run_dir)
    return moved


def resolve_run(entry: str, study: StudyRecipe, train_sets: Sequence[str] = (), runs: dict[str, str] | None = None) -> str:
    """A recipe names its run directory; anything else is a run directory (where the study moved it, in `runs`)
    or the ImageNet baseline."""
    if entry.endswith((".yaml", ".yml")):
        return str(training_recipe(entry, study, train_sets).run_dir)
    return (runs or {}).get(str(Path(entry)), entry)


def run_study(study: StudyRecipe, debug: bool = False, train_sets: Sequence[str] = ()) -> Path:
    """Every stage, skipping what is complete. debug: the smoke run (imret.smoke); train_sets: KEY=VALUE items for
    every training recipe, after train.overrides."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from imret.distributed import init_process_group
    from imret.embed import IMAGENET_BASELINE, embed
    from imret.faiss_build import gpu_count
    from imret.smoke import DEBUG_IMAGES, debug_study, missing_weights
    from imret.train import train

    if debug:
        study, train_sets = debug_study(study, train_sets)
    runs = moved_runs(study, train_sets)
    out = Path(study.study.out)
    # a missing or CPU-only FAISS on a GPU machine, or one without kernels for its GPUs: said now, not after training
    gpu_count(study.study.faiss_device)
    ensure_shards(study, DEBUG_IMAGES if debug else None)
    # queries from a held-out test split when the build has one; else from validation, which also chose each
    # model's epoch and threshold (the report says which)
    query_split = "test" if load_manifest(study.data.shards)["splits"]["test"]["samples"] else "val"
    skipped: dict[str, str] = {}  # run directory -> why a smoke run did not train it
    for recipe_path in study.train.recipes:
        recipe = training_recipe(recipe_path, study, train_sets)
        if recipe.model.init == "run" and str(Path(recipe.model.weights)) in runs:
            recipe.model.weights = runs[str(Path(recipe.model.weights))]
        reason = missing_weights(recipe, skipped) if debug else None
        if reason:
            log.warning("stage train: %s skipped: %s", recipe_path, reason)
            skipped[str(recipe.run_dir)] = reason
            continue
        log.info("stage train: %s", recipe_path)
        train(recipe)
    timeout = timedelta(seconds=TrainConfig().collective_timeout_s)
    init_process_group(timeout, parse_flag_from_env("ACCELERATE_USE_CPU"))  # when no recipe trained in this process
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timeout)

    models, unavailable = {}, {}
    for name, entry in study.compare.models.items():
        source = resolve_run(entry, study, train_sets, runs)
        reason = imagenet_unavailable(download=not debug) if source == IMAGENET_BASELINE else skipped.get(str(Path(source)))
        if reason:
            unavailable[name] = reason
            log.warning("model %s left out: %s", name, reason)
            continue
        models[name] = source
    if not models:
        raise ImretError("no model left to compare: " + "; ".join(f"{n}: {r}" for n, r in unavailable.items()))
    segmentation = resolve_run(study.compare.segmentation, study, train_sets, runs) if study.compare.segmentation else None
    if segmentation and str(Path(segmentation)) in skipped:
        log.warning("no masked variant: the segmentation run was skipped (%s)", skipped[str(Path(segmentation))])
        segmentation = None

    embeddings: dict[str, dict[str, dict[str, Path]]] = {}
    for name, source in models.items():
        embeddings[name] = {}
        for variant in VARIANTS if segmentation else VARIANTS[:1]:
            mask = segmentation if variant == "masked" else None
            embeddings[name][variant] = {
                role: embed(source, study.data.shards, split, mask_with=mask, out=out / "embeddings" / name / f"{variant}-{split}",
                            batch_size=study.embed.batch_size, workers=study.embed.workers, decode=study.embed.decode,
                            layer=study.embed.layer.get(name))  # fmt: skip
                for role, split in (("gallery", "train"), ("queries", query_split))
            }  # fmt: skip

    if state.is_main_process:
        evaluate_and_report(study, out, embeddings, models, segmentation, unavailable, query_split)
    state.wait_for_everyone()
    return out / "report.md"


def ensure_shards(study: StudyRecipe, limit: int | None = None) -> None:
    """The study's shards, built from data.source when missing (limit: from a seeded sample of that many records)."""
    from imret.data.build import build_shards

    d = study.data
    if storage.exists(storage.join(d.shards, MANIFEST)):
        return
    if not d.source:
        raise ImretError(f"{d.shards} has no finished shard build and data.source is not set")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the other ranks would wait out their collective timeout
        raise ImretError(
            f"{d.shards} has no finished shard build: build it in one process first, then launch the study: "
            f"imret shards build {d.source} --format {d.format} --out {d.shards} --val-fraction {d.val_fraction} "
            f"--test-fraction {d.test_fraction} --seed {d.split_seed} --samples-per-shard {d.samples_per_shard}"
            + (f" --max-side {d.max_side}" if d.max_side else "")
        )  # fmt: skip
    log.info("stage shards: building %s from %s", d.shards, d.source)
    build_shards(d.source, d.format, d.shards, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                 seed=d.split_seed, samples_per_shard=d.samples_per_shard, max_side=d.max_side, limit=limit)  # fmt: skip


def imagenet_unavailable(download: bool = True) -> str | None:
    """Why the untrained ImageNet row cannot be embedded, or None; a smoke run (download=False) looks in the cache only."""
    from imret.models import imagenet_cache_path, imagenet_state_dict

    if not download:
        cached = imagenet_cache_path("resnet18")
        return None if cached.is_file() else f"resnet18's ImageNet weights are not in {cached} (a smoke run never downloads)"
    try:
        imagenet_state_dict("resnet18")
    except ImretError as exc:
        return str(exc).split(";")[0]
    return None


def evaluate_and_report(study: StudyRecipe, out: Path, embeddings: dict, models: dict[str, str],
                        segmentation: str | None, unavailable: dict[str, str], query_split: str) -> None:  # fmt: skip
    from imret.report import write_report

    fingerprint = stage_fingerprint(study, embeddings)
    done = out / "retrieval.json"
    if done.is_file() and (out / "report.md").is_file() and json.loads(done.read_text()).get("fingerprint") == fingerprint:
        log.info("stages retrieval and report: complete for these embeddings, nothing to do (%s)", out / "report.md")
        return
    log.info("stage retrieval: scoring %d models on %d queries", len(models), study.study.queries)
    results, details = score(study, embeddings)
    results.update(fingerprint=fingerprint, unavailable=unavailable, query_split=query_split,
                   models={name: describe_model(source, embeddings[name]) for name, source in models.items()},
                   segmentation=segmentation, shards=study.data.shards)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)  # written last, so a report that failed half-way is never taken as complete
    log.info("stage report: writing %s", out / "report.md")
    write_report(out, results, details)
    write_json_atomic(done, results)
    log.info("report: %s", (out / "report.md").resolve())


def stage_fingerprint(study: StudyRecipe, embeddings: dict) -> str:
    metas = {f"{name}/{variant}/{split}": json.loads((path / "meta.json").read_text())["job"]
             for name, variants in embeddings.items() for variant, splits in variants.items()
             for split, path in splits.items()}  # fmt: skip
    settings = {"queries": study.study.queries, "k": study.study.k, "seed": study.study.seed,
                "resamples": study.study.bootstrap_resamples}  # fmt: skip
    return hashlib.sha256(json.dumps([metas, settings], sort_keys=True).encode()).hexdigest()[:16]


def describe_model(source: str, variants: dict) -> dict[str, Any]:
    meta = json.loads((variants["original"]["gallery"] / "meta.json").read_text())
    return {"run": source, "task": meta["task"], "layer": meta["layer"], "dim": meta["dim"],
            "initialisation": meta["initialisation"]}  # fmt: skip


def select_queries(keys: Iterable[str], count: int, seed: int) -> list[str]:
    """The query set: the `count` keys of the query split that rank first by a seeded hash of the key, in key
    order; the same for every model and both variants, independent of the order the keys come in, and drawn
    in one pass that holds `count` keys, whatever the split's size."""
    from imret.tasks.base import key_rank

    return sorted(key for _, key in heapq.nsmallest(count, ((key_rank(key, seed, "queries"), key) for key in keys)))


def rows_of(keys: Iterable[str], wanted: list[str]) -> list[int]:
    """The row of each wanted key, in the order given, from one pass over the keys."""
    position = {key: i for i, key in enumerate(wanted)}
    rows: list[int | None] = [None] * len(wanted)
    for row, key in enumerate(keys):
        if key in position:
            rows[position[key]] = row
    return rows  # type: ignore[return-value]


def score(study: StudyRecipe, embeddings: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """embeddings: model -> variant -> {"gallery": train split's embedding dir, "queries": the query split's}."""
    from imret.embed import load_embeddings
    from imret.index import exact_gallery_index
    from imret.retrieval import ideal_gains, ndcg, neighbour_iou, random_neighbours, ranking_scores, relevance, search
    from imret.stats import holm, paired_test, summary

    s = study.study
    first = next(iter(embeddings.values()))["original"]
    _, gallery_labels, gallery_keys, _ = load_embeddings(first["gallery"])
    _, candidate_labels, candidate_keys, _ = load_embeddings(first["queries"])
    query_keys = select_queries(candidate_keys, s.queries, s.seed)
    if not query_keys:
        raise ImretError(f"{first['queries']}: no embeddings to draw queries from")
    if s.k > len(gallery_keys):
        raise ImretError(f"study.k={s.k} exceeds the gallery of {len(gallery_keys)} train images")
    query_labels = np.asarray(candidate_labels[rows_of(candidate_keys, query_keys)])
    ideal, relevant_total = ideal_gains(gallery_labels, query_labels, s.k)
    gallery_digest = gallery_keys.digest()

    def scored(found: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """A retrieval's scores: the mean label IoU of its k neighbours (summary and paired tests use it), nDCG@k with
        the IoU as gain, and precision, mAP, recall (hit rate) and MRR at k by each relevance (RELEVANCE)."""
        ious = neighbour_iou(gallery_labels, query_labels, found)
        per_query = ious.mean(1)
        metrics = {**summary(per_query, s.seed, s.bootstrap_resamples)}
        for suffix, relevant in relevance(query_labels, gallery_labels[found]).items():
            ranking = ranking_scores(relevant, relevant_total[suffix])
            for name, key in (("precision", "precision_at_k"), ("ap", "map_at_k"), ("recall", "recall_at_k"), ("mrr", "mrr_at_k")):
                metrics[key + suffix] = float(ranking[name].mean())
            if not suffix:
                metrics["ndcg_at_k"] = float(ndcg(ious, ideal).mean())
        return metrics, per_query

    results: dict[str, Any] = {}
    per_query: dict[tuple[str, str], np.ndarray] = {}
    neighbours: dict[tuple[str, str], np.ndarray] = {}
    for name, variants in embeddings.items():
        results[name] = {}
        for variant, dirs in variants.items():
            g_emb, _, g_keys, g_meta = load_embeddings(dirs["gallery"])
            q_emb, _, q_keys, _ = load_embeddings(dirs["queries"])
            if g_keys.digest() != gallery_digest:
                raise ImretError(f"{dirs['gallery']}: a different gallery from {first['gallery']}; embed again")
            rows = rows_of(q_keys, query_keys)
            missing = [key for key, row in zip(query_keys, rows) if row is None]
            if missing:
                raise ImretError(f"{dirs['queries']}: {len(missing)} of the queries are not embedded (first: {missing[0]}); "
                                 f"they decoded for {first['queries']} but not here: see the embedding warnings")  # fmt: skip
            index = exact_gallery_index(dirs["gallery"], g_emb, g_meta, s.faiss_device)
            found = search(index, np.asarray(q_emb[rows]), s.k)[1]
            del index
            results[name][variant], per_query[name, variant] = scored(found)
            neighbours[name, variant] = found
    random_found = random_neighbours(len(gallery_labels), len(query_keys), s.k, s.seed)
    results[RANDOM] = {}
    results[RANDOM]["original"], per_query[RANDOM, "original"] = scored(random_found)

    comparisons = []
    for name in embeddings:
        comparisons.append(("original", name, "original", RANDOM))
        if "masked" in results[name]:
            comparisons.append(("masked", name, "original", name))
    # neighbours in the ordering by mean, so the report orders only what a test can tell apart
    ordering = sorted(results, key=lambda name: -results[name]["original"]["mean"])
    for a, b in zip(ordering, ordering[1:]):
        if ("original", a, "original", b) not in comparisons and ("original", b, "original", a) not in comparisons:
            comparisons.append(("original", a, "original", b))
    rows = []
    for variant, a, b_variant, b in comparisons:
        test = paired_test(per_query[a, variant], per_query[b, b_variant])
        rows.append({"a": f"{a}/{variant}", "b": f"{b}/{b_variant}", "test": "wilcoxon signed-rank", **test})
    for row, adjusted in zip(rows, holm([r["p_value"] for r in rows])):
        row["p_holm"] = adjusted
    results_json = {"k": s.k, "queries": len(query_keys), "seed": s.seed, "query_keys": query_keys,
                    "results": results, "ordering": ordering, "comparisons": rows}  # fmt: skip
    details = {"gallery_keys": gallery_keys, "query_split_count": len(candidate_keys), "query_keys": query_keys,
               "neighbours": neighbours, "per_query": per_query, "gallery_labels": gallery_labels,
               "query_labels": query_labels}  # fmt: skip
    return results_json, details


# ---------------------------------------------------------------- demo


def demo(out: str | Path = "demo", seed: int = 0) -> Path:
    """The study on the embedded synthetic data with CPU-sized recipes, everything under OUT. `seed` seeds the
    training runs and the query draw (the data stay the same), to see which results hold across seeds."""
    from imret.data.synth import write_synth
    from imret.shipped import shipped_root

    recipes = shipped_root() / "recipes" / "demo"  # inside the installed package, or the checkout's
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    study = load_study(recipes / "study.yaml")
    study.train.recipes = [str(recipes / Path(r).name) for r in study.train.recipes]
    study.compare.models = {n: str(recipes / Path(e).name) if e.endswith(".yaml") else e for n, e in study.compare.models.items()}
    if study.compare.segmentation:
        study.compare.segmentation = str(recipes / Path(study.compare.segmentation).name)
    study.train.overrides.append(f"run.seed={seed}")
    study.study.seed = seed
    if not (out / "data" / "labels.csv").is_file():
        write_synth(out / "data", images=2000, size=96, seed=0, overwrite=True)
    os.chdir(out)  # runs/, shards/ and the study land under OUT; recipes name their runs relative to it
    return run_study(study).resolve()
