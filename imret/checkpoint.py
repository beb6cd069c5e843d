"""Resumable training state, written so that only complete checkpoints are ever loaded.

A checkpoint is a directory `checkpoints/step-<global step>/` holding `state.pt` (model, optimiser, scheduler,
scaler, progress; written by rank 0), `rng-rank<r>.pt` (each rank's RNG states) and, last, `COMPLETE`. It is
assembled under a temporary name and renamed once complete; older ones are deleted only after that, keeping
the newest `keep`. Multi-node runs need the run directory on a shared filesystem.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imret.errors import ImretError, writing

MARKER = "COMPLETE"
NAME = re.compile(r"step-(\d{9})")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached": cached}}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Anything without the marker (a killed write) is ignored."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if NAME.fullmatch(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def latest_checkpoint(directory: Path) -> Path | None:
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def staging_dir(directory: Path, step: int) -> Path:
    return directory / f".tmp-step-{step:09d}"


def save_file(obj: Any, path: Path) -> None:
    """torch.save through a Python file, synced to disk: torch's own file writer reports a full disk as an opaque
    RuntimeError; through a file it is an OSError, which becomes one line with the space free and needed."""
    with writing(path, state_bytes(obj), cleanup=lambda: path.unlink(missing_ok=True)):
        with open(path, "wb") as handle:
            try:
                torch.save(obj, handle)
            except RuntimeError as exc:  # the zip writer's closing step fails after the write did: that is the cause
                if isinstance(exc.__context__, OSError):
                    raise exc.__context__ from None
                raise
            handle.flush()
            os.fsync(handle.fileno())


def state_bytes(obj: Any) -> int:
    """About what torch.save writes for `obj`: the bytes of its tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(value) for value in obj)
    return 0


def write_rank_rng(stage: Path, rank: int) -> None:
    save_file(rng_state(), stage / f"rng-rank{rank}.pt")


def finish_checkpoint(directory: Path, stage: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    """Rank 0, after every rank wrote its RNG file into `stage`: write the state, the marker, rename, prune. A write
    that fails (a full disk) removes the stage, so the checkpoints before it stay the newest complete ones."""
    try:
        save_file(state, stage / "state.pt")
        with writing(stage / MARKER):
            (stage / MARKER).write_text(f"{step}\n")
            _fsync_file(stage / MARKER)
    except ImretError:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    final = directory / f"step-{step:09d}"
    if final.exists():  # the same step saved again after a resume: retire the old one in one rename, since
        retired = directory / f".old-step-{step:09d}"  # a kill during rmtree could leave a marked, gutted one
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
    os.replace(stage, final)
    for old in complete_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*directory.glob(".tmp-step-*"), *directory.glob(".old-step-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state, this rank's RNG state or None when the run had fewer ranks)."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    rng_path = path / f"rng-rank{rank}.pt"
    rng = torch.load(rng_path, map_location="cpu", weights_only=True) if rng_path.is_file() else None
    return state, rng
