"""The optimiser and its learning-rate schedule, from the recipe's `optim` section (timm's and torchvision's
reference scripts are the anchors): Adam, AdamW or SGD with momentum (optionally Nesterov), all fused; a
plateau, cosine or one-cycle schedule after a linear warm-up; and, when asked, the rate scaled linearly with the
global batch, so that a recipe means the same on 1 GPU and on 8.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from imret.config import OptimConfig, Recipe


def effective_lr(optim: OptimConfig, global_batch: int) -> float:
    """optim.lr, or with scale_lr_with_batch, optim.lr x global batch / optim.lr_reference_batch (linear scaling)."""
    return optim.lr * global_batch / optim.lr_reference_batch if optim.scale_lr_with_batch else optim.lr


def make_optimizer(params, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """Fused: one kernel for the whole update, and it takes the all-ranks skip flag on the device (imret.step).
    `params` may be parameter groups, each with its own rate (and weight decay)."""
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=optim.weight_decay, fused=True)
    if optim.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov,
                           weight_decay=optim.weight_decay, fused=True)  # fmt: skip


def param_groups(model: torch.nn.Module, recipe: Recipe, lr: float) -> list[dict[str, Any]]:
    """The optimiser's parameter groups, the recipe's rate first (the rate the run logs): one group when nothing
    differs (checkpoints of earlier runs hold one); else the heads at `lr`, the trunk (a U-Net's encoder) at
    lr x optim.trunk_lr_scale, for a timm trunk with optim.layer_decay one group a layer at lr x trunk_lr_scale x
    layer_decay^(layers above it) (timm's param_groups_layer_decay, which also exempts norms and biases from weight
    decay), and the proxies of a proxy loss at lr x loss.proxy_lr_scale."""
    optim = recipe.optim
    from imret.models import RetrievalNet

    trunk = model.trunk if isinstance(model, RetrievalNet) else model.unet.encoder
    proxies = getattr(model, "proxies", None)
    proxy_scale = recipe.loss.proxy_lr_scale if proxies is not None else 1.0
    if optim.trunk_lr_scale == 1.0 and optim.layer_decay is None and proxy_scale == 1.0:
        return [{"params": list(model.parameters()), "lr": lr}]
    separate = {id(p) for p in trunk.parameters()} | {id(p) for p in (proxies.parameters() if proxies is not None else [])}
    groups = [{"params": [p for p in model.parameters() if id(p) not in separate], "lr": lr}]
    if optim.layer_decay is not None:
        from timm.optim import param_groups_layer_decay

        exempt = trunk.no_weight_decay() if hasattr(trunk, "no_weight_decay") else ()
        for group in param_groups_layer_decay(trunk, weight_decay=optim.weight_decay, no_weight_decay_list=exempt,
                                              layer_decay=optim.layer_decay):  # fmt: skip
            groups.append({"params": group["params"], "weight_decay": group["weight_decay"],
                           "lr": lr * optim.trunk_lr_scale * group["lr_scale"]})  # fmt: skip
    else:
        groups.append({"params": list(trunk.parameters()), "lr": lr * optim.trunk_lr_scale})
    if proxies is not None:
        groups.append({"params": list(proxies.parameters()), "lr": lr * proxy_scale})
    return [group for group in groups if group["params"]]


def zero_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Momentum buffers of zeros for fused SGD, made once the parameters are on their device. Fused SGD makes them
    uninitialised on its first step and fills them in the kernel, which a skipped step (found_inf) leaves early:
    the next steps would build on garbage. From zeros, a first step's buffer is the gradient (momentum x 0 +
    gradient, no dampening), just what SGD's first step sets."""
    for group in optimizer.param_groups:
        if group.get("fused") and group.get("momentum", 0) > 0:
            for param in group["params"]:
                optimizer.state[param].setdefault("momentum_buffer", torch.zeros_like(param))


class Schedule:
    """The learning rate at every optimiser step (`step`, after each one) and after each validation
    (`validated`). The first round(warmup_epochs x steps of the first epoch) optimiser steps rise linearly to the
    base rate; then
      plateau:  the rate is multiplied by plateau_factor whenever the validation loss has not improved for
                plateau_patience epochs (the study's schedule);
      cosine:   half a cosine from the base rate to 0 at the last optimiser step of max_epochs;
      onecycle: PyTorch's OneCycleLR (its warm-up phase is warmup_epochs, or 30% when that is 0).
    `steps_per_epoch` holds every epoch's optimiser steps, known from the shard manifest before training."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, steps_per_epoch: list[int]):
        self.name, self.optimizer = optim.schedule, optimizer
        self.total = max(1, sum(steps_per_epoch))
        self.warmup = min(round(optim.warmup_epochs * steps_per_epoch[0]), self.total - 1)
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.steps = 0
        if self.name == "plateau":
            self.inner: Any = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=optim.plateau_factor, patience=optim.plateau_patience)
            self._set(self.warmed(0))
        elif self.name == "cosine":
            self.inner = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.cosine(step))
        else:
            self.inner = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=self.base, total_steps=self.total,
                pct_start=self.warmup / self.total if self.warmup else 0.3)  # fmt: skip

    def warmed(self, step: int) -> float:
        """The warm-up's factor at an optimiser step: (step + 1) / warmup during it, 1 after."""
        return min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0

    def cosine(self, step: int) -> float:
        if step < self.warmup:
            return self.warmed(step)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _set(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * factor

    def step(self) -> None:
        self.steps += 1
        if self.name != "plateau":
            if self.steps < self.total:  # OneCycleLR refuses a step past its last
                self.inner.step()
        elif self.steps <= self.warmup:
            self._set(self.warmed(self.steps))

    def validated(self, loss: float) -> None:
        if self.name == "plateau" and self.steps >= self.warmup:
            self.inner.step(loss)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "inner" not in state:  # checkpoints before optim.schedule held the plateau scheduler's state alone
            state = {"name": "plateau", "steps": self.warmup, "inner": state}
        self.steps = state["steps"]
        self.inner.load_state_dict(state["inner"])
