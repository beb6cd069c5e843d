"""Retrieval scores, statistics and the FAISS index against brute-force numpy and scipy."""

import json

import numpy as np
import pytest
import torch

from imret.errors import ImretError
from imret.retrieval import (RELEVANCE, build_index, exact_neighbours, ideal_gains, load_index, ndcg, random_baseline,
                             random_neighbours, ranking_scores, relevance, retrieval_iou, save_index, search)  # fmt: skip
from imret.stats import holm, paired_test, summary
from imret.study import select_queries
from imret.tasks.base import key_rank


def data(seed=0, n=300, q=40, dim=16, classes=8):
    rng = np.random.default_rng(seed)
    gallery = rng.normal(size=(n, dim)).astype(np.float32)
    queries = rng.normal(size=(q, dim)).astype(np.float32)
    g_labels = (rng.random((n, classes)) < 0.3).astype(np.uint8)
    q_labels = (rng.random((q, classes)) < 0.3).astype(np.uint8)
    return gallery, g_labels, queries, q_labels


def brute_iou(a, b):
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 0.0


@pytest.mark.parametrize("k", [1, 5, 12])
def test_retrieval_iou_equals_brute_force(k):
    gallery, g_labels, queries, q_labels = data()
    expected = []
    for query, labels in zip(queries, q_labels):
        nearest = np.argsort(((gallery - query) ** 2).sum(1))[:k]
        expected.append(np.mean([brute_iou(labels, g_labels[i]) for i in nearest]))
    assert retrieval_iou(gallery, g_labels, queries, q_labels, k) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("chunk", [7, 1000])
def test_exact_neighbours_read_in_chunks_equal_brute_force(chunk):
    gallery, _, queries, _ = data()
    expected = np.argsort(((gallery[None] - queries[:, None]) ** 2).sum(-1), axis=1, kind="stable")[:, :5]
    assert np.array_equal(exact_neighbours(gallery, queries, 5, "cpu", chunk=chunk), expected)


def test_random_baseline_is_seeded_distinct_and_correct():
    _, g_labels, _, q_labels = data()
    a, b = random_baseline(g_labels, q_labels, 5, seed=3), random_baseline(g_labels, q_labels, 5, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, random_baseline(g_labels, q_labels, 5, seed=4))
    drawn = random_neighbours(len(g_labels), len(q_labels), 5, seed=3)
    assert all(len(set(row)) == 5 for row in drawn)
    expected = [np.mean([brute_iou(q_labels[i], g_labels[j]) for j in row]) for i, row in enumerate(drawn)]
    assert a == pytest.approx(expected)
    assert 0.1 < a.mean() < 0.4  # random tags with p=0.3: expected IoU about 0.18


RELEVANT = {"": lambda q, g: brute_iou(q, g) >= 0.5, "_any_tag": lambda q, g: bool((q & g).any()),
            "_same_tags": lambda q, g: bool((q == g).all())}  # fmt: skip


@pytest.mark.parametrize("gallery_chunk", [1 << 16, 7])  # one pass, and many chunks whose top-k are merged
def test_ranking_scores_equal_brute_force(tmp_path, gallery_chunk):
    """Multi-label tags, every relevance definition, against loops over the definitions."""
    _, g_labels, _, q_labels = data(seed=1, n=200, q=30, classes=5)
    np.save(tmp_path / "labels.npy", g_labels)
    g_labels = np.load(tmp_path / "labels.npy", mmap_mode="r")  # as the study reads them
    rng = np.random.default_rng(1)
    k = 5
    retrieved = np.stack([rng.choice(200, k, replace=False) for _ in range(30)])
    ious = np.array([[brute_iou(q, g_labels[j]) for j in row] for q, row in zip(q_labels, retrieved)])
    ideal, relevant_total = ideal_gains(g_labels, q_labels, k, chunk=8, gallery_chunk=gallery_chunk)
    relevant = relevance(q_labels, g_labels[retrieved])
    assert set(relevant) == set(RELEVANCE) == set(relevant_total)
    gains = ndcg(ious, ideal)
    for suffix, is_relevant in RELEVANT.items():
        scores = ranking_scores(relevant[suffix], relevant_total[suffix])
        for i, q in enumerate(q_labels):
            rel = [is_relevant(q, g_labels[j]) for j in retrieved[i]]
            total = sum(is_relevant(q, g) for g in g_labels)
            assert relevant_total[suffix][i] == total
            assert scores["precision"][i] == pytest.approx(np.mean(rel))
            hits, ap = 0, 0.0
            for rank, one in enumerate(rel, start=1):
                if one:
                    hits += 1
                    ap += hits / rank
            assert scores["ap"][i] == pytest.approx(ap / min(k, total) if total else 0.0)
            assert scores["recall"][i] == float(any(rel))
            assert scores["mrr"][i] == pytest.approx(1 / (rel.index(True) + 1) if any(rel) else 0.0)
    for i, q in enumerate(q_labels):
        all_ious = np.array([brute_iou(q, g) for g in g_labels])
        dcg = sum(g / np.log2(r + 1) for r, g in enumerate(ious[i], start=1))
        idcg = sum(g / np.log2(r + 1) for r, g in enumerate(sorted(all_ious, reverse=True)[:k], start=1))
        assert gains[i] == pytest.approx(dcg / idcg if idcg else 0.0)


def test_single_label_scores_equal_pytorch_metric_learnings_accuracy_calculator():
    """One tag an image: the three relevance definitions coincide with "same class", and over the whole ranking
    (k = the gallery) AP is PML's mean_average_precision, the first rank its precision_at_1, and MRR its
    mean_reciprocal_rank."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(3)
    classes, n, q = 6, 120, 40
    centres = rng.normal(size=(classes, 8))
    g_class, q_class = rng.integers(0, classes, n), rng.integers(0, classes, q)
    gallery = (centres[g_class] + rng.normal(size=(n, 8))).astype(np.float32)
    queries = (centres[q_class] + rng.normal(size=(q, 8))).astype(np.float32)
    g_labels, q_labels = np.eye(classes, dtype=np.uint8)[g_class], np.eye(classes, dtype=np.uint8)[q_class]
    order = exact_neighbours(gallery, queries, n, "cpu")
    _, relevant_total = ideal_gains(g_labels, q_labels, n)
    relevant = relevance(q_labels, g_labels[order])
    assert all(np.array_equal(relevant[""], relevant[suffix]) for suffix in RELEVANCE)
    ours = ranking_scores(relevant[""], relevant_total[""])
    pml = AccuracyCalculator(include=("precision_at_1", "mean_average_precision", "mean_reciprocal_rank"), k=None,
                             device=torch.device("cpu")).get_accuracy(queries, q_class, gallery, g_class,
                                                                     ref_includes_query=False)  # fmt: skip
    assert ours["ap"].mean() == pytest.approx(pml["mean_average_precision"], abs=1e-6)
    assert ranking_scores(relevant[""][:, :1], relevant_total[""])["precision"].mean() == pytest.approx(pml["precision_at_1"])
    assert ours["mrr"].mean() == pytest.approx(pml["mean_reciprocal_rank"], abs=1e-6)
    hits_at_5 = [(q_class[i] == g_class[order[i, :5]]).any() for i in range(q)]  # recall@5, the hit rate
    assert ranking_scores(relevant[""][:, :5], relevant_total[""])["recall"].mean() == pytest.approx(np.mean(hits_at_5))


def test_summary_and_paired_test_against_numpy_and_scipy():
    rng = np.random.default_rng(0)
    a = rng.random(80)
    b = a - 0.05 + rng.normal(0, 0.05, 80)
    s = summary(a, seed=0)
    assert s["mean"] == pytest.approx(a.mean()) and s["std"] == pytest.approx(a.std(ddof=1))
    assert s["ci95"][0] < a.mean() < s["ci95"][1] and s["ci95"][1] - s["ci95"][0] < 0.2
    test = paired_test(a, b)
    assert test["mean_difference"] > 0 and test["median_difference"] == pytest.approx(np.median(a - b))
    assert paired_test(a + 1, a)["effect_size"] == 1.0 and paired_test(a, a + 1)["effect_size"] == -1.0
    assert paired_test(a, a)["p_value"] == 1.0
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_queries_are_seeded_and_independent_of_key_order():
    keys = [f"k{i}" for i in range(100)]
    chosen = select_queries(keys, 20, seed=0)
    assert chosen == select_queries(list(reversed(keys)), 20, seed=0) and len(set(chosen)) == 20
    assert chosen != select_queries(keys, 20, seed=1)
    assert sorted(select_queries(keys, 500, seed=0)) == sorted(keys)
    # drawn apart from the triplet validation sample and the threshold half, which select the models
    for purpose in ("triplet validation", "threshold half"):
        assert chosen != sorted(sorted(keys, key=lambda key: key_rank(key, 0, purpose))[:20])


def test_index_round_trip_and_refusals(tmp_path):
    gallery, _, queries, _ = data()
    index = build_index(gallery, "flat", device="cpu")
    distances, found = search(index, queries, 3)
    expected = np.argsort(((gallery[None] - queries[:, None]) ** 2).sum(-1), axis=1)[:, :3]
    assert np.array_equal(found, expected)
    path = tmp_path / "index.faiss"
    save_index(index, path, {"model": "runs/a", "layer": "pooled"})
    loaded, sidecar = load_index(path, {"model": "runs/a", "dim": 16})
    assert sidecar["count"] == 300 and np.array_equal(search(loaded, queries, 3)[1], found)
    assert not loaded.codes.is_owned  # a view of the file's pages, memory-mapped, not a copy read into RAM
    with pytest.raises(ImretError, match=r"built for model='runs/a', expected 'runs/b'"):
        load_index(path, {"model": "runs/b"})
    with pytest.raises(ImretError, match=r"built for dim=16, expected 32"):
        load_index(path, {"dim": 32})
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ImretError, match="truncated"):
        load_index(path)
    sidecar_path = tmp_path / "index.faiss.json"
    sidecar_path.write_text(json.dumps({**sidecar, "bytes": 1000}))
    with pytest.raises(ImretError, match="unreadable index"):
        load_index(path)


def test_ivfpq_is_close_to_exact_on_clustered_data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32)) * 5
    gallery = (centres[rng.integers(0, 20, 10_000)] + rng.normal(size=(10_000, 32))).astype(np.float32)
    exact = search(build_index(gallery, "flat", "cpu"), gallery[:200], 10)[1]
    approx = search(build_index(gallery, "ivfpq", "cpu"), gallery[:200], 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall > 0.3
    with pytest.raises(ImretError, match="needs at least"):
        build_index(gallery[:5000], "ivfpq", "cpu")


def test_padded_neighbours_are_refused_not_scored():
    labels = np.eye(3, dtype=np.uint8)
    with pytest.raises(ImretError, match="k exceeds the gallery"):
        retrieval_iou(np.eye(3, dtype=np.float32), labels, np.eye(3, dtype=np.float32)[:1], labels[:1], k=5)


def test_float16_flat_and_ivfpq_round_trip_from_a_memory_map(tmp_path, monkeypatch):
    """Built from a memory-mapped gallery added in chunks, IVF-PQ trained once on a bounded sample, both saved and
    read back to the same neighbours; float16 storage finds what float32 exact search finds."""
    import imret.retrieval as retrieval

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(30, 32)) * 5
    np.save(tmp_path / "gallery.npy", (centres[rng.integers(0, 30, 12_000)] + rng.normal(size=(12_000, 32))).astype(np.float32))
    gallery = np.load(tmp_path / "gallery.npy", mmap_mode="r")
    monkeypatch.setattr(retrieval, "ADD_CHUNK", 5000)  # three adds
    queries = np.asarray(gallery[:100])
    exact = search(build_index(gallery, "flat", "cpu"), queries, 10)[1]
    half = build_index(gallery, "flat", "cpu", float16=True)
    found = search(half, queries, 10)[1]
    assert half.ntotal == 12_000 and np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact)]) > 0.98

    trained_on = []
    original = retrieval.training_sample
    monkeypatch.setattr(retrieval, "TRAIN_MAX", 10_000)
    monkeypatch.setattr(retrieval, "training_sample", lambda *a: trained_on.append(len(original(*a))) or original(*a))
    ivf = build_index(gallery, "ivfpq", "cpu")
    assert trained_on == [10_000] and ivf.ntotal == 12_000
    for name, index in (("half", half), ("ivf", ivf)):
        path = tmp_path / f"{name}.faiss"
        save_index(index, path, {"model": "m"})
        loaded, _ = load_index(path)
        assert np.array_equal(search(loaded, queries, 10)[1], search(index, queries, 10)[1])
        if name == "half":
            assert not loaded.codes.is_owned  # memory-mapped, like the float32 flat index


def test_a_gpu_machine_without_gpu_faiss_is_told_the_fix(monkeypatch):
    """A CUDA machine whose FAISS cannot use the GPUs: an error naming the fix, not a silent CPU search;
    --device cpu is the deliberate way to search on the CPU. Two FAISS builds at once are refused too."""
    import torch

    import imret.faiss_build as faiss_build

    if faiss_build.load_faiss().get_num_gpus() > 0:
        pytest.skip("this FAISS has GPU support")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ImretError, match=r"cannot use them: pip uninstall -y faiss-cpu && pip install -e '\.\[gpu\]'"):
        faiss_build.gpu_count("auto")
    assert faiss_build.gpu_count("cpu") == 0
    monkeypatch.setattr(faiss_build, "installed_faiss_builds", lambda: (("faiss-cpu", "1.15.1"), ("faiss-gpu-cu12", "1.14.1")))
    with pytest.raises(ImretError, match=r"two FAISS builds share the `faiss` module .*pip uninstall -y faiss-cpu faiss-gpu-cu12"):
        faiss_build.gpu_count("cpu")


def exact_signed_rank_p(diff: np.ndarray) -> float:
    """Two-sided p of the signed-rank statistic by enumerating all 2^n sign patterns (no ties, no zeros):
    the definition, independent of scipy."""
    from itertools import product

    ranks = np.argsort(np.argsort(np.abs(diff))) + 1
    observed = ranks[diff > 0].sum()
    total = ranks.sum()
    extreme = min(observed, total - observed)
    count = 0
    for signs in product((False, True), repeat=len(diff)):
        plus = ranks[np.array(signs)].sum()
        count += min(plus, total - plus) <= extreme
    return count / 2 ** len(diff)


def test_signed_rank_p_values_against_a_table_and_the_definition():
    assert paired_test(np.arange(1.0, 6.0), np.zeros(5))["p_value"] == pytest.approx(2 / 32)  # all 5 positive: 2/2^5
    rng = np.random.default_rng(4)
    for n in (8, 11, 13):
        diff = rng.normal(0.3, 1.0, n)
        assert paired_test(diff, np.zeros(n))["p_value"] == pytest.approx(exact_signed_rank_p(diff))


def test_direction_comes_from_the_test_and_a_disagreeing_mean_is_said():
    """30 queries a little better, one much worse: the signed-rank test says higher (effect size +0.88), the mean
    says lower; the conclusion follows the test and names the mean that points the other way."""
    from imret.report import comparison_sentence

    a = np.concatenate([np.full(30, 0.52), [0.0]])
    b = np.concatenate([np.full(30, 0.50), [1.0]])
    row = {"a": "masked", "b": "original", **paired_test(a, b), "p_holm": 0.001}
    assert row["effect_size"] == pytest.approx((30 * 15.5 - 31) / (31 * 32 / 2)) and row["mean_difference"] < 0
    assert row["median_difference"] == pytest.approx(0.02)
    sentence = comparison_sentence(row)
    assert sentence.startswith("masked is significantly higher than original (effect size +0.88")
    assert "The mean difference points the other way" in sentence and "the median" not in sentence
    flipped = comparison_sentence({**row, "a": "original", "b": "masked", **paired_test(b, a), "p_holm": 0.2})
    assert flipped.startswith("original is not significantly lower than masked") and "mean difference points" in flipped


def test_the_ordering_says_which_neighbours_a_test_tells_apart():
    from imret.report import ordering_sentence

    results = {"ordering": ["triplet", "classifier", "random", "rotation"],
               "results": {n: {"original": {"mean": m}} for n, m in
                           (("triplet", 0.49), ("classifier", 0.485), ("random", 0.16), ("rotation", 0.155))},
               "comparisons": [
                   {"a": "triplet/original", "b": "classifier/original", "effect_size": 0.1, "p_holm": 0.4},
                   {"a": "classifier/original", "b": "random/original", "effect_size": 0.99, "p_holm": 1e-30},
                   # the rotation row was tested the other way round (rotation vs random) and is a clear loss
                   {"a": "rotation/original", "b": "random/original", "effect_size": -0.3, "p_holm": 0.01}]}  # fmt: skip
    assert ordering_sentence(results).endswith(
        "triplet (0.490) ≈ classifier (0.485) > random (0.160) > rotation (0.155).")
    results["comparisons"][2]["p_holm"] = 0.2
    assert ordering_sentence(results).endswith("> random (0.160) ≈ rotation (0.155).")


def test_a_gallery_sharded_as_faiss_spreads_a_flat_index_over_gpus_keeps_global_row_numbers(monkeypatch):
    """index_cpu_to_all_gpus makes a flat index on several GPUs an IndexShards with successive_ids, which refuses a
    second add(); the same structure of CPU shards here, the gallery added several chunks a shard."""
    import faiss

    from imret import retrieval

    monkeypatch.setattr(retrieval, "ADD_CHUNK", 100)
    gallery = np.random.default_rng(0).standard_normal((1051, 16)).astype(np.float32)
    queries = np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32)
    index = faiss.IndexShards(16, True, True)
    for _ in range(3):
        index.add_shard(faiss.IndexFlatL2(16))
    retrieval.add_rows(index, gallery)
    assert index.ntotal == 1051 and [index.at(i).ntotal for i in range(3)] == [350, 350, 351]
    expected = np.argsort(((queries[:, None] - gallery[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :5]
    assert np.array_equal(index.search(queries, 5)[1], expected)


def test_a_float16_flat_index_from_the_gpu_is_saved_as_the_cpu_builds_it(monkeypatch):
    import faiss

    from imret import retrieval

    monkeypatch.setattr(retrieval, "ADD_CHUNK", 64)
    gallery = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    flat = faiss.IndexFlatL2(16)
    flat.add(gallery.astype(np.float16).astype(np.float32))  # what a GPU's float16 storage hands back
    half = retrieval.half_precision(flat)
    cpu = build_index(gallery, "flat", "cpu", float16=True)
    assert isinstance(half, faiss.IndexScalarQuantizer) and half.ntotal == 300
    assert np.array_equal(faiss.serialize_index(half), faiss.serialize_index(cpu))
