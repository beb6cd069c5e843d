"""Every GPU path of training and embedding at toy size, on a CUDA machine only (`pytest -m gpu tests/gpu`);
elsewhere each test is skipped with the reason. Imports only what a bare GPU machine has besides imret's small
dependencies (torch, torchvision, accelerate, numpy, pillow, pytest), so the marker collects there."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_recipe_overrides
from imret.config import AugmentConfig, load_recipe
from imret.data.augment import DeviceAugment, quarter_turns
from imret.data.device_decode import decode_batch, images_on_device
from imret.data.prefetch import DevicePrefetcher
from imret.data.shards import make_loader
from imret.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
ROOT = Path(__file__).resolve().parents[2]


def loader_batches(shards, decode, size, batch_size=10):
    return list(make_loader(shards, "val", batch_size=batch_size, size=size, training=False, with_masks=True,
                            decode=decode))  # fmt: skip


def gpu_recipe(tmp_path, shards, name, extra=()):
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    return load_recipe(path, tiny_recipe_overrides(shards, tmp_path / "runs", name) + [
        "data.decode=gpu", "train.mixed_precision=bf16", "train.max_epochs=1", "train.steps_per_epoch=3", *extra])  # fmt: skip


def train_rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


@pytest.mark.parametrize("size", [48, 30])  # the stored size, and a downscale
def test_nvjpeg_decoding_matches_the_worker_path(synth_shards, size):
    on_cpu, as_bytes = loader_batches(synth_shards, "cpu", size), loader_batches(synth_shards, "gpu", size)
    for plain, encoded in zip(on_cpu, as_bytes):
        decoded = images_on_device(encoded, size, CUDA)
        assert decoded.device.type == "cuda" and decoded.shape == plain["image"].shape
        difference = (decoded.cpu().float() - plain["image"].float()).abs()
        assert difference.mean() < 4 and torch.quantile(difference.flatten(), 0.99) < 32


def test_batches_decoded_on_the_side_stream_equal_a_decode_that_waits_for_everything(train_shards):
    """The prefetcher decodes batch i+1 on its side stream while the compute stream is busy with batch i; what
    it yields must equal a decode with the device drained before and after (nvJPEG writing on a stream of its
    own once overwrote memory the side stream had just freed: pytorch/vision#9606)."""
    batches = loader_batches(train_shards, "gpu", 24, batch_size=32)
    expected = []
    for batch in batches:
        torch.cuda.synchronize()
        expected.append(decode_batch(batch["image"], batch["key"], 24, CUDA).cpu())
        torch.cuda.synchronize()
    busy = torch.randn(2048, 2048, device=CUDA)
    prefetcher = DevicePrefetcher(batches, CUDA, 24)
    for batch, want in zip(prefetcher, expected):
        for _ in range(4):  # keep the compute stream busy, so the side stream frees and reuses memory meanwhile
            busy = torch.tanh(busy @ busy)
        assert torch.equal(batch["image"].cpu(), want), batch["key"][0]
    assert prefetcher.wait_s > 0


def test_augmentation_makes_no_device_sync():
    gen = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 2, (6, 1, 8, 8), generator=gen).to(torch.uint8).repeat_interleave(8, 2).repeat_interleave(8, 3)
    images, masks = (masks * 255).repeat(1, 3, 1, 1).cuda(), masks.cuda()
    aug = DeviceAugment(AugmentConfig(crop="random_resized", hflip=True, color_jitter=1.0), 48, 64, training=True).cuda()
    aug(images, masks)  # warm-up: kernels loaded
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, m = aug(images, masks)
        quarter_turns(x, torch.randint(0, 4, (len(x),), device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.shape == (6, 3, 48, 48) and m.shape == (6, 1, 48, 48)


TASKS = {"multilabel": [], "triplet": ["task.name=triplet", "task.mining=semi_hard"], "rotation": ["task.name=rotation"],
         "segmentation": ["task.name=segmentation", "model.backbone=resnet18", "data.batch_size_per_device=16"]}  # fmt: skip


@pytest.mark.parametrize("task", TASKS)
def test_a_bf16_step_of_each_task_and_a_nonfinite_one_skipped_on_the_device(tmp_path, train_shards, monkeypatch, task):
    """Three bf16 steps from JPEG bytes decoded on the GPU; the second one's loss is NaN, and the fused optimiser
    skips it on the device (found_inf): the weights stay finite and the skip is counted."""
    from imret.tasks import TASKS as registry

    original, calls = registry[task].train_loss, []

    def second_is_nan(self, *args):
        loss, stats = original(self, *args)
        calls.append(1)
        return (loss * float("nan"), stats) if len(calls) == 2 else (loss, stats)

    monkeypatch.setattr(registry[task], "train_loss", second_is_nan)
    run = train(gpu_recipe(tmp_path, train_shards, task, TASKS[task]))
    assert train_rows(run)[-1]["nonfinite_steps"] == 1
    weights = torch.load(run / "model" / "weights.pt", weights_only=True)
    assert all(torch.isfinite(value.float()).all() for value in weights.values())


def test_compiled_training_on_cuda(tmp_path, train_shards):
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    headers = Path(sysconfig.get_paths()["include"], "Python.h").is_file()
    if not (compiler and headers):
        pytest.skip("train.compile on CUDA: inductor needs a C compiler and the Python headers at run time "
                    f"(compiler: {compiler or 'none'}, Python.h: {'found' if headers else 'missing'})")  # fmt: skip
    run = train(gpu_recipe(tmp_path, train_shards, "compiled", ["train.compile=true"]))
    state = torch.load(run / "model" / "weights.pt", weights_only=True)
    assert state and not [key for key in state if "_orig_mod" in key]


def test_the_embedding_job_on_cuda_decodes_either_way_to_the_same_vectors(tmp_path, train_shards):
    from imret.embed import embed, load_embeddings

    run = train(gpu_recipe(tmp_path, train_shards, "embedded"))
    found = {}
    for decode in ("gpu", "cpu"):
        out = embed(str(run), train_shards, "val", out=tmp_path / f"emb-{decode}", decode=decode, workers=2, batch_size=16)
        vectors, _, keys, meta = load_embeddings(out)
        assert meta["job"]["decode"] == decode and meta["images_per_s"] > 0
        found[decode] = (np.asarray(vectors), list(keys))
    assert found["gpu"][1] == found["cpu"][1]
    a, b = found["gpu"][0], found["cpu"][0]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.98  # the two decode paths differ by a few grey levels, bf16 by a little more


def test_two_ranks_share_one_gpu_over_gloo(tmp_path, train_shards):
    """NCCL refuses two ranks on one GPU; gloo carries DDP's collectives there, and both ranks end alike."""
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    overrides = tiny_recipe_overrides(train_shards, tmp_path / "runs", "shared") + [
        "data.decode=gpu", "train.max_epochs=1", "train.steps_per_epoch=3"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(ROOT / "tests"), str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    # accelerate gives DDP device_ids=[local rank], cuda:1 for rank 1 on a one-GPU machine where its model sits on
    # cuda:0 (it picks the device as local rank modulo the GPUs); with this, DDP takes the module's own device
    env["ACCELERATE_BYPASS_DEVICE_MAP"] = "true"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(Path(__file__).parent / "two_ranks_one_gpu.py"), str(path), str(tmp_path), *overrides],
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks agree: 3 steps each" in result.stderr
    devices = [json.loads((tmp_path / f"rank{r}.json").read_text())["device"] for r in (0, 1)]
    if torch.cuda.device_count() == 1:
        assert devices == ["cuda:0", "cuda:0"]


def test_the_doctor_passes_a_working_gpu_machine():
    from imret.doctor import run_checks

    checks = {check.name: check for check in run_checks()}
    for index in range(torch.cuda.device_count()):
        assert checks[f"gpu {index}"].status in ("ok", "warning") and checks[f"nvjpeg gpu {index}"].status == "ok"
    assert checks["cuda"].status == "ok" and checks["nccl"].status == "ok"
    failing = {name for name, check in checks.items() if check.status == "error"}
    assert failing <= {"faiss"}, [checks[name] for name in failing]  # a FAISS without GPU support is the fix it names
