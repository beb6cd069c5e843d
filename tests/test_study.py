"""The embedding job under 2 gloo ranks, and a tiny end-to-end study: retrieval.json, report.md, figures."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_recipe_overrides
from imret.config import load_recipe
from imret.data.build import build_shards
from imret.data.manifest import load_manifest
from imret.embed import embed, load_embeddings
from imret.errors import ImretError
from imret.report import fmt
from imret.retrieval import retrieval_iou
from imret.study import load_study, run_study
from imret.train import train


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No ImageNet weights here, and no download attempt."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))

    def refuse(*args, **kwargs):
        raise URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_embedding_covers_every_sample_once_with_two_ranks_and_uneven_shards(tmp_path, synth_dir):
    shards = tmp_path / "uneven"
    build_shards(synth_dir, "folder", shards, val_fraction=0.25, samples_per_shard=13, workers=0)
    manifest = load_manifest(shards)
    assert len({s["samples"] for s in manifest["splits"]["train"]["shards"]}) == 2  # 6 x 13 and one of 12
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("")
    run = train(load_recipe(recipe_path, tiny_recipe_overrides(shards, tmp_path / "runs", "m") +
                            ["train.max_epochs=1", "train.steps_per_epoch=1", "data.batch_size_per_device=8"]))  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "imret",
           "embed", str(run), "--shards", str(shards), "--split", "train", "--out", str(tmp_path / "two")]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two, labels, keys, meta = load_embeddings(tmp_path / "two")
    assert len(keys) == len(set(keys)) == manifest["splits"]["train"]["samples"] == meta["count"]
    assert meta["layer"] == "pooled" and two.shape == (len(keys), 256)
    one, _, one_keys, _ = load_embeddings(embed(str(run), shards, "train", out=tmp_path / "one", workers=2))
    assert list(one_keys) == list(keys) and np.allclose(one, two, atol=1e-5)  # 2 ranks of 1 worker = 1 rank of 2 workers
    parts = sorted((tmp_path / "two" / "parts").iterdir())
    assert len(parts) == len(manifest["splits"]["train"]["shards"])


def test_a_rerun_skips_finished_parts_and_a_new_model_redoes_them(tmp_path, synth_shards, caplog):
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("")
    overrides = tiny_recipe_overrides(synth_shards, tmp_path / "runs", "m") + ["train.max_epochs=1", "train.steps_per_epoch=1",
                                                                                "data.batch_size_per_device=8"]  # fmt: skip
    run = train(load_recipe(recipe_path, overrides))
    out = embed(str(run), synth_shards, "val", out=tmp_path / "e")
    part = next((out / "parts").iterdir())
    stamp = part.stat().st_mtime_ns
    (out / "meta.json").unlink()  # as if killed before the merge
    with caplog.at_level(logging.INFO, logger="imret.embed"):
        embed(str(run), synth_shards, "val", out=out)
    assert part.stat().st_mtime_ns == stamp and (out / "meta.json").is_file()
    with caplog.at_level(logging.INFO, logger="imret.embed"):
        embed(str(run), synth_shards, "val", out=out)
    assert "nothing to do" in caplog.text
    other = train(load_recipe(recipe_path, overrides + ["run.name=other", "run.seed=1"]))
    embed(str(other), synth_shards, "val", out=out)
    assert json.loads((out / "meta.json").read_text())["model"] == str(other)


def write_study(tmp_path: Path, shards: Path) -> Path:
    runs = tmp_path / "runs"
    base = tiny_recipe_overrides(shards, runs, "x")
    recipes = {}
    for name, extra in {"cls": [], "rot": ["task.name=rotation"],
                        "seg": ["task.name=segmentation", "model.backbone=resnet18", "data.batch_size_per_device=16"]}.items():  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        lines = {}
        for item in base + extra + ["train.max_epochs=1", "train.steps_per_epoch=4", f"run.name={name}"]:
            key, value = item.split("=", 1)
            section, field = key.split(".")
            lines.setdefault(section, {})[field] = value
        path.write_text("".join(f"{s}:\n" + "".join(f"  {k}: {v}\n" for k, v in fields.items()) for s, fields in lines.items()))
        recipes[name] = path
    study = tmp_path / "study.yaml"
    study.write_text(f"""
study:
  out: {tmp_path / 'out'}
  queries: 30
  seed: 1
  bootstrap_resamples: 200
data:
  shards: {shards}
train:
  recipes: [{recipes['cls']}, {recipes['rot']}, {recipes['seg']}]
compare:
  models:
    classifier: {recipes['cls']}
    rotation: {recipes['rot']}
    imagenet: imagenet-resnet18
  segmentation: {recipes['seg']}
""")
    return study


def test_a_tiny_study_end_to_end_and_twice(tmp_path, train_shards, offline, caplog, monkeypatch):
    study_path = write_study(tmp_path, train_shards)
    report = run_study(load_study(study_path))
    out = tmp_path / "out"
    results = json.loads((out / "retrieval.json").read_text())
    assert results["k"] == 5 and results["queries"] == 30 and results["seed"] == 1
    assert set(results["results"]) == {"classifier", "rotation", "random"}
    assert set(results["results"]["classifier"]) == {"original", "masked"}
    assert "could not be downloaded" in results["unavailable"]["imagenet"]
    assert all(0 <= c["p_holm"] <= 1 for c in results["comparisons"])
    tested = {(c["a"], c["b"]) for c in results["comparisons"]}
    for a, b in zip(results["ordering"], results["ordering"][1:]):  # every pair of neighbours, in one direction
        assert (f"{a}/original", f"{b}/original") in tested or (f"{b}/original", f"{a}/original") in tested

    text = report.read_text()
    for name in ("classifier", "rotation"):
        for variant in ("original", "masked"):
            assert fmt(results["results"][name][variant]) in text  # the report prints the computed numbers
    assert "not in the table" in text and "Conclusions" in text
    from imret.report import comparison_sentence

    assert all(comparison_sentence(row) in text for row in results["comparisons"])  # direction from the test
    assert "30 validation images, drawn once with seed 1" in text and "may be slightly optimistic" in text
    assert re.search(r"F1 [0-9.]+ at threshold [0-9.]+, chosen on \d+ validation images and scored on the other \d+", text)
    for figure in ["retrieval.png", "segmentation-examples.png", "loss-classifier.png", "grid-classifier-original.png", "grid-classifier-masked.png", "f1-classifier.png"]:
        with Image.open(out / "figures" / figure) as img:
            img.verify()
    for link in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert (out / link).is_file(), link

    # the same queries for every model and variant: rescoring the stored embeddings reproduces each mean
    gallery, g_labels, _, _ = load_embeddings(out / "embeddings" / "rotation" / "masked-train")
    val, v_labels, v_keys, _ = load_embeddings(out / "embeddings" / "rotation" / "masked-val")
    rows = [v_keys.index(key) for key in results["query_keys"]]
    rescored = retrieval_iou(gallery, g_labels, val[rows], v_labels[rows], 5).mean()
    assert rescored == pytest.approx(results["results"]["rotation"]["masked"]["mean"])

    stamp = (out / "retrieval.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        run_study(load_study(study_path))
    assert "already finished" in caplog.text and "nothing to do" in caplog.text
    assert (out / "retrieval.json").stat().st_mtime_ns == stamp

    # each gallery's exact index was saved beside its embeddings, naming what it indexes, and a rescoring reuses it
    index_paths = sorted((out / "embeddings").glob("*/*-train/index.faiss"))
    assert len(index_paths) == 4
    sidecar = json.loads((out / "embeddings" / "rotation" / "masked-train" / "index.faiss.json").read_text())
    assert sidecar["kind"] == "flat" and sidecar["split"] == "train" and sidecar["mask_with"].endswith("seg")
    assert Path(sidecar["locations"]["shards"]).is_absolute() and Path(sidecar["locations"]["model"], "model").is_dir()
    index_stamps = [p.stat().st_mtime_ns for p in index_paths]

    # a report that fails half-way leaves no retrieval.json, so the next run redoes it (here with 3 queries,
    # fewer than the retrieval grids' 4 rows)
    with monkeypatch.context() as patch:
        patch.setattr("imret.report.write_report", fail)
        with pytest.raises(RuntimeError, match="disk full"):
            run_study(load_study(study_path, ["study.queries=3"]))
    assert not (out / "retrieval.json").exists()
    run_study(load_study(study_path, ["study.queries=3"]))
    assert json.loads((out / "retrieval.json").read_text())["queries"] == 3 and "3 validation images" in report.read_text()
    assert [p.stat().st_mtime_ns for p in index_paths] == index_stamps  # loaded, not built again
    with pytest.raises(ImretError, match="study.k=1000 exceeds the gallery"):
        run_study(load_study(study_path, ["study.k=1000"]))


def fail(*args, **kwargs):
    raise RuntimeError("disk full")


def test_a_study_with_no_model_left_or_unbuilt_shards_under_launch_says_what_to_do(tmp_path, train_shards, offline,
                                                                                    monkeypatch):  # fmt: skip
    study = tmp_path / "study.yaml"
    study.write_text(f"data:\n  shards: {train_shards}\ncompare:\n  models:\n    imagenet: imagenet-resnet18\n")
    with pytest.raises(ImretError, match="no model left to compare: imagenet: .*could not be downloaded"):
        run_study(load_study(study))
    study.write_text(f"data:\n  shards: {tmp_path / 'new'}\n  source: {tmp_path / 'src'}\n  max_side: 64\n"
                     "compare:\n  models:\n    imagenet: imagenet-resnet18\n")  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ImretError, match=f"imret shards build {tmp_path / 'src'} --format folder .*--test-fraction 0.0 .* --max-side 64"):
        run_study(load_study(study))


def test_queries_come_from_a_held_out_test_split_and_a_row_can_embed_another_layer(tmp_path, synth_dir, offline):
    """A build with a test split: the queries are test images and the report says so. The same run is compared
    twice, once with the layer it declares and once with its head (as the triplet model's pooled control)."""
    from imret.data.shards import make_loader

    shards = tmp_path / "shards"
    build_shards(synth_dir, "folder", shards, val_fraction=0.2, test_fraction=0.2, samples_per_shard=20, workers=0)
    recipe = tmp_path / "cls.yaml"
    recipe.write_text(f"run:\n  name: cls\n  dir: {tmp_path / 'runs'}\ndata:\n  image_size: 32\n  load_size: 32\n"
                      "  batch_size_per_device: 16\n  workers: 0\nmodel:\n  backbone: small-cnn\n"
                      "train:\n  max_epochs: 1\n  steps_per_epoch: 2\nlog:\n  wandb_mode: disabled\n")  # fmt: skip
    study_path = tmp_path / "study.yaml"
    study_path.write_text(f"study:\n  out: {tmp_path / 'out'}\n  queries: 10\n  bootstrap_resamples: 100\n"
                          f"data:\n  shards: {shards}\ntrain:\n  recipes: [{recipe}]\n"
                          f"compare:\n  models:\n    classifier: {recipe}\n    classifier logits: {recipe}\n"
                          "embed:\n  layer:\n    classifier logits: head\n")  # fmt: skip
    report = run_study(load_study(study_path)).read_text()
    results = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    test_keys = {k for batch in make_loader(shards, "test", batch_size=8, size=32, training=False) for k in batch["key"]}
    assert results["query_split"] == "test" and set(results["query_keys"]) <= test_keys and len(test_keys) == 24
    assert "10 test images, a split held out from training and from model selection" in report
    models = results["models"]
    assert (models["classifier"]["layer"], models["classifier"]["dim"]) == ("pooled", 256)
    assert (models["classifier logits"]["layer"], models["classifier logits"]["dim"]) == ("head", 12)
    assert "| classifier logits | head 12-d |" in report
    study_path.write_text(study_path.read_text().replace("classifier logits: head", "classifer: head"))
    with pytest.raises(ImretError, match="embed.layer names 'classifer', which is not a row of compare.models"):
        load_study(study_path)


def test_an_empty_split_is_refused_before_embedding(tmp_path, synth_dir):
    shards = tmp_path / "no-val"
    build_shards(synth_dir, "folder", shards, val_fraction=0.001, workers=0)
    with pytest.raises(ImretError, match="the val split is empty"):
        embed("imagenet-resnet18", shards, "val", out=tmp_path / "e")
