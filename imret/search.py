"""`imret search INDEX_DIR IMAGE...`: query an index with any image; `imret serve` answers through the same code.

An index directory names its model run, layer, masking and shard location (its sidecar), so a search needs
nothing else. A query is decoded as the embedding job decoded the shards' images (at the model's load size,
in memory, by the job's decode path) and embedded through the same `embed_images` (for a masked index, after
the same segmentation run's `Masker`), so a gallery image searched comes back first at distance ~0. The model
whose weights, layer or dimension differ from what the index was built with is refused, as is masking that does
not match the index.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from imret.data.device_decode import decode_jpegs, resize
from imret.data.lookup import Lookup, lookup_paths
from imret.data.shards import decode_image
from imret.embed import Embedder, Masker, embed_images, load_model
from imret.errors import ImretError, did_you_mean
from imret.index import EXAMPLES_SPLIT, INDEX_FILE, ensure_lookups
from imret.metrics import label_iou
from imret.retrieval import load_index, search

MAX_K = 100
VARIANTS = ("original", "masked")


@dataclass
class Neighbour:
    rank: int
    key: str
    tags: list[str]
    distance: float  # squared L2, what the index ranks by
    label_iou: float | None  # with the query's tags, when they are given


def decode_query(data: bytes, load_size: int, decode: str = "cpu") -> torch.Tensor:
    """Image bytes -> uint8 [3, load, load], as the embedding job decoded its shards' images: `decode` is the
    job's path (cpu: PIL; gpu: a JPEG through the device path's decoder and resize, here on the CPU). Anything
    that PIL cannot decode completely (a truncated file, not an image), or an image of more than PIL's
    Image.MAX_IMAGE_PIXELS, is an ImretError."""
    too_large = ImretError(f"an image of more than the {Image.MAX_IMAGE_PIXELS} pixels allowed")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # the header only: the size before any decoding
            if Image.MAX_IMAGE_PIXELS and probe.width * probe.height > Image.MAX_IMAGE_PIXELS:
                raise too_large
            jpeg = probe.format == "JPEG"
        image = decode_image(data, load_size)  # also the check that the whole file decodes
        if decode == "gpu" and jpeg:
            image = resize(decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)], ["query"],
                                        torch.device("cpu"))[0], load_size)  # fmt: skip
        return image
    except ImretError:
        raise
    except Image.DecompressionBombError:  # PIL's own refusal, at twice the limit
        raise too_large from None
    except UnidentifiedImageError:
        raise ImretError("not an image (no format that PIL reads)") from None
    except Exception as exc:  # PIL reports bad data as OSError, SyntaxError, ValueError, zlib.error, struct.error...
        raise ImretError(f"not a readable image ({type(exc).__name__}: {exc})") from None


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Gallery:
    """One index directory, loaded once: the FAISS index, the model (and U-Net) that embedded its gallery,
    the gallery's labels and class names, and its key -> shard lookups."""

    def __init__(self, index_dir: str | Path, masked: bool, models: dict[str, Any] | None = None):
        """models: the loaded models by location, shared by the galleries of one process."""
        self.dir = Path(index_dir)
        self.index, sidecar = load_index(self.dir / INDEX_FILE)
        self.sidecar = sidecar
        mask_with = sidecar["locations"]["mask_with"]
        if masked and not mask_with:
            raise ImretError(f"{self.dir}: --masked, and this index holds whole images (no segmentation run masked "
                             f"its gallery): leave out --masked, or search the masked index")  # fmt: skip
        if mask_with and not masked:
            raise ImretError(f"{self.dir}: this index holds images masked by {mask_with}: add --masked")
        meta = json.loads((self.dir / "meta.json").read_text())
        self.classes: list[str] = meta["classes"]
        self.labels = np.load(self.dir / "labels.npy", mmap_mode="r")
        ensure_lookups(self.dir, sidecar)
        location = sidecar["locations"]["shards"]
        self.lookup = Lookup(self.dir, sidecar["split"], location)
        examples = EXAMPLES_SPLIT if lookup_paths(self.dir, EXAMPLES_SPLIT)[2].is_file() else sidecar["split"]
        self.examples = self.lookup if examples == sidecar["split"] else Lookup(self.dir, examples, location)
        if not len(self.lookup) == len(self.labels) == self.index.ntotal:
            raise ImretError(f"{self.dir}: the index, labels.npy and the lookup disagree on the gallery's size")

        models = {} if models is None else models
        job = sidecar["job"]
        net, self.meta = self._model(models, sidecar["locations"]["model"], job["weights_sha256"])
        if self.meta["embedding"]["layer"] != sidecar["layer"] or self.meta["embedding"]["dim"] != self.index.d:
            raise ImretError(f"{self.dir}: built from the {sidecar['layer']} layer, {self.index.d}-d; the model in "
                             f"{sidecar['locations']['model']} embeds its {self.meta['embedding']['layer']} layer, "
                             f"{self.meta['embedding']['dim']}-d")  # fmt: skip
        self.embedder = Embedder(net, self.meta).to(device())
        self.masker = None
        if mask_with:
            seg, seg_meta = self._model(models, mask_with, job["mask_weights_sha256"])
            self.masker = Masker(seg, seg_meta, self.meta).to(device())

    def _model(self, models: dict[str, Any], location: str, weights_sha256: str) -> tuple[torch.nn.Module, dict[str, Any]]:
        if location not in models:
            net, meta = load_model(location)
            models[location] = (net.to(device()), meta)
        net, meta = models[location]
        if meta["weights_sha256"] != weights_sha256:
            raise ImretError(f"{self.dir}: the model in {location} is not the one this index was built with (its "
                             f"weights changed since): embed and index the gallery again")  # fmt: skip
        return net, meta

    def decode(self, data: bytes) -> torch.Tensor:
        return decode_query(data, self.meta["load_size"], self.sidecar["job"].get("decode", "cpu"))

    def embed(self, images: list[torch.Tensor]) -> np.ndarray:
        """Decoded queries -> their embeddings, in one forward pass."""
        batch = torch.stack(images).to(device())
        return embed_images(self.embedder, batch, self.masker(batch) if self.masker is not None else None)

    def neighbours(self, vectors: np.ndarray, k: int, query_labels: list[np.ndarray | None]) -> list[list[Neighbour]]:
        check_k(k, self.index.ntotal)
        distances, rows = search(self.index, vectors, k)
        found = []
        for query, row, dist in zip(query_labels, rows, distances):
            kept = row >= 0  # IVF-PQ pads with -1 when the lists it probes hold fewer than k vectors
            row, dist = row[kept], dist[kept]
            labels = self.labels[row]
            ious = label_iou(query[None, :], labels).tolist() if query is not None else [None] * len(row)
            found.append([Neighbour(rank + 1, self.lookup.key(int(row[rank])), self.tag_names(labels[rank]),
                                    float(dist[rank]), ious[rank]) for rank in range(len(row))])  # fmt: skip
        return found

    def tag_names(self, multi_hot: np.ndarray) -> list[str]:
        return [self.classes[i] for i in np.flatnonzero(multi_hot)]

    def parse_tags(self, text: str) -> np.ndarray:
        """'shirt;hat' -> the multi-hot row of those classes; an unknown name is refused with a did-you-mean."""
        row = np.zeros(len(self.classes), np.uint8)
        for name in (part.strip() for part in text.split(";")):
            if not name:
                continue
            if name not in self.classes:
                raise ImretError(f"unknown tag '{name}'{did_you_mean(name, self.classes)}; the tags are "
                                 f"{', '.join(self.classes)}")  # fmt: skip
            row[self.classes.index(name)] = 1
        return row


def find_indexes(paths: list[str]) -> list[tuple[str, str, Path]]:
    """(model name, variant, index dir) of each index to serve: a study's output directory gives every compared
    model's gallery, original and masked; an index directory gives itself, named after its model run."""
    found = []
    for path in map(Path, paths):
        if (path / "retrieval.json").is_file() and (path / "embeddings").is_dir():
            names = json.loads((path / "retrieval.json").read_text()).get("models", {})
            for name in names:
                for variant in VARIANTS:
                    if (path / "embeddings" / name / f"{variant}-train" / INDEX_FILE).is_file():
                        found.append((name, variant, path / "embeddings" / name / f"{variant}-train"))
        elif (path / f"{INDEX_FILE}.json").is_file():
            sidecar = json.loads((path / f"{INDEX_FILE}.json").read_text())
            found.append((Path(sidecar["locations"]["model"]).name, "masked" if sidecar["mask_with"] else "original", path))
        else:
            raise ImretError(f"{path}: neither an index directory (index.faiss, imret index build) nor a study's "
                             f"output directory (retrieval.json)")  # fmt: skip
    seen: dict[tuple[str, str], Path] = {}
    for name, variant, path in found:
        if (name, variant) in seen:
            raise ImretError(f"{seen[name, variant]} and {path} are both the {variant} index of {name}: serve one")
        seen[name, variant] = path
    if not found:
        raise ImretError(f"no index in {', '.join(paths)}: a study writes its indexes when it scores")
    return found


def choose_index(target: str, model: str | None, masked: bool) -> tuple[str, str, Path]:
    """The index `imret search` answers from: an index directory itself, or in a study's output directory the
    `--model` row's (by default the row with the highest mean label IoU on the original images in retrieval.json),
    original or masked as `--masked` says. (model name, variant, index directory)"""
    found = find_indexes([target])
    if (Path(target) / f"{INDEX_FILE}.json").is_file():
        return found[0]
    names = list(dict.fromkeys(name for name, _, _ in found))
    if model is None:
        results = json.loads((Path(target) / "retrieval.json").read_text())["results"]
        model = max(names, key=lambda name: results.get(name, {}).get("original", {}).get("mean", -1.0))
    elif model not in names:
        raise ImretError(f"{target}: no model '{model}'{did_you_mean(model, names)}; the study compared "
                         f"{', '.join(names)}")  # fmt: skip
    variant = "masked" if masked else "original"
    for name, candidate, path in found:
        if (name, candidate) == (model, variant):
            return name, variant, path
    raise ImretError(f"{target}: {model} has no {variant} index (the study had no segmentation run to mask with)")


def check_k(k: int, gallery: int) -> None:
    if not 1 <= k <= min(MAX_K, gallery):
        raise ImretError(f"k={k}: choose 1 to {min(MAX_K, gallery)} (the gallery holds {gallery} images)")


def search_files(target: str | Path, images: list[str], k: int = 5, masked: bool = False, tags: str | None = None,
                 model: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """`imret search`: each image's neighbours, as {"image", "index", "model", "variant", "neighbours": [Neighbour as
    dict]}; `target` is an index directory or a study's output directory (as `imret serve` takes them)."""
    name, variant, index_dir = choose_index(str(target), model, masked)
    gallery = Gallery(index_dir, masked)
    check_k(k, gallery.index.ntotal)
    query = gallery.parse_tags(tags) if tags is not None else None
    decoded = []
    for path in images:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ImretError(f"{path}: {exc.strerror}") from None
        try:
            decoded.append(gallery.decode(data))
        except ImretError as exc:
            raise ImretError(f"{path}: {exc}") from None
    found = gallery.neighbours(gallery.embed(decoded), k, [query] * len(decoded))
    return [{"image": path, "index": str(index_dir), "model": name, "variant": variant,
             "neighbours": [asdict(n) for n in rows]} for path, rows in zip(images, found)]  # fmt: skip


def format_results(results: list[dict[str, Any]]) -> str:
    lines = []
    for result in results:
        lines.append(f"{result['image']}  (index: {result['index']}, {result['model']}, {result['variant']})")
        for n in result["neighbours"]:
            iou = f"  IoU {n['label_iou']:.2f}" if n["label_iou"] is not None else ""
            lines.append(f"  {n['rank']:3d}  {n['key']}  distance {n['distance']:.4f}{iou}  {';'.join(n['tags']) or '-'}")
    return "\n".join(lines)
