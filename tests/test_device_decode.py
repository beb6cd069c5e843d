"""data.decode: gpu. Workers hand over JPEG bytes and the batch is decoded by one batched call; torchvision's
call decodes on the CPU too, which is how these tests hold the device path to the loader's own (PIL) path."""

import io
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import imret.train
from conftest import tiny_recipe_overrides
from imret.cli import main
from imret.config import load_recipe
from imret.data.build import build_shards
from imret.data.device_decode import decode_batch, images_on_device
from imret.data.shards import make_loader
from imret.train import train

CPU = torch.device("cpu")


def batches(shards, decode, size):
    return list(make_loader(shards, "val", batch_size=10, size=size, training=False, with_masks=True, decode=decode))


@pytest.mark.parametrize("size", [48, 30, 20])  # the stored size, a downscale, and one past PIL's DCT shortcut
def test_device_path_matches_the_worker_path(synth_shards, size):
    on_cpu, as_bytes = batches(synth_shards, "cpu", size), batches(synth_shards, "gpu", size)
    assert [b["key"] for b in on_cpu] == [b["key"] for b in as_bytes]
    for plain, encoded in zip(on_cpu, as_bytes):
        assert isinstance(encoded["image"], list) and all(item.dim() == 1 for item in encoded["image"])
        assert torch.equal(plain["mask"], encoded["mask"]) and torch.equal(plain["labels"], encoded["labels"])
        decoded = images_on_device(encoded, size, CPU)
        assert decoded.shape == plain["image"].shape and decoded.dtype == torch.uint8
        difference = (decoded.float() - plain["image"].float()).abs()
        assert difference.mean() < 4 and torch.quantile(difference.flatten(), 0.99) < 32


def test_png_samples_fall_back_to_the_workers_and_say_so_once(tmp_path, synth_dir, caplog):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    labels = (data / "labels.csv").read_text().splitlines()
    for index, line in enumerate(labels[1:40:2], start=1):  # every other one of the first images becomes a PNG
        name = line.split(",")[0]
        Image.open(data / "images" / name).save(data / "images" / name.replace(".jpg", ".png"))
        (data / "images" / name).unlink()
        labels[2 * index - 1] = line.replace(".jpg", ".png", 1)
    (data / "labels.csv").write_text("\n".join(labels) + "\n")
    shards = tmp_path / "shards"
    build_shards(data, "folder", shards, val_fraction=0.5, samples_per_shard=200, workers=0)
    mixed = batches(shards, "gpu", 32)
    kinds = {item.dim() for batch in mixed for item in batch["image"]}
    assert kinds == {1, 3}  # JPEG bytes and PNGs decoded by the worker
    with caplog.at_level(logging.INFO, logger="imret.data"):
        decoded = [images_on_device(batch, 32, CPU) for batch in mixed]
    assert sum("PNG and WebP samples are decoded on the CPU" in r.message for r in caplog.records) <= 1
    plain = batches(shards, "cpu", 32)
    for got, want in zip(decoded, plain):
        assert (got.float() - want["image"].float()).abs().mean() < 4


def test_decode_batch_keeps_the_order_of_a_mixed_batch():
    ramp = np.linspace(0, 255, 16)
    image = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128.0), -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=100)
    jpeg = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    zeros = torch.zeros(3, 16, 16, dtype=torch.uint8)
    out = decode_batch([zeros, jpeg, zeros], ["a", "b", "c"], 16, CPU)
    assert out.shape == (3, 3, 16, 16) and not out[0].any() and not out[2].any()
    assert (out[1].permute(1, 2, 0).float() - torch.from_numpy(image).float()).abs().mean() < 3


def test_gpu_decoding_without_cuda_is_one_clear_line(tmp_path, train_shards, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    overrides = tiny_recipe_overrides(train_shards, tmp_path / "runs") + ["data.decode=gpu"]
    assert main(["train", str(path)] + [a for o in overrides for a in ("--set", o)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imret: error: data.decode: gpu decodes with nvJPEG on a CUDA device")
    assert main(["embed", "imagenet-resnet18", "--shards", str(train_shards), "--split", "val", "--decode", "gpu"]) == 2
    assert "data.decode: gpu decodes with nvJPEG" in capsys.readouterr().err


def test_the_trainer_runs_on_jpeg_bytes(tmp_path, train_shards, monkeypatch):
    """The whole loop (training, validation, figures) on batches whose images arrive as bytes, decoded on the
    CPU by the device path: the check that refuses decode: gpu without CUDA is lifted for this test only."""
    monkeypatch.setattr(imret.train, "check_decode_device", lambda decode, device: None)
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    recipe = load_recipe(path, tiny_recipe_overrides(train_shards, tmp_path / "runs") + [
        "data.decode=gpu", "data.load_size=40", "augment.crop=random", "augment.hflip=true"])  # fmt: skip
    run = train(recipe)
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert len(val) == 3 and min(r["loss"] for r in val[1:]) < val[0]["loss"]


def test_a_query_is_decoded_by_the_path_that_decoded_its_gallery(synth_shards):
    """A gallery decoded on the device gets queries through the device path's decoder and resize, a CPU-decoded
    one through PIL's; either way a truncated file is refused."""
    from imret.errors import ImretError
    from imret.search import decode_query

    encoded = batches(synth_shards, "gpu", 30)[0]
    data = encoded["image"][0].numpy().tobytes()
    gallery_row = images_on_device(encoded, 30, CPU)[0]
    plain_row = batches(synth_shards, "cpu", 30)[0]["image"][0]
    assert torch.equal(decode_query(data, 30, "gpu"), gallery_row)
    assert torch.equal(decode_query(data, 30, "cpu"), plain_row) and not torch.equal(gallery_row, plain_row)
    for decode in ("cpu", "gpu"):
        with pytest.raises(ImretError, match="not a readable image"):
            decode_query(data[: len(data) // 2], 30, decode)


@pytest.mark.parametrize("mode, kept", [("RGB", True), ("L", True), ("CMYK", False)])
def test_only_jpegs_that_nvjpeg_turns_into_rgb_stay_encoded(mode, kept):
    from imret.data.shards import jpeg_bytes

    buffer = io.BytesIO()
    Image.new(mode, (16, 8)).save(buffer, format="JPEG")
    assert (jpeg_bytes(buffer.getvalue()) is not None) == kept
    png = io.BytesIO()
    Image.new("RGB", (16, 8)).save(png, format="PNG")
    assert jpeg_bytes(png.getvalue()) is None  # a PNG named .jpg
