"""Key files and the streamed embedding merge: what the bounded-memory formats hold is what went in."""

import numpy as np
import pytest

from imret.embed import load_embeddings, merge_parts, read_masks, write_masks
from imret.keyfile import KeyFile, KeyWriter


def test_keys_round_trip_with_random_access(tmp_path):
    batches = [["a-1", "b-22"], [], ["c-333"], [f"k-{i}" for i in range(1000)]]
    writer = KeyWriter(tmp_path / "keys")
    for batch in batches:
        writer.add(batch)
    assert writer.close() == 1003
    keys = KeyFile(tmp_path / "keys")
    everything = [k for batch in batches for k in batch]
    assert len(keys) == 1003 and list(keys) == everything
    assert keys[0] == "a-1" and keys[2] == "c-333" and keys[-1] == "k-999" and keys[3:6] == everything[3:6]
    assert keys.index("k-500") == 503 and "b-22" in keys
    with pytest.raises(IndexError):
        keys[1003]
    again = KeyWriter(tmp_path / "other")
    again.add(everything)
    again.close()
    assert KeyFile(tmp_path / "other").digest() == keys.digest()
    empty = KeyWriter(tmp_path / "empty")
    assert empty.close() == 0 and list(KeyFile(tmp_path / "empty")) == []


def test_a_truncated_key_file_is_refused(tmp_path):
    writer = KeyWriter(tmp_path / "keys")
    writer.add(["one", "two"])
    writer.close()
    (tmp_path / "keys.txt").write_bytes(b"one\n")
    with pytest.raises(ValueError, match="4 bytes, its offsets say 8"):
        KeyFile(tmp_path / "keys")


def test_the_streamed_merge_holds_the_parts_in_order_and_loads_as_memory_maps(tmp_path):
    rng = np.random.default_rng(0)
    parts, sizes = [], [3, 0, 5, 2]
    for i, size in enumerate(sizes):
        path = tmp_path / f"train-{i:06d}.npz"
        np.savez(path, keys=np.array([f"s{i}-{j}" for j in range(size)], dtype=str).reshape(size),
                 labels=rng.integers(0, 2, (size, 4)).astype(np.uint8), embeddings=rng.normal(size=(size, 6)).astype(np.float32))  # fmt: skip
        parts.append(path)
    meta = {"task": "multilabel", "embedding": {"layer": "pooled", "dim": 6}, "initialisation": "scratch"}
    fingerprint = {"model": "runs/x", "mask_with": None, "shards_manifest_hash": "h"}
    manifest = {"classes": ["a", "b", "c", "d"], "splits": {"train": {"samples": 10}}}
    out = tmp_path / "out"
    out.mkdir()
    merge_parts(out, parts, meta, fingerprint, manifest, "train", str(tmp_path))
    vectors, labels, keys, loaded = load_embeddings(out)
    assert isinstance(vectors, np.memmap) and isinstance(labels, np.memmap) and loaded["count"] == 10
    expected = [np.load(p) for p in parts]
    assert np.array_equal(vectors, np.concatenate([e["embeddings"] for e in expected]))
    assert np.array_equal(labels, np.concatenate([e["labels"] for e in expected]))
    assert list(keys) == [k for e in expected for k in e["keys"].tolist()]
    assert not list(out.glob(".*tmp*"))


def test_cached_masks_are_packed_and_read_back_exactly(tmp_path):
    masks = (np.random.default_rng(1).random((7, 30, 30)) > 0.6).astype(np.uint8)
    write_masks(tmp_path / "m.masks.npz", masks)
    assert np.array_equal(read_masks(tmp_path / "m.masks.npz"), masks)
    assert (tmp_path / "m.masks.npz").stat().st_size < masks.nbytes / 4
    write_masks(tmp_path / "none.masks.npz", np.zeros((0, 1, 1), np.uint8))
    assert read_masks(tmp_path / "none.masks.npz").shape[0] == 0
