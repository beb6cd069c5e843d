"""The key -> shard lookup of an index directory: where each image lies in its shards, found without a scan.

Built once from the tar headers (tarfile reads each member's header and seeks past its data), and stored as
two arrays that are memory-mapped when read, so a server holds no per-key Python object even at tens of
millions of keys:

  lookup/<split>.rows.npy   one record per row: key, shard number, and the image's and json's byte ranges
  lookup/<split>.hash.npy   (64-bit hash of the key, row), sorted by hash: a key is a binary search away
  lookup/<split>.json       the shard files, the manifest hash, the count and the arrays' sizes; written last

The gallery's lookup follows the embeddings' rows (a search result's row is its record); the val split's
lists every sample, for the examples a page offers. A key is found only when its hash is present and the
record's own key equals it: a request names a key, never a path, and only a byte range of a shard listed in
the lookup is ever read. All shard bytes are read through `open_shard`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from imret.data import storage
from imret.data.manifest import load_manifest, manifest_hash, write_json_atomic
from imret.data.shards import IMAGE_EXTS, decode_image
from imret.errors import DataError

FORMAT = 1
KEY_BYTES = 64  # imret's keys are at most 53 characters (sample_key); longer ones are refused when building
MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
ROW = np.dtype([("key", f"S{KEY_BYTES}"), ("shard", "<u4"), ("ext", "u1"), ("image_offset", "<u8"),
                ("image_size", "<u8"), ("json_offset", "<u8"), ("json_size", "<u8")])  # fmt: skip
HASHED = np.dtype([("hash", "<u8"), ("row", "<u8")])


def open_shard(location: str, name: str) -> IO[bytes]:
    """A shard of a shard location (a directory or a URL), open for seeking through its tar headers."""
    return storage.open_seekable(storage.join(location, name))


def read_range(location: str, name: str, offset: int, size: int) -> bytes:
    data = storage.read_range(storage.join(location, name), offset, size)
    if len(data) != size:
        raise DataError(f"shard {name} in {location}: {len(data)} of {size} bytes at {offset} (truncated since indexed?)")
    return data


def key_hash(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def scan_shard(location: str, name: str) -> Iterator[tuple[str, int, int, int, int, int]]:
    """(key, image extension index, image offset, image size, json offset, json size) of each sample that has
    an image, in tar order, from the headers alone."""
    current: dict[str, Any] = {}

    def sample() -> tuple[str, int, int, int, int, int] | None:
        if "image" not in current:
            return None
        json_range = current.get("json", (0, 0))
        return (current["key"], current["ext"], *current["image"], *json_range)

    with open_shard(location, name) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        for member in tar:
            if not member.isfile() or "." not in member.name:
                continue
            key, ext = member.name.split(".", 1)  # WebDataset's split: the key ends at the first dot
            if key != current.get("key"):
                if (done := sample()) is not None:
                    yield done
                current = {"key": key}
            ext = ext.lower()
            if ext in IMAGE_EXTS:
                current["image"], current["ext"] = (member.offset_data, member.size), IMAGE_EXTS.index(ext)
            elif ext == "json":
                current["json"] = (member.offset_data, member.size)
    if (done := sample()) is not None:
        yield done


def lookup_paths(directory: Path, split: str) -> tuple[Path, Path, Path]:
    base = directory / "lookup"
    return base / f"{split}.rows.npy", base / f"{split}.hash.npy", base / f"{split}.json"


def build_lookup(directory: Path, location: str, manifest: dict[str, Any], manifest_hash: str, split: str,
                 keys: list[str] | None = None) -> None:  # fmt: skip
    """The lookup of a split's shards under `directory`/lookup. With `keys` (the embeddings' keys, in manifest
    shard order and tar order, the samples that failed to decode left out), one record per key in that order;
    without, one per sample. The arrays are written under temporary names and renamed, the json last."""
    rows_path, hash_path, done_path = lookup_paths(directory, split)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    done_path.unlink(missing_ok=True)
    shards = [s["file"] for s in manifest["splits"][split]["shards"]]
    count = len(keys) if keys is not None else manifest["splits"][split]["samples"]
    tmp_rows = rows_path.with_name(f".{rows_path.name}.{os.getpid()}.tmp")
    tmp_hash = hash_path.with_name(f".{hash_path.name}.{os.getpid()}.tmp")
    try:
        rows = np.lib.format.open_memmap(tmp_rows, mode="w+", dtype=ROW, shape=(count,))
        filled = fill_rows(rows, location, shards, keys)
        if filled != count:
            raise DataError(f"{location}: {filled} samples of the {split} split found in its shards, {count} expected "
                            f"(the shards changed since they were embedded?)")  # fmt: skip
        hashes = np.empty(count, np.uint64)
        for start in range(0, count, 1 << 16):  # no list of every key's hash at once
            hashes[start : start + (1 << 16)] = [key_hash(key) for key in rows["key"][start : start + (1 << 16)]]
        order = np.argsort(hashes, kind="stable")  # by hash, then row: 5x faster than sorting the records
        hashed = np.empty(count, HASHED)
        hashed["hash"], hashed["row"] = hashes[order], order
        del hashes, order
        rows.flush()
        del rows
        with open(tmp_hash, "wb") as handle:
            np.save(handle, hashed)
        for tmp in (tmp_rows, tmp_hash):
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp_rows, rows_path)
        os.replace(tmp_hash, hash_path)
    finally:
        tmp_rows.unlink(missing_ok=True)
        tmp_hash.unlink(missing_ok=True)
    write_json_atomic(done_path, {"format": FORMAT, "split": split, "location": location, "shards": shards,
                                  "shards_manifest_hash": manifest_hash, "count": count,
                                  "bytes": {"rows": rows_path.stat().st_size, "hash": hash_path.stat().st_size}})  # fmt: skip


def fill_rows(rows: np.ndarray, location: str, shards: list[str], keys: list[str] | None) -> int:
    """Scan the shards in order into `rows`; returns how many were filled. With `keys`, a sample whose key is
    not the next expected one failed to decode when embedded and has no row."""
    filled = 0
    for shard_number, name in enumerate(shards):
        for key, ext, image_offset, image_size, json_offset, json_size in scan_shard(location, name):
            if keys is not None and (filled == len(keys) or keys[filled] != key):
                continue
            if filled == len(rows):
                raise DataError(f"shard {name} in {location}: more samples than the manifest counts")
            encoded = key.encode("utf-8")
            if len(encoded) > KEY_BYTES:
                raise DataError(f"shard {name}: key {key!r} is longer than the lookup's {KEY_BYTES} bytes")
            rows[filled] = (encoded, shard_number, ext, image_offset, image_size, json_offset, json_size)
            filled += 1
    return filled


def lookup_complete(directory: Path, split: str, manifest_hash: str, count: int | None) -> bool:
    """A finished lookup for these shards (and, for a gallery, this many rows), with arrays of the size it
    recorded: anything else is built again."""
    rows_path, hash_path, done_path = lookup_paths(directory, split)
    if not done_path.is_file():
        return False
    done = json.loads(done_path.read_text())
    sizes = {"rows": rows_path, "hash": hash_path}
    return (done.get("format") == FORMAT and done.get("shards_manifest_hash") == manifest_hash
            and (count is None or done.get("count") == count)
            and all(path.is_file() and path.stat().st_size == done["bytes"][name] for name, path in sizes.items()))  # fmt: skip


class Lookup:
    """A finished lookup, memory-mapped: key -> row, row -> key, and a row's image and json bytes."""

    def __init__(self, directory: Path, split: str, location: str):
        rows_path, hash_path, done_path = lookup_paths(directory, split)
        done = json.loads(done_path.read_text())
        self.location, self.shards = location, done["shards"]
        self.rows = np.load(rows_path, mmap_mode="r")
        # a strided view of the mapped records: binary-searched with bisect (a page per probe), since
        # np.searchsorted copies a non-contiguous array whole (400 MB at 50M keys) on every call
        hashed = np.load(hash_path, mmap_mode="r")
        self.hashes, self.hash_rows = hashed["hash"], hashed["row"]

    def __len__(self) -> int:
        return len(self.rows)

    def find(self, key: str) -> int | None:
        encoded = key.encode("utf-8", "replace")
        if len(encoded) > KEY_BYTES:
            return None
        wanted = key_hash(encoded)
        at = bisect.bisect_left(self.hashes, wanted)
        while at < len(self.hashes) and int(self.hashes[at]) == wanted:
            row = int(self.hash_rows[at])
            if self.rows["key"][row] == encoded:
                return row
            at += 1
        return None

    def key(self, row: int) -> str:
        return self.rows["key"][row].decode("utf-8")

    def image(self, row: int) -> tuple[bytes, str]:
        """The stored image's bytes and media type."""
        record = self.rows[row]
        data = read_range(self.location, self.shards[record["shard"]], int(record["image_offset"]), int(record["image_size"]))
        return data, MEDIA_TYPES[IMAGE_EXTS[record["ext"]]]

    def labels(self, row: int) -> list[int]:
        """The sample's label ids, from its json member."""
        record = self.rows[row]
        if not record["json_size"]:
            return []
        data = read_range(self.location, self.shards[record["shard"]], int(record["json_offset"]), int(record["json_size"]))
        return list(json.loads(data)["labels"])


def split_lookup(directory: Path, location: str, split: str) -> Lookup:
    """Every sample of a split of the shards at `location`, looked up through `directory`/lookup (built from
    the tar headers the first time, again when the shards change)."""
    manifest = load_manifest(location)
    current = manifest_hash(manifest)
    if not lookup_complete(directory, split, current, None):
        build_lookup(directory, location, manifest, current, split)
    return Lookup(directory, split, location)


def fetch_images(directory: Path, location: str, split: str, keys: set[str], size: int) -> dict[str, np.ndarray]:
    """Decoded images [size, size, 3] of those keys that are in the split, each read as one byte range of its
    shard (the report's example grids): no shard is scanned, nor downloaded whole from a bucket."""
    lookup = split_lookup(directory, location, split)
    found = {}
    for key in keys:
        row = lookup.find(key)
        if row is not None:
            data, _ = lookup.image(row)
            found[key] = decode_image(data, size).permute(1, 2, 0).numpy()
    return found
