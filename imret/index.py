"""The index of an embedding directory: `EMB_DIR/index.faiss` and its sidecar, which names what it indexes
(model run, layer, masking, split, shard location and the embedding job), and `EMB_DIR/lookup/`, where each
gallery row's image lies in the shards (imret.data.lookup), so that `imret search` and `imret serve` need
nothing else. `imret index build EMB_DIR` writes both; a study writes the exact index it scores with, once,
and reuses it on a rerun; `imret search` and `imret serve` build a missing lookup when they first open an
index (one pass over the split's tar headers)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from imret.embed import load_embeddings
from imret.errors import ImretError
from imret.keyfile import KeyFile
from imret.retrieval import build_index, exact_neighbours, load_index, save_index, search

INDEX_FILE = "index.faiss"
EXAMPLES_SPLIT = "val"  # the images a search page offers to try: never in a train gallery
RECALL_QUERIES, RECALL_K = 1000, 10


def index_sidecar(meta: dict[str, Any], kind: str, float16: bool) -> dict[str, Any]:
    return {"model": meta["model"], "layer": meta["layer"], "mask_with": meta["mask_with"], "split": meta["split"],
            "locations": meta["locations"], "shards_manifest_hash": meta["shards_manifest_hash"], "job": meta["job"],
            "kind": kind, "float16": float16}  # fmt: skip


def saved_sidecar(emb_dir: Path) -> dict[str, Any] | None:
    path = emb_dir / f"{INDEX_FILE}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def build_and_save(emb_dir: str | Path, kind: str = "flat", device: str = "auto", float16: bool = False) -> str:
    emb_dir = Path(emb_dir)
    embeddings, _, _, meta = load_embeddings(emb_dir)
    start = time.perf_counter()
    index = build_index(embeddings, kind, device, float16=float16)
    seconds = time.perf_counter() - start
    summary = f"{emb_dir / INDEX_FILE}: {kind} index of {len(embeddings)} x {embeddings.shape[1]} in {seconds:.1f} s"
    if kind == "ivfpq":  # approximate: say how approximate, against exact search on a sample of queries
        rng = np.random.default_rng(0)
        sample = embeddings[np.sort(rng.choice(len(embeddings), size=min(RECALL_QUERIES, len(embeddings)), replace=False))]
        k = min(RECALL_K, len(embeddings))
        exact = exact_neighbours(embeddings, sample, k, device)
        approx = search(index, sample, k)[1]
        recall = np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)])
        summary += f"; recall@{k} against exact search: {recall:.3f}"
    save_index(index, emb_dir / INDEX_FILE, index_sidecar(meta, kind, float16))
    ensure_lookups(emb_dir, meta)
    return summary


def exact_gallery_index(emb_dir: Path, embeddings: np.ndarray, meta: dict[str, Any], device: str) -> Any:
    """The exact (flat, float32) index of a gallery: loaded when one was saved for these embeddings, else built
    and saved, unless the directory holds another kind built by hand (`imret index build --kind ivfpq`), which
    is left alone: the study scores with exact search only."""
    sidecar = saved_sidecar(emb_dir)
    wanted = {"job": meta["job"], "kind": "flat", "float16": False}
    if sidecar is not None and all(sidecar.get(k) == v for k, v in wanted.items()):
        try:
            saved = load_index(emb_dir / INDEX_FILE, wanted)[0]
        except ImretError:  # damaged: built again below
            sidecar = None
        else:
            return to_devices(saved, device)
    index = build_index(embeddings, "flat", device)
    if sidecar is None or sidecar.get("job") != meta["job"]:
        save_index(index, emb_dir / INDEX_FILE, index_sidecar(meta, "flat", False))
    return index


def ensure_lookups(emb_dir: Path, meta: dict[str, Any]) -> None:
    """The key -> shard lookups of an index directory, built from the shards' tar headers when missing or made
    for other shards: the gallery's rows, and the val split's samples (the examples `imret serve` offers).
    `meta`: the embeddings' meta.json or the index's sidecar (both name the split, count and shards)."""
    from imret.data.lookup import build_lookup, lookup_complete
    from imret.data.manifest import load_manifest, manifest_hash

    location = meta["locations"]["shards"]
    manifest = load_manifest(location)
    current = manifest_hash(manifest)
    if current != meta["shards_manifest_hash"]:
        raise ImretError(f"{emb_dir}: the shards in {location} changed since they were embedded (manifest hash "
                         f"{current}, embedded {meta['shards_manifest_hash']}): embed and index them again")  # fmt: skip
    if not lookup_complete(emb_dir, meta["split"], current, meta["count"]):
        build_lookup(emb_dir, location, manifest, current, meta["split"], KeyFile(emb_dir / "keys"))
    if meta["split"] != EXAMPLES_SPLIT and manifest["splits"][EXAMPLES_SPLIT]["samples"]:
        if not lookup_complete(emb_dir, EXAMPLES_SPLIT, current, None):
            build_lookup(emb_dir, location, manifest, current, EXAMPLES_SPLIT)


def to_devices(index: Any, device: str) -> Any:
    """A loaded (CPU) flat index spread over every GPU when `device` asks for them and there are some."""
    from imret.faiss_build import gpu_count, load_faiss
    from imret.retrieval import cloner_options

    if not gpu_count(device, "flat", index.d):
        return index
    return load_faiss().index_cpu_to_all_gpus(index, co=cloner_options(float16=False))
