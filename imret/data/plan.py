"""Which record goes into which shard, decided before any image is read, the same for every build engine.

A split's records, in the split's fixed order (a seeded hash of each id: the order carries no trace of file names
or classes, so consecutive shards are alike), are numbered 0, 1, 2, ...; record i goes to shard i // N. An image
that later fails to encode leaves its shard one sample short instead of moving every later boundary, so a shard's
contents never depend on another shard's, and any engine, any retry, any resumed run writes the same shards.

The listing streams past twice and the planner never holds the records: the first pass keeps each record's
16-byte hash (the split's order) and 8-byte key hash (two records whose keys collide: the later one is refused),
from which every record's split, shard and slot follow; the second pass writes each record to a spool file on
local disk, a few shards a file, and the plans are read back one spool file at a time, in shard order. About 40
bytes a record while planning (2 GB for 50 million), and one spool file's records at a time after.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from imret.data.manifest import SPLITS
from imret.data.sources import Record, Source
from imret.errors import DataError

SPOOL_FILES = 256  # at most this many spool files, each the records of about n_shards / SPOOL_FILES shards


@dataclass
class Rejected:
    id: str
    source: str
    reason: str


@dataclass
class ShardPlan:
    split: str
    index: int
    records: list[Record]
    fingerprint: str = ""  # what the shard is made of and how: a finished shard with another fingerprint is stale

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


@dataclass
class Plan:
    """The listing's rejects, and how many records each split's shards get, before the plans stream."""

    rejected: list[Rejected] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # records planned per split
    samples_per_shard: int = 1000

    def shards(self, split: str) -> int:
        return math.ceil(self.counts.get(split, 0) / self.samples_per_shard)

    def names(self) -> list[str]:
        return [shard_name(split, i) for split in SPLITS for i in range(self.shards(split))]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(sample_id: str) -> str:
    """Dot-free ASCII (WebDataset splits keys at the first dot), readable, and unique through the hash."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", sample_id).strip("_")[:40] or "id"
    return f"{slug}-{hashlib.sha1(sample_id.encode('utf-8')).hexdigest()[:12]}"


def order_hash(sample_id: str, seed: int) -> tuple[int, int]:
    """The split's order: the first 16 bytes of sha256(seed, id), as two integers (sorting them sorts the digests)."""
    digest = hashlib.sha256(f"{seed}\0{sample_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:16], "big")


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Records per split: the first round(n x val) of the order go to val, the next round(n x test) to test."""
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


class ShardPlanner:
    """Plans a source's shards in two passes over its listing; `plan()` returns the Plan (rejects and counts), then
    `shard_plans()` yields each shard's records, in SPLITS order and shard order."""

    def __init__(self, source: Source, val_fraction: float, test_fraction: float, seed: int, samples_per_shard: int,
                 settings: dict[str, Any], limit: int | None = None):  # fmt: skip
        """limit: plan only the first `limit` records of the order (a seeded sample of the source, for a smoke run)."""
        self.source, self.seed, self.n, self.limit = source, seed, samples_per_shard, limit
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.settings = settings  # the build's settings: part of every shard's fingerprint
        self.spool = tempfile.TemporaryDirectory(prefix="imret-plan-")

    def plan(self) -> Plan:
        plan = Plan(samples_per_shard=self.n)
        high, low, keys = array("Q"), array("Q"), array("Q")  # 8 bytes each, not a Python int
        for record in self.source.records():
            if record.problem:
                plan.rejected.append(Rejected(record.id, record.source, record.problem))
                continue
            high_hash, low_hash = order_hash(record.id, self.seed)
            high.append(high_hash)
            low.append(low_hash)
            keys.append(int.from_bytes(hashlib.sha1(sample_key(record.id).encode()).digest()[:8], "big"))
        order = np.lexsort((np.frombuffer(low, dtype=np.uint64), np.frombuffer(high, dtype=np.uint64)))  # by the digest
        del high, low
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        planned = len(order) if self.limit is None else min(self.limit, len(order))
        sizes = split_sizes(planned, self.val_fraction, self.test_fraction)
        bounds = {"val": (0, sizes["val"]), "test": (sizes["val"], sizes["val"] + sizes["test"]),
                  "train": (sizes["val"] + sizes["test"], planned)}  # fmt: skip
        split_code = np.full(len(order), -1, dtype=np.int8)  # -1: beyond the limit, not planned
        for code, split in enumerate(SPLITS):
            lo, hi = bounds[split]
            split_code[order[lo:hi]] = code
        kept = self._unique_keys(np.frombuffer(keys, dtype=np.uint64), split_code, rank)
        # slot of each kept record within its split, in the split's order
        self.slot = np.full(len(order), -1, dtype=np.int64)
        for code, split in enumerate(SPLITS):
            lo, hi = bounds[split]
            members = order[lo:hi][kept[order[lo:hi]]]
            self.slot[members] = np.arange(len(members))
            plan.counts[split] = len(members)
        self.split_code = split_code
        self.collisions = ~kept
        self.plan_ = plan
        return plan

    def _unique_keys(self, keys: np.ndarray, split_code: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """Whether each record keeps its key: of records whose keys collide, the first in split order keeps it."""
        kept = np.ones(len(keys), dtype=bool)
        unique, counts = np.unique(keys, return_counts=True)
        for key in unique[counts > 1]:
            clashing = np.flatnonzero((keys == key) & (split_code >= 0))  # among the planned records
            if len(clashing) < 2:
                continue
            first = min(clashing, key=lambda i: (split_code[i], rank[i]))
            kept[clashing[clashing != first]] = False
        return kept

    def shard_plans(self) -> Iterator[ShardPlan]:
        """Second pass: each kept record to its shard's spool file; then the shards, one spool file at a time."""
        plan = self.plan_
        starts = np.cumsum([0] + [plan.shards(split) for split in SPLITS])
        per_file = max(1, math.ceil(starts[-1] / SPOOL_FILES))
        spool = Path(self.spool.name)
        handles: dict[int, Any] = {}
        candidate = 0
        try:
            for record in self.source.records():
                if record.problem:
                    continue
                j, candidate = candidate, candidate + 1
                if j >= len(self.slot):
                    raise DataError(f"{self.source.location}: the listing changed while the build was planned")
                if self.collisions[j] and self.split_code[j] >= 0:
                    plan.rejected.append(Rejected(record.id, record.source, f"key collision on {sample_key(record.id)}"))
                    continue
                code, slot = int(self.split_code[j]), int(self.slot[j])
                if code < 0:  # beyond the limit
                    continue
                shard = int(starts[code]) + slot // self.n
                handle = handles.get(shard // per_file)
                if handle is None:
                    handle = handles[shard // per_file] = open(spool / f"{shard // per_file:05d}.jsonl", "a", encoding="utf-8")
                handle.write(json.dumps([shard, slot % self.n, asdict(record)]) + "\n")
        finally:
            for handle in handles.values():
                handle.close()
        if candidate != len(self.slot):
            raise DataError(f"{self.source.location}: the listing changed while the build was planned")
        for number in range(math.ceil(starts[-1] / per_file)):
            path = spool / f"{number:05d}.jsonl"
            entries: dict[int, list[tuple[int, Record]]] = {}
            if path.is_file():
                with open(path, encoding="utf-8") as handle:
                    for line in handle:
                        shard, offset, fields = json.loads(line)
                        entries.setdefault(shard, []).append((offset, Record(**fields)))
                path.unlink()
            for shard in range(number * per_file, min((number + 1) * per_file, int(starts[-1]))):
                code = int(np.searchsorted(starts, shard, side="right")) - 1
                records = [record for _, record in sorted(entries.get(shard, []), key=lambda entry: entry[0])]
                yield self._plan_of(SPLITS[code], shard - int(starts[code]), records)
        self.spool.cleanup()

    def _plan_of(self, split: str, index: int, records: list[Record]) -> ShardPlan:
        described = json.dumps([self.settings, split, index, [[r.id, r.source, r.image] for r in records]], sort_keys=True)
        return ShardPlan(split, index, records, hashlib.sha256(described.encode()).hexdigest()[:20])
