"""Facts about the machine this process runs on."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on: under SLURM, taskset or a container's cpuset that is fewer than
    the machine has, and sizing worker pools by the machine would oversubscribe them."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def native_bf16() -> bool:
    """Whether the current CUDA GPU computes in bf16 in hardware (Ampere, compute capability 8.0, or newer).
    torch.cuda.is_bf16_supported() also says yes on Volta and Turing, which emulate bf16 far slower than float32."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
