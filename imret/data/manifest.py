"""`manifest.json`: the proof that a shard directory is a finished build, and what is in it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from imret.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")  # test: optional, held out from training and model selection (--test-fraction)


def load_manifest(shard_dir: str | Path) -> dict[str, Any]:
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not path.is_file():
        hint = " (an unfinished or killed build: run `imret shards build` again)" if shard_dir.is_dir() else ""
        raise DataError(f"{shard_dir}: no {MANIFEST}, so not a finished shard build{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        version = manifest["format_version"]
        manifest["splits"].setdefault("test", {"samples": 0, "shards": []})  # builds before --test-fraction
        for split in SPLITS:
            for shard in manifest["splits"][split]["shards"]:
                shard["file"], shard["samples"], shard["bytes"], shard["sha256"]  # noqa: B018 (presence check)
        manifest["classes"], manifest["has_masks"]  # noqa: B018
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a valid imret manifest ({type(exc).__name__}: {exc})") from None
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {version}, this imret reads {FORMAT_VERSION}: rebuild the shards")
    return manifest


def manifest_hash(manifest: dict[str, Any]) -> str:
    """Identifies the data a model saw or a gallery holds: the shard checksums and the classes."""
    shards = {s: manifest["splits"][s]["shards"] for s in SPLITS if s != "test" or manifest["splits"][s]["shards"]}
    content = {"classes": manifest["classes"], "shards": shards}  # an empty test split: the hash of older builds
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, content: Any) -> None:
    """Write to a temporary name, flush to disk, then rename: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=1, ensure_ascii=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {path}: {exc.strerror}") from None
