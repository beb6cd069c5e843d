"""The FAISS build: which distributions install it, the options imret sets on it, the GPU IVF-PQ limits, and the
GPU probe that runs in a child process (FAISS aborts its process on a CUDA error) with its cached verdict."""

import sys
import tomllib
from pathlib import Path

import pytest

import imret.faiss_build as faiss_build
from imret.errors import ImretError
from imret.retrieval import GPU_SHARED_MEMORY, PQ_BITS, cloner_options, gpu_pq_supported, pq_subquantizers

ROOT = Path(__file__).resolve().parents[1]
# faiss/gpu/GpuClonerOptions.h (FAISS 1.15.1): every field of GpuMultipleClonerOptions, its base's included
CLONER_FIELDS = ("indicesOptions", "useFloat16CoarseQuantizer", "useFloat16", "usePrecomputed", "reserveVecs",
                 "storeTransposed", "verbose", "use_cuvs", "allowCpuCoarseQuantizer", "shard", "shard_type",
                 "common_ivf_quantizer")  # fmt: skip


@pytest.fixture
def fresh_builds():
    faiss_build.installed_faiss_builds.cache_clear()
    yield
    faiss_build.installed_faiss_builds.cache_clear()


def test_every_distribution_that_installs_the_faiss_module_is_found(tmp_path, monkeypatch, fresh_builds):
    """Read from the installed file lists, so a build imret never heard of (here a cuVS one) is caught too."""
    info = tmp_path / "faiss_gpu_cuvs-1.15.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: faiss-gpu-cuvs\nVersion: 1.15.1\n")
    (info / "RECORD").write_text("faiss/__init__.py,,\nfaiss/libfaiss.so,,\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    builds = faiss_build.installed_faiss_builds()
    assert ("faiss-gpu-cuvs", "1.15.1") in builds and any(name == "faiss-cpu" for name, _ in builds)
    with pytest.raises(ImretError, match=r"two FAISS builds share the `faiss` module .*pip uninstall -y faiss-cpu faiss-gpu-cuvs"):
        faiss_build.load_faiss()


def test_the_gpu_extra_pins_a_build_with_hopper_kernels():
    """faiss-gpu 1.15.x (Meta's CUDA 12 wheel): cubins for sm_70-sm_90 and sm_90 PTX, read with cuobjdump (README);
    faiss-gpu-cu12 1.14.1 holds sm_70 and sm_80 only and aborts on an H100."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == ["faiss-gpu>=1.15.1,<1.16"]


def test_options_objects_take_only_the_fields_faiss_declares():
    import faiss

    options = faiss_build.set_declared(faiss.ClusteringParameters(), niter=3, seed=7)
    assert (options.niter, options.seed) == (3, 7)
    with pytest.raises(ImretError, match="ClusteringParameters has no field useFloat16LookupTables"):
        faiss_build.set_declared(faiss.ClusteringParameters(), niter=3, useFloat16LookupTables=True)


def test_the_gpu_cloner_options_are_fields_faiss_declares(monkeypatch):
    """A stand-in with exactly the header's fields, declared as SWIG declares them (properties) and refusing any
    other attribute: what imret sets to spread an index over the GPUs must all be real fields."""
    import faiss

    class ClonerOptions:
        __slots__ = ("values",)

        def __init__(self):
            self.values = {}

    for name in CLONER_FIELDS:
        setattr(ClonerOptions, name, property(lambda self, n=name: self.values.get(n),
                                              lambda self, value, n=name: self.values.__setitem__(n, value)))  # fmt: skip
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", ClonerOptions, raising=False)
    assert cloner_options(float16=True).values == {"shard": True, "common_ivf_quantizer": True, "useFloat16": True}
    assert cloner_options(float16=False).values["useFloat16"] is False


@pytest.mark.parametrize("dim", [16, 128, 384, 512, 768, 1000, 1024, 1280, 2048])
def test_ivfpq_sub_quantizers_have_gpu_kernels_and_fit_shared_memory(dim):
    m = pq_subquantizers(dim)
    assert dim % m == 0 and m <= min(64, dim // 2) and gpu_pq_supported(dim, m)
    assert 2 * m * 2**PQ_BITS <= GPU_SHARED_MEMORY  # float16 tables; float32 ones at m = 64 would need 64 KiB
    assert 4 * 64 * 2**PQ_BITS > GPU_SHARED_MEMORY


def test_a_dimension_without_gpu_kernels_keeps_a_cpu_layout():
    assert pq_subquantizers(2 * 53) == 53 and not gpu_pq_supported(2 * 53, 53)  # trained and searched on the CPU


def test_a_child_that_aborts_is_a_verdict_with_its_last_words():
    verdict = faiss_build.run_child([sys.executable, "-c", (
        "import os, sys; sys.stderr.write('Faiss assertion failed: CUDA error 209 no kernel image is available "
        "for execution on the device\\n'); sys.stderr.flush(); os.abort()")])  # fmt: skip
    assert verdict == {"ok": False, "error": "was killed by SIGABRT (Faiss assertion failed: CUDA error 209 no kernel "
                                             "image is available for execution on the device)"}  # fmt: skip
    assert faiss_build.run_child([sys.executable, "-c", "print('{\"self_hits\": 1.0}')"]) == {"ok": True, "self_hits": 1.0}
    assert faiss_build.run_child([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.5)["error"].startswith(
        "did not finish")


def test_the_real_probe_child_reports_a_machine_without_gpu_faiss_in_one_line():
    verdict = faiss_build.run_child([sys.executable, "-m", "imret.faiss_build", "probe", "flat", "16"])
    assert verdict["ok"] is False
    assert verdict["error"].startswith("exited with status 1 (imret: error: --device gpu: no GPU is visible to FAISS")


def test_a_pass_is_cached_per_build_driver_and_kind_and_a_failure_is_probed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(faiss_build, "_verdicts", {})
    key = faiss_build.probe_key("flat", 128)
    assert key == faiss_build.probe_key("flat", 64) != faiss_build.probe_key("ivfpq", 128)  # IVF-PQ's limits depend on d
    faiss_build.remember(key, {"ok": True, "kind": "flat"})
    children = []

    def child(command, timeout=0):
        children.append(command)
        return {"ok": False, "error": "was killed by SIGABRT"}

    monkeypatch.setattr(faiss_build, "run_child", child)
    assert faiss_build.probe_verdict("flat", 128) == {"ok": True, "kind": "flat"} and children == []
    assert (tmp_path / "imret" / "faiss-gpu-probe.json").is_file()
    for _ in range(2):  # two commands: the failure is not written down, so each one probes
        monkeypatch.setattr(faiss_build, "_verdicts", {})
        assert faiss_build.probe_verdict("ivfpq", 128) == {"ok": False, "error": "was killed by SIGABRT"}
    assert len(children) == 2 and list(faiss_build.read_cache()) == [key]


def test_the_ranks_of_a_machine_starting_together_probe_once(tmp_path, monkeypatch):
    """Eight ranks of a torchrun start at once; without the lock each would start a probe on every GPU. Two threads
    here (an flock is held per open file, so they exclude each other as processes do): while the first probes,
    the second must wait, then read the first's verdict."""
    import threading

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(faiss_build, "_verdicts", {})
    calls, second_in_child = [], threading.Event()

    def child(command, timeout=0):
        calls.append(command)
        if len(calls) == 2:
            second_in_child.set()
        second_in_child.wait(timeout=1.0)  # without the lock, the other thread gets here meanwhile
        return {"ok": True, "kind": "flat"}

    monkeypatch.setattr(faiss_build, "run_child", child)
    start = threading.Barrier(2)
    verdicts = []

    def rank():
        start.wait()
        verdicts.append(faiss_build.probe_verdict("flat", 64))

    threads = [threading.Thread(target=rank) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and verdicts == [{"ok": True, "kind": "flat"}] * 2


def test_a_cpu_machine_needs_no_probe():
    assert faiss_build.gpu_count("auto") == 0 and faiss_build.gpu_count("cpu") == 0


def test_the_doctor_reports_every_check_and_the_faiss_build_as_json(capsys):
    import json

    from imret.cli import main

    assert main(["doctor", "--json"]) == 0  # no GPU is a warning, not an error
    checks = {check["name"]: check for check in json.loads(capsys.readouterr().out)["checks"]}
    assert {"python", "torch", "cuda", "nccl", "nvjpeg", "faiss", "shared memory", "cores", "dataloader start method",
            "accelerate", "wandb", "aws"} <= set(checks)  # fmt: skip
    assert all(set(check) == {"name", "status", "detail", "fix"} for check in checks.values())
    assert all(check["status"] in ("ok", "warning", "error") for check in checks.values())
    assert checks["faiss"]["detail"].startswith(faiss_build.describe_builds()) and "GPU support: no" in checks["faiss"]["detail"]


def test_the_doctor_names_aws_variables_but_never_their_values(monkeypatch, capsys):
    from imret.cli import main

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-print-me")
    main(["doctor"])
    out = capsys.readouterr().out
    assert "AWS_SECRET_ACCESS_KEY" in out and "do-not-print-me" not in out
