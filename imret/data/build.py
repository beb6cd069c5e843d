"""`imret shards build|verify|info`: a source dataset becomes WebDataset tar shards and a manifest.

Every image is decoded here, once, so training never meets a file it cannot read: what fails is listed in
the manifest's `rejected` with its reason and the rest of the build goes on. The planner (imret.data.plan)
decides before any image is read which record goes into which shard; each shard is then written whole by one
task, on this machine's process pool (`--engine local`) or on a Ray cluster (`--engine ray`, imret.data.ray_build),
with the same per-shard writer, so both give the same bytes. A task writes its shard under a temporary name and
publishes it when complete (a rename into a local directory, an upload to a URL), then a small done record beside
it (`.<shard>.done.json`: its samples, bytes, sha256, rejects and what it was made of); `manifest.json` is written
last, by the driver, from the done records, so a location without one is never taken for a finished build. A
rerun skips the shards whose done record matches their plan and whose size is as recorded (`--verify`: and whose
sha256), and a finished build run again with the same inputs rewrites nothing.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import re
import socket
import tarfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from imret.data import storage
from imret.data.manifest import (
    FORMAT_VERSION, MANIFEST, SPLITS, CheckedStream, Shard, load_manifest, sha256_file, shard_files,
)  # fmt: skip
from imret.data.plan import Plan, Rejected, ShardPlan, ShardPlanner, sample_key
from imret.data.sources import Record, annotate, read_source
from imret.errors import DataError, write_failed
from imret.system import usable_cores

log = logging.getLogger("imret.data")
# EXIF orientation -> the transpose that displays the image upright (as PIL.ImageOps.exif_transpose does)
ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # fmt: skip
STORED_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
OWN_FILES = re.compile(r"(train|val|test)-\d{6}\.tar")  # the shards imret writes into a location
DONE = re.compile(r"\.((train|val|test)-\d{6}\.tar)\.done\.json")
# drafts of a killed attempt: a shard's (local stage or upload), and storage.write_text's of a done record or the manifest
LEFTOVER = re.compile(r"\.(train|val|test)-\d{6}\.tar(\.[0-9a-f]{12})?\.tmp|\.(\.(train|val|test)-\d{6}\.tar\.done\.json|manifest\.json)(\.\d+)?\.tmp")


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


def encode_record(record: Record, class_index: dict[str, int], max_side: int | None,
                  label_names: list[str]) -> Encoded | Rejected:  # fmt: skip
    """One record decoded, checked and encoded for its shard, or the reason it is rejected. A store that fails to
    serve the image (after storage's retries) is the task's failure, retried, not the image's."""

    def reject(reason: str) -> Rejected:
        return Rejected(record.id, record.source, reason)

    if record.problem:
        return reject(record.problem)
    try:
        data = storage.read_bytes(record.image)
    except storage.NotFound:
        return reject("cannot read image: not found")
    except DataError as exc:
        if storage.is_remote(record.image):
            raise
        return reject(f"cannot read image: {str(exc).rsplit(': ', 1)[-1]}")
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
        names, mask = annotate(record.annotation, label_names)
    except (ValueError, OSError, KeyError, UnidentifiedImageError, storage.NotFound) as exc:
        return reject(f"cannot read annotation: {exc}")
    except DataError as exc:  # as for the image: a local file that cannot be read is this sample's problem,
        if storage.is_remote(record.image):  # a store that kept failing is the task's (it is retried)
            raise
        return reject(f"cannot read annotation: {str(exc).rsplit(': ', 1)[-1]}")
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


def _members(sample: Encoded) -> dict[str, bytes]:
    meta = {"id": sample.id, "labels": sample.labels, "width": sample.width, "height": sample.height}
    members = {sample.image_ext: sample.image, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    if sample.mask_png is not None:
        members["mask.png"] = sample.mask_png
    return members


@dataclass
class Encoder:
    """What a shard task needs besides its plan: how to turn records into samples."""

    class_index: dict[str, int]
    max_side: int | None
    require_masks: bool
    label_names: list[str]

    def encode(self, record: Record) -> Encoded | Rejected:
        result = encode_record(record, self.class_index, self.max_side, self.label_names)
        if isinstance(result, Encoded) and self.require_masks and result.mask_png is None:
            return Rejected(result.id, result.source, "no mask (--require-masks)")
        return result


def done_location(out: str, name: str) -> storage.Location:
    return storage.join(out, f".{name}.done.json")


def write_shard(plan: ShardPlan, out: str, encoder: Encoder, node: str | None = None) -> dict[str, Any]:
    """The per-shard writer of every engine: encode the plan's records in order, write them to a tar under a name no
    other attempt uses (fixed tar metadata: the same input gives the same bytes), publish it whole, then its done
    record, which names the machine (`node`, default this host's name). Returns the done record."""
    started = time.perf_counter()
    rejected, count, with_masks = [], 0, 0
    with storage.staging_dir(out) as stage:
        tmp = stage / f".{plan.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for record in plan.records:
                    result = encoder.encode(record)
                    if isinstance(result, Rejected):
                        rejected.append({"source": result.source, "id": result.id, "reason": result.reason})
                        continue
                    key = sample_key(result.id)
                    for suffix, payload in _members(result).items():
                        info = tarfile.TarInfo(f"{key}.{suffix}")
                        info.size, info.mtime, info.mode = len(payload), 0, 0o444
                        tar.addfile(info, io.BytesIO(payload))
                    count += 1
                    with_masks += result.mask_png is not None
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            done = {"file": plan.name, "samples": count, "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp),
                    "with_masks": with_masks, "rejected": rejected, "fingerprint": plan.fingerprint,
                    "node": node or socket.gethostname()}  # fmt: skip
            storage.put_file(tmp, storage.join(out, plan.name))
        except OSError as exc:  # a full disk: one line with the space free where the shard was being written
            raise DataError(str(write_failed(tmp, exc))) from None
        finally:
            tmp.unlink(missing_ok=True)
    done["seconds"] = round(time.perf_counter() - started, 3)
    storage.write_text(done_location(out, plan.name), json.dumps(done))
    return done


def finished_shard(out: str, plan: ShardPlan, names: set[str], verify: bool) -> dict[str, Any] | None:
    """A shard's done record when the shard is finished for this plan (its size as recorded; with `verify`, its
    sha256 too), else None."""
    done_name = done_location(out, plan.name).name
    if done_name not in names or plan.name not in names:
        return None
    try:
        done = json.loads(storage.read_text(done_location(out, plan.name)))
    except (ValueError, storage.NotFound):
        return None
    if done.get("fingerprint") != plan.fingerprint or storage.size(storage.join(out, plan.name)) != done.get("bytes"):
        return None
    if verify:
        try:
            with CheckedStream(Shard(storage.join(out, plan.name), done["samples"], done["bytes"], done["sha256"])) as stream:
                stream.finish()
        except DataError:
            return None
    return done


# ---------------------------------------------------------------- engines


def local_engine(plans: Iterator[ShardPlan], out: str, encoder: Encoder, workers: int, retries: int,
                 on_done: Callable[[dict[str, Any]], None]) -> None:  # fmt: skip
    """This machine's process pool: each shard one task, at most 2 x workers planned at a time; a failed task is
    retried up to `retries` times, then the build stops naming the shard and its first error."""
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    pending: dict[str, tuple[Any, ShardPlan, int, str]] = {}  # name -> (result, plan, tries, first error)

    def submit(plan: ShardPlan, tries: int, first_error: str) -> None:
        if pool is None:
            pending[plan.name] = (_Ready(_attempt(plan, out, encoder)), plan, tries, first_error)
        else:
            pending[plan.name] = (pool.apply_async(_attempt, (plan, out, encoder)), plan, tries, first_error)

    try:
        for plan in plans:
            submit(plan, 1, "")
            while len(pending) >= 2 * max(1, workers):
                _collect(pending, submit, retries, on_done)
        while pending:
            _collect(pending, submit, retries, on_done)
    finally:
        if pool is not None:
            pool.terminate()


class _Ready:
    """A result already computed (the pool-less path), with the pool's result interface."""

    def __init__(self, value):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self, timeout: float | None = None):
        return self.value


def _attempt(plan: ShardPlan, out: str, encoder: Encoder) -> tuple[bool, Any]:
    """In a pool worker: (True, done record) or (False, the error's one line); errors are returned, not raised,
    so that any of them, however exotic, reaches the driver as text."""
    try:
        return True, write_shard(plan, out, encoder)
    except Exception as exc:  # returned to the driver, which retries the shard or stops the build naming it
        return False, f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _collect(pending: dict, submit: Callable, retries: int, on_done: Callable[[dict[str, Any]], None]) -> None:
    """Wait for one finished task (oldest first); hand its done record on, or retry it, or stop the build."""
    name = next(iter(pending))
    result, plan, tries, first_error = pending.pop(name)
    ok, value = result.get()
    if ok:
        on_done(value)
    elif tries <= retries:
        log.warning("shard %s failed (try %d of %d): %s", name, tries, retries + 1, value)
        submit(plan, tries + 1, first_error or value)
    else:
        raise DataError(f"shard {name} failed ({tries} {'try' if tries == 1 else 'tries'}); first error: {first_error or value}")


# ---------------------------------------------------------------- the build


def build_shards(src: str | Path, fmt: str, out: str | Path, *, val_fraction: float = 0.1, seed: int = 0,
                 samples_per_shard: int = 1000, max_side: int | None = None, workers: int | None = None,
                 overwrite: bool = False, strict: bool = False, require_masks: bool = False,
                 test_fraction: float = 0.0, engine: str = "local", address: str | None = None, retries: int = 3,
                 verify: bool = False, limit: int | None = None) -> dict[str, Any]:  # fmt: skip
    """limit: build only a seeded sample of that many records (a study's smoke run)."""
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise DataError(f"--val-fraction and --test-fraction must each be in [0, 1) and leave images to train on, "
                        f"got {val_fraction} and {test_fraction}")  # fmt: skip
    if samples_per_shard < 1 or (max_side is not None and max_side < 16) or retries < 0:
        raise DataError("--samples-per-shard must be >= 1, --max-side >= 16 and --retries >= 0")
    if engine not in ("local", "ray"):
        raise DataError(f"--engine: '{engine}' is not one of local, ray")
    out = str(out)
    if engine == "ray":  # a cluster that does not answer is said before any planning
        from imret.data.ray_build import connect

        connect(address)
    source = read_source(src, fmt)
    settings = {"format": fmt, "path": source.location if storage.is_remote(source.location) else str(Path(source.location).resolve()),
                "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
                "samples_per_shard": samples_per_shard, "max_side": max_side, "require_masks": require_masks,
                "classes": source.classes, "limit": limit}  # fmt: skip
    planner = ShardPlanner(source, val_fraction, test_fraction, seed, samples_per_shard, settings, limit)
    if overwrite:
        _clear(out)
    plan = planner.plan()
    names = set(storage.listdir(out))
    finished = MANIFEST in names
    for leftover in (name for name in names if LEFTOVER.fullmatch(name)):  # a killed attempt's drafts
        storage.remove(storage.join(out, leftover))
    encoder = Encoder({name: i for i, name in enumerate(source.classes)}, max_side, require_masks, source.label_names)
    done: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=sum(plan.counts.values()), desc=f"build {storage.Location(out).name}", unit="img", mininterval=1.0)

    kept: list[str] = []  # shards an earlier run finished

    def record(shard: dict[str, Any], skipped: bool = False) -> None:
        done[shard["file"]] = shard
        bar.update(shard["samples"] + len(shard["rejected"]))
        if skipped:
            kept.append(shard["file"])
        else:
            log.info("shard %s: %d samples, %d rejected, on %s in %.1f s", shard["file"], shard["samples"],
                     len(shard["rejected"]), shard["node"], shard["seconds"])  # fmt: skip

    def todo() -> Iterator[ShardPlan]:
        for shard_plan in planner.shard_plans():
            previous = finished_shard(out, shard_plan, names, verify)
            if previous is not None:
                record(previous, skipped=True)
            elif finished:
                raise DataError(f"{out} holds a finished build (of other inputs, or an older imret's): pass --overwrite "
                                f"to replace it")  # fmt: skip
            else:
                yield shard_plan

    if engine == "ray":
        from imret.data.ray_build import ray_engine

        ray_engine(todo(), out, encoder, src=source.location, address=address, retries=retries, on_done=record)
    else:
        local_engine(todo(), out, encoder, usable_cores() if workers is None else workers, retries, record)
    bar.close()
    if finished:
        log.info("%s: a finished build of these inputs: nothing to do", out)
        return load_manifest(out)
    if kept:
        log.info("%s: %d of %d shards were finished by an earlier run and kept", out, len(kept), len(done))
    log_nodes(done.values())
    return write_manifest(out, plan, done, settings, strict)


def _clear(out: str) -> None:
    """--overwrite: the manifest first (from here on the location is not a finished build), then imret's own
    shards, done records and drafts; anything else under it stays."""
    storage.remove(storage.join(out, MANIFEST))
    for name in storage.listdir(out):
        if OWN_FILES.fullmatch(name) or DONE.fullmatch(name) or LEFTOVER.fullmatch(name):
            storage.remove(storage.join(out, name))


def log_nodes(done) -> None:
    """One line a machine (a Ray node, or this one): the shards and images it wrote and the time its tasks took."""
    by_node: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for shard in done:
        by_node[shard.get("node", "?")].append(shard)
    for node, shards in sorted(by_node.items()):
        seconds = sum(s.get("seconds", 0.0) for s in shards)
        images = sum(s["samples"] + len(s["rejected"]) for s in shards)
        log.info("node %s: %d shards, %d images, %.1f s of tasks (%.0f images/s a task)", node, len(shards), images,
                 seconds, images / seconds if seconds else 0.0)  # fmt: skip


def write_manifest(out: str, plan: Plan, done: dict[str, dict[str, Any]], settings: dict[str, Any],
                   strict: bool) -> dict[str, Any]:  # fmt: skip
    """The manifest from the done records, written last; shards and done records of an earlier plan go first."""
    rejected = [{"source": r.source, "id": r.id, "reason": r.reason} for r in plan.rejected]
    for name in plan.names():
        rejected += done[name]["rejected"]
    if strict and rejected:
        listed = "; ".join(f"{r['source']}: {r['reason']}" for r in rejected[:5])
        raise DataError(f"--strict: {len(rejected)} rejected ({listed}{'; ...' if len(rejected) > 5 else ''}), "
                        f"no manifest written")  # fmt: skip
    planned = set(plan.names())
    for name in storage.listdir(out):  # an earlier plan's shards, and drafts of attempts that died (a lost node's)
        done_of = DONE.fullmatch(name)
        if (OWN_FILES.fullmatch(name) and name not in planned) or (done_of and done_of.group(1) not in planned) or LEFTOVER.fullmatch(name):
            storage.remove(storage.join(out, name))
    splits = {}
    for split in SPLITS:
        shards = [{k: done[name][k] for k in ("file", "samples", "bytes", "sha256")}
                  for name in plan.names() if name.startswith(f"{split}-")]  # fmt: skip
        splits[split] = {"samples": sum(s["samples"] for s in shards), "shards": shards}
    total = sum(split["samples"] for split in splits.values())
    with_masks = sum(shard["with_masks"] for shard in done.values() if shard["file"] in planned)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "classes": settings["classes"],
        "has_masks": with_masks > 0 and with_masks == total,
        "samples_with_masks": with_masks,
        "splits": splits,
        "rejected": rejected,
        "source": {k: settings[k] for k in ("format", "path", "val_fraction", "test_fraction", "seed",
                                             "samples_per_shard", "max_side") + (("limit",) if settings["limit"] else ())},  # fmt: skip
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
