"""The benchmarks run end to end on tiny sizes (their numbers are measured by hand, never asserted)."""

from imret.bench import bench_embed, bench_faiss, bench_loader, format_result


def test_loader_and_faiss_benchmarks_run():
    loader = bench_loader(images=64, size=32, workers=0, source_size=64)
    assert loader["images"] > 0 and loader["speedup_vs_plain"] > 0 and "plain_images_per_s" in format_result(loader)
    faiss = bench_faiss(images=500, size=0, workers=0, queries=20, dim=16)
    assert faiss["neighbours_agree_with_torch"] == 1.0


def test_the_embedding_benchmark_compares_equal_work():
    result = bench_embed(images=80, size=64, workers=1)  # 96 px photos to 72: too close for reduced JPEG decoding
    assert result["images"] == 72 and result["max_abs_difference"] < 1e-4  # the baseline computes the same vectors
