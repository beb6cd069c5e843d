"""The process group of a launched command (torchrun, accelerate launch, SLURM through either), made by imret
before accelerate would make it, on a store whose keys carry the launch's restart attempt.

torchrun's c10d rendezvous shares one TCPStore server across every attempt of a job (made once by node 0's agent,
unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), and torch.distributed.rendezvous connects the ranks to it without a
per-attempt prefix (its comment assumes a new store per retry; torch 2.14's dynamic_rendezvous.py reuses the
server). The keys a process group writes there (each rank's gloo address, NCCL's unique id) therefore do not name
the attempt: after `--max-restarts` restarts the job, a new rank can read what a dead rank of the previous attempt
wrote before its new peer has overwritten it, and the group fails to form ("Gloo connectFullMesh failed ...
Connection refused"): seen in 1 of 3 restarts of a 2-rank run whose rank 1 was killed during a checkpoint.
Prefixing every key with the attempt (TORCHELASTIC_RESTART_COUNT) gives each attempt its own keys.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_process_group(timeout: timedelta, cpu: bool) -> None:
    """Under a launcher with several processes (WORLD_SIZE > 1) and no group yet: the group accelerate would make
    (gloo for CPU ranks, NCCL for GPUs), on the launcher's store with this attempt's prefix. Accelerate then takes
    the group as it is. Elsewhere nothing happens."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    backend = "gloo" if cpu or not torch.cuda.is_available() else "nccl"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend, store=dist.PrefixStore(f"imret/attempt-{attempt}", store), rank=rank,
                            world_size=world, timeout=timeout)  # fmt: skip
