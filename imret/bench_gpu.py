"""`imret bench gpu`: what one GPU does with imret's hot paths, each figure beside the ceiling it should reach.

- ceiling: the card's measured bf16 matmul rate, turned into training images/s by each model's training FLOPs
  per image (counted by torch's FlopCounterMode: about 10.65 GFLOP for ResNet18 at 224 px).
- ResNet18 at 224 px (bf16, channels_last, batch 128, random resized crop + flip on the device): from batches
  already in GPU memory (what the input pipeline must feed), then through `imret train` from shards with
  decoding in the loader workers (`data.decode: cpu`) and on the GPU (`gpu`), per worker count, with the
  fraction of the in-memory rate that is lost to input (`stall`) and the loop's own input-wait fraction.
- the device augmentation with and without masks; JPEG decoding per CPU core and on the GPU, and from those,
  how many loader cores one GPU needs with each decode path.
- the U-Net's training rate from memory; `imret embed` of the train split against the same model's forward
  pass on batches already in GPU memory (the embedding job's goal: within 10% of it).
- FAISS on the GPUs, 1M x 128: exact search and IVF-PQ (build, search, recall@10 against exact).

Every stage's figures are written the moment they are measured (`out`: one JSON line a stage, flushed), and a
stage that fails is recorded as an error with its message while the others go on. The FAISS stages run in
child processes, since FAISS aborts its process on a CUDA error; with a FAISS that has no GPU support they are
recorded as skipped, with the reason. The photos are the embedded synthetic scenes upscaled with noise to
`side` px JPEGs (about the size a recipe's shards hold), written once per run. `scale` shrinks everything for
the CPU test of this code.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np
import torch

from imret.system import native_bf16, usable_cores


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
    embed_batch: int = 256
    faiss_gallery: int = 1_000_000
    faiss_dim: int = 128
    faiss_queries: int = 1000


FULL, TINY = Scale(), Scale(images=320, side=48, load_size=40, image_size=32, batch=16, steps=6, log_every=2,
                            warmup_intervals=1, unet_batch=8, embed_batch=32, faiss_gallery=12_000, faiss_dim=16,
                            faiss_queries=50)  # fmt: skip


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
    bf16 = device.type == "cuda" and native_bf16()

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


def embed_rates(run: str, shards: Path, scale: Scale, device: torch.device, workers: int) -> dict[str, float]:
    """`imret embed` of the train split (its own rate, after its first batch), against the same model's forward pass
    (decoded uint8 batches already on the device, through the same Embedder) at the same batch size."""
    from imret.embed import Embedder, embed, embed_on_device, load_model

    out = embed(run, shards, "train", out=Path(run) / "bench-embeddings", batch_size=scale.embed_batch, workers=workers)
    job_rate = json.loads((out / "meta.json").read_text())["images_per_s"]
    net, meta = load_model(run)
    embedder = Embedder(net, meta).to(device)
    images = torch.randint(0, 256, (scale.embed_batch, 3, meta["load_size"], meta["load_size"]), dtype=torch.uint8,
                           device=device)  # fmt: skip
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the embedding job sets it
    forward = scale.embed_batch / timed(device, lambda: embed_on_device(embedder, images), repeats=10)
    return {"embed_images_per_s": round(job_rate), "forward_only_images_per_s": round(forward),
            "embed_vs_forward": round(job_rate / forward, 3)}  # fmt: skip


def clustered_vectors(gallery: int, dim: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectors around gallery/100 centres (so that recall means something), and queries near gallery rows."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(max(10, gallery // 100), dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), gallery)] + 0.3 * rng.normal(size=(gallery, dim)).astype(np.float32)
    return vectors, vectors[rng.choice(gallery, queries, replace=False)] + 0.05


def faiss_stage(kind: str, gallery: int, dim: int, queries: int, where: str, exact_path: Path) -> dict[str, Any]:
    """In a child process: build a `kind` index of the clustered vectors on `where` (gpu|cpu) and search it; the
    exact stage leaves its neighbours in `exact_path` for the IVF-PQ stage's recall@10."""
    from imret.faiss_build import gpu_count
    from imret.retrieval import build_index, exact_neighbours, search

    vectors, qs = clustered_vectors(gallery, dim, queries)
    start = time.perf_counter()
    index = build_index(vectors, kind, where)
    figures: dict[str, Any] = {"device": where, "gpus": gpu_count(where), "gallery": gallery, "dim": dim,
                               "queries": queries, "k": 10, "build_s": round(time.perf_counter() - start, 4)}  # fmt: skip
    search(index, qs, 10)  # warm-up: the first search pays for allocations
    start = time.perf_counter()
    found = search(index, qs, 10)[1]
    figures["search_s"] = round(time.perf_counter() - start, 4)
    if kind == "flat":
        np.save(exact_path, found)
    else:
        exact = np.load(exact_path) if exact_path.is_file() else exact_neighbours(vectors, qs, 10, "cpu")
        figures["recall_at_10"] = round(float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact)])), 4)
    return figures


class SkipStage(Exception):
    """A stage that cannot run on this machine (the reason is recorded, the benchmark goes on)."""


class Recorder:
    """The benchmark's stages as they finish: each a JSON line in `out` (flushed at once, so that whatever ends
    the process leaves the figures before it), kept for the summary, and one line of progress on `echo`."""

    def __init__(self, out: Path | None, echo: TextIO):
        self.stages: dict[str, dict[str, Any]] = {}
        self.handle = open(out, "w") if out else None
        self.echo = echo

    def add(self, stage: str, status: str, **fields: Any) -> dict[str, Any]:
        entry = {"status": status, **fields}
        self.stages[stage] = entry
        if self.handle:
            self.handle.write(json.dumps({"stage": stage, **entry}) + "\n")
            self.handle.flush()
        print(f"bench gpu: {stage}: {status}", file=self.echo, flush=True)
        return entry

    def run(self, stage: str, measure: Callable[[], dict[str, Any]], needs: tuple[str, ...] = ()) -> dict[str, Any]:
        missing = [name for name in needs if self.stages.get(name, {}).get("status") != "ok"]
        if missing:
            return self.add(stage, "skipped", reason=f"needs the {', '.join(missing)} stage")
        try:
            figures = measure()
        except SkipStage as exc:
            return self.add(stage, "skipped", reason=str(exc))
        except Exception as exc:  # recorded with its message; the other stages still run
            message = " ".join(str(exc).split()) or type(exc).__name__
            return self.add(stage, "error", error=f"{type(exc).__name__}: {message[:500]}")
        return self.add(stage, "ok", **figures)

    def close(self) -> None:
        if self.handle:
            self.handle.close()


def faiss_in_child(kind: str, scale: Scale, device: torch.device, exact_path: Path) -> dict[str, Any]:
    from imret.faiss_build import describe_builds, load_faiss, run_child

    where = "gpu" if device.type == "cuda" else "cpu"
    faiss = load_faiss()
    if where == "gpu" and not (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus()):
        raise SkipStage(f"the installed FAISS ({describe_builds()}) has no GPU support: pip install -e '.[gpu]'")
    verdict = run_child([sys.executable, "-m", "imret.bench_gpu", kind, str(scale.faiss_gallery), str(scale.faiss_dim),
                         str(scale.faiss_queries), where, str(exact_path)], timeout=600)  # fmt: skip
    if not verdict.pop("ok"):
        raise RuntimeError(f"the FAISS child {verdict['error']}")
    return verdict


def run_gpu_bench(device: torch.device, scale: Scale = FULL, cpu_workers: list[int] | None = None,
                  gpu_workers: list[int] | None = None, out: Path | None = None,
                  echo: TextIO = sys.stderr) -> dict[str, Any]:  # fmt: skip
    """Every stage, in order; returns {"bench", "date", "machine", "device", "seconds", "stages": {name: entry}}
    where an entry is {"status": "ok", figures...}, {"status": "error", "error"} or {"status": "skipped", "reason"}."""
    from imret.bench import machine

    cores = usable_cores()
    cpu_workers = cpu_workers or sorted({min(4, cores), max(1, cores // 2), max(1, cores - 1)})
    gpu_workers = gpu_workers or sorted({min(2, cores), min(4, cores), min(8, cores)})
    if device.type != "cuda":  # nvJPEG needs CUDA: the CPU test of this code runs the worker-decoding path only
        gpu_workers = []
    started = time.perf_counter()
    record = Recorder(out, echo)
    record.add("setup", "ok", date=date.today().isoformat(), machine=machine(), device=str(device),
               torch=torch.__version__, cuda=torch.version.cuda, image_size=scale.image_size, load_size=scale.load_size,
               batch=scale.batch, images=scale.images)  # fmt: skip

    def ceiling() -> dict[str, Any]:
        peak = matmul_peak_flops(device)
        resnet18 = training_flops_per_image("multilabel", "resnet18", scale.image_size)
        unet = training_flops_per_image("segmentation", "resnet18", scale.image_size)
        return {"matmul_tflops": float(f"{peak / 1e12:.3g}"), "resnet18_training_gflop_per_image": round(resnet18 / 1e9, 2),
                "unet_training_gflop_per_image": round(unet / 1e9, 2), "ceiling_images_per_s": round(peak / resnet18)}  # fmt: skip

    def share(rate: float, model: str = "resnet18") -> float | None:
        if record.stages.get("ceiling", {}).get("status") != "ok":
            return None
        c = record.stages["ceiling"]
        return round(rate * c[f"{model}_training_gflop_per_image"] * 1e9 / (c["matmul_tflops"] * 1e12), 4)

    def in_memory(task: str, batch: int, model: str) -> Callable[[], dict[str, Any]]:
        def measure() -> dict[str, Any]:
            rate = train_from_memory(task, "resnet18", scale, batch, device)
            return {"images_per_s": round(rate), "of_ceiling": share(rate, model)}

        return measure

    record.run("ceiling", ceiling)
    record.run("in_memory", in_memory("multilabel", scale.batch, "resnet18"))
    runs: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shards = tmp / "shards"

        def photos() -> dict[str, Any]:
            start = time.perf_counter()
            photo_shards(tmp, scale, cores)
            return {"images": scale.images, "side": scale.side, "seconds": round(time.perf_counter() - start, 1)}

        record.run("photos", photos)
        for decode, counts in (("cpu", cpu_workers), ("gpu", gpu_workers)):
            for workers in counts:
                def shard_training(decode: str = decode, workers: int = workers) -> dict[str, Any]:
                    figures = train_from_shards(tmp, shards, scale, decode, workers, f"{decode}-{workers}")
                    runs.append(figures["run"])
                    rate, memory = figures["images_per_s"], record.stages["in_memory"].get("images_per_s")
                    return {"images_per_s": round(rate), "of_ceiling": share(rate),
                            "stall_vs_in_memory": round(max(0.0, 1 - rate / memory), 3) if memory else None,
                            "input_wait_fraction": round(figures["input_wait_fraction"], 3)}  # fmt: skip

                record.run(f"train_decode_{decode}_workers_{workers}", shard_training, needs=("photos",))
        record.run("augment", lambda: {k: round(v) for k, v in augmentation_rates(scale, device).items()})

        def decoding() -> dict[str, Any]:
            rates = {k: round(v, 1) for k, v in decode_rates(shards, scale, device).items()}
            memory = record.stages["in_memory"].get("images_per_s")
            if memory:  # loader cores that keep the in-memory rate fed
                rates["cores_per_gpu_decode_cpu"] = round(memory / rates["cpu_core_images_per_s"], 1)
                rates["cores_per_gpu_decode_gpu"] = round(memory / rates["tar_read_core_images_per_s"], 1)
            return rates

        record.run("decode", decoding, needs=("photos",))
        record.run("unet_in_memory", in_memory("segmentation", scale.unet_batch, "unet"))

        def embedding() -> dict[str, Any]:
            if not runs:
                raise SkipStage("no training stage finished, so there is no model to embed with")
            return embed_rates(runs[-1], shards, scale, device, min(8, cores))

        record.run("embed", embedding, needs=("photos",))
        exact_path = tmp / "exact-neighbours.npy"
        record.run("faiss_exact", lambda: faiss_in_child("flat", scale, device, exact_path))
        record.run("faiss_ivfpq", lambda: faiss_in_child("ivfpq", scale, device, exact_path))
    seconds = round(time.perf_counter() - started)
    record.add("done", "ok", seconds=seconds)
    record.close()
    setup = record.stages["setup"]
    return {"bench": "gpu", "date": setup["date"], "machine": setup["machine"], "device": setup["device"],
            "seconds": seconds, "stages": record.stages}  # fmt: skip


def format_summary(result: dict[str, Any]) -> str:
    """One line a stage: its status, and its figures or the reason it has none."""
    lines = [f"imret bench gpu, {result['date']}, {result['machine']} ({result['seconds']} s)"]
    for stage, entry in result["stages"].items():
        details = {k: v for k, v in entry.items() if k != "status"}
        text = "  ".join(f"{k}={v}" for k, v in details.items())
        lines.append(f"{stage:28s} {entry['status']:8s} {text}")
    return "\n".join(lines)


if __name__ == "__main__":  # a FAISS stage's child: python -m imret.bench_gpu KIND GALLERY DIM QUERIES WHERE EXACT_PATH
    kind_arg, gallery_arg, dim_arg, queries_arg, where_arg, exact_arg = sys.argv[1:]
    print(json.dumps(faiss_stage(kind_arg, int(gallery_arg), int(dim_arg), int(queries_arg), where_arg, Path(exact_arg))))
