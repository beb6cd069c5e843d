"""Run under torchrun by test_gpu_paths: two ranks on one GPU. NCCL refuses two ranks on one device, so the
process group is made with gloo before imret's Accelerator, which then takes it as it is; each rank writes the
device it trained on. It ends the way `imret` run as a command does."""

import json
import os
import sys
from pathlib import Path

from accelerate import PartialState

from imret.cli import exit_without_teardown, release_process_group
from imret.config import load_recipe
from imret.train import train

recipe_path, out, *overrides = sys.argv[1:]
state = PartialState(backend="gloo")
train(load_recipe(recipe_path, overrides))
Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps({"device": str(state.device)}))
release_process_group()
exit_without_teardown(0)
