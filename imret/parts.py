"""Part files of a sharded job onto rank 0's disk, for machines that share none.

Each rank of `imret embed` writes one part file per shard it embedded; rank 0 merges them all. On a disk every
rank shares, rank 0 already sees every part and nothing moves. Otherwise each part rank 0 lacks comes from a
rank that has it, over the process group, one part at a time (memory: one part), and is written under a
temporary name and renamed, so a merge never reads half a part.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import gather_object

from imret.errors import ImretError


def collect_parts(part_paths: list[Path], state: PartialState) -> None:
    """Run on every rank, after every rank wrote its parts and before rank 0 merges `part_paths`."""
    if state.num_processes == 1:
        return
    missing = [[i for i, path in enumerate(part_paths) if not path.is_file()] if state.is_main_process else None]
    dist.broadcast_object_list(missing, src=0)
    held = gather_object([[i for i in missing[0] if part_paths[i].is_file()]])  # every rank gets every list
    owner: dict[int, int] = {}
    for rank, indices in enumerate(held):
        for index in indices:
            owner.setdefault(index, rank)
    lost = [part_paths[i].name for i in missing[0] if i not in owner]
    if lost:  # every rank draws the same conclusion, so none waits on a transfer that never comes
        raise ImretError(f"{part_paths[0].parent}: no rank holds the parts {', '.join(lost[:5])}; run imret embed again")
    for index in missing[0]:
        path = part_paths[index]
        if state.process_index == owner[index]:
            dist.send_object_list([path.read_bytes()], dst=0)
        elif state.is_main_process:
            received: list[bytes | None] = [None]
            dist.recv_object_list(received, src=owner[index])
            tmp = path.with_name(f".{path.stem}.received.tmp")
            tmp.write_bytes(received[0])
            os.replace(tmp, path)
