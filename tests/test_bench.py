"""The benchmarks run end to end on tiny sizes (their numbers are measured by hand, never asserted)."""

import pytest
import torch

from imret.bench import bench_embed, bench_faiss, bench_loader, bench_train, format_result


def test_loader_and_faiss_benchmarks_run():
    loader = bench_loader(images=64, size=32, workers=0, source_size=64)
    assert loader["images"] > 0 and loader["speedup_vs_plain"] > 0 and "plain_images_per_s" in format_result(loader)
    faiss = bench_faiss(images=500, size=0, workers=0, queries=20, dim=16)
    assert faiss["neighbours_agree_with_torch"] == 1.0


def test_the_embedding_benchmark_compares_equal_work():
    result = bench_embed(images=80, size=64, workers=1)  # 96 px photos to 72: too close for reduced JPEG decoding
    assert result["images"] == 72 and result["max_abs_difference"] < 1e-4  # the baseline computes the same vectors


def test_the_training_benchmark_runs_imret_and_the_plain_loop():
    result = bench_train(images=256, size=32, workers=0)
    assert result["imret_images_per_s"] > 0 and result["plain_images_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_gpu_benchmark_refuses_a_machine_without_cuda_in_one_line(capsys):
    from imret.cli import main

    assert main(["bench", "gpu", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["imret: error: imret bench gpu measures a CUDA GPU, and this machine has none visible"]


def test_the_gpu_benchmark_code_runs_at_toy_size_on_the_cpu(tmp_path):
    """Every stage of `imret bench gpu` (the worker-decoding runs only: nvJPEG needs CUDA), so the one run a lent
    GPU gets does not die on a typo; each stage is in the JSON-lines file as soon as it is measured."""
    import io
    import json

    from imret.bench_gpu import TINY, format_summary, run_gpu_bench

    out, echo = tmp_path / "figures.jsonl", io.StringIO()
    result = run_gpu_bench(torch.device("cpu"), TINY, cpu_workers=[1], out=out, echo=echo)
    stages = result["stages"]
    assert {name: entry["status"] for name, entry in stages.items() if entry["status"] != "ok"} == {}
    assert [json.loads(line)["stage"] for line in out.read_text().splitlines()] == list(stages)
    for name in ("in_memory", "train_decode_cpu_workers_1", "unet_in_memory"):
        assert stages[name]["images_per_s"] > 0 and stages[name]["of_ceiling"] > 0
    assert stages["decode"]["cpu_core_images_per_s"] > 0 and stages["embed"]["embed_images_per_s"] > 0
    assert stages["embed"]["forward_only_images_per_s"] > 0 and stages["embed"]["embed_vs_forward"] > 0
    assert stages["faiss_exact"]["device"] == "cpu" and 0.5 < stages["faiss_ivfpq"]["recall_at_10"] <= 1.0
    assert "faiss_ivfpq" in format_summary(result) and "bench gpu: faiss_ivfpq: ok" in echo.getvalue()


def test_a_failing_gpu_benchmark_stage_is_recorded_and_the_rest_goes_on(tmp_path):
    """A stage that raises is an error entry with its message; one that needs it is skipped with the reason; the
    lines written before stay."""
    import io
    import json

    from imret.bench_gpu import Recorder

    out = tmp_path / "figures.jsonl"
    record = Recorder(out, io.StringIO())
    record.run("first", lambda: {"images_per_s": 10})
    record.run("photos", lambda: 1 / 0)
    record.run("train", lambda: {"images_per_s": 5}, needs=("photos",))
    record.close()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [{"stage": "first", "status": "ok", "images_per_s": 10},
                     {"stage": "photos", "status": "error", "error": "ZeroDivisionError: division by zero"},
                     {"stage": "train", "status": "skipped", "reason": "needs the photos stage"}]  # fmt: skip


def test_the_scale_benchmark_runs_every_stage_in_its_own_process(tmp_path):
    from imret.bench_scale import STAGES, bench_scale

    result = bench_scale((3000,), workdir=str(tmp_path))
    (row,) = result["sizes"]
    assert row["n"] == 3000 and row["embeddings_mib"] == pytest.approx(3000 * 128 * 4 / 2**20, abs=0.1)
    for stage in STAGES:
        assert row[stage]["seconds"] > 0 and row[stage]["peak_rss_mib"] > 50
    assert row["score_mean_iou"] > 0.3  # clustered vectors with labels that follow their cluster: retrieval works
    assert row["open"]["open_s"] >= 0 and row["open"]["own_mib_at_end"] > 0 and row["read"]["own_mib_at_end"] > 0


def test_the_serve_benchmark_measures_a_real_server_batched_and_one_at_a_time():
    from imret.bench_serve import run_serve_bench

    result = run_serve_bench(gallery=300, clients=(1, 3), seconds=0.5, queries=6)
    assert 290 <= result["gallery"] <= 310
    for mode in ("batched", "one_at_a_time"):
        for clients in ("1", "3"):
            figures = result[mode][clients]
            assert figures["queries"] > 0 and figures["queries_per_s"] > 0 and figures["p99_ms"] >= figures["p50_ms"] > 0
    assert set(result["one_at_a_time"]["batch_sizes"]) == {"1"}  # --max-batch 1 never batches
