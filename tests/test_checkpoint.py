import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from imret import checkpoint


def make(directory, step, keep=2):
    stage = checkpoint.staging_dir(directory, step)
    stage.mkdir(parents=True)
    checkpoint.write_rank_rng(stage, 0)
    return checkpoint.finish_checkpoint(directory, stage, {"step": step}, step, keep)


def test_only_complete_checkpoints_are_loaded(tmp_path):
    make(tmp_path, 5)
    killed_before_rename = checkpoint.staging_dir(tmp_path, 9)
    killed_before_rename.mkdir()
    torch.save({"step": 9}, killed_before_rename / "state.pt")
    no_marker = tmp_path / "step-000000012"  # renamed by hand, or a foreign copy: no COMPLETE marker
    no_marker.mkdir()
    torch.save({"step": 12}, no_marker / "state.pt")
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert latest.name == "step-000000005"
    state, rng = checkpoint.load_checkpoint(latest, 0)
    assert state == {"step": 5} and rng is not None


def test_keeps_the_newest_and_deletes_only_after_the_new_one_is_complete(tmp_path):
    for step in (1, 2, 3, 4):
        make(tmp_path, step, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-000000003", "step-000000004"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_rng_states_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = checkpoint.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    checkpoint.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_saving_a_step_again_never_leaves_a_marked_gutted_checkpoint(tmp_path, monkeypatch):
    make(tmp_path, 5)
    real_rmtree = shutil.rmtree

    def killed_while_deleting_a_checkpoint(path, *args, **kwargs):
        if Path(path).is_dir() and Path(path).name.lstrip(".").startswith(("step-", "old-step-")):
            (Path(path) / "state.pt").unlink()
            raise KeyboardInterrupt  # the process dies half-way through the delete
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting_a_checkpoint)
    stage = checkpoint.staging_dir(tmp_path, 5)  # step 5 again, as after a resume from it
    stage.mkdir()
    checkpoint.write_rank_rng(stage, 0)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.finish_checkpoint(tmp_path, stage, {"step": 5, "again": True}, 5, keep=2)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    state, _ = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path), 0)
    assert state == {"step": 5, "again": True}  # the old copy went aside in one rename before any delete
    make(tmp_path, 7)
    assert not list(tmp_path.glob(".old-step-*"))
