"""`imret embed RUN_DIR --shards DIR --split train|val`: the sharded embedding job (also under accelerate launch).

Each rank embeds every world-th shard of the split, one part file per shard, written atomically; a rerun
skips finished parts (and redoes them all when the model, the shards or the masking changed). Rank 0 then
merges the parts, in manifest order, into `embeddings.npy`, `labels.npy`, `keys.txt` (with its offsets) and, last,
`meta.json`. The layer is the one the model declared. `--mask-with SEG_RUN` zeroes the background with the
U-Net's predicted mask first, as the study did.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import defaultdict
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from imret.config import AugmentConfig, TrainConfig, recipe_from_dict
from imret.data.augment import DeviceAugment, denormalise
from imret.data.device_decode import check_decode_device, resolve_decode
from imret.data.prefetch import DevicePrefetcher
from imret.data.manifest import load_manifest, manifest_hash, sha256_file, write_json_atomic
from imret.data.shards import ShardBatches, shard_files
from imret.data.storage import is_remote, require_local
from imret.distributed import init_process_group
from imret.errors import ImretError, writing
from imret.keyfile import KeyFile, KeyWriter
from imret.models import RetrievalNet, make_backbone
from imret.parts import collect_parts
from imret.system import native_bf16, usable_cores

log = logging.getLogger("imret.embed")
IMAGENET_BASELINE = "imagenet-resnet18"  # the study's untrained ImageNet ResNet18, pooled features at 224 px


def load_model(source: str) -> tuple[nn.Module, dict[str, Any]]:
    """A run directory's exported model (or the ImageNet baseline), in eval mode, with its meta."""
    if source == IMAGENET_BASELINE:
        backbone = make_backbone("resnet18", 224, "imagenet")
        meta = {"task": "none", "backbone": "resnet18", "image_size": 224, "load_size": 224,
                "normalisation": backbone.normalisation, "embedding": {"layer": "pooled", "dim": backbone.features},
                "initialisation": f"{backbone.initialisation}, not trained", "weights_sha256": "imagenet"}  # fmt: skip
        return RetrievalNet(backbone.trunk, nn.Identity(), embedding="pooled").eval(), meta
    from imret.tasks import make_task

    model_dir = Path(source) / "model"
    if not (model_dir / "meta.json").is_file() or not (model_dir / "weights.pt").is_file():
        raise ImretError(f"{source}: no exported model (model/meta.json and model/weights.pt); train it first")
    meta = json.loads((model_dir / "meta.json").read_text())
    recipe = recipe_from_dict(meta["recipe"])
    recipe.model.init, recipe.model.weights = "scratch", None  # the trained weights come next
    net = make_task(recipe, meta["classes"]).build_model()
    net.load_state_dict(torch.load(model_dir / "weights.pt", map_location="cpu", weights_only=True))
    meta["weights_sha256"] = sha256_file(model_dir / "weights.pt")
    return net.eval(), meta


def choose_layer(net: nn.Module, meta: dict[str, Any], layer: str | None, source: str) -> dict[str, Any]:
    """The model's meta with `layer` as its embedding (the net is switched to it); the declared one when None."""
    if layer is None or layer == meta["embedding"]["layer"]:
        return meta
    head = getattr(net, "head", None)
    if not isinstance(net, RetrievalNet) or layer not in ("pooled", "head") or not isinstance(head, nn.Linear):
        raise ImretError(f"{source}: has no '{layer}' layer to embed with (its embedding is {meta['embedding']['layer']})")
    net.embedding = layer
    dim = head.in_features if layer == "pooled" else head.out_features
    return {**meta, "embedding": {"layer": layer, "dim": dim, "declared": meta["embedding"]["layer"]}}


class Embedder(nn.Module):
    """uint8 batch -> the model's declared embedding; with masks, the background is zeroed first."""

    def __init__(self, net: nn.Module, meta: dict[str, Any]):
        super().__init__()
        self.net = net
        self.normalisation = meta.get("normalisation")  # runs exported before it was recorded: ImageNet's
        self.augment = DeviceAugment(AugmentConfig(), meta["image_size"], meta["load_size"], training=False,
                                     normalisation=self.normalisation)  # fmt: skip

    @torch.no_grad()
    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        x, _ = self.augment(images)
        if masks is not None:
            x = (denormalise(x, self.normalisation) * masks.to(x.device, x.dtype)[:, None] - self.augment.mean) / self.augment.std
        return self.net.embed(x).float()


def embed_on_device(embedder: Embedder, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """A decoded uint8 batch [B, 3, load, load] on the embedder's device -> float32 embeddings [B, D] there: the one
    path from pixels to vectors, shared by the embedding job and `imret search`/`serve` (which decode their
    images as the job did: the same decode path, at the model's load size). bf16 on GPUs that support it."""
    bf16 = images.device.type == "cuda" and native_bf16()
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        return embedder(images, masks)


def embed_images(embedder: Embedder, images: torch.Tensor, masks: torch.Tensor | None = None) -> np.ndarray:
    """embed_on_device, copied to the host."""
    return embed_on_device(embedder, images, masks).cpu().numpy()


class Masker(nn.Module):
    """The U-Net's apparel mask (probability > 0.5) of what the embedding model sees, at its size."""

    def __init__(self, seg: nn.Module, seg_meta: dict[str, Any], meta: dict[str, Any]):
        super().__init__()
        self.seg, self.seg_size = seg, seg_meta["image_size"]
        # what the embedding model sees, normalised as the U-Net was trained
        self.augment = DeviceAugment(AugmentConfig(), meta["image_size"], meta["load_size"], training=False,
                                     normalisation=seg_meta.get("normalisation"))  # fmt: skip

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, _ = self.augment(images)
        seg_in = F.interpolate(x, size=(self.seg_size, self.seg_size), mode="bilinear", align_corners=False)
        mask = (torch.sigmoid(self.seg(seg_in).float()) > 0.5).float()
        return F.interpolate(mask, size=x.shape[-2:], mode="nearest")[:, 0].to(torch.uint8)


def batches_by_shard(shards: list[tuple[Path, int, int]], size: int, classes: int, batch_size: int, workers: int,
                     device: torch.device, decode: str) -> DataLoader:  # fmt: skip
    """One loader over all of this rank's shards: its workers stay up from the first shard to the last."""
    workers = min(workers, len(shards))
    return DataLoader(ShardBatches(shards, size, classes, batch_size, keep_jpeg=decode == "gpu"), batch_size=None,
                      num_workers=workers, pin_memory=device.type == "cuda",
                      prefetch_factor=2 if workers else None)  # fmt: skip


def mask_path(cache: Path, shard: Path) -> Path:
    return cache / f"{shard.stem}.masks.npz"


def write_masks(path: Path, masks: np.ndarray) -> None:
    """Bit-packed and compressed: a 224 px mask is 49 KiB as bytes, 6 KiB packed, and less once compressed."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")  # another job may share this cache
    with writing(path, cleanup=lambda: tmp.unlink(missing_ok=True)):
        np.savez_compressed(tmp, packed=np.packbits(masks.astype(bool), axis=-1), side=masks.shape[-1] if masks.size else 0)
        os.replace(tmp, path)


def read_masks(path: Path) -> np.ndarray:
    with np.load(path) as stored:
        return np.unpackbits(stored["packed"], axis=-1, count=int(stored["side"])).astype(np.uint8)


def cache_masks(masker: Masker, shards: list[tuple[Path, int, int]], cache: Path, load_size: int, classes: int,
                device: torch.device, batch_size: int, workers: int, decode: str) -> None:  # fmt: skip
    """Predicted masks of each shard's samples, in order, cached under the segmentation run: every compared
    model that sees the same crop reuses them instead of running the U-Net again."""
    missing = [shard for shard in shards if not mask_path(cache, shard[0]).is_file()]
    if not missing:
        return
    cache.mkdir(parents=True, exist_ok=True)
    pending: dict[int, list[torch.Tensor]] = defaultdict(list)  # on the device until a shard is complete
    batches = DevicePrefetcher(batches_by_shard(missing, load_size, classes, batch_size, workers, device, decode),
                               device, load_size, copy=())  # fmt: skip
    for batch in batches:
        if batch["key"]:
            pending[batch["shard"]].append(masker(batch["image"]))
        if batch["last"]:
            masks = pending.pop(batch["shard"], [])
            write_masks(mask_path(cache, missing[batch["shard"]][0]), torch.cat(masks).cpu().numpy() if masks else np.zeros((0, 1, 1), np.uint8))


def job_fingerprint(source: str, meta: dict, seg_source: str | None, seg_meta: dict | None, manifest: dict, split: str,
                    decode: str) -> dict:  # fmt: skip
    """What the job's output depends on; parts or a merge made for another fingerprint are never reused (the two
    decode paths give slightly different pixels, so they are not mixed in one gallery either)."""
    return {"model": str(source), "weights_sha256": meta["weights_sha256"], "layer": meta["embedding"]["layer"],
            "mask_with": str(seg_source) if seg_source else None,
            "mask_weights_sha256": seg_meta["weights_sha256"] if seg_meta else None,
            "shards_manifest_hash": manifest_hash(manifest), "split": split, "decode": decode}  # fmt: skip


def default_out(source: str, split: str, mask_with: str | None, layer: str | None = None) -> Path:
    """RUN_DIR/embeddings/<split>[-<layer>][-masked-<seg run>]; the layer only when it is not the declared one."""
    base = Path("runs") / IMAGENET_BASELINE if source == IMAGENET_BASELINE else Path(source)
    name = split + (f"-{layer}" if layer else "") + (f"-masked-{Path(mask_with).name}" if mask_with else "")
    return base / "embeddings" / name


def embedding_complete(out: Path, fingerprint: dict) -> bool:
    meta_path = Path(out) / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    return meta.get("job") == fingerprint and "locations" in meta  # older merges lack locations: merged again


def embed(source: str, shards: str | Path, split: str, mask_with: str | None = None, out: str | Path | None = None,
          batch_size: int = 128, workers: int | None = None, decode: str = "auto", layer: str | None = None) -> Path:  # fmt: skip
    """shards: a local directory or a URL; out: a local or shared directory. decode: where JPEGs are decoded,
    as `data.decode` in a recipe (auto: on the GPU when there is one). layer: pooled|head instead of the layer
    the model declares (a study's control rows)."""
    require_local(out, "--out")
    # PartialState, not an Accelerator: a study may already hold one with another mixed-precision setting. The
    # other ranks wait while rank 0 merges: under the recipes' collective timeout, not torch's 10 minutes
    timeout = timedelta(seconds=TrainConfig().collective_timeout_s)
    init_process_group(timeout, parse_flag_from_env("ACCELERATE_USE_CPU"))
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timeout)
    decode = resolve_decode(decode, state.device)
    check_decode_device(decode, state.device)
    if workers is None:  # a GPU embeds far faster than one process decodes
        workers = min(8, max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    manifest = load_manifest(shards)
    if not manifest["splits"][split]["samples"]:
        raise ImretError(f"{shards}: the {split} split is empty; rebuild the shards with a --val-fraction that leaves "
                         f"images in both splits")  # fmt: skip
    net, meta = load_model(source)
    meta = choose_layer(net, meta, layer, source)
    seg, seg_meta = load_model(mask_with) if mask_with else (None, None)
    if seg_meta is not None and seg_meta["task"] != "segmentation":
        raise ImretError(f"--mask-with {mask_with}: a {seg_meta['task']} model, not a segmentation one")
    fingerprint = job_fingerprint(source, meta, mask_with, seg_meta, manifest, split, decode)
    out = Path(out) if out else default_out(source, split, mask_with, layer if "declared" in meta["embedding"] else None)
    if broadcast_object_list([embedding_complete(out, fingerprint)])[0]:  # rank 0's disk holds the merged output
        if state.is_main_process:
            log.info("%s is complete for this model and these shards: nothing to do", out)
        return out

    parts = out / "parts"
    if state.is_main_process:
        start_job(out, fingerprint)
    state.wait_for_everyone()
    if state.is_local_main_process and not state.is_main_process:
        start_job(out, fingerprint)  # a machine that does not share rank 0's disk: its own parts directory
    state.wait_for_everyone()

    embedder = Embedder(net, meta).to(state.device)
    masker = Masker(seg, seg_meta, meta).to(state.device) if seg is not None else None
    mask_cache = (Path(mask_with) / "masks" / f"{split}-{meta['load_size']}-{meta['image_size']}-"
                  f"{seg_meta['weights_sha256'][:12]}-{manifest_hash(manifest)}-{decode}") if seg is not None else None  # fmt: skip
    files = shard_files(shards, manifest, split)
    mine = files[state.process_index :: state.num_processes]
    classes = len(manifest["classes"])
    todo = [f for f in mine if not (parts / f"{f[0].stem}.npz").is_file()]
    if masker:
        cache_masks(masker, todo, mask_cache, meta["load_size"], classes, state.device, batch_size, workers, decode)
    rate = embed_shards(todo, embedder, masker, mask_cache, parts, meta, classes, batch_size, workers, state.device,
                        decode, split, state.is_local_main_process)  # fmt: skip
    state.wait_for_everyone()
    collect_parts([parts / f"{f[0].stem}.npz" for f in files], state)
    if state.is_main_process:
        merge_parts(out, [parts / f"{f[0].stem}.npz" for f in files], meta, fingerprint, manifest, split, str(shards),
                    rate)  # fmt: skip
    state.wait_for_everyone()
    return out


def embed_shards(todo: list[tuple[Path, int, int]], embedder: Embedder, masker: Masker | None, mask_cache: Path | None,
                 parts: Path, meta: dict[str, Any], classes: int, batch_size: int, workers: int, device: torch.device,
                 decode: str, split: str, show_bar: bool) -> float | None:  # fmt: skip
    """Embed this rank's unfinished shards, one part file each; returns the images per second after the first
    batch (the job's own rate, without the loader's start), None when there was nothing to embed.

    The next batch is read, copied (and decoded) on a side stream while this one is embedded; the vectors stay on
    the device until their shard is complete, so no batch waits for a copy back to the host."""
    shard_masks: dict[int, np.ndarray] = {}  # the cached masks of the shards in flight, one entry per shard
    bar = tqdm(total=sum(f[1] for f in todo), desc=f"embed {split}", unit="img", disable=not show_bar)
    pending: dict[int, Part] = defaultdict(Part)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one batch shape but a shard's last: each tuned once
    load_size = meta["load_size"]
    batches = DevicePrefetcher(batches_by_shard(todo, load_size, classes, batch_size, workers, device, decode), device,
                               load_size, copy=())  # fmt: skip
    first, after_first = None, 0
    for batch in batches:
        shard, part = todo[batch["shard"]], pending[batch["shard"]]
        if batch["key"]:
            done, count = len(part.keys), len(batch["key"])
            batch_masks = None
            if masker:
                if batch["shard"] not in shard_masks:
                    shard_masks[batch["shard"]] = read_masks(mask_path(mask_cache, shard[0]))
                cached = shard_masks[batch["shard"]]
                if done + count > len(cached):
                    raise ImretError(f"{mask_path(mask_cache, shard[0])}: {len(cached)} cached masks, the shard yields "
                                     f"more images; delete that file to compute them again")  # fmt: skip
                batch_masks = torch.from_numpy(cached[done : done + count])
            part.vectors.append(embed_on_device(embedder, batch["image"], batch_masks))
            part.keys += batch["key"]
            part.labels.append(batch["labels"].numpy().astype(np.uint8))
            if first is None:
                first = time.perf_counter()
            else:
                after_first += count
            bar.update(count)
        if batch["last"]:
            write_part(parts / f"{shard[0].stem}.npz", pending.pop(batch["shard"]), meta["embedding"]["dim"], classes)
            shard_masks.pop(batch["shard"], None)
    bar.close()
    if first is None or not after_first:
        return None
    return after_first / max(time.perf_counter() - first, 1e-9)


def start_job(out: Path, fingerprint: dict) -> None:
    """out/parts for this job; parts of another model or other shards must not be merged in."""
    job_path = out / "job.json"
    current = job_path.is_file() and json.loads(job_path.read_text()) == fingerprint
    if job_path.is_file() and not current:
        shutil.rmtree(out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    if not current:
        write_json_atomic(job_path, fingerprint)


class NpyWriter:
    """A .npy file of known shape written row block by row block with plain writes (pages written through a
    memory map would stay resident in this process), under a temporary name until `close` checks and renames."""

    def __init__(self, path: Path, dtype, shape: tuple[int, int]):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self.tmp = path.with_name(f".{path.stem}.tmp.npy")
        self.handle = open(self.tmp, "wb")
        np.lib.format.write_array_header_1_0(self.handle, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                           "fortran_order": False, "shape": shape})  # fmt: skip
        self.rows = 0

    def add(self, rows: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        if self.rows != self.shape[0]:
            raise ImretError(f"{self.path}: wrote {self.rows} rows of {self.shape[0]}; the parts changed during the merge")
        os.replace(self.tmp, self.path)


@dataclass
class Part:
    """One shard's embeddings, gathered batch by batch until its last batch arrives (the vectors on the device)."""

    keys: list[str] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    vectors: list[torch.Tensor] = field(default_factory=list)


def write_part(path: Path, part: Part, dim: int, classes: int) -> None:
    """One shard's part, on disk before its name says it is there: an existing part counts as done. A write that
    fails (a full disk) leaves no draft behind and the parts before it as they were."""
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    keys = np.array(part.keys, dtype=object).astype(str)
    labels = np.concatenate(part.labels) if part.labels else np.zeros((0, classes), np.uint8)
    vectors = torch.cat(part.vectors).cpu().numpy() if part.vectors else np.zeros((0, dim), np.float32)
    with writing(path, keys.nbytes + labels.nbytes + vectors.nbytes, cleanup=lambda: tmp.unlink(missing_ok=True)):
        with open(tmp, "wb") as handle:
            np.savez(handle, keys=keys, labels=labels, embeddings=vectors)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


def merge_parts(out: Path, part_paths: list[Path], meta: dict, fingerprint: dict, manifest: dict, split: str,
                shards: str, images_per_s: float | None = None) -> None:  # fmt: skip
    """The parts, in manifest order, streamed into `embeddings.npy` (float32) and `labels.npy` (multi-hot uint8),
    which readers memory-map, and a key file (imret.keyfile), one part in memory at a time: RAM does not grow with
    the split. Each is written under a temporary name and renamed; `meta.json` comes last. A sample cannot come
    twice: each part is one shard of the manifest, and the shard build made keys unique."""
    counts = []
    for path in part_paths:
        with np.load(path, allow_pickle=False) as part:
            counts.append(len(part["keys"]))
    total, dim, classes = sum(counts), meta["embedding"]["dim"], len(manifest["classes"])
    expected = manifest["splits"][split]["samples"]
    if total != expected:
        log.warning("%s: %d of %d samples embedded (the rest failed to decode; see the warnings above)", out, total, expected)
    with writing(out / "embeddings.npy", total * (dim * 4 + classes), cleanup=lambda: remove_drafts(out)):
        vectors = NpyWriter(out / "embeddings.npy", np.float32, (total, dim))
        labels = NpyWriter(out / "labels.npy", np.uint8, (total, classes))
        keys = KeyWriter(out / "keys")
        for path in part_paths:
            with np.load(path, allow_pickle=False) as part:
                vectors.add(part["embeddings"])
                labels.add(part["labels"])
                keys.add(part["keys"].tolist())
        vectors.close()
        labels.close()
        keys.close()
    write_json_atomic(out / "meta.json", {
        "model": fingerprint["model"], "task": meta["task"], "layer": meta["embedding"]["layer"],
        "dim": dim, "count": total, "split": split, "mask_with": fingerprint["mask_with"],
        "locations": {"model": absolute(fingerprint["model"]), "mask_with": absolute(fingerprint["mask_with"]),
                      "shards": absolute(shards)},  # for imret search and serve, started from anywhere
        "initialisation": meta["initialisation"], "classes": manifest["classes"],
        "images_per_s": round(images_per_s, 1) if images_per_s else None,  # rank 0's, after its first batch
        "shards_manifest_hash": fingerprint["shards_manifest_hash"], "job": fingerprint,
    })  # fmt: skip
    log.info("%s: %d embeddings of dimension %d (%s layer)", out, total, dim, meta["embedding"]["layer"])


def remove_drafts(out: Path) -> None:
    """The merge's temporary files (a merge that failed half-way: the parts stay, and a rerun merges again)."""
    for draft in out.glob(".*tmp*"):
        draft.unlink(missing_ok=True)


def absolute(location: str | None) -> str | None:
    """A local path made absolute; a URL, the ImageNet baseline's name and None stay as they are."""
    if location is None or location == IMAGENET_BASELINE or is_remote(location):
        return location
    return str(Path(location).resolve())


def load_embeddings(directory: str | Path) -> tuple[np.ndarray, np.ndarray, KeyFile, dict[str, Any]]:
    """(embeddings [N, dim] float32 and labels [N, C] uint8, both memory-mapped; the keys; meta)."""
    directory = Path(directory)
    if not (directory / "meta.json").is_file():
        raise ImretError(f"{directory}: no complete embeddings (meta.json is written last); run imret embed")
    meta = json.loads((directory / "meta.json").read_text())
    try:
        embeddings = np.load(directory / "embeddings.npy", mmap_mode="r")
        labels = np.load(directory / "labels.npy", mmap_mode="r")
        keys = KeyFile(directory / "keys")
    except (OSError, ValueError) as exc:
        raise ImretError(f"{directory}: unreadable embeddings ({exc}); run imret embed again") from None
    if not len(embeddings) == len(labels) == len(keys) == meta["count"]:
        raise ImretError(f"{directory}: embeddings, labels and keys disagree on the count; run imret embed again")
    return embeddings, labels, keys, meta
