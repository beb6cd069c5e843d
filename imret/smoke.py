"""`imret study RECIPE --debug`: every stage of the real study (shards, every training recipe, embedding, indexes,
scoring, report) at debug sizes, in a folder of its own, so a new dataset and machine are checked end to end in
minutes before a run of days. Its shards come from a seeded sample of the source, its runs, embeddings and report
sit under `<study.out>-debug/` (a real run never takes them for its own), and a training stage that needs
weights this machine lacks is reported and skipped, with every stage that depends on it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

from imret.config import Recipe
from imret.errors import ImretError

DEBUG_IMAGES = 240  # a seeded sample of the source: enough for every split to hold a few batches
DEBUG_SHARD = 16  # samples a shard: several shards a split, so the loaders' splitting is exercised too
DEBUG_TRAINING = ["data.image_size=64", "data.load_size=72", "data.batch_size_per_device=8", "data.workers=1",
                  "train.max_epochs=2", "train.steps_per_epoch=3", "train.early_stop_patience=2",
                  "checkpoint.every_n_steps=0", "log.wandb_mode=disabled", "log.every_n_steps=1"]  # fmt: skip


def debug_study(study, train_sets: Sequence[str]):
    """(the study at debug sizes, everything under `<study.out>-debug/`; the --train-set items followed by the debug
    runs' directory, which nothing may move out of that folder)."""
    if not study.data.source:
        raise ImretError(f"--debug builds its own shards from a sample of data.source, and {study.data.shards} names no "
                         f"source: set data.source (and data.format) in the study recipe")  # fmt: skip
    smoke = copy.deepcopy(study)
    root = Path(f"{study.study.out}-debug")
    smoke.study.out = str(root)
    smoke.study.bootstrap_resamples = 200
    smoke.data.shards = str(root / "shards")
    smoke.data.samples_per_shard = DEBUG_SHARD
    smoke.train.overrides = [*study.train.overrides, *DEBUG_TRAINING]
    smoke.embed.batch_size, smoke.embed.workers = 32, 1
    return smoke, [*train_sets, f"run.dir={root / 'runs'}"]


def missing_weights(recipe: Recipe, skipped: dict[str, str]) -> str | None:
    """Why a training recipe cannot start on this machine, or None: published weights it needs and the local
    caches lack (never downloaded in a smoke run), or another run it starts from that was skipped or is missing."""
    from imret.models import IMAGENET_URLS, PRETRAINED, TIMM_PREFIX, cached_timm_weights, imagenet_cache_path

    model = recipe.model
    if model.init == "run":
        if str(Path(model.weights)) in skipped:
            return f"it starts from {model.weights}, which was skipped ({skipped[str(Path(model.weights))]})"
        if not (Path(model.weights) / "model" / "meta.json").is_file():
            return f"it starts from {model.weights}, which has no exported model"
        return None
    if model.init not in PRETRAINED or model.weights:
        return None
    if model.backbone.startswith(TIMM_PREFIX):
        try:
            cached_timm_weights(model.backbone.removeprefix(TIMM_PREFIX))
        except ImretError as exc:
            return str(exc).split(";")[0]
        return None
    if model.backbone not in IMAGENET_URLS:
        return None  # no published weights: the training stage says so in its own line
    cached = imagenet_cache_path(model.backbone)
    return None if cached.is_file() else f"it needs {model.backbone}'s ImageNet weights, which are not in {cached}"
