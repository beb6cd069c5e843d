"""report.md and its figures, generated from the numbers just computed (retrieval.json) and the runs' own
records, never written by hand: the study's own text disagreed with its notebook."""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import date
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ALPHA = 0.05
CURVES = {"multilabel": ["loss", "f1"], "rotation": ["loss", "accuracy"], "segmentation": ["loss", "iou"],
          "triplet": ["loss", "margin", "active_fraction", "val_iou_at_5"]}  # the learning curves each task shows


def slug(name: str) -> str:
    """A file name for a model's figures: markdown links break on spaces."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-").lower() or "model"


def fmt(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "—"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f} [{stats['ci95'][0]:.3f}, {stats['ci95'][1]:.3f}]"


def ordered_models(results: dict[str, Any]) -> list[str]:
    return sorted(results["results"], key=lambda name: -results["results"][name]["original"]["mean"])


def bar_chart(results: dict[str, Any], path: Path) -> None:
    names = ordered_models(results)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.6))
    width = 0.38
    for offset, variant, colour in ((-width / 2, "original", "tab:blue"), (width / 2, "masked", "tab:orange")):
        means, errors, xs = [], [[], []], []
        for x, name in enumerate(names):
            stats = results["results"][name].get(variant)
            if stats:
                xs.append(x + offset)
                means.append(stats["mean"])
                errors[0].append(stats["mean"] - stats["ci95"][0])
                errors[1].append(stats["ci95"][1] - stats["mean"])
        if xs:
            ax.bar(xs, means, width, yerr=errors, capsize=3, color=colour, label=variant)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(f"mean label IoU of {results['k']} neighbours")
    ax.set_title(f"retrieval on {results['queries']} validation queries (95% bootstrap CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def retrieval_grid(name: str, variant: str, details: dict[str, Any], images: dict[str, np.ndarray], path: Path,
                   rows: int = 4) -> None:  # fmt: skip
    neighbours = details["neighbours"][name, variant][:rows]
    rows, k = neighbours.shape
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.6 * (k + 1), 1.8 * rows), squeeze=False)
    for r in range(rows):
        query_key = details["query_keys"][r]
        axes[r, 0].imshow(images[query_key])
        axes[r, 0].set_title("query", fontsize=8)
        query_labels = details["query_labels"][r].astype(bool)
        for c, index in enumerate(neighbours[r]):
            key = details["gallery_keys"][index]
            labels = details["gallery_labels"][index].astype(bool)
            union = (labels | query_labels).sum()
            iou = (labels & query_labels).sum() / union if union else 0.0
            axes[r, c + 1].imshow(images[key])
            axes[r, c + 1].set_title(f"IoU {iou:.2f}", fontsize=8)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(f"{name} ({variant})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_meta(run: str) -> dict[str, Any] | None:
    path = Path(run) / "model" / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else None


def conclusions(results: dict[str, Any]) -> list[str]:
    return [ordering_sentence(results)] + [comparison_sentence(row) for row in results["comparisons"]]


def ordering_sentence(results: dict[str, Any]) -> str:
    """The models by mean label IoU on the original images, '>' between neighbours the paired test tells apart
    (Holm-adjusted p < 0.05, effect in the same direction) and '≈' between those it cannot."""
    tests = {(row["a"], row["b"]): row for row in results["comparisons"]}
    names = results["ordering"]
    text = f"{names[0]} ({results['results'][names[0]]['original']['mean']:.3f})"
    for a, b in zip(names, names[1:]):
        row = tests.get((f"{a}/original", f"{b}/original"))
        flipped = tests.get((f"{b}/original", f"{a}/original"))
        effect = row["effect_size"] if row else -flipped["effect_size"]
        separated = (row or flipped)["p_holm"] < ALPHA and effect > 0
        text += f" {'>' if separated else '≈'} {b} ({results['results'][b]['original']['mean']:.3f})"
    return (f"Ordering by mean label IoU on the original images ('≈': the paired test cannot tell the neighbours "
            f"apart at {ALPHA}): {text}.")


def comparison_sentence(row: dict[str, Any]) -> str:
    """Direction from the signed-rank test's statistic (the effect size's sign), significance from its
    Holm-adjusted p-value; the mean and median differences beside them, and a word when either points the
    other way (a few large differences against many small ones)."""
    a, b, effect = row["a"], row["b"], row["effect_size"]
    numbers = (f"effect size {effect:+.2f}, Holm-adjusted p = {row['p_holm']:.2g}; mean difference "
               f"{row['mean_difference']:+.3f}, median {row['median_difference']:+.3f}")  # fmt: skip
    if effect == 0:
        return f"{a} and {b} do not differ by the signed-rank test ({numbers})."
    verdict = "significantly" if row["p_holm"] < ALPHA else "not significantly"
    sentence = f"{a} is {verdict} {'higher' if effect > 0 else 'lower'} than {b} ({numbers})."
    against = [name for name in ("mean", "median") if np.sign(row[f"{name}_difference"]) == -np.sign(effect)]
    if against:
        winner, loser = (a, b) if effect > 0 else (b, a)
        named = " and the ".join(against)
        sentence += (f" The {named} difference{'s point' if len(against) > 1 else ' points'} the other way: the "
                     f"signed-rank test weighs each query's difference by its rank and favours {winner}, while the "
                     f"{named} favour{'s' if len(against) == 1 else ''} {loser}.")  # fmt: skip
    return sentence


def query_sentence(results: dict[str, Any]) -> str:
    common = (f"drawn once with seed {results['seed']}; the same queries for every model and for both variants. "
              f"Gallery: the whole train split.")  # fmt: skip
    if results["query_split"] == "test":
        return (f"- Queries: {results['queries']} test images, a split held out from training and from model "
                f"selection, {common}")  # fmt: skip
    return (f"- Queries: {results['queries']} validation images, {common} The validation split also chose each "
            f"model's epoch and each classifier's threshold, so these scores may be slightly optimistic: build the "
            f"shards with `--test-fraction` (`data.test_fraction` in a study) for held-out queries.")


def retrieval_examples(trained: list[str], results: dict[str, Any], details: dict[str, Any], out: Path) -> list[str]:
    """Grids for the best and the worst model, original and masked side by side; their images are read through
    key -> shard lookups kept under OUT/lookup."""
    from imret.data.lookup import fetch_images

    best, worst = trained[0], trained[-1]
    shown = [(name, variant) for name in dict.fromkeys([best, worst]) for variant in ("original", "masked")
             if (name, variant) in details["neighbours"]]  # fmt: skip
    wanted = set(details["query_keys"][:4]) | {details["gallery_keys"][i] for key in shown
                                               for i in details["neighbours"][key][:4].ravel()}  # fmt: skip
    images = {**fetch_images(out, results["shards"], results["query_split"], wanted, 96),
              **fetch_images(out, results["shards"], "train", wanted, 96)}  # fmt: skip
    lines = ["## Retrieval examples", "", "Each row: a query and its nearest gallery images with their label IoU.", ""]
    for name in dict.fromkeys([best, worst]):
        cells = []
        for variant in ("original", "masked"):
            if (name, variant) in details["neighbours"]:
                path = out / "figures" / f"grid-{slug(name)}-{variant}.png"
                retrieval_grid(name, variant, details, images, path)
                cells.append(f"![{name} {variant}](figures/{path.name})")
        lines += [f"{'Best' if name == best else 'Worst'} model, {name} (original, then masked):", "", " ".join(cells), ""]
    return lines


def write_report(out: Path, results: dict[str, Any], details: dict[str, Any]) -> Path:
    from imret.data.manifest import load_manifest

    figures = out / "figures"
    shutil.rmtree(figures, ignore_errors=True)
    figures.mkdir(parents=True)
    manifest = load_manifest(results["shards"])
    models = results["models"]
    lines = [f"# Retrieval study ({date.today().isoformat()})", "",
             "Generated by `imret study` from `retrieval.json` and the runs' own records; do not edit by hand.", "",
             "## Setup", "",
             f"- Data: `{results['shards']}`: {len(details['gallery_keys'])} gallery (train) images, "
             f"{details['query_split_count']} {results['query_split']} images (as embedded), {len(manifest['classes'])} classes.",
             query_sentence(results),
             "- Model selection: each run exports the epoch with the lowest validation loss; each classifier's decision "
             "threshold is chosen on one half of the validation split and its F1 reported on the other half.",
             f"- Score per query: mean label IoU (shared tags / union of tags) of its {results['k']} nearest gallery "
             f"images by L2 (exact FAISS search). Reported: mean ± std over queries [95% bootstrap interval].",
             f"- Also, with relevant = label IoU ≥ 0.5: precision@{results['k']}, mAP@{results['k']} (normalised by "
             f"min(k, relevant images in the gallery)), recall@{results['k']} (the hit rate: any relevant image in the "
             f"top {results['k']}) and MRR@{results['k']}; nDCG@{results['k']} with the IoU as gain; and the four "
             f"binary scores again with relevant = sharing a tag, and = the identical tag set.",
             f"- Masked: the background zeroed by the segmentation run `{results['segmentation']}` before embedding."
             if results["segmentation"] else "- Masked: no segmentation run was given, so no masked variant.", ""]  # fmt: skip

    k = results["k"]
    lines += ["## Retrieval", "", "| model | embedding | original | masked | "
              f"P@{k} | mAP@{k} | R@{k} | MRR@{k} | nDCG@{k} |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ordered_models(results):
        r = results["results"][name]
        embedding = f"{models[name]['layer']} {models[name]['dim']}-d" if name in models else "—"
        o = r["original"]
        lines.append(f"| {name} | {embedding} | {fmt(o)} | {fmt(r.get('masked'))} | {o['precision_at_k']:.3f} | "
                     f"{o['map_at_k']:.3f} | {o['recall_at_k']:.3f} | {o['mrr_at_k']:.3f} | {o['ndcg_at_k']:.3f} |")  # fmt: skip
    bar_chart(results, figures / "retrieval.png")
    lines += ["", "![retrieval](figures/retrieval.png)", "", "The same retrievals (original images) under the other "
              "two relevance definitions:", "", f"| model | shares a tag: P@{k} | mAP@{k} | R@{k} | MRR@{k} | "
              f"identical tags: P@{k} | mAP@{k} | R@{k} | MRR@{k} |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in ordered_models(results):
        o = results["results"][name]["original"]
        cells = [f"{o[f'{metric}_at_k{suffix}']:.3f}" for suffix in ("_any_tag", "_same_tags")
                 for metric in ("precision", "map", "recall", "mrr")]  # fmt: skip
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines.append("")
    for name, reason in results["unavailable"].items():
        lines.append(f"- **{name}** is not in the table: {reason}.")
    lines += ["", "## Paired comparisons", "",
              "Wilcoxon signed-rank tests over the same queries; effect size = matched-pairs rank-biserial "
              "correlation (+1: every query better under the first); p-values Holm-adjusted over all comparisons.", "",
              "| comparison | mean difference | median difference | effect size | p (Holm) | significant at 0.05 |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for row in results["comparisons"]:
        lines.append(f"| {row['a']} vs {row['b']} | {row['mean_difference']:+.3f} | {row['median_difference']:+.3f} | "
                     f"{row['effect_size']:+.2f} | {row['p_holm']:.2g} | {'yes' if row['p_holm'] < ALPHA else 'no'} |")  # fmt: skip
    lines += ["", "## Conclusions", ""] + [f"- {line}" for line in conclusions(results)] + [""]

    trained = [n for n in ordered_models(results) if n in models]
    if trained:
        lines += retrieval_examples(trained, results, details, out)

    lines += ["## Models", "", "| model | backbone | task (loss) | embedding layer | initialisation | validation |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, info in models.items():
        meta = run_meta(info["run"])
        lines.append(f"| {name} | {(meta or {}).get('backbone', 'resnet18')} | {task_and_loss(meta, info['task'])} | "
                     f"{info['layer']} ({info['dim']}-d) | {info['initialisation']} | {summarise_validation(meta)} |")  # fmt: skip
    seg = run_meta(results["segmentation"]) if results["segmentation"] else None
    if seg:
        lines += ["", f"Segmentation (`{results['segmentation']}`): {summarise_validation(seg)}; initialisation: "
                  f"{seg['initialisation']}.", ""]  # fmt: skip
        examples = Path(results["segmentation"]) / "plots" / "val-examples.png"
        if examples.is_file():
            shutil.copy(examples, figures / "segmentation-examples.png")
            lines += ["Validation images, true masks and predictions:", "",
                      "![segmentation](figures/segmentation-examples.png)", ""]  # fmt: skip

    lines += ["## Learning curves", "", "Training values by step, validation values at the end of each epoch.", ""]
    runs = {name: info["run"] for name, info in models.items()} | ({"segmentation": results["segmentation"]} if seg else {})
    for name, run in runs.items():
        meta = run_meta(run)
        shown = []
        for metric in CURVES.get(meta["task"] if meta else "", []):
            curve = Path(run) / "plots" / f"{metric}.png"
            if curve.is_file():
                shutil.copy(curve, figures / f"{metric}-{slug(name)}.png")
                shown.append(f"![{metric} {name}](figures/{metric}-{slug(name)}.png)")
        if shown:
            lines += [f"{name} (`{run}`):", "", " ".join(shown), ""]
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def summarise_validation(meta: dict[str, Any] | None) -> str:
    if meta is None:
        return "untrained baseline"
    val, task = meta["val"], meta["task"]
    if task == "multilabel":
        return (f"F1 {val['f1']:.3f} at threshold {val['threshold']:.2f}, chosen on {val['threshold_images']:.0f} "
                f"validation images and scored on the other {val['scored_images']:.0f} (precision {val['precision']:.3f}, "
                f"recall {val['recall']:.3f}, accuracy {val['accuracy']:.3f}; F1 at 0.5: {val['f1_at_0.5']:.3f})")  # fmt: skip
    if task == "rotation":
        return f"rotation accuracy {val['accuracy']:.3f}"
    if task == "segmentation":
        return f"example-wise IoU {val['iou']:.3f}"
    if task == "triplet" and "active_fraction" in val:
        return f"val label IoU@5 {val['val_iou_at_5']:.3f}, active triplets {val['active_fraction']:.2f}"
    if task == "triplet":
        return f"val label IoU@5 {val['val_iou_at_5']:.3f}, loss {val['loss']:.3f}"
    return f"loss {val['loss']:.3f}"


def task_and_loss(meta: dict[str, Any] | None, task: str) -> str:
    """The task, and for metric learning its loss (runs from before the loss section trained triplet)."""
    if task != "triplet" or meta is None:
        return task
    return f"{task} ({meta['recipe'].get('loss', {}).get('name', 'triplet')})"
