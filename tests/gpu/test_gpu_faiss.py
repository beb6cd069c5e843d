"""FAISS on the GPU at toy size: flat, float16 and IVF-PQ indexes against exact CPU search, the options imret
sets checked against the installed FAISS's own class, the probe, and the memory an IVF-PQ build gives back.
Needs CUDA and a FAISS with GPU support (`pip install -e '.[gpu]'`); skipped with the reason elsewhere."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def faiss():
    module = pytest.importorskip("faiss")
    if not (hasattr(module, "get_num_gpus") and module.get_num_gpus()):
        from imret.faiss_build import describe_builds

        pytest.skip(f"the installed FAISS ({describe_builds()}) has no GPU support: pip install -e '.[gpu]'")
    return module


def clustered(n=20_000, dim=128, queries=200, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, 200, n)] + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)
    return vectors, vectors[rng.choice(n, queries, replace=False)] + 0.05


def recall(found, exact):
    return float(np.mean([len(set(a) & set(e)) / exact.shape[1] for a, e in zip(found, exact)]))


def test_the_cloner_options_imret_sets_are_fields_faiss_declares(faiss):
    from imret.faiss_build import declared_fields
    from imret.retrieval import cloner_options

    declared = declared_fields(faiss.GpuMultipleClonerOptions())
    assert {"shard", "common_ivf_quantizer", "useFloat16"} <= declared and "useFloat16LookupTables" not in declared
    options = cloner_options(float16=True)
    assert options.shard and options.common_ivf_quantizer and options.useFloat16


def test_gpu_indexes_against_exact_cpu_search(faiss, tmp_path):
    from imret.retrieval import build_index, load_index, on_gpus, save_index, search

    vectors, queries = clustered()
    exact = search(build_index(vectors, "flat", "cpu"), queries, 10)
    for kind, float16, least in (("flat", False, 1.0), ("flat", True, 0.95), ("ivfpq", False, 0.5)):
        index = build_index(vectors, kind, "gpu", float16=float16)
        assert on_gpus(index)
        distances, rows = search(index, queries, 10)
        assert recall(rows, exact[1]) >= least, (kind, float16)
        if kind == "flat" and not float16:
            np.testing.assert_allclose(distances, exact[0], rtol=1e-3, atol=1e-3)
        path = tmp_path / f"{kind}-{float16}.faiss"
        save_index(index, path, {"kind": kind})
        assert recall(search(load_index(path)[0], queries, 10)[1], exact[1]) >= least


def test_the_probe_passes_for_the_dimensions_imret_embeds(faiss, tmp_path, monkeypatch):
    import imret.faiss_build as faiss_build

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(faiss_build, "_verdicts", {})
    for kind, dim in (("flat", 128), ("ivfpq", 128), ("ivfpq", 512)):
        assert faiss_build.probe_verdict(kind, dim)["ok"], (kind, dim)


def test_ivfpq_builds_give_their_gpu_memory_back(faiss):
    import gc

    from imret.retrieval import build_index

    vectors, _ = clustered(n=40_000)
    index = build_index(vectors, "ivfpq", "gpu")  # resources and kernels of a first build stay for the process
    del index
    gc.collect()
    free_before = torch.cuda.mem_get_info()[0]
    for _ in range(3):
        index = build_index(vectors, "ivfpq", "gpu")
        del index
        gc.collect()
    assert free_before - torch.cuda.mem_get_info()[0] < 256 * 2**20
