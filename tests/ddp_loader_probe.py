"""Run by test_loader under torchrun: each rank reads two training epochs and the validation split, and
writes what it saw. The ranks meet in a collective after every epoch, as a DDP trainer would."""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from imret.data.shards import make_loader

shards, out = sys.argv[1], Path(sys.argv[2])
state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator reads it
report = {"backend": dist.get_backend(), "world": state.num_processes, "train": {}}
loader = make_loader(shards, "train", batch_size=4, size=32, training=True, rank=state.process_index,
                     world=state.num_processes, workers=2, shuffle_buffer=16)
for epoch in range(2):
    loader.set_epoch(epoch)
    keys = [key for batch in loader for key in batch["key"]]
    report["train"][epoch] = {"steps": len(loader), "keys": keys}
    state.wait_for_everyone()
val = make_loader(shards, "val", batch_size=4, size=32, training=False, rank=state.process_index,
                  world=state.num_processes, workers=2)
report["val"] = [key for batch in val for key in batch["key"]]
(out / f"rank{state.process_index}.json").write_text(json.dumps(report))
state.wait_for_everyone()
state.destroy_process_group()
