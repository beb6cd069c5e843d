"""What the training loop keeps on the device, so that a step never waits for the host: running sums of the
loss and the task's statistics, read back once per log interval, and the all-ranks skip of an optimiser step
whose loss was not finite somewhere: one small all-reduce per optimiser step, and the fused optimiser skips
the update on the device (`found_inf`, the protocol PyTorch's GradScaler uses), so nobody reads the loss.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import gather_object

from imret.errors import ImretError

log = logging.getLogger("imret.train")


class TrainingError(ImretError):
    pass


class RunningStats:
    """Per-name sums and counts of finite values since the last read; tensors stay on their device."""

    def __init__(self):
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, Any] = {}

    def add(self, values: dict[str, torch.Tensor | float]) -> None:
        for name, value in values.items():
            value = torch.as_tensor(value).detach().float()
            finite = torch.isfinite(value)
            self.sums[name] = self.sums.get(name, 0.0) + torch.where(finite, value, torch.zeros_like(value))
            self.counts[name] = self.counts.get(name, 0) + finite.float()

    def read(self) -> dict[str, float]:
        """The mean of each name since the last read (NaN when it had no finite value): one device-to-host copy."""
        names = list(self.sums)
        if not names:
            return {}
        by_device: dict[torch.device, list[str]] = {}
        for name in names:
            by_device.setdefault(self.sums[name].device, []).append(name)
        means: dict[str, float] = {}
        for group in by_device.values():
            sums = torch.stack([self.sums[name] for name in group])
            counts = torch.stack([self.counts[name] for name in group])
            means.update(zip(group, (sums / counts).tolist()))
        self.sums, self.counts = {}, {}
        return {name: means[name] for name in names}


class NonfiniteGuard:
    """A loss that is not finite on any rank, anywhere in an accumulation window, skips that optimiser step on
    every rank. Each rank's window flag is all-reduced (max) at the window's end and handed to the fused
    optimiser as `found_inf`; with fp16's loss scaler (which sets `found_inf` itself) the flag is read on the
    host instead. `check` reads the flags of the log interval: it names the batch keys of skipped steps and
    stops every rank, with the same message, after `max_in_row` skipped optimiser steps in a row."""

    def __init__(self, device: torch.device, world: int, device_skip: bool, max_in_row: int):
        self.device, self.world, self.device_skip, self.max_in_row = device, world, device_skip, max_in_row
        self.window_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.local: list[torch.Tensor] = []  # per step: this rank's loss was not finite
        self.keys: list[list[str]] = []  # per step: its batch keys, to name them
        self.skipped: list[torch.Tensor] = []  # per optimiser step: skipped on every rank
        self.closed = 0  # how many of `local` belong to windows that have stepped

    def observe(self, loss: torch.Tensor, keys: list[str]) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.window_bad = self.window_bad | bad
        self.local.append(bad)
        self.keys.append(list(keys))

    def step(self, optimizer) -> None:
        """The optimiser step of a window's end (a prepared accelerate optimizer), skipped where flagged."""
        skip = self.window_bad.float()
        if self.world > 1:
            dist.all_reduce(skip, op=dist.ReduceOp.MAX)
        if self.device_skip:
            optimizer.optimizer.found_inf = skip
            try:
                optimizer.step()
            finally:
                del optimizer.optimizer.found_inf
        elif not skip.item():
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.skipped.append(skip > 0)
        self.closed = len(self.local)
        self.window_bad = torch.zeros((), dtype=torch.bool, device=self.device)

    def check(self, rank: int, progress) -> None:
        """Read the flags of the optimiser steps since the last check (an open accumulation window waits for its
        step); update progress.nonfinite_in_row/total; warn or stop."""
        closed = self.closed
        skipped = torch.stack(self.skipped).tolist() if self.skipped else []
        local = torch.stack(self.local[:closed]).tolist() if closed else []
        bad_keys = [key for bad, keys in zip(local, self.keys[:closed]) if bad for key in keys][-8:]
        self.local, self.keys, self.skipped, self.closed = self.local[closed:], self.keys[closed:], [], 0
        longest = 0
        for flag in skipped:
            progress.nonfinite_in_row = progress.nonfinite_in_row + 1 if flag else 0
            progress.nonfinite_total += flag
            longest = max(longest, progress.nonfinite_in_row)
        if not any(skipped):
            return
        reports = gather_object([(rank, bad_keys)])  # every rank read the same flags, so every rank is here
        where = "; ".join(f"rank {r}: {', '.join(keys)}" for r, keys in reports if keys)
        if longest >= self.max_in_row:
            raise TrainingError(f"non-finite loss for {longest} optimiser steps in a row "
                                f"(train.max_nonfinite_steps); last batch keys on {where}")  # fmt: skip
        if rank == 0:
            log.warning("non-finite loss: %d optimiser step(s) skipped on every rank up to step %d (%d in a row); "
                        "batch keys on %s", sum(skipped), progress.global_step, progress.nonfinite_in_row, where)  # fmt: skip
