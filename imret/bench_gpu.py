"""`imret bench gpu`: what one GPU does with imret's hot paths, each figure beside the ceiling it should reach.

- ceiling: the card's measured bf16 matmul rate, turned into training images/s by each model's training FLOPs
  per image (counted by torch's FlopCounterMode: about 10.65 GFLOP for ResNet18 at 224 px).
- ResNet18 at 224 px (bf16, channels_last, batch 128, random resized crop + flip on the device): from batches
  already in GPU memory (what the input pipeline must feed), then through `imret train` from shards with
  decoding in the loader workers (`data.decode: cpu`) and on the GPU (`gpu`), per worker count, with the
  fraction of the in-memory rate that is lost to input (`stall`) and the loop's own input-wait fraction.
- the device augmentation with and without masks; JPEG decoding per CPU core and on the GPU, and from those,
  how many loader cores one GPU needs with each decode path.
- the U-Net's training rate from memory; `imret embed` of the train split.
- FAISS on the GPU, 1M x 128: exact search and IVF-PQ (build, search, recall@10 against exact).

The photos are the embedded synthetic scenes upscaled with noise to `side` px JPEGs (about the size a
recipe's shards hold), written once per run. `scale` shrinks everything for the CPU test of this code.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from imret.system import usable_cores


@dataclass
class Scale:
    """Sizes of one benchmark run; `full` is the one on a GPU, `tiny` the CPU test's."""

    images: int = 12800
    side: int = 288  # stored JPEG side
    load_size: int = 256
    image_size: int = 224
    batch: int = 128
    steps: int = 80  # per training run; the first `warmup_intervals` log intervals are left out
    log_every: int = 10
    warmup_intervals: int = 2
    unet_batch: int = 64
    faiss_gallery: int = 1_000_000
    faiss_dim: int = 128
    faiss_queries: int = 1000


FULL, TINY = Scale(), Scale(images=320, side=48, load_size=40, image_size=32, batch=16, steps=6, log_every=2,
                            warmup_intervals=1, unet_batch=8, faiss_gallery=12_000, faiss_dim=16, faiss_queries=50)  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Seconds per call, after warm-up, the device drained before and after."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def matmul_peak_flops(device: torch.device) -> float:
    """The bf16 (CUDA) or float32 (CPU) matrix-multiply rate this device reaches: the practical compute ceiling."""
    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(device, lambda: a @ b, repeats=20 if device.type == "cuda" else 5)


def training_flops_per_image(task_name: str, backbone: str, size: int) -> float:
    """Forward + backward FLOPs of one training image, counted on a batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    task = _task(task_name, backbone, size)
    model = task.build_model()
    images, masks, labels = torch.randn(2, 3, size, size), torch.ones(2, 1, size, size), torch.ones(2, len(task.classes))
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = task.train_loss(model, images, masks, labels, 0)
        loss.backward()
    return counter.get_total_flops() / 2


def _task(task_name: str, backbone: str, size: int):
    from imret.config import Recipe
    from imret.tasks import make_task

    recipe = Recipe()
    recipe.task.name, recipe.model.backbone, recipe.data.image_size = task_name, backbone, size
    return make_task(recipe, [f"class{i}" for i in range(12)])


def train_from_memory(task_name: str, backbone: str, scale: Scale, batch: int, device: torch.device) -> float:
    """Images/s of the training step alone: uint8 batches already on the device, augmented there."""
    from imret.config import AugmentConfig
    from imret.data.augment import DeviceAugment

    task = _task(task_name, backbone, scale.image_size)
    model = task.build_model().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, fused=True)
    augment = DeviceAugment(AugmentConfig(crop="random_resized", hflip=True), scale.image_size, scale.load_size, True).to(device)
    images = torch.randint(0, 256, (batch, 3, scale.load_size, scale.load_size), dtype=torch.uint8, device=device)
    masks = torch.randint(0, 2, (batch, 1, scale.load_size, scale.load_size), dtype=torch.uint8, device=device)
    labels = (torch.rand(batch, 12, device=device) > 0.8).float()
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def step() -> None:
        x, m = augment(images, masks)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = task.train_loss(model, x, m, labels, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return batch / timed(device, step, repeats=max(5, scale.steps // 2), warmup=5)


def _noisy_photo(args: tuple[Path, int, int, int]) -> None:
    """One synthetic scene as a photo-sized JPEG: upscaled, with sensor-like noise so it compresses like one."""
    from PIL import Image

    from imret.data.synth import render_scene

    out, index, base, side = args
    image, mask, garments = render_scene(0, index % base, 96)
    big = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    noise = np.random.default_rng(index).normal(0, 8, big.shape)
    name = f"photo-{index:06d}"
    Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8)).save(out / "images" / f"{name}.jpg", quality=90)
    Image.fromarray(mask).resize((side, side), Image.Resampling.NEAREST).save(out / "masks" / f"{name}.png")
    (out / "labels" / name).write_text(";".join(garments))


def photo_shards(tmp: Path, scale: Scale, workers: int) -> Path:
    from imret.data.build import build_shards
    from imret.data.synth import CLASSES

    folder = tmp / "photos"
    for sub in ("images", "masks", "labels"):
        (folder / sub).mkdir(parents=True)
    jobs = [(folder, i, min(1024, scale.images), scale.side) for i in range(scale.images)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_noisy_photo, jobs, chunksize=64)
    rows = [f"{p.name}.jpg,{p.read_text()}" for p in sorted((folder / "labels").iterdir())]
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (folder / "labels.csv").write_text("image,labels\n" + "\n".join(rows) + "\n")
    shards = tmp / "shards"
    build_shards(folder, "folder", shards, val_fraction=2 * scale.batch / scale.images,
                 samples_per_shard=max(1, scale.images // 64), workers=workers)  # fmt: skip
    return shards


def train_from_shards(tmp: Path, shards: Path, scale: Scale, decode: str, workers: int, name: str) -> dict[str, float]:
    """`imret train` for `scale.steps` steps; the rates of the log intervals after the warm-up ones."""
    from imret.config import load_recipe
    from imret.train import train

    recipe_path = tmp / "recipe.yaml"
    recipe_path.write_text("")
    recipe = load_recipe(recipe_path, [
        f"data.shards={shards}", f"data.image_size={scale.image_size}", f"data.load_size={scale.load_size}",
        f"data.batch_size_per_device={scale.batch}", f"data.workers={workers}", f"data.decode={decode}",
        "augment.crop=random_resized", "augment.hflip=true", "train.max_epochs=1",
        f"train.steps_per_epoch={scale.steps}", f"log.every_n_steps={scale.log_every}", "log.wandb_mode=disabled",
        f"run.dir={tmp / 'runs'}", f"run.name={name}"])  # fmt: skip
    run = train(recipe)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"][scale.warmup_intervals :]
    return {"images_per_s": statistics.median(r["images_per_s"] for r in rows),
            "input_wait_fraction": statistics.median(r["input_wait_fraction"] for r in rows), "run": str(run)}  # fmt: skip


def augmentation_rates(scale: Scale, device: torch.device) -> dict[str, float]:
    from imret.config import AugmentConfig
    from imret.data.augment import DeviceAugment

    augment = DeviceAugment(AugmentConfig(crop="random_resized", hflip=True), scale.image_size, scale.load_size, True).to(device)
    images = torch.randint(0, 256, (scale.batch, 3, scale.load_size, scale.load_size), dtype=torch.uint8, device=device)
    masks = torch.randint(0, 2, (scale.batch, 1, scale.load_size, scale.load_size), dtype=torch.uint8, device=device)
    return {"images_only": scale.batch / timed(device, lambda: augment(images), 20),
            "with_masks": scale.batch / timed(device, lambda: augment(images, masks), 20)}  # fmt: skip


def decode_rates(shards: Path, scale: Scale, device: torch.device) -> dict[str, float]:
    """JPEG decoding at the loading size: one CPU core (the loader's PIL path), the device (nvJPEG, batched),
    and one core reading tars and handing over JPEG bytes (what a worker does with decode: gpu)."""
    from imret.data.device_decode import decode_batch
    from imret.data.manifest import load_manifest
    from imret.data.shards import decode_image, decoded_samples, shard_files

    files = shard_files(shards, load_manifest(shards), "train")
    raw = [s["jpg"] for s in decoded_raw(files[:2])][: scale.batch]
    cpu_s = timed(torch.device("cpu"), lambda: [decode_image(data, scale.load_size) for data in raw], repeats=3, warmup=1)
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in raw]
    keys = [str(i) for i in range(len(raw))]
    device_s = timed(device, lambda: decode_batch(tensors, keys, scale.load_size, device), repeats=10)
    start, count = time.perf_counter(), 0
    for _ in decoded_samples(files[:4], scale.load_size, 12, False, 0, 0.0, keep_jpeg=True):
        count += 1
    read_rate = count / (time.perf_counter() - start)
    return {"cpu_core_images_per_s": len(raw) / cpu_s, "device_images_per_s": len(raw) / device_s,
            "tar_read_core_images_per_s": read_rate,
            "mean_jpeg_kib": float(np.mean([len(d) for d in raw]) / 1024)}  # fmt: skip


def decoded_raw(files):
    from imret.data.shards import read_shard

    for shard in files:
        yield from read_shard(shard)


def embed_rate(run: str, shards: Path, device: torch.device, workers: int) -> float:
    from imret.data.manifest import load_manifest
    from imret.embed import embed

    count = load_manifest(shards)["splits"]["train"]["samples"]
    start = time.perf_counter()
    embed(run, shards, "train", out=Path(run) / "bench-embeddings", batch_size=256, workers=workers)
    return count / (time.perf_counter() - start)


def faiss_figures(scale: Scale, device: torch.device) -> dict[str, Any]:
    """Exact and IVF-PQ search of clustered vectors (so that recall means something), on the GPUs if FAISS has
    GPU support, else on the CPU (the `device` field says which)."""
    from imret.retrieval import build_index, gpu_count, search

    where = "gpu" if device.type == "cuda" else "cpu"
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(max(10, scale.faiss_gallery // 100), scale.faiss_dim)).astype(np.float32)
    gallery = centres[rng.integers(0, len(centres), scale.faiss_gallery)] + 0.3 * rng.normal(
        size=(scale.faiss_gallery, scale.faiss_dim)).astype(np.float32)  # fmt: skip
    queries = gallery[rng.choice(scale.faiss_gallery, scale.faiss_queries, replace=False)] + 0.05
    out: dict[str, Any] = {"device": where, "gpus": gpu_count(where), "gallery": scale.faiss_gallery,
                           "dim": scale.faiss_dim, "queries": scale.faiss_queries, "k": 10}  # fmt: skip
    found = {}
    for kind, name in (("flat", "exact"), ("ivfpq", "ivfpq")):  # one index on the GPUs at a time
        start = time.perf_counter()
        index = build_index(gallery, kind, where)
        out[f"{name}_build_s"] = time.perf_counter() - start
        search(index, queries, 10)  # warm-up: the first search pays for allocations
        start = time.perf_counter()
        found[name] = search(index, queries, 10)[1]
        out[f"{name}_search_s"] = time.perf_counter() - start
        del index
    exact, approx = found["exact"], found["ivfpq"]
    out["ivfpq_recall_at_10"] = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def run_gpu_bench(device: torch.device, scale: Scale = FULL, cpu_workers: list[int] | None = None,
                  gpu_workers: list[int] | None = None) -> dict[str, Any]:  # fmt: skip
    from imret.bench import machine

    cores = usable_cores()
    cpu_workers = cpu_workers or sorted({min(4, cores), max(1, cores // 2), max(1, cores - 1)})
    gpu_workers = gpu_workers or sorted({min(2, cores), min(4, cores), min(8, cores)})
    if device.type != "cuda":  # nvJPEG needs CUDA: the CPU test of this code runs the worker-decoding path only
        gpu_workers = []
    started = time.perf_counter()
    peak = matmul_peak_flops(device)
    flops = {"resnet18": training_flops_per_image("multilabel", "resnet18", scale.image_size),
             "unet": training_flops_per_image("segmentation", "resnet18", scale.image_size)}

    def share(rate: float, model: str = "resnet18") -> float:
        return round(rate * flops[model] / peak, 4)

    result: dict[str, Any] = {
        "bench": "gpu", "date": date.today().isoformat(), "machine": machine(), "device": str(device),
        "image_size": scale.image_size, "load_size": scale.load_size, "batch": scale.batch,
        "matmul_tflops": float(f"{peak / 1e12:.3g}"), "resnet18_training_gflop_per_image": round(flops["resnet18"] / 1e9, 2),
        "ceiling_images_per_s": round(peak / flops["resnet18"]),
    }  # fmt: skip
    memory = train_from_memory("multilabel", "resnet18", scale, scale.batch, device)
    result["in_memory"] = {"images_per_s": round(memory), "of_ceiling": share(memory)}
    with tempfile.TemporaryDirectory() as tmp:
        shards = photo_shards(Path(tmp), scale, cores)
        result["shards"] = {}
        last_run = ""
        for decode, counts in (("cpu", cpu_workers), ("gpu", gpu_workers)):
            for workers in counts:
                figures = train_from_shards(Path(tmp), shards, scale, decode, workers, f"{decode}-{workers}")
                last_run = figures.pop("run")
                rate = figures["images_per_s"]
                result["shards"][f"decode_{decode}_workers_{workers}"] = {
                    "images_per_s": round(rate), "of_ceiling": share(rate),
                    "stall_vs_in_memory": round(max(0.0, 1 - rate / memory), 3),
                    "input_wait_fraction": round(figures["input_wait_fraction"], 3)}  # fmt: skip
        result["augment_images_per_s"] = {k: round(v) for k, v in augmentation_rates(scale, device).items()}
        decoding = decode_rates(shards, scale, device)
        result["decode"] = {k: round(v, 1) for k, v in decoding.items()}
        result["cores_per_gpu"] = {  # loader cores that keep the in-memory rate fed
            "decode_cpu": round(memory / decoding["cpu_core_images_per_s"], 1),
            "decode_gpu": round(memory / decoding["tar_read_core_images_per_s"], 1)}  # fmt: skip
        unet = train_from_memory("segmentation", "resnet18", scale, scale.unet_batch, device)
        result["unet_in_memory"] = {"images_per_s": round(unet), "of_ceiling": share(unet, "unet"),
                                    "training_gflop_per_image": round(flops["unet"] / 1e9, 2)}  # fmt: skip
        result["embed_images_per_s"] = round(embed_rate(last_run, shards, device, min(8, cores)))
    result["faiss"] = faiss_figures(scale, device)
    result["seconds"] = round(time.perf_counter() - started)
    return result
