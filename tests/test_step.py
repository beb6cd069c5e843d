"""The training step never waits for the host: tasks' losses and statistics stay on the device, non-finite
steps are skipped on the device, and the loop's host reads do not grow with the number of steps."""

import math

import numpy as np
import pytest
import torch

from conftest import tiny_recipe_overrides
from imret.config import load_recipe
from imret.losses import triplet_loss
from imret.step import NonfiniteGuard, RunningStats
from imret.tasks import make_task
from imret.train import train

TASKS = {"multilabel": [], "rotation": ["task.name=rotation"], "segmentation": ["task.name=segmentation"],
         "triplet-batch-hard": ["task.name=triplet"],
         "triplet-semi-hard": ["task.name=triplet", "task.mining=semi_hard"]}  # fmt: skip


def tiny(tmp_path, shards, extra=()):
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    return load_recipe(path, tiny_recipe_overrides(shards, tmp_path / "runs") + list(extra))


@pytest.mark.parametrize("task_name", TASKS)
def test_each_tasks_training_loss_compiles_as_one_graph(tmp_path, train_shards, task_name):
    """fullgraph=True refuses any host read-back (`float(t)`, `.item()`, boolean indexing): none in the step."""
    backbone = ["model.backbone=resnet18"] if task_name == "segmentation" else []
    recipe = tiny(tmp_path, train_shards, TASKS[task_name] + backbone)
    task = make_task(recipe, [f"c{i}" for i in range(4)])
    model = task.build_model()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=gen)
    masks = (torch.rand(8, 1, 32, 32, generator=gen) > 0.5).float()
    labels = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]] * 2, dtype=torch.float32)
    loss, stats = torch.compile(task.train_loss, fullgraph=True, backend="eager")(model, images, masks, labels, 0)
    assert loss.requires_grad and torch.isfinite(loss)
    assert all(isinstance(v, (torch.Tensor, float)) for v in stats.values())


def brute_force_triplets(emb, labels, margin, pos_iou, neg_iou, mining):
    """A plain loop over every (anchor, positive, negative): the reference for the masked tensor version."""
    emb, labels = emb.numpy().astype(np.float64), labels.numpy().astype(bool)
    n = len(emb)
    dist = np.sqrt(((emb[:, None] - emb[None]) ** 2).sum(-1))
    iou = np.array([[(labels[i] & labels[j]).sum() / max(1, (labels[i] | labels[j]).sum()) for j in range(n)] for i in range(n)])
    hinges = []
    for a in range(n):
        pos = [p for p in range(n) if p != a and iou[a, p] >= pos_iou]
        neg = [q for q in range(n) if q != a and iou[a, q] <= neg_iou]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            hinges.append(max(0.0, max(dist[a, pos]) - min(dist[a, neg]) + margin))
            continue
        for p in pos:
            semi = [dist[a, q] for q in neg if dist[a, p] < dist[a, q] < dist[a, p] + margin]
            d_neg = min(semi) if semi else max(dist[a, neg])
            hinges.append(max(0.0, dist[a, p] - d_neg + margin))
    return (float(np.mean(hinges)) if hinges else 0.0), len(hinges)


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_loss_equals_a_brute_force_loop(mining, seed):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(12, 4, generator=gen), dim=1)
    labels = (torch.rand(12, 5, generator=gen) > 0.6).float()
    loss, stats = triplet_loss(emb, labels, 0.3, 0.5, 0.0, mining)
    expected, count = brute_force_triplets(emb, labels, 0.3, 0.5, 0.0, mining)
    assert int(stats["triplets"]) == count and count > 0
    assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_running_stats_are_means_of_the_finite_values():
    stats = RunningStats()
    values = [1.0, float("nan"), 3.0, float("inf"), 5.0]
    for value in values:
        stats.add({"loss": torch.tensor(value), "margin": 0.5})
    stats.add({"rare": torch.tensor(float("nan"))})
    means = stats.read()
    assert means["loss"] == pytest.approx(3.0) and means["margin"] == 0.5 and math.isnan(means["rare"])
    assert stats.read() == {}  # a read starts the next interval


class Prepared:  # what accelerate's AcceleratedOptimizer exposes to the guard
    def __init__(self, inner):
        self.optimizer = inner

    def step(self):
        self.optimizer.step()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def adam_pair():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, Prepared(torch.optim.Adam(model.parameters(), lr=0.1, fused=True))


def test_a_non_finite_window_is_skipped_on_the_device_and_a_finite_one_steps():
    model, optimizer = adam_pair()
    guard = NonfiniteGuard(torch.device("cpu"), world=1, device_skip=True, max_in_row=3)
    before = [p.detach().clone() for p in model.parameters()]
    for scale in (1.0, float("nan")):  # one window of two steps, the second not finite
        loss = model(torch.ones(3, 4)).sum() * scale
        guard.observe(loss, ["k"])
        loss.backward()
    guard.step(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(int(s["step"]) == 0 for s in optimizer.optimizer.state.values())  # Adam's step count unchanged

    reference = torch.nn.Linear(4, 2)
    reference.load_state_dict(model.state_dict())
    plain = torch.optim.Adam(reference.parameters(), lr=0.1)
    for net, step in ((model, lambda: (guard.observe(loss, ["k"]), guard.step(optimizer))), (reference, plain.step)):
        loss = net(torch.ones(3, 4)).sum()
        loss.backward()
        step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(reference.parameters(), model.parameters()))


def test_a_skipped_first_sgd_step_leaves_momentum_that_the_next_step_can_use():
    """Fused SGD would keep the uninitialised buffers of a first step skipped on the device."""
    from imret.config import OptimConfig
    from imret.optim import make_optimizer, zero_momentum

    model, _ = adam_pair()
    reference = torch.nn.Linear(4, 2)
    reference.load_state_dict(model.state_dict())
    optimizer = make_optimizer(model.parameters(), OptimConfig(name="sgd", momentum=0.9, nesterov=True), 0.1)
    zero_momentum(optimizer)
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    guard = NonfiniteGuard(torch.device("cpu"), world=1, device_skip=True, max_in_row=3)
    for scale in (float("nan"), 1.0, 1.0):
        loss = model(torch.ones(3, 4)).sum() * scale
        guard.observe(loss, ["k"])
        loss.backward()
        guard.step(Prepared(optimizer))
    for _ in range(2):
        reference(torch.ones(3, 4)).sum().backward()
        plain.step()
        plain.zero_grad()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(reference.parameters(), model.parameters()))


def test_skipped_steps_in_a_row_stop_with_the_batch_keys():
    from imret.train import Progress, TrainingError

    model, optimizer = adam_pair()
    guard = NonfiniteGuard(torch.device("cpu"), world=1, device_skip=True, max_in_row=2)
    progress = Progress()
    for keys, scale in ((["a"], 1.0), (["b"], float("nan")), (["c"], 1.0)):
        loss = model(torch.ones(1, 4)).sum() * scale
        guard.observe(loss, keys)
        loss.backward()
        guard.step(optimizer)
    guard.check(0, progress)
    assert (progress.nonfinite_in_row, progress.nonfinite_total) == (0, 1)
    for keys in (["d"], ["e"]):
        loss = model(torch.ones(1, 4)).sum() * float("inf")
        guard.observe(loss, keys)
        loss.backward()
        guard.step(optimizer)
    with pytest.raises(TrainingError, match=r"for 2 optimiser steps in a row .* rank 0: d, e"):
        guard.check(0, progress)


def test_a_check_inside_an_accumulation_window_keeps_its_keys_for_the_step(caplog):
    from imret.train import Progress

    model, optimizer = adam_pair()
    guard = NonfiniteGuard(torch.device("cpu"), world=1, device_skip=True, max_in_row=3)
    progress = Progress()
    loss = model(torch.ones(1, 4)).sum() * float("nan")
    guard.observe(loss, ["open"])  # the window's first step; its optimiser step comes after the check
    loss.backward()
    guard.check(0, progress)
    assert progress.nonfinite_total == 0
    loss = model(torch.ones(1, 4)).sum()
    guard.observe(loss, ["closing"])
    loss.backward()
    guard.step(optimizer)
    with caplog.at_level("WARNING"):
        guard.check(0, progress)
    assert progress.nonfinite_total == 1 and "rank 0: open" in caplog.text and "closing" not in caplog.text


def count_host_reads(monkeypatch) -> list[str]:
    """Record every Python-level read of a tensor's value (the calls that make a GPU step wait)."""
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return reads


@pytest.mark.parametrize("task_extra", [[], ["task.name=rotation"], ["task.name=triplet", "task.mining=semi_hard"]])
def test_host_reads_do_not_grow_with_the_number_of_steps(tmp_path, train_shards, monkeypatch, task_extra):
    """One epoch of 3 steps and one of 9, logging once at the epoch's end: the same number of host reads."""
    reads = count_host_reads(monkeypatch)
    counts = []
    for steps in (3, 9):
        before = len(reads)
        train(tiny(tmp_path, train_shards, [*task_extra, f"run.name=s{steps}", "train.max_epochs=1",
                                            f"train.steps_per_epoch={steps}", "log.every_n_steps=1000"]))  # fmt: skip
        counts.append(len(reads) - before)
    assert counts[0] == counts[1], f"{counts[1] - counts[0]} more host reads for 6 more steps"
