"""The shard builder on each source format, with the rejects it must list and the oddities it must absorb."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from imret.cli import main
from imret.data.build import build_shards, verify_shards
from imret.data.manifest import load_manifest
from imret.data.plan import ShardPlanner, sample_key
from imret.data.sources import Record, Source, decode_rle
from imret.errors import DataError


def rgb(w=20, h=12, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def read_samples(shard_dir: Path) -> dict[str, dict]:
    """Every sample in every shard, by original id: {"key", "meta", "image" (PIL), "mask" (np or None)}."""
    out = {}
    for tar_path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {}
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, files in members.items():
            meta = json.loads(files["json"])
            image_ext = next(e for e in ("jpg", "png", "webp") if e in files)
            mask = np.asarray(Image.open(io.BytesIO(files["mask.png"]))) if "mask.png" in files else None
            out[meta["id"]] = {"key": key, "meta": meta, "image": Image.open(io.BytesIO(files[image_ext])),
                               "mask": mask, "split": tar_path.name.split("-")[0]}
    return out


def folder(root: Path, images: dict, labels: dict, masks: dict | None = None, classes=None) -> Path:
    (root / "images").mkdir(parents=True)
    for name, payload in images.items():
        path = root / "images" / name
        path.write_bytes(payload) if isinstance(payload, bytes) else payload.save(path)
    if masks is not None:
        (root / "masks").mkdir()
        for stem, array in masks.items():
            Image.fromarray(array).save(root / "masks" / f"{stem}.png")
    rows = "".join(f'"{name}",{";".join(tags)}\n' for name, tags in labels.items())
    (root / "labels.csv").write_text("image,labels\n" + rows, encoding="utf-8")
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_folder_round_trip_keeps_ids_labels_and_masks(tmp_path):
    ids = ["plain", "dotted.name.v2", "ünïcødé 衣服", "a/b"[0] + "-dash"]
    images = {f"{i}.png": rgb(seed=n) for n, i in enumerate(ids)}
    masks = {i: (np.arange(240).reshape(12, 20) % (n + 2) == 0).astype(np.uint8) * 7 for n, i in enumerate(ids)}
    labels = {f"{i}.png": ["shirt", "hat"][: n % 2 + 1] for n, i in enumerate(ids)}
    src = folder(tmp_path / "src", images, labels, masks, classes=["hat", "shirt"])
    manifest = build_shards(src, "folder", tmp_path / "out", val_fraction=0.25, workers=0)
    samples = read_samples(tmp_path / "out")
    assert set(samples) == set(ids) and manifest["has_masks"] and manifest["classes"] == ["hat", "shirt"]
    assert manifest["splits"]["val"]["samples"] == 1 and manifest["splits"]["train"]["samples"] == 3
    for i in ids:
        s = samples[i]
        assert "." not in s["key"] and s["key"].isascii()
        assert s["meta"]["labels"] == sorted(["hat", "shirt"].index(t) for t in labels[f"{i}.png"])
        assert np.array_equal(np.asarray(s["image"]), np.asarray(images[f"{i}.png"]))  # PNG stored as is
        assert np.array_equal(s["mask"], np.where(masks[i] > 0, 255, 0))
    assert verify_shards(tmp_path / "out") == []


def test_rejects_are_listed_with_reasons_and_the_rest_kept(tmp_path):
    good = io.BytesIO()
    rgb(64, 48).save(good, format="JPEG")
    data = good.getvalue()
    images = {"ok.jpg": data, "trunc.jpg": data[: len(data) // 2], "empty.jpg": b"", "junk.jpg": b"not an image",
              "badmask.jpg": data, "unknown.jpg": data, "norow.jpg": data, "notes.txt": b"hello", "dirmask.jpg": data}
    labels = {n: ["shirt"] for n in images if n not in ("norow.jpg",)}
    labels["unknown.jpg"] = ["shirt", "cape"]
    labels["ghost.jpg"] = ["shirt"]
    masks = {Path(n).stem: np.ones((48, 64), np.uint8) for n in images}
    masks["badmask"] = np.ones((10, 10), np.uint8)
    src = folder(tmp_path / "src", images, labels, masks, classes=["shirt"])
    (src / "masks" / "dirmask.png").unlink()
    (src / "masks" / "dirmask.png").mkdir()  # an annotation that exists and cannot be read (EISDIR)
    manifest = build_shards(src, "folder", tmp_path / "out", workers=2)
    reasons = {r["source"]: r["reason"] for r in manifest["rejected"]}
    assert reasons["images/trunc.jpg"].startswith("cannot decode image")
    assert reasons["images/empty.jpg"] == "empty file"
    assert reasons["images/junk.jpg"].startswith("cannot decode image")
    assert reasons["images/badmask.jpg"] == "mask is 10x10, image is 64x48"
    assert reasons["images/unknown.jpg"] == "unknown class 'cape'"
    assert reasons["images/norow.jpg"] == "no row in labels.csv"
    assert reasons["images/notes.txt"] == "unsupported extension '.txt'"
    assert reasons["labels.csv:ghost.jpg"] == "image file missing"
    assert reasons["images/dirmask.jpg"].startswith("cannot read annotation") and "directory" in reasons["images/dirmask.jpg"]
    assert len(reasons) == 9
    assert set(read_samples(tmp_path / "out")) == {"ok"}

    with pytest.raises(DataError, match="--strict: 9 rejected"):
        build_shards(src, "folder", tmp_path / "strict", workers=0, strict=True)
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_image_modes_become_rgb_and_exif_orientation_is_applied(tmp_path):
    base = rgb(30, 20)
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    base.save(rotated, format="JPEG", exif=exif, quality=100)
    cmyk = io.BytesIO()
    base.convert("CMYK").save(cmyk, format="JPEG")
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited over white
    images = {"gray.png": base.convert("L"), "cmyk.jpg": cmyk.getvalue(), "palette.png": base.convert("P"),
              "alpha.png": rgba, "rotated.jpg": rotated.getvalue(), "g16.png": Image.fromarray(
                  (np.arange(600).reshape(20, 30) * 100).astype(np.uint16))}
    masks = {Path(n).stem: np.zeros((20, 30), np.uint8) for n in images}
    masks["rotated"] = np.zeros((20, 30), np.uint8)  # raw orientation: rotated along with the image
    masks["rotated"][:, :5] = 1  # left columns of the raw image -> top rows once displayed
    src = folder(tmp_path / "src", images, {n: ["x"] for n in images}, masks)
    manifest = build_shards(src, "folder", tmp_path / "out", workers=0)
    assert manifest["rejected"] == []
    samples = read_samples(tmp_path / "out")
    for s in samples.values():
        assert s["image"].mode == "RGB"
    assert np.asarray(samples["alpha"]["image"]).min() == 255
    assert samples["rotated"]["image"].size == (20, 30)
    assert samples["rotated"]["mask"][:5].all() and not samples["rotated"]["mask"][5:].any()
    assert np.asarray(samples["g16"]["image"]).max() > 200  # scaled, not clipped to white


def test_max_side_downscales_image_and_mask_together(tmp_path):
    mask = np.zeros((60, 100), np.uint8)
    mask[:, 50:] = 1
    src = folder(tmp_path / "src", {"big.png": rgb(100, 60)}, {"big.png": ["x"]}, {"big": mask})
    build_shards(src, "folder", tmp_path / "out", max_side=50, workers=0, val_fraction=0.0)
    s = read_samples(tmp_path / "out")["big"]
    assert s["image"].size == (50, 30) and s["mask"].shape == (30, 50)
    assert set(np.unique(s["mask"])) == {0, 255} and s["mask"][:, 26:].all() and not s["mask"][:, :24].any()
    assert s["meta"]["width"] == 50 and s["meta"]["height"] == 30


def planned(ids, val_fraction, seed, test_fraction=0.0, per_shard=1000):
    """split -> its records' ids in shard order, as the planner lays out a listing of these ids."""
    source = Source("folder", "src", [], lambda: (Record(i, i, f"src/{i}.jpg", {"kind": "folder"}) for i in ids))
    planner = ShardPlanner(source, val_fraction, test_fraction, seed, per_shard, {})
    planner.plan()
    layout = {"train": [], "val": [], "test": []}
    for plan in planner.shard_plans():
        assert len(plan.records) <= per_shard
        layout[plan.split] += [record.id for record in plan.records]
    return layout


def test_split_is_seeded_exact_and_independent_of_order():
    ids = [f"img{i}" for i in range(200)]
    layout = planned(ids, 0.1, seed=42, per_shard=7)
    train, val = layout["train"], layout["val"]
    assert len(val) == 20 and not layout["test"] and set(train) | set(val) == set(ids) and not set(train) & set(val)
    assert planned(list(reversed(ids)), 0.1, seed=42, per_shard=7) == layout  # the same shards whatever the listing order
    assert planned(ids, 0.1, seed=43)["val"] != val
    with_test = planned(ids, 0.1, seed=42, test_fraction=0.15, per_shard=7)
    assert with_test["val"] == val and len(with_test["test"]) == 30  # val unchanged by a test split
    assert set(with_test["train"]) | set(with_test["test"]) == set(train)
    order = sorted(ids, key=lambda i: hashlib.sha256(f"42\0{i}".encode()).digest())  # the split's fixed order
    assert val == order[:20] and train == order[20:]


def test_a_test_split_is_built_listed_and_read(tmp_path, synth_dir, capsys):
    out = tmp_path / "shards"
    assert main(["shards", "build", str(synth_dir), "--format", "folder", "--out", str(out), "--val-fraction", "0.2",
                 "--test-fraction", "0.25", "--samples-per-shard", "20", "--workers", "0"]) == 0  # fmt: skip
    assert "66 train, 24 val, 30 test samples in 8 shards; 0 rejected" in capsys.readouterr().out
    manifest = load_manifest(out)
    counts = {split: manifest["splits"][split]["samples"] for split in ("train", "val", "test")}
    assert counts == {"train": 66, "val": 24, "test": 30} and manifest["source"]["test_fraction"] == 0.25
    assert sorted(p.name for p in out.glob("test-*.tar")) == ["test-000000.tar", "test-000001.tar"]
    assert verify_shards(out) == []
    from imret.data.shards import make_loader

    keys = [k for batch in make_loader(out, "test", batch_size=7, size=32, training=False) for k in batch["key"]]
    assert len(keys) == len(set(keys)) == 30


def test_a_build_from_before_test_splits_reads_as_an_empty_test_split_with_its_old_hash(tmp_path, synth_shards):
    from imret.data.manifest import manifest_hash

    old = json.loads((synth_shards / "manifest.json").read_text())
    del old["splits"]["test"]
    copy = tmp_path / "old"
    copy.mkdir()
    (copy / "manifest.json").write_text(json.dumps(old))
    loaded = load_manifest(copy)
    assert loaded["splits"]["test"] == {"samples": 0, "shards": []}
    content = {"classes": old["classes"], "shards": {s: old["splits"][s]["shards"] for s in ("train", "val")}}
    import hashlib

    assert manifest_hash(loaded) == hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def test_keys_are_unique_dot_free_ascii():
    ids = ["a.b", "a_b", "a b", "衣服", "衣裳", "x" * 300]
    keys = [sample_key(i) for i in ids]
    assert len(set(keys)) == len(keys)
    assert all("." not in k and k.isascii() and "/" not in k for k in keys)


def test_a_finished_build_run_again_rewrites_nothing_and_other_inputs_need_overwrite(tmp_path, synth_dir):
    out = tmp_path / "out"
    first = build_shards(synth_dir, "folder", out, workers=0, samples_per_shard=50)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert build_shards(synth_dir, "folder", out, workers=0, samples_per_shard=50) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten, the manifest neither
    with pytest.raises(DataError, match=r"holds a finished build \(of other inputs, or an older imret's\): pass --overwrite"):
        build_shards(synth_dir, "folder", out, workers=0)
    manifest = build_shards(synth_dir, "folder", out, workers=0, samples_per_shard=1000, overwrite=True)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 120


def test_killed_build_leaves_no_manifest_and_is_rebuilt(tmp_path, synth_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000003.tar").write_bytes(b"partial")
    drafts = [".train-000004.tar.tmp", ".train-000005.tar.0123456789ab.tmp", "..train-000001.tar.done.json.4242.tmp",
              ".manifest.json.4242.tmp"]  # a shard's, a done record's and the manifest's, as their writers name them
    for draft in drafts:
        (out / draft).write_bytes(b"partial")
    with pytest.raises(DataError, match="not a finished shard build"):
        load_manifest(out)
    build_shards(synth_dir, "folder", out, workers=0, samples_per_shard=100)
    assert not any((out / draft).exists() for draft in drafts) and not (out / "train-000003.tar").exists()
    assert verify_shards(out) == []


def test_verify_detects_a_changed_shard(tmp_path, synth_dir, capsys):
    out = tmp_path / "out"
    build_shards(synth_dir, "folder", out, workers=0, samples_per_shard=50)
    shard = out / "train-000001.tar"
    payload = bytearray(shard.read_bytes())
    payload[1000] ^= 0xFF
    shard.write_bytes(bytes(payload))
    assert verify_shards(out) == ["train-000001.tar: sha256 differs from the manifest"]
    assert main(["shards", "verify", str(out)]) == 1
    assert "MISMATCH train-000001.tar" in capsys.readouterr().out


# ---------------------------------------------------------------- iMaterialist


def test_rle_matches_a_hand_drawn_mask():
    # a 4x3 image (H=4, W=3); pixels numbered down the first column, then the next, starting at 1:
    #   1 5 9
    #   2 6 10
    #   3 7 11
    #   4 8 12
    expected = np.array([[0, 1, 0],
                         [1, 1, 0],
                         [1, 0, 0],
                         [0, 0, 1]], dtype=bool)  # fmt: skip
    assert np.array_equal(decode_rle("2 2 5 2 12 1", 4, 3), expected)
    with pytest.raises(ValueError, match="outside"):
        decode_rle("12 2", 4, 3)
    with pytest.raises(ValueError, match="odd number"):
        decode_rle("1 2 3", 4, 3)


def imaterialist(root: Path, rows: list[tuple], images: dict) -> Path:
    (root / "train").mkdir(parents=True)
    for image_id, img in images.items():
        img.save(root / "train" / f"{image_id}.jpg", quality=95)
    cats = [{"id": i, "name": n} for i, n in enumerate(["shirt, blouse", "pants", "sleeve"])]
    (root / "label_descriptions.json").write_text(json.dumps({"categories": cats, "attributes": []}))
    lines = ["ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds"]
    lines += [f"{i},{rle},{h},{w},{c},\"1,2\"" for i, rle, h, w, c in rows]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def test_imaterialist_tags_and_union_mask(tmp_path):
    rows = [("a", "2 2 5 2", 4, 3, 0), ("a", "12 1", 4, 3, 2), ("b", "1 12", 4, 3, 1),
            ("c", "1 1", 4, 3, 7), ("d", "1 1", 5, 3, 0), ("nofile", "1 1", 4, 3, 0)]  # fmt: skip
    images = {i: rgb(3, 4, seed=n) for n, i in enumerate("abcd")} | {"extra": rgb(3, 4)}
    src = imaterialist(tmp_path / "src", rows, images)
    manifest = build_shards(src, "imaterialist", tmp_path / "out", workers=0, val_fraction=0.0)
    assert manifest["classes"] == ["shirt, blouse", "pants", "sleeve"]
    reasons = {r["id"]: r["reason"] for r in manifest["rejected"]}
    assert reasons == {"c": "unknown class '7'", "d": "mask is 3x5, image is 3x4",
                       "nofile": "image file missing", "extra": "no rows in train.csv"}  # fmt: skip
    samples = read_samples(tmp_path / "out")
    assert samples["a"]["meta"]["labels"] == [0, 2] and samples["b"]["meta"]["labels"] == [1]
    expected_a = np.array([[0, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1]]) * 255
    assert np.array_equal(samples["a"]["mask"], expected_a) and samples["b"]["mask"].min() == 255


# ---------------------------------------------------------------- Clothing Co-Parsing


def test_ccp_pixel_and_image_level(tmp_path):
    root = tmp_path / "ccp"
    for sub in ("photos", "annotations/pixel-level", "annotations/image-level"):
        (root / sub).mkdir(parents=True)
    names = ["null", "bag", "hair", "shirt", "skin", "shoes"]
    label_list = np.empty((1, len(names)), dtype=object)
    label_list[0, :] = [np.array([n]) for n in names]
    savemat(root / "label_list.mat", {"label_list": label_list})
    gt = np.array([[0, 0, 2, 2], [0, 3, 3, 4], [0, 3, 3, 4], [5, 5, 0, 0]], dtype=np.uint8)
    savemat(root / "annotations/pixel-level/0001.mat", {"groundtruth": gt})
    savemat(root / "annotations/image-level/0002.mat", {"tags": np.array([[1], [2], [5]])})
    savemat(root / "annotations/image-level/0004.mat", {"tags": np.array([[99]])})
    for stem in ("0001", "0002", "0003", "0004"):
        rgb(4, 4).save(root / "photos" / f"{stem}.jpg")

    manifest = build_shards(root, "ccp", tmp_path / "out", workers=0, val_fraction=0.0)
    assert manifest["classes"] == ["bag", "shirt", "shoes"]
    assert {r["id"]: r["reason"] for r in manifest["rejected"]} == {
        "0003": "no annotation .mat", "0004": "unknown class '99'"}  # fmt: skip
    assert not manifest["has_masks"] and manifest["samples_with_masks"] == 1
    samples = read_samples(tmp_path / "out")
    assert samples["0001"]["meta"]["labels"] == [1, 2]  # shirt, shoes: hair and skin are not tags
    assert np.array_equal(samples["0001"]["mask"] > 0, np.isin(gt, [1, 3, 5]))
    assert samples["0002"]["meta"]["labels"] == [0, 2] and samples["0002"]["mask"] is None

    required = build_shards(root, "ccp", tmp_path / "masked", workers=0, val_fraction=0.0, require_masks=True)
    assert required["has_masks"] and required["splits"]["train"]["samples"] == 1


def test_cli_end_to_end_with_broken_files(tmp_path, capsys):
    data = tmp_path / "synth"
    assert main(["data", "synth", str(data), "--images", "30", "--size", "40"]) == 0
    (data / "images" / "synth-000003.jpg").write_bytes(b"")
    (data / "images" / "synth-000004.jpg").write_bytes((data / "images" / "synth-000005.jpg").read_bytes()[:300])
    out = tmp_path / "shards"
    assert main(["shards", "build", str(data), "--format", "folder", "--out", str(out), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "2 rejected" in printed and "images/synth-000003.jpg: empty file" in printed
    assert main(["shards", "verify", str(out)]) == 0
    assert main(["shards", "info", str(out)]) == 0
    assert "rejected: 2" in capsys.readouterr().out
    splits = load_manifest(out)["splits"]
    assert splits["train"]["samples"] + splits["val"]["samples"] == 28
    assert main(["shards", "build", str(data), "--format", "folder", "--out", str(out)]) == 0  # the same: a no-op
    assert main(["shards", "build", str(data), "--format", "folder", "--out", str(out), "--samples-per-shard", "7"]) == 2
    assert "--overwrite" in capsys.readouterr().err
