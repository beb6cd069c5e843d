"""`imret index build EMB_DIR`: a FAISS index over an embedding directory, saved with its sidecar."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from imret.embed import load_embeddings
from imret.retrieval import build_index, save_index, search

RECALL_QUERIES, RECALL_K = 1000, 10


def build_and_save(emb_dir: str | Path, kind: str = "flat", device: str = "auto") -> str:
    emb_dir = Path(emb_dir)
    embeddings, _, _, meta = load_embeddings(emb_dir)
    start = time.perf_counter()
    index = build_index(embeddings, kind, device)
    seconds = time.perf_counter() - start
    summary = f"{emb_dir / 'index.faiss'}: {kind} index of {len(embeddings)} x {embeddings.shape[1]} in {seconds:.1f} s"
    if kind == "ivfpq":  # approximate: say how approximate, against exact search on a sample of queries
        rng = np.random.default_rng(0)
        sample = embeddings[rng.choice(len(embeddings), size=min(RECALL_QUERIES, len(embeddings)), replace=False)]
        k = min(RECALL_K, len(embeddings))
        exact = search(build_index(embeddings, "flat", device), sample, k)[1]
        approx = search(index, sample, k)[1]
        recall = np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)])
        summary += f"; recall@{k} against exact search: {recall:.3f}"
    save_index(index, emb_dir / "index.faiss", {"model": meta["model"], "layer": meta["layer"], "kind": kind,
                                                "shards_manifest_hash": meta["shards_manifest_hash"]})  # fmt: skip
    return summary
