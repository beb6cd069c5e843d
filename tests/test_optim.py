"""Optimisers and learning-rate schedules against hand-computed values."""

import math
import re

import pytest
import torch

from imret.config import OptimConfig, load_recipe
from imret.errors import RecipeError
from imret.optim import Schedule, effective_lr, make_optimizer


def params():
    return [torch.nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_each_optimiser_is_the_fused_one_with_the_recipes_settings(name, cls):
    optimizer = make_optimizer(params(), OptimConfig(name=name, momentum=0.8, nesterov=name == "sgd", weight_decay=0.01), 0.1)
    assert type(optimizer) is cls and optimizer.defaults["fused"] and optimizer.defaults["weight_decay"] == 0.01
    if name == "sgd":
        assert optimizer.defaults["momentum"] == 0.8 and optimizer.defaults["nesterov"]


def test_the_learning_rate_scales_linearly_with_the_global_batch():
    assert effective_lr(OptimConfig(lr=0.1), 1024) == 0.1
    assert effective_lr(OptimConfig(lr=0.1, scale_lr_with_batch=True, lr_reference_batch=256), 1024) == pytest.approx(0.4)


def rates(optim: OptimConfig, steps_per_epoch: list[int], validations: dict[int, float] | None = None) -> list[float]:
    """The rate before each optimiser step, validating at each epoch's end with the given losses."""
    optimizer = make_optimizer(params(), optim, optim.lr)
    schedule = Schedule(optimizer, optim, steps_per_epoch)
    seen = []
    for epoch, steps in enumerate(steps_per_epoch):
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        schedule.validated((validations or {}).get(epoch, 1.0))
    return seen


def test_warmup_then_cosine_by_hand():
    seen = rates(OptimConfig(lr=1.0, schedule="cosine", warmup_epochs=0.5), [4, 4])
    warm = [1 / 2, 2 / 2]  # two warm-up steps: (step + 1) / 2
    cosine = [0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(0, 6)]  # 6 steps from the base rate to 0
    assert seen == pytest.approx(warm + cosine)


def test_plateau_waits_for_the_warmup_and_then_divides_on_a_stall():
    optim = OptimConfig(lr=1.0, warmup_epochs=1.0, plateau_factor=0.5, plateau_patience=0)
    seen = rates(optim, [2, 2, 2, 2], validations={0: 1.0, 1: 0.5, 2: 0.9, 3: 0.9})
    # warm-up over epoch 0 (0.5, 1); epoch 1 improves (the first loss counted); epoch 2 stalls: halved for epoch 3
    assert seen == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5])


def test_onecycle_rises_over_the_warmup_and_falls_to_nearly_nothing():
    seen = rates(OptimConfig(lr=1.0, schedule="onecycle", warmup_epochs=1.0), [10, 10, 10])
    assert seen.index(max(seen)) == 9 and max(seen) == pytest.approx(1.0)  # PyTorch peaks at warm-up steps - 1
    assert seen[0] == pytest.approx(1.0 / 25) and seen[-1] < 1e-3


@pytest.mark.parametrize("text, expected", [
    ("optim:\n  nesterov: true\n", "optim.nesterov needs optim.name: sgd"),
    ("optim:\n  name: sgd\n  momentum: 0.0\n  nesterov: true\n", "with optim.momentum above 0"),
    ("optim:\n  warmup_epochs: 5.0\ntrain:\n  max_epochs: 5\n", "optim.warmup_epochs (5.0) must be below train.max_epochs"),
    ("optim:\n  name: lamb\n", "'lamb' is not one of adam, adamw, sgd"),
    ("optim:\n  schedule: cosin\n", "did you mean 'cosine'"),
])  # fmt: skip
def test_optimiser_settings_that_cannot_work_are_refused(tmp_path, text, expected):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=re.escape(expected)):
        load_recipe(path)
