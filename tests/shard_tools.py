"""Helpers that tamper with a built shard directory, keeping or breaking its manifest on purpose, and a
backbone without BatchNorm for the tests that need ranks to average gradients exactly."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Callable

from imret.data.manifest import sha256_file


def copy_build(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_shard(shard_dir: Path, name: str, edit: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]) -> None:
    """Replace the members of one shard by edit(members), then update the manifest to match, so the
    loader meets the change at read time rather than at the size check."""
    path = shard_dir / name
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    members = edit(members)
    with tarfile.open(path, "w") as tar:
        for member_name, payload in members:
            info = tarfile.TarInfo(member_name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    sync_manifest(shard_dir, name, samples=len({m.split(".", 1)[0] for m, _ in members}))


def sync_manifest(shard_dir: Path, name: str, samples: int | None = None) -> None:
    manifest_path = shard_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if shard["file"] == name:
                shard["bytes"] = (shard_dir / name).stat().st_size
                shard["sha256"] = sha256_file(shard_dir / name)
                if samples is not None:
                    split["samples"] += samples - shard["samples"]
                    shard["samples"] = samples
    manifest_path.write_text(json.dumps(manifest))


def register_no_norm_backbone() -> None:
    """A conv, a ReLU and pooling: no BatchNorm, whose batch statistics would differ between one rank at batch
    2B and two ranks at batch B. Registered in the open backbone registry as "no-norm"."""
    from torch import nn

    from imret.models import BACKBONES

    def no_norm():
        trunk = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return trunk, 8

    BACKBONES["no-norm"] = no_norm
