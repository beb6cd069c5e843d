"""Batches on the device one step ahead: while step i computes, batch i+1 is copied from pinned memory (and,
with `data.decode: gpu`, decoded) on a side CUDA stream, so a step never waits for its own input's copy.
Off CUDA it only moves each batch to the device."""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator

import torch

from imret.data.device_decode import images_on_device


class DevicePrefetcher:
    """Iterates host batches as device batches: `image` uint8 [B,3,S,S] (decoded when it came as JPEG bytes),
    `mask` and `labels` on the device, `key` unchanged. `wait_s` adds up the time spent waiting for the
    loader, the part of a step that a faster input pipeline would remove."""

    def __init__(self, batches: Iterable[dict[str, Any]], device: torch.device, size: int):
        self.batches, self.device, self.size = batches, device, size
        self.wait_s = 0.0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        host = iter(self.batches)
        if self.device.type != "cuda":
            while (batch := self._next(host)) is not None:
                yield self.to_device(batch)
            return
        side = torch.cuda.Stream(self.device)
        ahead = self._stage(host, side)
        while ahead is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(side)
            for value in ahead.values():
                if isinstance(value, torch.Tensor):
                    value.record_stream(compute)  # allocated on the side stream, freed after the step's use
            yield ahead
            ahead = self._stage(host, side)  # the step's kernels are queued: fetch and copy the next meanwhile

    def _next(self, host: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        start = time.perf_counter()
        batch = next(host, None)
        self.wait_s += time.perf_counter() - start
        return batch

    def _stage(self, host: Iterator[dict[str, Any]], side: torch.cuda.Stream) -> dict[str, Any] | None:
        batch = self._next(host)
        if batch is None:
            return None
        with torch.cuda.stream(side):
            return self.to_device(batch)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {**batch, "image": images_on_device(batch, self.size, self.device)}
        for name in ("mask", "labels"):
            if name in batch:
                out[name] = batch[name].to(self.device, non_blocking=True)
        return out
