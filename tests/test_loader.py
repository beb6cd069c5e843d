"""The streaming loader: coverage per rank and worker, equal steps, and what it does with bad shards."""

import json
import logging
import os
import pickle
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from imret.data.manifest import load_manifest
from imret.data.shards import ShardBatches, decode_image, make_loader, read_shard, shard_files
from imret.errors import DataError
from shard_tools import copy_build, rewrite_shard, sync_manifest


def keys_of(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


def all_keys(shards: Path, split: str) -> set[str]:
    loader = make_loader(shards, split, batch_size=7, size=32, training=False)
    return set(keys_of(loader))


def test_batches_are_fixed_size_uint8_with_labels_and_masks(synth_shards):
    loader = make_loader(synth_shards, "train", batch_size=8, size=40, training=True, with_masks=True,
                         shuffle_buffer=20)
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 3, 40, 40) and batch["image"].dtype == torch.uint8
    assert batch["mask"].shape == (8, 1, 40, 40) and set(batch["mask"].unique().tolist()) <= {0, 1}
    assert batch["labels"].shape == (8, 12) and ((batch["labels"] == 0) | (batch["labels"] == 1)).all()
    assert 1 <= batch["labels"].sum(1).min() and batch["labels"].sum(1).max() <= 5


def test_reduced_size_jpeg_decoding_matches_a_full_decode(synth_dir):
    path = next((synth_dir / "images").iterdir())
    full = Image.open(path).convert("RGB").resize((24, 24), Image.Resampling.BILINEAR)
    fast = decode_image(path.read_bytes(), 24).permute(1, 2, 0).numpy().astype(float)
    assert np.abs(fast - np.asarray(full, dtype=float)).mean() < 12


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_ranks_get_disjoint_samples_and_equal_steps(synth_shards, world, workers):
    train = all_keys(synth_shards, "train")
    for epoch in (0, 1):
        seen, steps = [], []
        for rank in range(world):
            loader = make_loader(synth_shards, "train", batch_size=4, size=32, training=True, rank=rank,
                                 world=world, workers=workers, shuffle_buffer=10)
            loader.set_epoch(epoch)
            keys = keys_of(loader)
            assert len(keys) == 4 * len(loader)
            steps.append(len(loader))
            seen += keys
        assert len(set(steps)) == 1 and steps[0] > 0
        assert len(seen) == len(set(seen)) and set(seen) <= train  # at most once per epoch


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1)])
def test_validation_sees_every_sample_exactly_once(synth_shards, world, workers):
    manifest = load_manifest(synth_shards)
    seen = Counter()
    for rank in range(world):
        loader = make_loader(synth_shards, "val", batch_size=4, size=32, training=False, rank=rank, world=world,
                             workers=workers)
        keys = keys_of(loader)
        assert len(list(iter(loader))) == len(loader)
        seen.update(keys)
    assert sum(seen.values()) == manifest["splits"]["val"]["samples"] and set(seen.values()) == {1}


def test_shard_order_is_deterministic_per_epoch(synth_shards):
    def order(epoch, seed=0):
        loader = make_loader(synth_shards, "train", batch_size=4, size=32, training=True, seed=seed,
                             shuffle_buffer=8)
        loader.set_epoch(epoch)
        return keys_of(loader)

    assert order(0) == order(0) and order(1) == order(1)
    assert order(0) != order(1) and order(0) != order(0, seed=1)


def test_too_few_shards_for_the_ranks_is_an_error_and_workers_are_clamped(synth_shards, caplog):
    with pytest.raises(DataError, match="9 shards for 10 ranks"):
        make_loader(synth_shards, "train", batch_size=4, size=32, training=True, world=10, workers=1)
    with caplog.at_level(logging.WARNING, logger="imret.data"):
        loader = make_loader(synth_shards, "train", batch_size=4, size=32, training=True, world=4, workers=4)
    assert "feed only 2 of 4 loader workers" in caplog.text and loader.loader.num_workers == 2
    assert all(len(workers) == 2 and all(workers) for workers in loader.stream.assignment(0))


def test_no_manifest_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no manifest.json, so not a finished shard build"):
        make_loader(tmp_path, "train", batch_size=4, size=32, training=True)


def test_masks_from_shards_without_masks_is_an_error(shards_without_masks):
    with pytest.raises(DataError, match="masks were asked for, and these shards have none"):
        make_loader(shards_without_masks, "train", batch_size=4, size=32, training=True, with_masks=True)


def test_a_pickle_member_is_never_unpickled(tmp_path, synth_shards):
    shards = copy_build(synth_shards, tmp_path / "s")
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    def add_trap(members):
        key = members[0][0].split(".")[0]
        return [(f"{key}.pyd", pickle.dumps(Trap())), (f"{key}.pickle", pickle.dumps(Trap()))] + members

    rewrite_shard(shards, "train-000000.tar", add_trap)
    keys = keys_of(make_loader(shards, "train", batch_size=1, size=32, training=True))
    assert len(keys) == load_manifest(shards)["splits"]["train"]["samples"]
    assert not marker.exists()


def corrupt_images(count):
    def edit(members):
        done, out = 0, []
        for name, payload in members:
            if name.endswith(".jpg") and done < count:
                payload, done = b"garbage" + payload[:50], done + 1
            out.append((name, payload))
        return out

    return edit


def test_a_corrupt_sample_is_skipped_counted_and_never_slept_on(tmp_path, synth_shards, caplog, monkeypatch):
    shards = copy_build(synth_shards, tmp_path / "s")
    rewrite_shard(shards, "train-000000.tar", corrupt_images(1))
    loader = make_loader(shards, "train", batch_size=1, size=32, training=False, max_bad_fraction=0.05)

    def no_sleep(seconds):  # webdataset's warn_and_continue sleeps half a second per bad sample
        raise AssertionError(f"slept {seconds} s")

    monkeypatch.setattr(time, "sleep", no_sleep)
    with caplog.at_level(logging.WARNING, logger="imret.data"):
        keys = keys_of(loader)
    assert len(keys) == load_manifest(shards)["splits"]["train"]["samples"] - 1
    assert "skipping corrupt sample" in caplog.text and "train-000000.tar" in caplog.text


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_batches_never_span_shards_and_end_each_shard_once(tmp_path, synth_shards, workers):
    shards = copy_build(synth_shards, tmp_path / "s")
    rewrite_shard(shards, "train-000001.tar", corrupt_images(10))  # every sample of this shard
    files = shard_files(shards, load_manifest(shards), "train")
    seen, ends = defaultdict(list), Counter()
    for batch in DataLoader(ShardBatches(files, 32, 12, batch_size=4), batch_size=None, num_workers=workers):
        assert not ends[batch["shard"]], "a batch after its shard's last one"
        assert len(batch["key"]) == len(batch["image"]) == len(batch["labels"]) <= 4
        seen[batch["shard"]] += batch["key"]
        ends[batch["shard"]] += batch["last"]
    assert ends == Counter({index: 1 for index in range(len(files))})
    expected = {index: [raw["__key__"] for raw in read_shard(shard)] for index, shard in enumerate(files)}
    assert dict(seen) == {**expected, 1: []}  # the corrupt shard ends with no keys, the others with all, in order


def test_too_many_corrupt_samples_fail_the_run(tmp_path, synth_shards):
    shards = copy_build(synth_shards, tmp_path / "s")
    rewrite_shard(shards, "train-000000.tar", corrupt_images(3))
    loader = make_loader(shards, "train", batch_size=1, size=32, training=False, max_bad_fraction=0.02)
    with pytest.raises(DataError, match="more than data.max_bad_fraction"):
        keys_of(loader)


def test_corrupt_samples_never_cost_a_rank_its_steps(tmp_path, synth_shards):
    shards = copy_build(synth_shards, tmp_path / "s")
    for name in ("train-000000.tar", "train-000001.tar"):
        rewrite_shard(shards, name, corrupt_images(1))
    steps = set()
    for rank in range(2):
        loader = make_loader(shards, "train", batch_size=3, size=32, training=True, rank=rank, world=2,
                             max_bad_fraction=0.1)
        assert len(keys_of(loader)) == 3 * len(loader)
        steps.add(len(loader))
    assert len(steps) == 1


def test_a_truncated_shard_fails_with_its_name(tmp_path, synth_shards):
    shards = copy_build(synth_shards, tmp_path / "s")
    shard = shards / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(DataError, match="train-000001.tar: 5000 bytes, the manifest says"):
        keys_of(make_loader(shards, "train", batch_size=1, size=32, training=False))
    sync_manifest(shards, "train-000001.tar")  # same bytes as the manifest: the tar itself must tell
    with pytest.raises(DataError, match="train-000001.tar: truncated or corrupt after"):
        keys_of(make_loader(shards, "train", batch_size=1, size=32, training=False))


def test_an_altered_shard_is_caught_as_it_streams(tmp_path, synth_shards):
    shards = copy_build(synth_shards, tmp_path / "s")
    shard = shards / "val-000001.tar"
    payload = bytearray(shard.read_bytes())
    payload[len(payload) // 3] ^= 0x01  # inside a sample: the tar still parses, only the checksum knows
    shard.write_bytes(bytes(payload))
    with pytest.raises(DataError, match=r"^shard .*val-000001.tar: sha256 differs from the manifest$"):
        keys_of(make_loader(shards, "val", batch_size=1, size=32, training=False, max_bad_fraction=0.5))


def test_a_shard_cut_at_a_member_boundary_is_caught_by_its_count(tmp_path, synth_shards):
    shards = copy_build(synth_shards, tmp_path / "s")
    rewrite_shard(shards, "train-000002.tar", lambda members: members[:-3])  # a valid tar, one sample short
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][2]["samples"] += 1  # ...of what the manifest promises
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train-000002.tar: \d+ samples, the manifest says"):
        keys_of(make_loader(shards, "train", batch_size=1, size=32, training=False))


def test_two_gloo_ranks_under_torchrun(tmp_path, synth_shards):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    probe = Path(__file__).parent / "ddp_loader_probe.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe),
           str(synth_shards), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    train = all_keys(synth_shards, "train")
    for epoch in ("0", "1"):
        a, b = (report["train"][epoch] for report in reports)
        assert a["steps"] == b["steps"] > 0 and len(a["keys"]) == len(b["keys"]) == a["steps"] * 4
        for verdicts in (a, b):  # each rank checked the union of what every rank read
            assert verdicts["seen_once"] and verdicts["all_from_train"] and verdicts["unseen_is_the_remainder"]
        assert len(train) - 2 * a["steps"] * 4 == a["remainder"] == b["remainder"]
    val = reports[0]["val"] + reports[1]["val"]
    assert sorted(val) == sorted(all_keys(synth_shards, "val"))
    assert all(report["backend"] == "gloo" and report["world"] == 2 for report in reports)
