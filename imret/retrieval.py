"""Retrieval: the FAISS index (build, save, load, search) and the scores of a retrieval.

Pure scoring functions take numpy arrays; `search` is exact L2 unless the index says otherwise. On the CPU,
FAISS scans query by query below `distance_compute_blas_threshold` queries (a trap for the 500-query
evaluation: slower than one matrix product), so imret lowers that threshold and sends queries in batches.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from imret.data.manifest import write_json_atomic
from imret.errors import ImretError, write_failed
from imret.faiss_build import gpu_count, load_faiss, set_declared
from imret.metrics import label_iou

log = logging.getLogger("imret.retrieval")
RELEVANT_IOU = 0.5  # a retrieved image is relevant when its label IoU with the query reaches this
PQ_MIN_TRAIN = 39 * 256  # 39 training points for each of the 256 centroids of every 8-bit PQ codebook
TRAIN_PER_LIST, TRAIN_MAX = 64, 1 << 18  # IVF-PQ trains on a seeded sample of at most this many vectors
ADD_CHUNK = 1 << 16  # vectors copied to the index at a time: the gallery is never converted whole
# GPU IVF-PQ (faiss/gpu/impl/IVFPQ.cu, GpuIndexIVFPQ.cu): the sub-quantizer counts it has kernels for, 8-bit codes
# only, and lookup tables (2^8 entries a sub-quantizer; float16 here, 2 bytes) that must fit the 48 KiB of shared
# memory a block gets (cudaDeviceProp.sharedMemPerBlock): float32 tables would stop at 48 sub-quantizers
GPU_PQ_SUBQUANTIZERS = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_SHARED_MEMORY = 48 * 1024
PQ_BITS, PQ_MAX_BYTES = 8, 64  # 8-bit codes, at most 64 bytes a vector


def build_index(embeddings: np.ndarray, kind: str = "flat", device: str = "auto", nlist: int | None = None,
                pq_m: int | None = None, float16: bool = False, seed: int = 0, probe: bool = True) -> Any:  # fmt: skip
    """Exact search (IndexFlatL2; with float16, half the memory and distances rounded to half precision) or
    IVF-PQ, on every GPU (the gallery sharded across them) when FAISS has GPU support, else on the CPU.

    IVF-PQ trains once, on a seeded sample of at most TRAIN_MAX vectors, before the index is spread over the
    GPUs, so every shard shares one coarse quantizer (and the shards merge back into one index to save it);
    its coarse k-means runs on the GPUs, in a temporary GPU index freed after training. On the GPU its lookup
    tables are float16 (a sub-quantizer count the GPU has no kernel for is trained and searched on the CPU,
    said in one line). The vectors are added ADD_CHUNK at a time, so a memory-mapped gallery is never copied
    whole. `probe=False` only in the GPU probe's own child process (imret.faiss_build)."""
    faiss = load_faiss()
    n, dim = embeddings.shape
    gpus = gpu_count(device, kind, dim, probe)
    if kind == "flat":
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16) if float16 and not gpus else faiss.IndexFlatL2(dim)
        if not gpus:  # room for every vector up front: a vector grown chunk by chunk would briefly hold two copies
            index.codes.resize(n * index.code_size)
            index.codes.resize(0)
    elif kind == "ivfpq":
        if n < PQ_MIN_TRAIN:
            raise ImretError(f"ivfpq needs at least {PQ_MIN_TRAIN} embeddings to train, got {n}; use --kind flat "
                             f"(exact search is fast at this size)")  # fmt: skip
        nlist = nlist or max(1, min(4096, int(4 * np.sqrt(n)), n // 39))
        pq_m = pq_m or pq_subquantizers(dim)
        if gpus and not gpu_pq_supported(dim, pq_m):
            log.warning("IVF-PQ with %d sub-quantizers of %d-d vectors has no GPU kernel: trained and searched on "
                        "the CPU", pq_m, dim)  # fmt: skip
            gpus = 0
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, pq_m, PQ_BITS)
        index.nprobe = min(nlist, 16)
        sample = training_sample(embeddings, min(n, max(PQ_MIN_TRAIN, TRAIN_PER_LIST * nlist), TRAIN_MAX), seed)
        if gpus:  # the coarse k-means, the costly part of training, on the GPUs; freed (memory, streams) after
            clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
            index.clustering_index = clustering
            try:
                index.train(sample)
            finally:
                index.clustering_index = None
                del clustering
        else:
            index.train(sample)
    else:
        raise ImretError(f"unknown index kind '{kind}': flat or ivfpq")
    if gpus:
        index = faiss.index_cpu_to_all_gpus(index, co=cloner_options(float16 or kind == "ivfpq"))
        if kind == "ivfpq":
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", min(nlist, 16))
    add_rows(index, embeddings)
    return index


def add_rows(index: Any, embeddings: np.ndarray) -> None:
    """Add the gallery ADD_CHUNK rows at a time. A flat index sharded over several GPUs is an IndexShards with
    `successive_ids` (faiss/gpu/GpuCloner.cpp): it takes one add() only, splitting those rows evenly, and numbers
    shard i's rows after shard i-1's. So each shard is filled with its own contiguous range, chunk by chunk, which
    keeps the row numbers global and the gallery never copied whole."""
    faiss = load_faiss()
    n = len(embeddings)
    sharded = isinstance(index, faiss.IndexShards) and index.successive_ids  # SWIG downcasts the cloner's result
    shards = [index.at(i) for i in range(index.count())] if sharded else [index]
    for i, shard in enumerate(shards):
        stop = n * (i + 1) // len(shards)
        for start in range(n * i // len(shards), stop, ADD_CHUNK):
            shard.add(np.ascontiguousarray(read_rows(embeddings, start, min(start + ADD_CHUNK, stop)), dtype=np.float32))
    if sharded:
        index.syncWithSubIndexes()  # its ntotal, and so the offsets of each shard's row numbers


def cloner_options(float16: bool) -> Any:
    """How an index is spread over the GPUs: the gallery sharded across them rather than copied to each; an IVF
    index's trained quantizer shared and only its lists sharded. `useFloat16` stores flat vectors in half
    precision and, for IVF-PQ, makes its lookup tables float16 (the cloner has no separate field for those)."""
    faiss = load_faiss()
    return set_declared(faiss.GpuMultipleClonerOptions(), shard=True, common_ivf_quantizer=True, useFloat16=float16)


def pq_subquantizers(dim: int) -> int:
    """The most sub-quantizers (bytes a vector, at most PQ_MAX_BYTES) that divide `dim` into sub-vectors of at least
    2 dimensions, among those the GPU has kernels for unless that would halve the code (a 106-d vector: 53 bytes on
    the CPU rather than 2 on the GPU)."""
    fitting = [m for m in range(1, PQ_MAX_BYTES + 1) if dim % m == 0 and m <= max(1, dim // 2)]
    on_gpu = max(m for m in fitting if gpu_pq_supported(dim, m))  # 1 always is
    return on_gpu if 2 * on_gpu >= max(fitting) else max(fitting)


def gpu_pq_supported(dim: int, pq_m: int) -> bool:
    """Whether GpuIndexIVFPQ takes `pq_m` sub-quantizers of `dim`-d vectors with 8-bit codes and float16 tables."""
    return dim % pq_m == 0 and pq_m in GPU_PQ_SUBQUANTIZERS and 2 * pq_m * 2**PQ_BITS <= GPU_SHARED_MEMORY


def training_sample(embeddings: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` rows drawn from the seed, gathered chunk by chunk (a memory-mapped gallery is read once, in order)."""
    rows = np.sort(np.random.default_rng(seed).choice(len(embeddings), size=size, replace=False))
    picked = []
    for start in range(0, len(embeddings), ADD_CHUNK):
        inside = rows[(rows >= start) & (rows < start + ADD_CHUNK)]
        if len(inside):
            picked.append(read_rows(embeddings, start, start + ADD_CHUNK)[inside - start])
    return np.ascontiguousarray(np.concatenate(picked), dtype=np.float32)


def read_rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows start:stop in memory. From a memory-mapped file they are read with a plain file read: pages touched
    through the map would stay resident in this process, and a pass over a 50M-row gallery would pull all of it
    into the process's memory."""
    stop = min(stop, len(array))
    if not (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap)):  # in memory, or a view of a map
        return np.asarray(array[start:stop])
    row_items = int(np.prod(array.shape[1:], dtype=np.int64))
    with open(array.filename, "rb") as handle:
        handle.seek(array.offset + start * row_items * array.dtype.itemsize)
        rows = np.fromfile(handle, dtype=array.dtype, count=(stop - start) * row_items)
    return rows.reshape(stop - start, *array.shape[1:])


def search(index: Any, queries: np.ndarray, k: int, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(squared L2 distances [Q, k], gallery indices [Q, k]), nearest first."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    parts = [index.search(q[i : i + batch], k) for i in range(0, len(q), batch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def exact_neighbours(gallery_emb: np.ndarray, query_emb: np.ndarray, k: int, device: str = "auto",
                     chunk: int = 1 << 20) -> np.ndarray:  # fmt: skip
    """The exact top-k gallery rows of each query, nearest first: the gallery indexed `chunk` rows at a time and
    the results merged, so a memory-mapped gallery is never held whole beside another index."""
    faiss = load_faiss()
    heap = faiss.ResultHeap(len(query_emb), k)
    queries = np.ascontiguousarray(query_emb, dtype=np.float32)
    for start in range(0, len(gallery_emb), chunk):
        part = build_index(read_rows(gallery_emb, start, start + chunk), "flat", device)
        distances, rows = search(part, queries, min(k, part.ntotal))
        heap.add_result(distances, np.where(rows >= 0, rows + start, -1))
    heap.finalize()
    return heap.I


# ---------------------------------------------------------------- saving and loading


def save_index(index: Any, path: str | Path, sidecar: dict[str, Any]) -> None:
    """The index under a temporary name (a GPU index moved to the CPU first, which also merges its shards),
    written through Python so that a full disk raises rather than only printing an error, flushed to disk and
    renamed; then its sidecar JSON, last: an index without a sidecar is never loaded."""
    faiss = load_faiss()
    path = Path(path)
    if on_gpus(index):
        index = faiss.index_gpu_to_cpu(index)
        if sidecar.get("float16") and isinstance(index, faiss.IndexFlat):
            index = half_precision(index)
    sidecar_path = path.with_name(f"{path.name}.json")
    sidecar_path.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, exc, int(index.sa_code_size() * index.ntotal) if hasattr(index, "sa_code_size") else None) from None
    except RuntimeError as exc:
        tmp.unlink(missing_ok=True)
        raise ImretError(f"writing {path} failed: {str(exc).splitlines()[0]}") from None
    meta = {**sidecar, "dim": int(index.d), "count": int(index.ntotal), "bytes": tmp.stat().st_size}
    os.replace(tmp, path)
    write_json_atomic(sidecar_path, meta)


def half_precision(flat: Any) -> Any:
    """A float16 flat index as the CPU build makes it (IndexScalarQuantizer QT_fp16): a GPU's float16 flat index comes
    back from the GPU as float32 vectors, twice the file. Copied ADD_CHUNK rows at a time."""
    faiss = load_faiss()
    half = faiss.IndexScalarQuantizer(flat.d, faiss.ScalarQuantizer.QT_fp16)
    for start in range(0, flat.ntotal, ADD_CHUNK):
        half.add(flat.reconstruct_n(start, min(ADD_CHUNK, flat.ntotal - start)))
    return half


def on_gpus(index: Any) -> bool:
    """Whether FAISS holds the index on GPUs: one GPU index, or the shards `index_cpu_to_all_gpus` spreads over
    several (imret builds no CPU shards). Asked before moving an index to the CPU, which copies even a CPU index."""
    faiss = load_faiss()
    return type(index).__name__.startswith("Gpu") or isinstance(index, (faiss.IndexShards, faiss.IndexReplicas))


def load_index(path: str | Path, expect: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Read an index and its sidecar; refuse one whose size, dimension or model does not match. A flat index
    (float32 or float16) is memory-mapped, not read: it opens at once whatever its size, its pages are the page
    cache's (read as searched, shared by every process that opens it), and it is read-only (nothing adds to a
    loaded index). IVF-PQ, 64 bytes a vector, is read."""
    faiss = load_faiss()
    path = Path(path)
    sidecar_path = path.with_name(f"{path.name}.json")
    if not path.is_file() or not sidecar_path.is_file():
        raise ImretError(f"{path}: no index with a sidecar {sidecar_path.name} here (imret index build)")
    sidecar = json.loads(sidecar_path.read_text())
    if path.stat().st_size != sidecar.get("bytes"):
        raise ImretError(f"{path}: {path.stat().st_size} bytes, its sidecar says {sidecar.get('bytes')} (truncated?)")
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError as exc:
        raise ImretError(f"{path}: unreadable index ({str(exc).splitlines()[0]})") from None
    for key, value in (expect or {}).items():
        if sidecar.get(key) != value:
            raise ImretError(f"{path}: built for {key}={sidecar.get(key)!r}, expected {value!r}")
    if index.d != sidecar["dim"] or index.ntotal != sidecar["count"]:
        raise ImretError(f"{path}: holds {index.ntotal} x {index.d}, its sidecar says {sidecar['count']} x {sidecar['dim']}")
    return index, sidecar


# ---------------------------------------------------------------- scores (pure)


def neighbour_iou(gallery_labels: np.ndarray, query_labels: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """[Q, k] label IoU between each query and each of its retrieved gallery items."""
    if (np.asarray(neighbours) < 0).any():  # FAISS pads with -1 when k exceeds what the index holds
        raise ImretError(f"fewer than k={neighbours.shape[1]} neighbours found: k exceeds the gallery")
    return label_iou(np.asarray(query_labels)[:, None, :], np.asarray(gallery_labels)[neighbours])


def retrieval_iou(gallery_emb: np.ndarray, gallery_labels: np.ndarray, query_emb: np.ndarray,
                  query_labels: np.ndarray, k: int = 5) -> np.ndarray:  # fmt: skip
    """Mean label IoU between each query and its k nearest gallery items by L2: [Q]."""
    return neighbour_iou(gallery_labels, query_labels, exact_neighbours(gallery_emb, query_emb, k)).mean(1)


def random_neighbours(gallery_size: int, queries: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(gallery_size, size=k, replace=False) for _ in range(queries)])


def random_baseline(gallery_labels: np.ndarray, query_labels: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    """Mean label IoU of k gallery items drawn at random (without replacement, from a seed) per query: [Q]."""
    neighbours = random_neighbours(len(gallery_labels), len(query_labels), k, seed)
    return neighbour_iou(gallery_labels, query_labels, neighbours).mean(1)


def relevance(query_labels: np.ndarray, neighbour_labels: np.ndarray) -> dict[str, np.ndarray]:
    """Whether each retrieved item [Q, k] is relevant to its query, by each definition (RELEVANCE): label IoU >=
    RELEVANT_IOU, at least one tag shared, the identical tag set."""
    q, g = np.asarray(query_labels).astype(bool)[:, None, :], np.asarray(neighbour_labels).astype(bool)
    return {"": label_iou(q, g) >= RELEVANT_IOU, "_any_tag": (q & g).any(-1), "_same_tags": (q == g).all(-1)}


RELEVANCE = ("", "_any_tag", "_same_tags")  # suffixes of the metric names in retrieval.json


def ideal_gains(gallery_labels: np.ndarray, query_labels: np.ndarray, k: int, chunk: int = 256,
                gallery_chunk: int = 1 << 16) -> tuple[np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
    """Per query: the k best IoUs anywhere in the gallery [Q, k], and how many gallery items are relevant [Q] by
    each definition of `relevance` (keyed as RELEVANCE). The gallery is read in chunks and kept top-k merged as it
    passes: no queries x gallery matrix."""
    q = np.asarray(query_labels, dtype=np.float32)
    q_count = q.sum(1)
    best = np.zeros((len(q), 0), dtype=np.float32)
    relevant = {suffix: np.zeros(len(q), dtype=np.int64) for suffix in RELEVANCE}
    for g_start in range(0, len(gallery_labels), gallery_chunk):
        g = read_rows(gallery_labels, g_start, g_start + gallery_chunk).astype(np.float32)
        g_count = g.sum(1)
        tops = []
        for start in range(0, len(q), chunk):
            rows = slice(start, start + chunk)
            inter = q[rows] @ g.T
            union = q_count[rows, None] + g_count[None, :] - inter
            iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
            tops.append(-np.partition(-iou, min(k, iou.shape[1]) - 1, axis=1)[:, :k])
            relevant[""][rows] += (iou >= RELEVANT_IOU).sum(1)
            relevant["_any_tag"][rows] += (inter > 0).sum(1)
            relevant["_same_tags"][rows] += ((inter == q_count[rows, None]) & (inter == g_count[None, :])).sum(1)
        merged = np.concatenate([best, np.concatenate(tops)], axis=1)
        best = -np.partition(-merged, min(k, merged.shape[1]) - 1, axis=1)[:, :k]
    return np.sort(best, axis=1)[:, ::-1], relevant


def ranking_scores(relevant: np.ndarray, relevant_total: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query scores of a ranking from which retrieved items [Q, k] (in rank order) are relevant: precision@k;
    AP@k, normalised by min(k, relevant items in the gallery); recall@k as the hit rate (any relevant item in the top
    k); and the reciprocal rank of the first relevant item (0 when none is in the top k)."""
    relevant = np.asarray(relevant, dtype=bool)
    k = relevant.shape[1]
    precision_at = np.cumsum(relevant, axis=1) / np.arange(1, k + 1)
    denominator = np.minimum(k, relevant_total)
    ap = np.divide((precision_at * relevant).sum(1), denominator, out=np.zeros(len(relevant)), where=denominator > 0)
    hit = relevant.any(1)
    reciprocal = np.where(hit, 1.0 / (relevant.argmax(1) + 1), 0.0)
    return {"precision": relevant.mean(1), "ap": ap, "recall": hit.astype(np.float64), "mrr": reciprocal}


def ndcg(ious: np.ndarray, ideal: np.ndarray) -> np.ndarray:
    """Per-query nDCG@k with the label IoU as gain, from the IoUs of the retrieved items [Q, k] and the best k
    anywhere in the gallery."""
    discount = 1.0 / np.log2(np.arange(2, ious.shape[1] + 2))
    dcg, idcg = (ious * discount).sum(1), (ideal * discount).sum(1)
    return np.divide(dcg, idcg, out=np.zeros(len(ious)), where=idcg > 0)
