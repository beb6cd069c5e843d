"""Sample keys at any count: one key a line in `<name>.txt` and the byte offset of each line in
`<name>.offsets.npy`, so the i-th key is one seek away and nothing holds 50 million Python strings."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np


class KeyWriter:
    """Appends keys to a temporary text file and their end offsets to a temporary raw file, so memory does not
    grow with the count; `close` writes the offsets as a .npy, syncs both to disk and renames them into place,
    offsets last (`KeyFile` checks the text's size against the offsets)."""

    def __init__(self, base: Path):
        self.base = base
        self.text_tmp = base.with_name(f".{base.name}.txt.tmp")
        self.raw_tmp = base.with_name(f".{base.name}.offsets.raw.tmp")
        self.handle, self.raw = open(self.text_tmp, "wb"), open(self.raw_tmp, "wb+")
        self.position, self.count = 0, 0

    def add(self, keys: Iterable[str]) -> None:
        encoded = [f"{key}\n".encode() for key in keys]
        if not encoded:
            return
        self.handle.write(b"".join(encoded))
        ends = self.position + np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self.raw.write(ends.tobytes())
        self.position, self.count = int(ends[-1]), self.count + len(encoded)

    def close(self) -> int:
        """Finish the files; returns the number of keys."""
        offsets_tmp = self.base.with_name(f".{self.base.name}.offsets.tmp.npy")
        with open(offsets_tmp, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": "<i8", "fortran_order": False,
                                                          "shape": (self.count + 1,)})  # fmt: skip
            handle.write(np.zeros(1, "<i8").tobytes())
            self.raw.seek(0)
            for block in iter(lambda: self.raw.read(1 << 24), b""):
                handle.write(block)
            for done in (handle, self.handle):
                done.flush()
                os.fsync(done.fileno())
        self.handle.close()
        self.raw.close()
        os.unlink(self.raw_tmp)
        os.replace(self.text_tmp, text_path(self.base))
        os.replace(offsets_tmp, offsets_path(self.base))
        return self.count


def text_path(base: Path) -> Path:
    return base.with_name(f"{base.name}.txt")


def offsets_path(base: Path) -> Path:
    return base.with_name(f"{base.name}.offsets.npy")


class KeyFile(Sequence):
    """The keys as a read-only sequence: len, indexing, iteration; the offsets are memory-mapped."""

    def __init__(self, base: Path):
        self.path = text_path(base)
        self.offsets = np.load(offsets_path(base), mmap_mode="r")
        size = int(self.offsets[-1])
        if self.path.stat().st_size != size:
            raise ValueError(f"{self.path}: {self.path.stat().st_size} bytes, its offsets say {size}")
        self.text = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.text[start : stop - 1].tobytes().decode()

    def __iter__(self) -> Iterator[str]:
        with open(self.path, "rb") as handle:
            for line in handle:
                yield line[:-1].decode()

    def digest(self) -> str:
        """sha256 of the key file: two galleries hold the same samples in the same order when these agree."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
