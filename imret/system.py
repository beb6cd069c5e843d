"""Facts about the machine this process runs on."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on: under SLURM, taskset or a container's cpuset that is fewer than
    the machine has, and sizing worker pools by the machine would oversubscribe them."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
