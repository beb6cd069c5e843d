"""`imret bench scale`: the retrieval stages at growing gallery sizes, on synthetic embeddings and labels (no
images): N = 10^5, 10^6 and 10^7 vectors of d = 128, 500 queries, k = 5, 46 classes (iMaterialist's count).

- merge: the embedding job's per-shard parts streamed into the memory-mapped embeddings, labels and key file
  (`imret.embed.merge_parts`);
- index: the exact index built from the memory map in chunks and saved (`imret.index.exact_gallery_index`);
- score: the study's scoring (`imret.study.score`): the saved index loaded, the queries searched, label IoU,
  precision/mAP/nDCG against the ideal gains over the whole gallery, the random baseline and the paired tests;
- open: the saved index opened as `imret search` and `imret serve` open it (`imret.retrieval.load_index`:
  memory-mapped) and the queries searched; read: the same with FAISS's plain read, the whole index copied into
  the process (the baseline). Both say how long opening took and the memory the process owns at the end
  (RssAnon: the mapped index is page cache, not the process's own).

Each stage runs in a fresh subprocess, so the peak resident memory reported is that stage's own, taken from
the kernel (`getrusage`), memory-mapped pages included. The synthetic parts are written once per N and are not
timed.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

SIZES = (10**5, 10**6, 10**7)
DIM, QUERIES, K, CLASSES, PART_ROWS = 128, 500, 5, 46, 100_000
STAGES = ("merge", "index", "score", "open", "read")


def write_parts(directory: Path, rows: int, seed: int) -> list[Path]:
    """Embedding-job parts of `rows` clustered vectors whose labels follow their cluster, PART_ROWS a part."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(256, DIM)).astype(np.float32)
    tags = np.random.default_rng(1).random((256, CLASSES)) < 0.08
    directory.mkdir(parents=True)
    paths = []
    for index, start in enumerate(range(0, rows, PART_ROWS)):
        count = min(PART_ROWS, rows - start)
        cluster = rng.integers(0, 256, count)
        vectors = centres[cluster] + rng.normal(scale=0.7, size=(count, DIM)).astype(np.float32)
        labels = tags[cluster] ^ (rng.random((count, CLASSES)) < 0.02)
        path = directory / f"{directory.name}-{index:06d}.npz"
        np.savez(path, keys=np.array([f"{directory.name}-{start + i:09d}" for i in range(count)]),
                 labels=labels.astype(np.uint8), embeddings=vectors)  # fmt: skip
        paths.append(path)
    return paths


def merge(work: Path, split: str) -> None:
    from imret.embed import merge_parts

    parts = sorted((work / "parts" / split).glob("*.npz"))
    out = work / split
    out.mkdir(exist_ok=True)
    count = 0
    for path in parts:
        with np.load(path) as part:
            count += len(part["keys"])
    manifest = {"classes": [f"class{i}" for i in range(CLASSES)], "splits": {split: {"samples": count}}}
    meta = {"task": "synthetic", "embedding": {"layer": "pooled", "dim": DIM}, "initialisation": "synthetic"}
    job = {"model": "synthetic", "weights_sha256": "-", "layer": "pooled", "mask_with": None,
           "mask_weights_sha256": None, "shards_manifest_hash": "synthetic", "split": split, "decode": "cpu"}  # fmt: skip
    merge_parts(out, parts, meta, job, manifest, split, str(work))


def index(work: Path) -> None:
    from imret.embed import load_embeddings
    from imret.index import exact_gallery_index

    embeddings, _, _, meta = load_embeddings(work / "train")
    exact_gallery_index(work / "train", embeddings, meta, "cpu")


def score(work: Path) -> None:
    from imret.study import StudyRecipe, score as study_score

    study = StudyRecipe()
    study.study.queries, study.study.k, study.study.faiss_device, study.study.bootstrap_resamples = QUERIES, K, "cpu", 1000
    results, _ = study_score(study, {"synthetic": {"original": {"gallery": work / "train", "queries": work / "val"}}})
    (work / "score.json").write_text(json.dumps(results["results"]["synthetic"]["original"]))


def open_and_search(work: Path, memory_mapped: bool) -> dict[str, float]:
    import faiss

    from imret.embed import load_embeddings
    from imret.index import INDEX_FILE
    from imret.retrieval import load_index, search

    queries = np.ascontiguousarray(load_embeddings(work / "val")[0][:QUERIES])
    path = work / "train" / INDEX_FILE
    start = time.perf_counter()
    index = load_index(path)[0] if memory_mapped else faiss.read_index(str(path))
    opened = time.perf_counter() - start
    search(index, queries, K)
    return {"open_s": round(opened, 3), "own_mib_at_end": round(own_memory_mib(), 1)}


def own_memory_mib() -> float:
    """The process's anonymous resident memory (RssAnon): what it holds itself, page cache not counted."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def run_stage(stage: str, work: Path) -> dict[str, float]:
    """One stage in a fresh interpreter: seconds, peak resident MiB and what the stage adds."""
    command = [sys.executable, "-m", "imret.bench_scale", stage, str(work)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench scale: stage {stage} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_scale(sizes: tuple[int, ...] = SIZES, workdir: str | None = None) -> dict[str, Any]:
    from imret.bench import machine

    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            work = Path(tmp)
            write_parts(work / "parts" / "train", n, seed=2)
            write_parts(work / "parts" / "val", QUERIES * 2, seed=3)
            row: dict[str, Any] = {"n": n}
            for stage in STAGES:
                row[stage] = run_stage(stage, work)
            files = [work / "train" / name for name in ("embeddings.npy", "labels.npy", "keys.txt", "keys.offsets.npy")]
            row["merged_mib"] = round(sum(f.stat().st_size for f in files) / 2**20, 1)
            row["embeddings_mib"] = round(files[0].stat().st_size / 2**20, 1)
            row["peak_rss_over_embeddings"] = round(max(row[s]["peak_rss_mib"] for s in STAGES) / row["embeddings_mib"], 2)
            row["score_mean_iou"] = round(json.loads((work / "score.json").read_text())["mean"], 4)
            rows.append(row)
    return {"bench": "scale", "date": date.today().isoformat(), "machine": machine(), "dim": DIM, "queries": QUERIES,
            "k": K, "classes": CLASSES, "sizes": rows}  # fmt: skip


def main() -> None:
    stage, work = sys.argv[1], Path(sys.argv[2])
    start = time.perf_counter()
    extra: dict[str, float] = {}
    if stage == "merge":
        merge(work, "train")
        merge(work, "val")
    elif stage in ("open", "read"):
        extra = open_and_search(work, memory_mapped=stage == "open")
    else:
        {"index": index, "score": score}[stage](work)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mib": round(peak_mib, 1), **extra}))


if __name__ == "__main__":
    main()
