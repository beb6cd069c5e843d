"""The streaming loader: shards -> fixed-size uint8 tensors, split by rank then by worker.

Per epoch the shard order is a permutation drawn from (seed, epoch), the same on every rank; rank r takes
every world-th shard of it and worker w every workers-th shard of those (our explicit node and worker
splitters). Each rank then runs the same number of steps, computed from the manifest's counts before the
epoch starts, so DDP never waits on a rank that ran dry; a sample is read at most once per epoch.
Validation reads every sample exactly once across ranks, in manifest order, and has no step count to agree on.
Only the extensions imret writes are read from a tar; anything else (a pickle, say) is never even loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import tarfile
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from imret.data.manifest import CheckedStream, Shard, load_manifest, shard_files
from imret.errors import DataError

log = logging.getLogger("imret.data")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
READ_EXTS = frozenset(IMAGE_EXTS + ("json", "mask.png"))


class BadSample(ValueError):
    pass


def _wanted(fname: str) -> bool:
    return fname.split(".", 1)[-1].lower() in READ_EXTS


def decode_image(data: bytes, size: int) -> torch.Tensor:
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        img.draft("RGB", (size, size))  # DCT-domain downscale: decode at 1/2, 1/4 or 1/8 when that is enough
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def decode_mask(data: bytes, size: int) -> torch.Tensor:
    img = Image.open(io.BytesIO(data)).convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(img) > 127).astype(np.uint8))[None]


def jpeg_bytes(data: bytes) -> torch.Tensor | None:
    """The JPEG's bytes as a 1-d uint8 tensor for decoding on the device, or None when the data is not a JPEG
    (a PNG stored as .jpg, say) or is one nvJPEG does not turn into RGB (CMYK, YCCK: imret's shard build re-encodes
    those, other writers may not). Only the header is parsed: a damaged one is caught here, in the worker."""
    header = Image.open(io.BytesIO(data))
    if header.format != "JPEG" or header.mode not in ("RGB", "L"):
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_sample(sample: dict[str, Any], size: int, num_classes: int, with_masks: bool,
                  keep_jpeg: bool = False) -> dict[str, Any]:  # fmt: skip
    """keep_jpeg (data.decode: gpu): a JPEG stays encoded, a 1-d uint8 tensor that the device decodes."""
    image_ext = next((ext for ext in IMAGE_EXTS if ext in sample), None)
    if image_ext is None or "json" not in sample:
        raise BadSample(f"has no {'image' if image_ext is None else 'json'} member")
    meta = json.loads(sample["json"])
    labels = torch.zeros(num_classes, dtype=torch.float32)
    ids = meta["labels"]
    if any(not isinstance(i, int) or not 0 <= i < num_classes for i in ids):
        raise BadSample(f"label ids {ids} outside 0..{num_classes - 1}")
    labels[ids] = 1.0
    image = jpeg_bytes(sample[image_ext]) if keep_jpeg and image_ext in ("jpg", "jpeg") else None
    if image is None:
        image = decode_image(sample[image_ext], size)
    out = {"image": image, "labels": labels, "key": sample["__key__"]}
    if with_masks:
        if "mask.png" not in sample:
            raise BadSample("has no mask")
        out["mask"] = decode_mask(sample["mask.png"], size)
    return out


def read_shard(shard: Shard) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard, checked against the manifest as they stream (size at open, sha256 and count at
    the end); a truncated or altered shard is an error naming it, never a silent short read."""
    count = 0
    try:
        with CheckedStream(shard) as stream:
            members = tar_file_expander([{"url": shard.location, "stream": stream}], select_files=_wanted)
            for sample in group_by_keys(members):
                count += 1
                yield sample
            stream.finish()
    except DataError as exc:  # webdataset appends the stream and the URL to an error raised while it reads
        raise DataError(str(exc.args[0]).split(" @ ")[0]) from None
    except (tarfile.TarError, OSError, ValueError) as exc:
        reason = str(exc.args[0] if exc.args else exc).split(" @ ")[0]
        raise DataError(f"shard {shard.location}: truncated or corrupt after {count} samples ({reason})") from None
    if count != shard.samples:
        raise DataError(f"shard {shard.location}: {count} samples, the manifest says {shard.samples}")


def shuffled(samples: Iterator[Any], buffer: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle buffer: keeps `buffer` samples and emits a random one per new arrival."""
    pool: list[Any] = []
    for sample in samples:
        if len(pool) < buffer:
            pool.append(sample)
            continue
        index = rng.randrange(buffer)
        yield pool[index]
        pool[index] = sample
    rng.shuffle(pool)
    yield from pool


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class ShardStream(IterableDataset):
    """Decoded samples of one split for one rank; each DataLoader worker reads its own shards."""

    def __init__(self, location: str | Path, split: str, *, size: int, rank: int, world: int, workers: int,
                 training: bool, seed: int = 0, shuffle_buffer: int = 0, with_masks: bool = False,
                 max_bad_fraction: float = 0.0, keep_jpeg: bool = False):  # fmt: skip
        self.manifest = load_manifest(location)
        self.shards = shard_files(location, self.manifest, split)
        self.split, self.size, self.rank, self.world = split, size, rank, world
        self.workers, self.training, self.seed = max(1, workers), training, seed
        self.shuffle_buffer, self.with_masks, self.max_bad_fraction = shuffle_buffer, with_masks, max_bad_fraction
        self.keep_jpeg = keep_jpeg
        self.num_classes = len(self.manifest["classes"])
        # shared memory: persistent loader workers hold their own copy of this object and read the epoch here
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(value)

    def assignment(self, epoch: int) -> list[list[list[Shard]]]:
        """[rank][worker] -> shards: a seeded permutation per epoch when training, manifest order otherwise."""
        order = list(self.shards)
        if self.training:
            random.Random(_seed(self.seed, epoch)).shuffle(order)
        per_rank = [order[r :: self.world] for r in range(self.world)]
        return [[shards[w :: self.workers] for w in range(self.workers)] for shards in per_rank]

    def allowed_bad(self, samples: int) -> int:
        return math.floor(self.max_bad_fraction * samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        shards = self.assignment(self.epoch)[self.rank][worker]
        allowed = self.allowed_bad(sum(shard.samples for shard in shards))
        samples = self._decoded(shards, allowed)
        if self.training and self.shuffle_buffer > 1:
            samples = shuffled(samples, self.shuffle_buffer, random.Random(_seed(self.seed, self.epoch, self.rank, worker)))
        return samples

    def _decoded(self, shards: list[Shard], allowed: int) -> Iterator[dict[str, Any]]:
        return decoded_samples(shards, self.size, self.num_classes, self.with_masks, allowed, self.max_bad_fraction,
                               self.keep_jpeg)  # fmt: skip


def decoded_samples(shards: list[Shard], size: int, num_classes: int, with_masks: bool,
                    allowed_bad: int, max_bad_fraction: float, keep_jpeg: bool = False) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Decoded samples of the shards in order; corrupt ones skipped and counted."""
    bad = 0
    for shard in shards:
        for raw in read_shard(shard):
            try:
                yield decode_sample(raw, size, num_classes, with_masks, keep_jpeg)
            except (BadSample, OSError, ValueError, KeyError, TypeError, UnidentifiedImageError) as exc:
                bad += 1
                log.warning("skipping corrupt sample %s in %s: %s", raw.get("__key__"), shard.location.name, exc)
                if bad > allowed_bad:
                    raise DataError(
                        f"{bad} corrupt samples in this worker's shards, more than data.max_bad_fraction "
                        f"({max_bad_fraction}) allows; last: {raw.get('__key__')} in {shard.location}: {exc}"
                    ) from None


class ShardBatches(IterableDataset):
    """Every decodable sample of the given shards, in order, as batches that never span two shards; the last
    batch of a shard says so (`last`), so the embedding job can write a shard's part the moment it is done.
    Use it with `DataLoader(batch_size=None)`; worker w decodes shards w, w + workers, ..."""

    def __init__(self, shards: list[Shard], size: int, num_classes: int, batch_size: int,
                 keep_jpeg: bool = False):  # fmt: skip
        self.shards, self.size, self.num_classes, self.batch_size = shards, size, num_classes, batch_size
        self.keep_jpeg = keep_jpeg

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in range(worker, len(self.shards), workers):
            samples = decoded_samples([self.shards[index]], self.size, self.num_classes, False, self.shards[index].samples,
                                      1.0, self.keep_jpeg)  # fmt: skip
            batch = list(islice(samples, self.batch_size))
            while True:
                following = list(islice(samples, self.batch_size))
                yield self.collate(batch, index, last=not following)
                if not following:
                    break
                batch = following

    def collate(self, samples: list[dict[str, Any]], shard: int, last: bool) -> dict[str, Any]:
        if not samples:  # a shard whose every sample failed to decode still reports that it is done
            return {"shard": shard, "last": last, "key": [], "image": torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8),
                    "labels": torch.zeros(0, self.num_classes)}  # fmt: skip
        return {"shard": shard, "last": last, **collate_samples(samples)}


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch; when some images are still JPEG bytes (data.decode: gpu), the images stay a list."""
    images = [s["image"] for s in samples]
    batch = {"image": torch.stack(images) if all(image.dim() == 3 for image in images) else images,
             "labels": torch.stack([s["labels"] for s in samples]), "key": [s["key"] for s in samples]}  # fmt: skip
    if "mask" in samples[0]:
        batch["mask"] = torch.stack([s["mask"] for s in samples])
    return batch


class ShardLoader:
    """A DataLoader over a ShardStream that knows its number of batches before the epoch starts.

    Training: every rank runs `len(loader)` steps, the same on all ranks: per worker, the batches it can
    fill even after skipping the most corrupt samples it is allowed; then the smallest total over ranks.
    """

    def __init__(self, stream: ShardStream, batch_size: int, workers: int, pin_memory: bool = False):
        self.stream, self.batch_size = stream, batch_size
        if stream.training:
            if len(stream.shards) < stream.world:
                raise DataError(
                    f"the {stream.split} split has {len(stream.shards)} shards for {stream.world} ranks: a rank "
                    f"without shards would hang DDP; rebuild with a smaller --samples-per-shard"
                )
            usable = len(stream.shards) // stream.world
            if workers > usable:
                log.warning("%d %s shards per rank feed only %d of %d loader workers: using %d (a smaller "
                            "--samples-per-shard gives more shards)", usable, stream.split, usable, workers, usable)  # fmt: skip
                workers = stream.workers = usable
        self.loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=stream.training,
                                 collate_fn=collate_samples, pin_memory=pin_memory,
                                 prefetch_factor=4 if workers else None, persistent_workers=workers > 0,
                                 generator=torch.Generator())  # leaves the global RNG alone: resumed runs replay it  # fmt: skip
        if stream.training and len(self) == 0:
            raise DataError(f"the {stream.split} split gives no full batch of {batch_size} on some rank: "
                            f"lower data.batch_size_per_device or use fewer ranks")  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch

    def __len__(self) -> int:
        return self.batches_in_epoch(self.stream.epoch)

    def batches_in_epoch(self, epoch: int) -> int:
        """The batches of an epoch, known before it starts (a learning-rate schedule plans with them)."""
        per_rank = []
        for workers in self.stream.assignment(epoch):
            if self.stream.training:
                counts = [sum(shard.samples for shard in shards) for shards in workers]
                per_rank.append(sum((n - self.stream.allowed_bad(n)) // self.batch_size for n in counts))
            else:
                per_rank.append(sum(math.ceil(sum(shard.samples for shard in shards) / self.batch_size) for shards in workers))
        return min(per_rank) if self.stream.training else per_rank[self.stream.rank]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return islice(iter(self.loader), len(self))


def make_loader(location: str | Path, split: str, *, batch_size: int, size: int, training: bool, rank: int = 0,
                world: int = 1, workers: int = 0, seed: int = 0, shuffle_buffer: int = 0,
                with_masks: bool = False, max_bad_fraction: float = 0.0, pin_memory: bool = False,
                decode: str = "cpu") -> ShardLoader:  # fmt: skip
    """location: a local shard directory or a URL (imret.data.storage). decode: "cpu" decodes images in the
    workers; "gpu" hands JPEGs over as bytes (imret.data.device_decode)."""
    stream = ShardStream(location, split, size=size, rank=rank, world=world, workers=workers, training=training,
                         seed=seed, shuffle_buffer=shuffle_buffer, with_masks=with_masks,
                         max_bad_fraction=max_bad_fraction, keep_jpeg=decode == "gpu")  # fmt: skip
    if with_masks and not stream.manifest["has_masks"]:
        raise DataError(f"{location}: masks were asked for, and these shards have none")
    return ShardLoader(stream, batch_size, workers, pin_memory)
