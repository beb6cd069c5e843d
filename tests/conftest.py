"""Shared fixtures: tiny datasets drawn in the test session, never downloaded, and a local S3 service."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import seaweed
from imret.data.build import build_shards
from imret.data.synth import write_synth


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    return write_synth(tmp_path_factory.mktemp("synth") / "data", images=120, size=48, seed=3)


@pytest.fixture(scope="session")
def synth_shards(synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "synth"
    build_shards(synth_dir, "folder", out, val_fraction=0.25, samples_per_shard=10, workers=0)
    return out


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> Path:
    """Enough 32 px scenes for a few real optimisation steps per epoch."""
    data = write_synth(tmp_path_factory.mktemp("synth32") / "data", images=800, size=32, seed=5)
    out = tmp_path_factory.mktemp("shards32") / "synth"
    build_shards(data, "folder", out, val_fraction=0.2, samples_per_shard=40, workers=0)
    return out


def tiny_recipe_overrides(shards: Path, run_dir: Path, name: str = "t") -> list[str]:
    """A CPU-sized recipe: 32 px, the small CNN, two short epochs, no W&B."""
    return [f"data.shards={shards}", "data.image_size=32", "data.load_size=32", "data.batch_size_per_device=32",
            "data.workers=0", "data.shuffle_buffer=64", "model.backbone=small-cnn", "optim.lr=0.001",
            "train.max_epochs=2", "log.wandb_mode=disabled", "log.every_n_steps=1", f"run.dir={run_dir}",
            f"run.name={name}"]


@pytest.fixture(scope="session")
def shards_without_masks(synth_dir, tmp_path_factory) -> Path:
    import shutil

    data = tmp_path_factory.mktemp("nomask") / "data"
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("masks"))
    out = data.parent / "shards"
    build_shards(data, "folder", out, workers=0, samples_per_shard=40)
    return out


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A SeaweedFS S3 service for the session, its bucket, and the standard AWS_* variables pointing at it (seen by
    this process and every process it starts): yields the bucket's URL, s3://imret-test."""
    weed = seaweed.start()
    try:
        seaweed.make_bucket(weed, "imret-test")
        with pytest.MonkeyPatch.context() as env:
            for name in [k for k in os.environ if k.startswith("AWS_")]:
                env.delenv(name)
            for name, value in weed.env.items():
                env.setenv(name, value)
            missing = tmp_path_factory.mktemp("aws") / "none"  # nothing from ~/.aws or an instance's metadata
            env.setenv("AWS_CONFIG_FILE", str(missing))
            env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
            env.setenv("AWS_EC2_METADATA_DISABLED", "true")
            yield "s3://imret-test"
    finally:
        seaweed.stop(weed)
