"""Dataset readers: each turns a source location (a directory, or a URL read through fsspec: `s3://...`) into class
names and a listing of `Record`s, one per image, produced one at a time and as often as asked (the shard planner
passes over the listing twice).

A record is plain data (where the image is, and what to read for its tags and mask), so it travels to a worker
process or to another machine's Ray task as it is; readers never read pixels: `annotate` (run where the image is
encoded) reads the annotation, the builder decodes the image. A problem the listing already sees (a row without
an image, an image without a row) becomes a record with `problem` set, listed among the rejects with that reason.
What a reader holds while it lists is its index (the folder's labels.csv, iMaterialist's train.csv rows), never
the images' records.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from imret.data import storage
from imret.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# Clothing Co-Parsing ids that are not apparel: never a tag, never in the mask.
CCP_NOT_APPAREL = ("null", "skin", "hair")

Annotation = tuple[list[str], "np.ndarray | None"]  # class names, mask (any dtype; non-zero = apparel) or None


@dataclass
class Record:
    id: str
    source: str  # how the rejects list names it: a path relative to the source location
    image: str | None  # the image's location (a path or a URL)
    annotation: dict[str, Any] | None  # what `annotate` reads, by its "kind": folder, imaterialist or ccp
    problem: str | None = None


@dataclass
class Source:
    format: str
    location: str
    classes: list[str]
    listing: Callable[[], Iterator[Record]]  # a fresh pass over the records, in the source's fixed order
    label_names: list[str] = field(default_factory=list)  # CCP: the names of the ids its .mat files hold

    def records(self) -> Iterator[Record]:
        return self.listing()


def read_source(location: str | Path, fmt: str) -> Source:
    location = str(location) if storage.is_remote(location) else str(Path(location).expanduser())
    if not storage.is_remote(location) and not Path(location).is_dir():
        raise DataError(f"{location}: not a directory")
    readers = {"folder": read_folder, "imaterialist": read_imaterialist, "ccp": read_ccp}
    if fmt not in readers:
        raise DataError(f"unknown format '{fmt}': choose one of {', '.join(readers)}")
    return readers[fmt](location)


def annotate(annotation: dict[str, Any], label_names: list[str]) -> Annotation:
    """A record's class names and mask, read from its annotation (where the record is encoded)."""
    kind = annotation["kind"]
    if kind == "folder":
        return list(annotation["labels"]), read_mask_png(annotation["mask"]) if annotation["mask"] else None
    if kind == "imaterialist":
        return _imaterialist_annotation(annotation)
    return _ccp_annotation(annotation["mat"], annotation["pixel_level"], label_names)


def read_mask_png(location: str) -> np.ndarray:
    with Image.open(io.BytesIO(storage.read_bytes(location))) as img:
        img.load()
        array = np.asarray(img)
    return array.any(axis=-1) if array.ndim == 3 else array != 0


def _text_rows(location: str) -> Iterator[dict[str, str]]:
    with storage.open_seekable(location) as handle:
        yield from csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8", newline=""))


def _csv_columns(location: str) -> list[str] | None:
    with storage.open_seekable(location) as handle:
        return csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8", newline="")).fieldnames


# ---------------------------------------------------------------- folder


def read_folder(root: str) -> Source:
    labels_csv = storage.join(root, "labels.csv")
    if not storage.exists(labels_csv):
        raise DataError(f"{root}: no labels.csv (the folder format needs images/, labels.csv, optional masks/)")
    rows, repeated = _read_label_rows(labels_csv)
    classes = _folder_classes(root, rows)
    images_dir, masks_dir = storage.join(root, "images"), storage.join(root, "masks")

    def listing() -> Iterator[Record]:
        files = storage.listdir(images_dir)
        masks = set(storage.listdir(masks_dir))
        seen_ids: set[str] = set()
        for name in files:
            stem, suffix = Path(name).stem, Path(name).suffix
            rel = f"images/{name}"
            problem = None
            if suffix.lower() not in IMAGE_EXTENSIONS:
                problem = f"unsupported extension '{suffix}'"
            elif stem in seen_ids:
                problem = f"duplicate id '{stem}'"
            elif name in repeated:
                problem = "more than one row in labels.csv"
            elif name not in rows:
                problem = "no row in labels.csv"
            seen_ids.add(stem)
            if problem:
                yield Record(stem, rel, None, None, problem)
                continue
            mask = str(storage.join(masks_dir, f"{stem}.png")) if f"{stem}.png" in masks else None
            yield Record(stem, rel, str(storage.join(images_dir, name)), {"kind": "folder", "labels": rows[name], "mask": mask})
        for name in sorted(set(rows) - set(files)):
            yield Record(Path(name).stem, f"labels.csv:{name}", None, None, "image file missing")

    return Source("folder", root, classes, listing)


def _read_label_rows(labels_csv: str) -> tuple[dict[str, list[str]], set[str]]:
    columns = _csv_columns(labels_csv)
    if columns is None or not {"image", "labels"} <= set(columns):
        raise DataError(f"{labels_csv}: needs the columns image,labels (got {columns})")
    rows: dict[str, list[str]] = {}
    repeated: set[str] = set()
    for row in _text_rows(labels_csv):
        image = (row["image"] or "").strip()
        if image in rows:
            repeated.add(image)
        rows[image] = [name.strip() for name in (row["labels"] or "").split(";") if name.strip()]
    return rows, repeated


def _folder_classes(root: str, rows: dict[str, list[str]]) -> list[str]:
    classes_txt = storage.join(root, "classes.txt")
    if not storage.exists(classes_txt):
        return sorted({name for labels in rows.values() for name in labels})
    classes = [line.strip() for line in storage.read_text(classes_txt).splitlines() if line.strip()]
    duplicates = sorted({name for name in classes if classes.count(name) > 1})
    if duplicates:
        raise DataError(f"{classes_txt}: listed twice: {', '.join(duplicates)}")
    return classes


# ---------------------------------------------------------------- iMaterialist (Fashion) 2020


def decode_rle(encoded: str, height: int, width: int) -> np.ndarray:
    """iMaterialist run-length encoding: 1-indexed `start length` pairs over pixels numbered column-major."""
    numbers = np.array(encoded.split(), dtype=np.int64)
    if numbers.size % 2:
        raise ValueError("odd number of values in EncodedPixels")
    starts, lengths = numbers[0::2] - 1, numbers[1::2]
    if (starts < 0).any() or (lengths < 0).any() or (starts + lengths > height * width).any():
        raise ValueError(f"EncodedPixels runs outside a {height}x{width} image")
    edges = np.zeros(height * width + 1, dtype=np.int32)
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + lengths, -1)
    column_major = np.cumsum(edges[:-1]) > 0
    return column_major.reshape(width, height).T


def _imaterialist_annotation(annotation: dict[str, Any]) -> Annotation:
    height, width = annotation["height"], annotation["width"]
    mask = np.zeros((height, width), dtype=bool)
    for encoded in annotation["rles"]:
        mask |= decode_rle(encoded, height, width)
    return sorted(set(annotation["classes"])), mask


def read_imaterialist(root: str) -> Source:
    csv_path, desc_path, images_dir = (storage.join(root, name) for name in ("train.csv", "label_descriptions.json", "train"))
    for needed in (csv_path, desc_path, images_dir):
        if not storage.exists(needed):
            raise DataError(f"{root}: missing {needed.name} (expected train.csv, label_descriptions.json, train/)")
    try:
        categories = json.loads(storage.read_text(desc_path))["categories"]
        by_id = {str(int(cat["id"])): str(cat["name"]) for cat in categories}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{desc_path}: cannot read categories ({exc})") from None
    classes = [by_id[cid] for cid in sorted(by_id, key=int)]
    columns = _csv_columns(csv_path)
    needed_columns = {"ImageId", "EncodedPixels", "Height", "Width", "ClassId"}
    if columns is None or not needed_columns <= set(columns):
        raise DataError(f"{csv_path}: needs the columns {', '.join(sorted(needed_columns))}")

    def listing() -> Iterator[Record]:
        rows: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)  # the index: train.csv, as it is
        for row in _text_rows(csv_path):
            rows[row["ImageId"]].append((str(row["ClassId"]).strip(), row["EncodedPixels"], row["Height"], row["Width"]))
        files = storage.listdir(images_dir)
        present, row_ids = set(files), set(rows)
        for image_id in sorted(row_ids):
            image_rows = rows.pop(image_id)  # the records go out one at a time; the index shrinks as they do
            name = f"{image_id}.jpg"
            rel = f"train/{name}"
            sizes = {(h, w) for _, _, h, w in image_rows}
            if name not in present:
                yield Record(image_id, rel, None, None, "image file missing")
            elif len(sizes) > 1:
                yield Record(image_id, rel, None, None, f"rows disagree on the mask size: {sorted(sizes)}")
            else:
                ((height, width),) = sizes
                yield Record(image_id, rel, str(storage.join(images_dir, name)), {
                    "kind": "imaterialist", "classes": [by_id.get(cid, cid) for cid, _, _, _ in image_rows],
                    "rles": [rle for _, rle, _, _ in image_rows], "height": int(height), "width": int(width)})  # fmt: skip
        for name in files:
            if Path(name).stem not in row_ids:
                yield Record(Path(name).stem, f"train/{name}", None, None, "no rows in train.csv")

    return Source("imaterialist", root, classes, listing)


# ---------------------------------------------------------------- Clothing Co-Parsing


def _mat_variable(location: str, name: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        content = loadmat(io.BytesIO(storage.read_bytes(location)))
    except (ValueError, OSError, TypeError) as exc:
        raise ValueError(f"cannot read {storage.Location(location).name}: {exc}") from None
    if name not in content:
        raise ValueError(f"{storage.Location(location).name} has no variable '{name}'")
    return np.asarray(content[name])


def _ccp_annotation(mat: str, pixel_level: bool, names: list[str]) -> Annotation:
    not_apparel = [i for i, name in enumerate(names) if name in CCP_NOT_APPAREL]
    if pixel_level:
        ids = _mat_variable(mat, "groundtruth").astype(np.int64)
        mask = ~np.isin(ids, not_apparel)
        present = np.unique(ids)
    else:
        mask, present = None, np.unique(_mat_variable(mat, "tags").astype(np.int64).ravel())
    labels = []
    for tag in present.tolist():
        if not 0 <= tag < len(names):
            labels.append(str(tag))  # the builder rejects it as an unknown class
        elif tag not in not_apparel:
            labels.append(names[tag])
    return labels, mask


def read_ccp(root: str) -> Source:
    photos, label_list = storage.join(root, "photos"), storage.join(root, "label_list.mat")
    pixel_dir, image_dir = storage.join(root, "annotations/pixel-level"), storage.join(root, "annotations/image-level")
    if not storage.exists(photos) or not storage.exists(label_list):
        raise DataError(f"{root}: expected photos/, annotations/ and label_list.mat (Clothing Co-Parsing layout)")
    try:
        names = [str(np.asarray(item).ravel()[0]) for item in _mat_variable(label_list, "label_list").ravel()]
    except (ValueError, IndexError) as exc:
        raise DataError(f"{label_list}: {exc}") from None
    classes = [name for name in names if name not in CCP_NOT_APPAREL]

    def listing() -> Iterator[Record]:
        pixel, image = set(storage.listdir(pixel_dir)), set(storage.listdir(image_dir))
        for name in storage.listdir(photos):
            stem, suffix = Path(name).stem, Path(name).suffix
            rel = f"photos/{name}"
            location = str(storage.join(photos, name))
            if suffix.lower() not in IMAGE_EXTENSIONS:
                yield Record(stem, rel, None, None, f"unsupported extension '{suffix}'")
            elif f"{stem}.mat" in pixel:
                yield Record(stem, rel, location, {"kind": "ccp", "mat": str(storage.join(pixel_dir, f"{stem}.mat")), "pixel_level": True})
            elif f"{stem}.mat" in image:
                yield Record(stem, rel, location, {"kind": "ccp", "mat": str(storage.join(image_dir, f"{stem}.mat")), "pixel_level": False})
            else:
                yield Record(stem, rel, None, None, "no annotation .mat")

    return Source("ccp", root, classes, listing, label_names=names)
