"""`imret bench`: throughput of imret's hot paths as a ratio against a plain baseline measured in the same run.

loader: the embedded data, upscaled to photo size (`source_size`, as real datasets come), read for one epoch
        by a plain map-style Dataset that opens and resizes each image file and mask with PIL, against
        imret's streaming loader over shards built from the same files with --max-side near the training
        size; same workers and batch size. Also the device augmentation on this machine's device.
train:  one epoch of `imret train` (small CNN, random crop + flip on the device) against a plain loop: a PIL
        folder Dataset with torchvision's CPU transforms in DataLoader workers, the same model and optimiser.
embed:  `imret embed` of the train split against a plain loop that opens, resizes, centre-crops and
        normalises each file with PIL and embeds batch by batch with the same exported model in the main
        process; both warmed up first, and the largest difference between their embeddings is reported.
faiss:  exact k-NN of 500 queries against a gallery: FAISS with its default BLAS threshold (a scan per query
        below it), FAISS as imret configures it, and a plain torch matmul + topk.
build:  `imret shards build` of the same photos with the local process pool and with Ray on the same cores,
        Ray's start-up outside its timing: Ray's per-task overhead against the plain pool.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from imret.system import usable_cores

BATCH = 64


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {usable_cores()} cores, {device}"


class PlainFolder(Dataset):
    """The baseline: what a first training script does, one PIL open + resize per file."""

    def __init__(self, root: Path, size: int):
        self.images = sorted((root / "images").iterdir())
        self.masks = root / "masks"
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.images[index]
        image = Image.open(path).convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        mask = Image.open(self.masks / f"{path.stem}.png").resize((self.size, self.size), Image.Resampling.NEAREST)
        return {"image": torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1),
                "mask": torch.from_numpy(np.asarray(mask).copy())[None]}  # fmt: skip


def _images_per_second(batches: Callable[[], Any]) -> tuple[float, int]:
    start, count = time.perf_counter(), 0
    for batch in batches():
        count += batch["image"].shape[0]
    return count / (time.perf_counter() - start), count


def _upscaled_copy(src: Path, dst: Path, side: int) -> Path:
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()
    for path in (src / "images").iterdir():
        Image.open(path).resize((side, side), Image.Resampling.BICUBIC).save(dst / "images" / path.name, quality=90)
    for path in (src / "masks").iterdir():
        Image.open(path).resize((side, side), Image.Resampling.NEAREST).save(dst / "masks" / path.name)
    for name in ("labels.csv", "classes.txt"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def bench_loader(images: int, size: int, workers: int, source_size: int = 384) -> dict[str, Any]:
    from imret.config import AugmentConfig
    from imret.data.augment import DeviceAugment
    from imret.data.build import build_shards
    from imret.data.shards import make_loader
    from imret.data.synth import write_synth

    with tempfile.TemporaryDirectory() as tmp:
        data = _upscaled_copy(write_synth(Path(tmp) / "synth", images=images, size=96, seed=0),
                              Path(tmp) / "photos", source_size)  # fmt: skip
        shards = Path(tmp) / "shards"
        per_shard = max(1, images // max(8, 2 * workers))
        start = time.perf_counter()
        build_shards(data, "folder", shards, val_fraction=0.0, samples_per_shard=per_shard, workers=workers,
                     max_side=size)  # fmt: skip
        build_seconds = time.perf_counter() - start
        plain = DataLoader(PlainFolder(data, size), batch_size=BATCH, shuffle=True, num_workers=workers,
                           drop_last=True, prefetch_factor=4 if workers else None)  # fmt: skip
        loader = make_loader(shards, "train", batch_size=BATCH, size=size, training=True, workers=workers,
                             shuffle_buffer=1000, with_masks=True)  # fmt: skip
        _images_per_second(lambda: islice_batches(loader, 3))  # warm the page cache for both
        _images_per_second(lambda: islice_batches(plain, 3))
        plain_rate, _ = _images_per_second(lambda: plain)
        imret_rate, seen = _images_per_second(lambda: loader)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    augment = DeviceAugment(AugmentConfig(crop="random_resized", hflip=True), size, size, training=True).to(device)
    batch = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8, device=device)
    masks = torch.randint(0, 2, (BATCH, 1, size, size), dtype=torch.uint8, device=device)
    augment(batch, masks)
    start = time.perf_counter()
    for _ in range(10):
        augment(batch, masks)
    if device == "cuda":
        torch.cuda.synchronize()
    augment_rate = 10 * BATCH / (time.perf_counter() - start)
    return {
        "bench": "loader", "date": date.today().isoformat(), "machine": machine(), "images": seen,
        "source_size": source_size, "size": size, "workers": workers, "batch": BATCH,
        "build_seconds": round(build_seconds, 1),
        "plain_images_per_s": round(plain_rate, 1), "imret_images_per_s": round(imret_rate, 1),
        "imret_images_per_s_per_worker": round(imret_rate / max(1, workers), 1),
        "speedup_vs_plain": round(imret_rate / plain_rate, 2),
        "augment_device": device, "augment_images_per_s": round(augment_rate, 1),
    }  # fmt: skip


def islice_batches(loader: Any, count: int):
    for index, batch in enumerate(loader):
        if index == count:
            return
        yield batch


def bench_faiss(images: int, size: int, workers: int, queries: int = 500, dim: int = 512, k: int = 5) -> dict[str, Any]:
    """`images` is the gallery size here; size and workers are unused."""
    import faiss

    from imret.retrieval import build_index, search

    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(images, dim)).astype(np.float32)
    query = rng.normal(size=(queries, dim)).astype(np.float32)

    def timed(fn) -> tuple[float, Any]:
        fn()
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    index = build_index(gallery, "flat", device="cpu")
    tuned_s, tuned = timed(lambda: search(index, query, k)[1])
    faiss.cvar.distance_compute_blas_threshold = 20  # FAISS's default
    default_s, default = timed(lambda: index.search(query, k)[1])
    faiss.cvar.distance_compute_blas_threshold = 1
    g, q = torch.from_numpy(gallery), torch.from_numpy(query)
    torch_s, plain = timed(lambda: torch.cdist(q, g).topk(k, largest=False).indices.numpy())
    agree = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(tuned, plain)]))
    return {"bench": "faiss", "date": date.today().isoformat(), "machine": machine(), "gallery": images,
            "queries": queries, "dim": dim, "k": k, "faiss_default_s": round(default_s, 4),
            "faiss_imret_s": round(tuned_s, 4), "torch_matmul_topk_s": round(torch_s, 4),
            "speedup_imret_vs_default": round(default_s / tuned_s, 2), "speedup_imret_vs_torch": round(torch_s / tuned_s, 2),
            "neighbours_agree_with_torch": round(agree, 4), "default_agrees": bool(np.array_equal(default, tuned))}  # fmt: skip


def _synth_shards(tmp: Path, images: int, workers: int) -> tuple[Path, Path]:
    from imret.data.build import build_shards
    from imret.data.synth import write_synth

    data = write_synth(tmp / "synth", images=images, size=96, seed=0)
    shards = tmp / "shards"
    build_shards(data, "folder", shards, val_fraction=0.1, samples_per_shard=max(1, images // 8), workers=max(1, workers))
    return data, shards


def _recipe(tmp: Path, shards: Path, size: int, workers: int, extra: list[str]):
    from imret.config import load_recipe

    path = tmp / "recipe.yaml"
    path.write_text("")
    return load_recipe(path, [f"data.shards={shards}", f"data.image_size={size}", f"data.load_size={size + 8}",
                              "data.batch_size_per_device=64", f"data.workers={workers}", "augment.crop=random",
                              "augment.hflip=true", "model.backbone=small-cnn", "train.max_epochs=1",
                              "log.wandb_mode=disabled", "log.every_n_steps=1", f"run.dir={tmp / 'runs'}", *extra])  # fmt: skip


class PlainLabelled(Dataset):
    """The baseline's dataset: each file opened with PIL, torchvision transforms on the CPU."""

    def __init__(self, root: Path, transform):
        import csv

        self.classes = (root / "classes.txt").read_text().split()
        rows = list(csv.DictReader(open(root / "labels.csv")))
        self.items = [(root / "images" / r["image"], r["labels"].split(";")) for r in rows]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, names = self.items[index]
        target = torch.zeros(len(self.classes))
        target[[self.classes.index(n) for n in names]] = 1.0
        return self.transform(Image.open(path).convert("RGB")), target


def bench_train(images: int, size: int, workers: int) -> dict[str, Any]:
    import json

    from torchvision import transforms as T

    from imret.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from imret.models import RetrievalNet, make_backbone
    from imret.train import train

    with tempfile.TemporaryDirectory() as tmp:
        data, shards = _synth_shards(Path(tmp), images, workers)
        run = train(_recipe(Path(tmp), shards, size, workers, []))
        rates = [r["images_per_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if r["split"] == "train"][1:]  # fmt: skip
        imret_rate = float(np.median(rates))
        transform = T.Compose([T.Resize((size + 8, size + 8)), T.RandomCrop(size), T.RandomHorizontalFlip(),
                               T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # fmt: skip
        loader = DataLoader(PlainLabelled(data, transform), batch_size=64, shuffle=True, num_workers=workers,
                            drop_last=True)  # fmt: skip
        backbone = make_backbone("small-cnn", size)
        model = RetrievalNet(backbone.trunk, torch.nn.Linear(backbone.features, 12), "pooled")
        optimizer = torch.optim.Adam(model.parameters(), 3e-4)
        times, start = [], time.perf_counter()
        for x, y in loader:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append((len(x), time.perf_counter() - start))
            start = time.perf_counter()
        plain_rate = float(np.median([n / t for n, t in times[1:]]))
    return {"bench": "train", "date": date.today().isoformat(), "machine": machine(), "images": images,
            "size": size, "workers": workers, "batch": 64, "plain_images_per_s": round(plain_rate, 1),
            "imret_images_per_s": round(imret_rate, 1), "speedup_vs_plain": round(imret_rate / plain_rate, 2)}  # fmt: skip


def bench_embed(images: int, size: int, workers: int) -> dict[str, Any]:
    from imret.embed import embed, load_embeddings, load_model
    from imret.train import train

    with tempfile.TemporaryDirectory() as tmp:
        data, shards = _synth_shards(Path(tmp), images, workers)
        run = train(_recipe(Path(tmp), shards, size, workers, ["train.steps_per_epoch=1"]))
        net, meta = load_model(str(run))
        embed(str(run), shards, "val", out=Path(tmp) / "warm-up", batch_size=128, workers=workers)
        start = time.perf_counter()
        out = embed(str(run), shards, "train", out=Path(tmp) / "embeddings", batch_size=128, workers=workers)
        imret_seconds = time.perf_counter() - start
        vectors, _, keys, _ = load_embeddings(out)
        files = [data / "images" / f"{key.rsplit('-', 1)[0]}.jpg" for key in keys]  # synth ids name the files
        start = time.perf_counter()
        plain = plain_embeddings(net, files, meta["load_size"], meta["image_size"])
        plain_seconds = time.perf_counter() - start
    return {"bench": "embed", "date": date.today().isoformat(), "machine": machine(), "images": len(keys),
            "size": size, "workers": workers, "batch": 128, "plain_images_per_s": round(len(keys) / plain_seconds, 1),
            "imret_images_per_s": round(len(keys) / imret_seconds, 1),
            "speedup_vs_plain": round(plain_seconds / imret_seconds, 2),
            "max_abs_difference": float(np.abs(plain - vectors).max())}  # fmt: skip


def plain_embeddings(net: torch.nn.Module, files: list[Path], load_size: int, size: int) -> np.ndarray:
    """The baseline: each file opened, resized, centre-cropped and normalised with PIL and torchvision, and
    embedded batch by batch in the main process; the same pixels the model sees in imret."""
    from torchvision import transforms as T

    from imret.data.augment import IMAGENET_MEAN, IMAGENET_STD

    transform = T.Compose([T.Resize((load_size, load_size)), T.CenterCrop(size), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # fmt: skip
    vectors = []
    with torch.no_grad():
        for i in range(0, len(files), 128):
            batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[i : i + 128]])
            vectors.append(net.embed(batch).float().numpy())
    return np.concatenate(vectors)


def bench_build(images: int, size: int, workers: int, samples_per_shard: int = 100) -> dict[str, Any]:
    """`imret shards build` of the same source with the local engine (a process pool of `workers`) and with Ray (a
    local instance of `workers` CPUs, one task a shard), one after the other. Ray's start-up (the instance, and its
    worker processes importing imret: one warm-up task a CPU) is done before its timing starts."""
    from imret.data.build import build_shards
    from imret.data.ray_build import connect

    workers = max(1, workers)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        source = _upscaled_copy(_synth_source(tmp, images), tmp / "photos", size)
        common = dict(val_fraction=0.1, samples_per_shard=samples_per_shard)
        start = time.perf_counter()
        build_shards(source, "folder", tmp / "local", workers=workers, **common)
        local_s = time.perf_counter() - start
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        started = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        try:
            warm = ray.remote(num_cpus=1)(_import_builder)
            ray.get([warm.remote() for _ in range(workers)])
            ray_start_s = time.perf_counter() - started
            connect(None)  # the instance above
            start = time.perf_counter()
            build_shards(source, "folder", tmp / "ray", engine="ray", **common)
            ray_s = time.perf_counter() - start
        finally:
            ray.shutdown()
        same = all((tmp / "local" / p.name).read_bytes() == p.read_bytes() for p in (tmp / "ray").glob("*.tar"))
    return {"bench": "build", "date": date.today().isoformat(), "machine": machine(), "images": images,
            "side": size, "samples_per_shard": samples_per_shard, "workers": workers,
            "local_images_per_s": round(images / local_s, 1), "ray_images_per_s": round(images / ray_s, 1),
            "ray_vs_local": round(local_s / ray_s, 3), "ray_start_s": round(ray_start_s, 1), "same_shards": same}  # fmt: skip


def _synth_source(tmp: Path, images: int) -> Path:
    from imret.data.synth import write_synth

    return write_synth(tmp / "synth", images=images, size=96, seed=0)


def _import_builder() -> bool:
    import imret.data.build  # noqa: F401 (what every shard task imports first)

    return True


BENCHES = {"loader": bench_loader, "train": bench_train, "embed": bench_embed, "faiss": bench_faiss,
           "build": bench_build}  # fmt: skip


def run(what: str, **kwargs: Any) -> dict[str, Any]:
    return BENCHES[what](**kwargs)


def format_result(result: dict[str, Any]) -> str:
    return "\n".join(f"{key:32s} {value}" for key, value in result.items())
