"""Batches on the device one step ahead: while step i computes, batch i+1 is copied from pinned memory (and,
with `data.decode: gpu`, decoded) on a side CUDA stream, so a step never waits for its own input's copy.
Off CUDA it only moves each batch to the device. Used by training, validation and the embedding job."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

import torch

from imret.data.device_decode import images_on_device


class DevicePrefetcher:
    """Iterates host batches as device batches: `image` uint8 [B,3,S,S] (decoded when it came as JPEG bytes) and
    the tensors named in `copy` on the device, everything else unchanged. `wait_s` adds up the time the consumer
    waited for its next batch (the loader, and the decoding on the device, which waits for the side stream):
    the part of a step that a faster input pipeline would remove."""

    def __init__(self, batches: Iterable[dict[str, Any]], device: torch.device, size: int,
                 copy: tuple[str, ...] = ("mask", "labels")):  # fmt: skip
        self.batches, self.device, self.size, self.copy = batches, device, size, copy
        self.wait_s = 0.0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        host = iter(self.batches)
        if self.device.type != "cuda":
            while (batch := self._timed(lambda: self._next_on_device(host))) is not None:
                yield batch
            return
        side = torch.cuda.Stream(self.device)
        ahead = self._stage(host, side)
        while ahead is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(side)
            for value in ahead.values():  # what the side stream allocated is freed only after the step's use;
                if isinstance(value, torch.Tensor) and value.is_cuda:  # tensors not copied stay on the host
                    value.record_stream(compute)
            yield ahead
            ahead = self._stage(host, side)  # the step's kernels are queued: fetch and copy the next meanwhile

    def _timed(self, fetch: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        start = time.perf_counter()
        batch = fetch()
        self.wait_s += time.perf_counter() - start
        return batch

    def _next_on_device(self, host: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        batch = next(host, None)
        return None if batch is None else self.to_device(batch)

    def _stage(self, host: Iterator[dict[str, Any]], side: torch.cuda.Stream) -> dict[str, Any] | None:
        with torch.cuda.stream(side):
            return self._timed(lambda: self._next_on_device(host))

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {**batch, "image": images_on_device(batch, self.size, self.device)}
        for name in self.copy:
            if name in batch:
                out[name] = batch[name].to(self.device, non_blocking=True)
        return out
