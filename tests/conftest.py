"""Shared fixtures: tiny datasets drawn in the test session, never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

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
