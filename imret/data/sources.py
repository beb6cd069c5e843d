"""Dataset readers: each turns a source directory into class names and one `Record` per image.

Readers only list; the expensive part (decoding the image, the mask and the labels) is done by
`Record.annotate` in the shard builder's worker processes, so a reader never reads pixels.
A problem the listing already sees (a row without an image, an image without a row) becomes a record
with `problem` set, and the builder lists it among the rejects with that reason.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from imret.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# Clothing Co-Parsing ids that are not apparel: never a tag, never in the mask.
CCP_NOT_APPAREL = ("null", "skin", "hair")

Annotation = tuple[list[str], "np.ndarray | None"]  # class names, mask (any dtype; non-zero = apparel) or None


@dataclass
class Record:
    id: str
    source: str  # how the rejects list names it: a path relative to the source directory
    image_path: Path | None
    annotate: Callable[[], Annotation] | None
    problem: str | None = None


@dataclass
class Source:
    format: str
    classes: list[str]
    records: list[Record]


def read_source(path: str | Path, fmt: str) -> Source:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a directory")
    readers = {"folder": read_folder, "imaterialist": read_imaterialist, "ccp": read_ccp}
    if fmt not in readers:
        raise DataError(f"unknown format '{fmt}': choose one of {', '.join(readers)}")
    return readers[fmt](path)


def _fixed(labels: list[str], mask_path: Path | None) -> Annotation:
    return labels, (read_mask_png(mask_path) if mask_path is not None else None)


def read_mask_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        array = np.asarray(img)
    return array.any(axis=-1) if array.ndim == 3 else array != 0


# ---------------------------------------------------------------- folder


def read_folder(root: Path) -> Source:
    labels_csv = root / "labels.csv"
    if not labels_csv.is_file():
        raise DataError(f"{root}: no labels.csv (the folder format needs images/, labels.csv, optional masks/)")
    rows, repeated = _read_label_rows(labels_csv)
    classes = _folder_classes(root, rows)
    images_dir, masks_dir = root / "images", root / "masks"
    files = sorted(p for p in images_dir.iterdir() if p.is_file()) if images_dir.is_dir() else []
    records, seen_ids = [], set()
    for file in files:
        rel = f"images/{file.name}"
        problem = None
        if file.suffix.lower() not in IMAGE_EXTENSIONS:
            problem = f"unsupported extension '{file.suffix}'"
        elif file.stem in seen_ids:
            problem = f"duplicate id '{file.stem}'"
        elif file.name in repeated:
            problem = "more than one row in labels.csv"
        elif file.name not in rows:
            problem = "no row in labels.csv"
        seen_ids.add(file.stem)
        if problem:
            records.append(Record(file.stem, rel, None, None, problem))
            continue
        mask = masks_dir / f"{file.stem}.png"
        annotate = partial(_fixed, rows[file.name], mask if mask.is_file() else None)
        records.append(Record(file.stem, rel, file, annotate))
    listed = {file.name for file in files}
    for name in sorted(set(rows) - listed):
        records.append(Record(Path(name).stem, f"labels.csv:{name}", None, None, "image file missing"))
    return Source("folder", classes, records)


def _read_label_rows(labels_csv: Path) -> tuple[dict[str, list[str]], set[str]]:
    rows: dict[str, list[str]] = {}
    repeated: set[str] = set()
    with open(labels_csv, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"image", "labels"} <= set(reader.fieldnames):
            raise DataError(f"{labels_csv}: needs the columns image,labels (got {reader.fieldnames})")
        for row in reader:
            image = (row["image"] or "").strip()
            if image in rows:
                repeated.add(image)
            rows[image] = [name.strip() for name in (row["labels"] or "").split(";") if name.strip()]
    return rows, repeated


def _folder_classes(root: Path, rows: dict[str, list[str]]) -> list[str]:
    classes_txt = root / "classes.txt"
    if not classes_txt.is_file():
        return sorted({name for labels in rows.values() for name in labels})
    classes = [line.strip() for line in classes_txt.read_text(encoding="utf-8").splitlines() if line.strip()]
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


def _imaterialist_annotation(class_ids: list[str], rles: list[str], height: int, width: int,
                             names: dict[str, str]) -> Annotation:  # fmt: skip
    mask = np.zeros((height, width), dtype=bool)
    for encoded in rles:
        mask |= decode_rle(encoded, height, width)
    return sorted({names.get(cid, cid) for cid in class_ids}), mask


def read_imaterialist(root: Path) -> Source:
    csv_path, desc_path, images_dir = root / "train.csv", root / "label_descriptions.json", root / "train"
    for needed in (csv_path, desc_path, images_dir):
        if not needed.exists():
            raise DataError(f"{root}: missing {needed.name} (expected train.csv, label_descriptions.json, train/)")
    try:
        categories = json.loads(desc_path.read_text(encoding="utf-8"))["categories"]
        by_id = {str(int(cat["id"])): str(cat["name"]) for cat in categories}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{desc_path}: cannot read categories ({exc})") from None
    classes = [by_id[cid] for cid in sorted(by_id, key=int)]

    rows: dict[str, list[dict]] = defaultdict(list)
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        needed = {"ImageId", "EncodedPixels", "Height", "Width", "ClassId"}
        if reader.fieldnames is None or not needed <= set(reader.fieldnames):
            raise DataError(f"{csv_path}: needs the columns {', '.join(sorted(needed))}")
        for row in reader:
            rows[row["ImageId"]].append(row)

    records = []
    for image_id in sorted(rows):
        image_rows = rows[image_id]
        file = images_dir / f"{image_id}.jpg"
        rel = f"train/{file.name}"
        sizes = {(row["Height"], row["Width"]) for row in image_rows}
        if not file.is_file():
            records.append(Record(image_id, rel, None, None, "image file missing"))
        elif len(sizes) > 1:
            records.append(Record(image_id, rel, None, None, f"rows disagree on the mask size: {sorted(sizes)}"))
        else:
            ((height, width),) = sizes
            annotate = partial(_imaterialist_annotation, [str(row["ClassId"]).strip() for row in image_rows],
                               [row["EncodedPixels"] for row in image_rows], int(height), int(width), by_id)  # fmt: skip
            records.append(Record(image_id, rel, file, annotate))
    for file in sorted(images_dir.iterdir()):
        if file.is_file() and file.stem not in rows:
            records.append(Record(file.stem, f"train/{file.name}", None, None, "no rows in train.csv"))
    return Source("imaterialist", classes, records)


# ---------------------------------------------------------------- Clothing Co-Parsing


def _mat_variable(path: Path, name: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        content = loadmat(path)
    except (ValueError, OSError, TypeError) as exc:
        raise ValueError(f"cannot read {path.name}: {exc}") from None
    if name not in content:
        raise ValueError(f"{path.name} has no variable '{name}'")
    return np.asarray(content[name])


def _ccp_annotation(mat_path: Path, pixel_level: bool, names: list[str]) -> Annotation:
    not_apparel = [i for i, name in enumerate(names) if name in CCP_NOT_APPAREL]
    if pixel_level:
        ids = _mat_variable(mat_path, "groundtruth").astype(np.int64)
        mask = ~np.isin(ids, not_apparel)
        present = np.unique(ids)
    else:
        mask, present = None, np.unique(_mat_variable(mat_path, "tags").astype(np.int64).ravel())
    labels = []
    for tag in present.tolist():
        if not 0 <= tag < len(names):
            labels.append(str(tag))  # the builder rejects it as an unknown class
        elif tag not in not_apparel:
            labels.append(names[tag])
    return labels, mask


def read_ccp(root: Path) -> Source:
    photos, pixel_dir, image_dir = root / "photos", root / "annotations" / "pixel-level", root / "annotations" / "image-level"
    label_list = root / "label_list.mat"
    if not photos.is_dir() or not label_list.is_file():
        raise DataError(f"{root}: expected photos/, annotations/ and label_list.mat (Clothing Co-Parsing layout)")
    try:
        names = [str(np.asarray(item).ravel()[0]) for item in _mat_variable(label_list, "label_list").ravel()]
    except (ValueError, IndexError) as exc:
        raise DataError(f"{label_list}: {exc}") from None
    classes = [name for name in names if name not in CCP_NOT_APPAREL]

    records = []
    for file in sorted(p for p in photos.iterdir() if p.is_file()):
        rel = f"photos/{file.name}"
        pixel, image = pixel_dir / f"{file.stem}.mat", image_dir / f"{file.stem}.mat"
        if file.suffix.lower() not in IMAGE_EXTENSIONS:
            records.append(Record(file.stem, rel, None, None, f"unsupported extension '{file.suffix}'"))
        elif pixel.is_file():
            records.append(Record(file.stem, rel, file, partial(_ccp_annotation, pixel, True, names)))
        elif image.is_file():
            records.append(Record(file.stem, rel, file, partial(_ccp_annotation, image, False, names)))
        else:
            records.append(Record(file.stem, rel, None, None, "no annotation .mat"))
    return Source("ccp", classes, records)
