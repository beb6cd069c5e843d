"""`imret shards build|verify|info`: a source dataset becomes WebDataset tar shards and a manifest.

Every image is decoded here, once, so training never meets a file it cannot read: what fails is listed in
the manifest's `rejected` with its reason and the rest of the build goes on. Shards are written to a
temporary name and published when complete (renamed into a local directory, uploaded to a URL from a local
temporary directory); `manifest.json` is written last, so a location without one is never taken for a
finished build.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from imret.data import storage
from imret.data.manifest import (
    FORMAT_VERSION, MANIFEST, SPLITS, CheckedStream, load_manifest, sha256_file, shard_files,
)  # fmt: skip
from imret.data.sources import Record, read_source
from imret.errors import DataError
from imret.system import usable_cores

# EXIF orientation -> the transpose that displays the image upright (as PIL.ImageOps.exif_transpose does)
ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # fmt: skip
STORED_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class Encoded:
    id: str
    source: str
    image: bytes
    image_ext: str
    labels: list[int]
    width: int
    height: int
    mask_png: bytes | None


@dataclass
class Rejected:
    id: str
    source: str
    reason: str


def sample_key(sample_id: str) -> str:
    """Dot-free ASCII (WebDataset splits keys at the first dot), readable, and unique through the hash."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", sample_id).strip("_")[:40] or "id"
    return f"{slug}-{hashlib.sha1(sample_id.encode('utf-8')).hexdigest()[:12]}"


def split_ids(ids: Iterable[str], val_fraction: float, seed: int,
              test_fraction: float = 0.0) -> tuple[list[str], list[str], list[str]]:  # fmt: skip
    """(train, val, test): ids ordered by a seeded hash and cut, val first, then test, the rest train; the split
    depends on the ids and the seed, never on file order, and adding a test split leaves val as it was."""
    order = sorted(set(ids), key=lambda i: hashlib.sha256(f"{seed}\0{i}".encode("utf-8")).digest())
    n_val, n_test = round(len(order) * val_fraction), round(len(order) * test_fraction)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


# ---------------------------------------------------------------- one sample (runs in a worker process)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth grayscale: scale, don't clip
        array = np.asarray(img, dtype=np.float64)
        top = array.max() or 1.0
        img = Image.fromarray((array * (255.0 / top)).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _fit_mask(mask: np.ndarray, raw: tuple[int, int], shown: tuple[int, int], transpose) -> Image.Image | str:
    """The mask in the displayed orientation, or the reason it cannot be."""
    height, width = mask.shape[:2]
    img = Image.fromarray((np.asarray(mask) != 0).astype(np.uint8) * 255)
    if (width, height) == shown:
        return img
    if (width, height) == raw and transpose is not None:
        return img.transpose(transpose)
    return f"mask is {width}x{height}, image is {shown[0]}x{shown[1]}"


def encode_record(record: Record, class_index: dict[str, int], max_side: int | None) -> Encoded | Rejected:
    def reject(reason: str) -> Rejected:
        return Rejected(record.id, record.source, reason)

    if record.problem:
        return reject(record.problem)
    try:
        data = record.image_path.read_bytes()
    except OSError as exc:
        return reject(f"cannot read image: {exc.strerror}")
    if not data:
        return reject("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # a truncated file raises here: never padded
        source_format = img.format
        raw_size = img.size
        transpose = ORIENTATION.get(img.getexif().get(0x0112, 1))
        shown = img.transpose(transpose) if transpose is not None else img
        rgb = _to_rgb(shown)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return reject(f"cannot decode image: {exc}")

    try:
        names, mask = record.annotate()
    except (ValueError, OSError, KeyError, UnidentifiedImageError) as exc:
        return reject(f"cannot read annotation: {exc}")
    unknown = sorted({name for name in names if name not in class_index})
    if unknown:
        return reject(f"unknown class {', '.join(repr(name) for name in unknown)}")
    mask_img = None
    if mask is not None:
        mask_img = _fit_mask(mask, raw_size, rgb.size, transpose)
        if isinstance(mask_img, str):
            return reject(mask_img)

    resized = False
    if max_side and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        mask_img = mask_img.resize(size, Image.Resampling.NEAREST) if mask_img is not None else None
        resized = True

    unchanged = source_format in STORED_AS_IS and img.mode == "RGB" and transpose is None and not resized
    if unchanged:
        image_bytes, ext = data, STORED_AS_IS[source_format]
    else:
        buffer = io.BytesIO()
        ext = "jpg" if source_format == "JPEG" else "png"
        rgb.save(buffer, format="JPEG" if ext == "jpg" else "PNG", quality=95)
        image_bytes = buffer.getvalue()
    mask_png = None
    if mask_img is not None:
        buffer = io.BytesIO()
        mask_img.save(buffer, format="PNG", optimize=True)
        mask_png = buffer.getvalue()
    labels = sorted({class_index[name] for name in names})
    return Encoded(record.id, record.source, image_bytes, ext, labels, rgb.width, rgb.height, mask_png)


# ---------------------------------------------------------------- writing


class ShardWriter:
    """Writes `<split>-NNNNNN.tar` files of at most `samples_per_shard` samples, each under a temporary name in
    `stage` until it is complete, then publishes it at `out` (a rename, or an upload to a remote location); fixed
    tar metadata, so the same input gives the same bytes."""

    def __init__(self, out: str, stage: Path, split: str, samples_per_shard: int):
        self.out, self.stage, self.split, self.limit = out, stage, split, samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self.tar: tarfile.TarFile | None = None
        self.count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self.tar is None:
            self.name = f"{self.split}-{len(self.shards):06d}.tar"
            self.tmp = self.stage / f".{self.name}.tmp"
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        for suffix, payload in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o444
            self.tar.addfile(info, io.BytesIO(payload))
        self.count += 1
        if self.count == self.limit:
            self.close()

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        with open(self.tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        record = {"file": self.name, "samples": self.count, "bytes": self.tmp.stat().st_size, "sha256": sha256_file(self.tmp)}
        storage.put_file(self.tmp, storage.join(self.out, self.name))
        self.shards.append(record)
        self.tar, self.count = None, 0


def _members(sample: Encoded) -> dict[str, bytes]:
    meta = {"id": sample.id, "labels": sample.labels, "width": sample.width, "height": sample.height}
    members = {sample.image_ext: sample.image, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    if sample.mask_png is not None:
        members["mask.png"] = sample.mask_png
    return members


def _prepare_out(out: str, overwrite: bool) -> None:
    manifest = storage.join(out, MANIFEST)
    if storage.exists(manifest):
        if not overwrite:
            raise DataError(f"{out} holds a finished build: pass --overwrite to replace it")
        storage.remove(manifest)  # first, so a build killed from here on is never read as complete
    for stale in storage.listdir(out):  # our own leftovers from an earlier or killed build, nothing else
        if re.fullmatch(r"\.?(train|val|test)-\d{6}\.tar(\.tmp)?|\.manifest\.json\.tmp", stale):
            storage.remove(storage.join(out, stale))


def _write_samples(ordered: list[tuple[str, Record]], encode: Callable[[Record], Encoded | Rejected],
                   writers: dict[str, ShardWriter], workers: int, require_masks: bool, rejected: list[Rejected],
                   name: str) -> int:  # fmt: skip
    """Encode the records (in `workers` processes) and write the accepted ones; returns how many have a mask."""
    keys: set[str] = set()
    with_masks = 0
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(encode, [r for _, r in ordered], chunksize=8) if pool else map(encode, (r for _, r in ordered))
        for (split, _), result in tqdm(zip(ordered, results), total=len(ordered), desc=f"build {name}", unit="img",
                                       mininterval=1.0):  # fmt: skip
            if isinstance(result, Encoded) and require_masks and result.mask_png is None:
                result = Rejected(result.id, result.source, "no mask (--require-masks)")
            if isinstance(result, Rejected):
                rejected.append(result)
                continue
            key = sample_key(result.id)
            if key in keys:
                rejected.append(Rejected(result.id, result.source, f"key collision on {key}"))
                continue
            keys.add(key)
            with_masks += result.mask_png is not None
            writers[split].add(key, _members(result))
        for writer in writers.values():
            writer.close()
    finally:
        if pool:
            pool.terminate()
    return with_masks


def build_shards(src: str | Path, fmt: str, out: str | Path, *, val_fraction: float = 0.1, seed: int = 0,
                 samples_per_shard: int = 1000, max_side: int | None = None, workers: int | None = None,
                 overwrite: bool = False, strict: bool = False, require_masks: bool = False,
                 test_fraction: float = 0.0) -> dict[str, Any]:  # fmt: skip
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise DataError(f"--val-fraction and --test-fraction must each be in [0, 1) and leave images to train on, "
                        f"got {val_fraction} and {test_fraction}")  # fmt: skip
    if samples_per_shard < 1 or (max_side is not None and max_side < 16):
        raise DataError("--samples-per-shard must be >= 1 and --max-side >= 16")
    out = str(out)
    source = read_source(src, fmt)
    _prepare_out(out, overwrite)

    candidates = {r.id: r for r in source.records if not r.problem}
    splits = dict(zip(SPLITS, split_ids(candidates, val_fraction, seed, test_fraction)))
    ordered = [(split, candidates[i]) for split, ids in splits.items() for i in ids]
    rejected = [Rejected(r.id, r.source, r.problem) for r in source.records if r.problem]

    encode = partial(encode_record, class_index={name: i for i, name in enumerate(source.classes)}, max_side=max_side)
    workers = usable_cores() if workers is None else workers
    with storage.staging_dir(out) as stage:
        writers = {split: ShardWriter(out, stage, split, samples_per_shard) for split in SPLITS}
        try:
            with_masks = _write_samples(ordered, encode, writers, workers, require_masks, rejected, storage.Location(out).name)
        except OSError as exc:
            raise DataError(f"writing shards in {stage}: {exc.strerror or exc}") from None
        finally:
            for stale in stage.glob(".*.tmp"):
                stale.unlink()

    if strict and rejected:
        listed = "; ".join(f"{r.source}: {r.reason}" for r in rejected[:5])
        raise DataError(f"--strict: {len(rejected)} rejected ({listed}{'; ...' if len(rejected) > 5 else ''}), "
                        f"no manifest written")  # fmt: skip
    samples = {split: sum(s["samples"] for s in writers[split].shards) for split in SPLITS}
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "classes": source.classes,
        "has_masks": with_masks > 0 and with_masks == sum(samples.values()),
        "samples_with_masks": with_masks,
        "splits": {split: {"samples": samples[split], "shards": writers[split].shards} for split in SPLITS},
        "rejected": [{"source": r.source, "id": r.id, "reason": r.reason} for r in rejected],
        "source": {"format": fmt, "path": str(Path(src).resolve()), "val_fraction": val_fraction,
                   "test_fraction": test_fraction, "seed": seed,
                   "samples_per_shard": samples_per_shard, "max_side": max_side},  # fmt: skip
    }
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=1, ensure_ascii=False))  # last
    return manifest


# ---------------------------------------------------------------- verify and info


def verify_shards(location: str | Path) -> list[str]:
    """Re-hash every shard against the manifest; returns the problems (empty when all is well)."""
    manifest = load_manifest(location)
    problems = []
    shards = [shard for split in SPLITS for shard in shard_files(location, manifest, split)]
    for shard in tqdm(shards, desc="verify", unit="shard", mininterval=1.0):
        try:
            with CheckedStream(shard) as stream:
                stream.finish()
        except storage.NotFound:
            problems.append(f"{shard.location.name}: missing")
        except DataError as exc:
            problems.append(f"{shard.location.name}: {str(exc).removeprefix(f'shard {shard.location}: ')}")
    return problems


def describe_shards(shard_dir: str | Path) -> str:
    manifest = load_manifest(shard_dir)
    lines = [f"{shard_dir}: {manifest['source']['format']} build of {manifest['created']}",
             f"classes ({len(manifest['classes'])}): {', '.join(manifest['classes'])}",
             f"masks: {'yes' if manifest['has_masks'] else 'no'} ({manifest['samples_with_masks']} samples have one)"]  # fmt: skip
    for split in SPLITS:
        info = manifest["splits"][split]
        size = sum(s["bytes"] for s in info["shards"]) / 2**20
        lines.append(f"{split}: {info['samples']} samples in {len(info['shards'])} shards, {size:.1f} MiB")
    rejected = manifest["rejected"]
    lines.append(f"rejected: {len(rejected)}")
    lines += [f"  {r['source']}: {r['reason']}" for r in rejected[:20]]
    if len(rejected) > 20:
        lines.append(f"  ... and {len(rejected) - 20} more in manifest.json")
    return "\n".join(lines)
