"""Run under torchrun by test_train: for each loss named on the command line, a one-step metric-learning run
whose first validation (the untrained model, rank 0's weights on every rank) test_train compares with one
process's. It ends the way `imret` run as a command does."""

import sys

from imret.cli import exit_without_teardown, release_process_group
from imret.config import load_recipe
from imret.train import train

recipe_path, losses, *overrides = sys.argv[1:]
for name in losses.split(","):
    train(load_recipe(recipe_path, [*overrides, f"loss.name={name}", f"run.name=two-{name}"]))
release_process_group()
exit_without_teardown(0)
