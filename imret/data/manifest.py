"""`manifest.json`: the proof that a shard location is a finished build, what is in it, and the check that each
shard read is the one it lists."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

from imret.data import storage
from imret.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")  # test: optional, held out from training and model selection (--test-fraction)
BLOCK = 1 << 20


def load_manifest(location: str | Path) -> dict[str, Any]:
    """The manifest of a finished build in a local directory or at a URL."""
    path = storage.join(location, MANIFEST)
    try:
        text = storage.read_text(path)
    except storage.NotFound:
        hint = " (an unfinished or killed build: run `imret shards build` again)" if storage.exists(location) else ""
        raise DataError(f"{location}: no {MANIFEST}, so not a finished shard build{hint}") from None
    try:
        manifest = json.loads(text)
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


class Shard(NamedTuple):
    """One shard of a build: where it is, and what the manifest promises about it."""

    location: storage.Location
    samples: int
    bytes: int
    sha256: str


def shard_files(location: str | Path, manifest: dict[str, Any], split: str) -> list[Shard]:
    """The shards of a split, in manifest order."""
    return [Shard(storage.join(location, s["file"]), int(s["samples"]), int(s["bytes"]), s["sha256"])
            for s in manifest["splits"][split]["shards"]]  # fmt: skip


class CheckedStream:
    """A shard's bytes as they stream, hashed on the way, so the manifest's promise is checked in the same pass
    that reads them: the size when the shard is opened, the sha256 at `finish`."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.stream = storage.Reader(shard.location)
        self.digest, self.count = hashlib.sha256(), 0
        if self.stream.size is not None and self.stream.size != shard.bytes:
            self.stream.close()
            raise DataError(f"shard {shard.location}: {self.stream.size} bytes, the manifest says {shard.bytes} "
                            f"(truncated or replaced?)")  # fmt: skip

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        self.count += len(data)
        return data

    def finish(self) -> None:
        """Read what the reader left (a tar reader stops at the end-of-archive marker), then compare."""
        while self.read(BLOCK):
            pass
        if self.count != self.shard.bytes:
            raise DataError(f"shard {self.shard.location}: {self.count} bytes read, the manifest says {self.shard.bytes} "
                            f"(truncated or replaced?)")  # fmt: skip
        if self.digest.hexdigest() != self.shard.sha256:
            raise DataError(f"shard {self.shard.location}: sha256 differs from the manifest")

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> CheckedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def manifest_hash(manifest: dict[str, Any]) -> str:
    """Identifies the data a model saw or a gallery holds: the shard checksums and the classes."""
    shards = {s: manifest["splits"][s]["shards"] for s in SPLITS if s != "test" or manifest["splits"][s]["shards"]}
    content = {"classes": manifest["classes"], "shards": shards}  # an empty test split: the hash of older builds
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, content: Any) -> None:
    """Write to a temporary name, flush to disk, then rename: a reader sees the old file or the whole new one."""
    storage.write_text(path, json.dumps(content, indent=1, ensure_ascii=False))
