"""Run under torchrun by test_train: trains a tiny recipe and writes how it ended; with `nan-on-rank-1` as
the mode, rank 1's loss is always NaN (rank 0's never is); with `no-norm`, the backbone is the BatchNorm-free
one of shard_tools (registered like any backbone), whose gradients average exactly across ranks. It ends the
way `imret` run as a command does."""

import json
import os
import sys
from pathlib import Path

from imret.cli import exit_without_teardown, release_process_group
from imret.config import load_recipe
from imret.tasks.multilabel import MultilabelTask
from imret.train import TrainingError, train

recipe_path, out, mode, *overrides = sys.argv[1:]
rank = int(os.environ["RANK"])
if mode == "no-norm":
    from shard_tools import register_no_norm_backbone

    register_no_norm_backbone()
if mode == "nan-on-rank-1" and rank == 1:
    original = MultilabelTask.train_loss

    def nan_loss(self, *args):
        loss, stats = original(self, *args)
        return loss * float("nan"), stats

    MultilabelTask.train_loss = nan_loss
try:
    train(load_recipe(recipe_path, overrides))
    result = {"ok": True}
except TrainingError as exc:
    result = {"ok": False, "error": str(exc)}
Path(out, f"rank{rank}.json").write_text(json.dumps(result))
release_process_group()
exit_without_teardown(0)
