"""Run by test_loader under torchrun: each rank reads two training epochs and the validation split. After each
epoch every rank gathers what all ranks read and checks, itself, that every training sample came exactly once
except the documented remainder: each worker's last incomplete batch, and the batches past the step count of
the rank with the fewest (every rank stops there). Each rank writes what it saw and its verdicts."""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env

from imret.data.shards import make_loader

BATCH = 4
shards, out = sys.argv[1], Path(sys.argv[2])
state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator reads it
report = {"backend": dist.get_backend(), "world": state.num_processes, "train": {}}
everything = [key for batch in make_loader(shards, "train", batch_size=BATCH, size=32, training=False) for key in batch["key"]]
loader = make_loader(shards, "train", batch_size=BATCH, size=32, training=True, rank=state.process_index,
                     world=state.num_processes, workers=2, shuffle_buffer=16)
for epoch in range(2):
    loader.set_epoch(epoch)
    keys = [key for batch in loader for key in batch["key"]]
    seen = [key for rank_keys in gather_object([keys]) for key in rank_keys]
    full = [sum(sum(s.samples for s in shards) // BATCH for shards in workers) for workers in loader.stream.assignment(epoch)]
    remainder = sum(sum(s.samples for s in shards) % BATCH for workers in loader.stream.assignment(epoch) for shards in workers)
    remainder += sum(batches - min(full) for batches in full) * BATCH
    report["train"][epoch] = {"steps": len(loader), "keys": keys, "seen_once": len(seen) == len(set(seen)),
                              "all_from_train": set(seen) <= set(everything),
                              "unseen_is_the_remainder": len(everything) - len(seen) == remainder, "remainder": remainder}  # fmt: skip
val = make_loader(shards, "val", batch_size=BATCH, size=32, training=False, rank=state.process_index,
                  world=state.num_processes, workers=2)
report["val"] = [key for batch in val for key in batch["key"]]
(out / f"rank{state.process_index}.json").write_text(json.dumps(report))
state.wait_for_everyone()
state.destroy_process_group()
