"""The installed FAISS: which build it is, whether its GPU kernels run on this machine, and its options objects.

Several distributions (faiss-cpu, faiss-gpu, faiss-gpu-cu12, faiss-gpu-cuvs, ...) install the same `faiss`
module, so imret reads which ones are installed from their file lists rather than from a list of names. A
GPU build can count the GPUs and still have no kernel for them (a wheel built for sm_70/sm_80 on a Hopper
card): its first search aborts the process, which no try/except catches. So before long work puts an index
on the GPUs, a tiny search runs in a child process (`python -m imret.faiss_build probe ...`); a pass is cached
per FAISS build, driver and GPUs, and a failure stops the command with one line and the fix.

SWIG stores any attribute set on a FAISS options object, so a misspelt or nonexistent field is silently
ignored: `set_declared` sets only the fields the FAISS class declares.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from imret.errors import ImretError

GPU_FIX = "pip uninstall -y faiss-cpu && pip install -e '.[gpu]' (FAISS with CUDA kernels)"
CPU_CHOICE = "or search on the CPU: --device cpu (study.faiss_device: cpu)"
PROBE_TIMEOUT_S = 300  # building the kernels' caches of a first run on a new card can take a while
_verdicts: dict[str, dict[str, Any]] = {}  # this process's probes, by key


@functools.cache
def installed_faiss_builds() -> tuple[tuple[str, str], ...]:
    """(distribution, version) of every installed distribution whose files include the `faiss` package."""
    from importlib.metadata import packages_distributions, version

    return tuple((name, version(name)) for name in sorted(set(packages_distributions().get("faiss", []))))


def describe_builds() -> str:
    return ", ".join(f"{name} {version}" for name, version in installed_faiss_builds()) or "none"


def load_faiss():
    """The `faiss` module, after refusing two builds at once; on the CPU it always takes the BLAS path."""
    builds = installed_faiss_builds()
    if len(builds) > 1:  # the later install overwrote the other's files; uninstalling either breaks both
        raise ImretError(f"two FAISS builds share the `faiss` module ({describe_builds()}): keep one: "
                         f"pip uninstall -y {' '.join(n for n, _ in builds)} && pip install -e '.[gpu]' (or '.[cpu]')")  # fmt: skip
    try:
        import faiss
    except ImportError:
        raise ImretError("FAISS is not installed: pip install -e '.[cpu]', or '.[gpu]' on a machine with NVIDIA GPUs") from None
    faiss.cvar.distance_compute_blas_threshold = 1  # below it, the CPU search scans query by query
    return faiss


def declared_fields(options: Any) -> set[str]:
    """The fields a SWIG-wrapped FAISS class declares: its properties (and its base classes')."""
    return {name for cls in type(options).__mro__ for name, value in vars(cls).items() if isinstance(value, property)}


def set_declared(options: Any, **fields: Any) -> Any:
    """Set fields of a FAISS options object, refusing any the installed FAISS does not declare."""
    unknown = sorted(set(fields) - declared_fields(options) - {"thisown"})
    if unknown:
        import faiss

        raise ImretError(f"FAISS {faiss.__version__} ({describe_builds()}): {type(options).__name__} has no field "
                         f"{', '.join(unknown)}; install the FAISS build imret pins: pip install -e '.[gpu]'")  # fmt: skip
    for name, value in fields.items():
        setattr(options, name, value)
    return options


def gpu_count(device: str = "auto", kind: str = "flat", dim: int = 128, probe: bool = True) -> int:
    """The GPUs FAISS will use for `device` (auto|gpu|cpu), after proving that a `kind` index of `dim` runs on them
    (a child process, once per machine, FAISS build and driver; `probe=False` in that child). A machine whose CUDA GPUs this FAISS cannot use
    is an error with the fix, never a silent fall back to the CPU; `--device cpu` chooses the CPU on purpose."""
    faiss = load_faiss()
    if device == "cpu":
        return 0
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpus == 0:
        import torch

        if torch.cuda.is_available():
            raise ImretError(f"this machine has CUDA GPUs and the installed FAISS ({describe_builds()}) cannot use "
                             f"them: {GPU_FIX}; {CPU_CHOICE}")  # fmt: skip
        if device == "gpu":
            raise ImretError(f"--device gpu: no GPU is visible to FAISS here; {GPU_FIX}")
        return 0
    verdict = probe_verdict(kind, dim) if probe else {"ok": True}
    if not verdict["ok"]:
        raise ImretError(f"FAISS ({describe_builds()}) cannot run a {kind} index on {describe_gpus()}: its probe "
                         f"{verdict['error']}; install a FAISS with kernels for these GPUs ({GPU_FIX}), {CPU_CHOICE}")  # fmt: skip
    return gpus


# ---------------------------------------------------------------- the probe, in a child process


def gpus() -> list[dict[str, Any]]:
    """Each CUDA GPU torch sees: name, compute capability, memory."""
    import torch

    found = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        found.append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                      "memory_gib": round(props.total_memory / 2**30, 1)})  # fmt: skip
    return found


def describe_gpus() -> str:
    listed = [f"{g['name']} (compute capability {g['capability']})" for g in gpus()]
    return ", ".join(sorted(set(listed), key=listed.index)) or "no GPU"


def driver_version() -> str:
    """The NVIDIA kernel driver's version line (a driver update can fix or break kernels: a new verdict)."""
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        import torch

        return f"cuda {torch.version.cuda}"


def probe_key(kind: str, dim: int) -> str:
    import faiss

    facts = {"builds": installed_faiss_builds(), "faiss": faiss.__version__, "file": faiss.__file__,
             "driver": driver_version(), "gpus": [(g["name"], g["capability"]) for g in gpus()],
             "kind": kind, "dim": dim if kind == "ivfpq" else None}  # fmt: skip
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "imret" / "faiss-gpu-probe.json"


def read_cache() -> dict[str, Any]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def remember(key: str, verdict: dict[str, Any]) -> None:
    """Add a verdict to the on-disk cache; a cache that cannot be written only costs a probe next time."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**read_cache(), key: verdict}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def probe_verdict(kind: str, dim: int) -> dict[str, Any]:
    """{"ok": bool, "error": str}: cached, or from a child process that builds and searches a tiny GPU index.
    Only a pass is kept on disk: a failure may be passing (a GPU another job has filled, a first run's slow kernel
    compilation past the timeout), so the next command probes again."""
    key = probe_key(kind, dim)
    if key not in _verdicts:
        with probing():  # the ranks of a machine start together: one probes, the others read its verdict
            cached = read_cache().get(key)
            if cached is None:
                cached = run_child([sys.executable, "-m", "imret.faiss_build", "probe", kind, str(dim)])
                if cached["ok"]:
                    remember(key, cached)
        _verdicts[key] = cached
    return _verdicts[key]


@contextlib.contextmanager
def probing() -> Iterator[None]:
    """This machine's lock on probing (an flock beside the cache); without a writable cache folder, no lock."""
    path = cache_path().with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def run_child(command: list[str], timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Run a child that prints one JSON object as its last stdout line; its verdict, or what ended it: the exit
    code or signal (FAISS aborts its process on a CUDA error) and the last line it wrote to stderr."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"did not finish in {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        try:
            return {"ok": True, **json.loads(lines[-1])}
        except ValueError:
            pass
    if done.returncode < 0:
        ended = f"was killed by {signal.Signals(-done.returncode).name}"
    else:
        ended = f"exited with status {done.returncode}"
    said = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    return {"ok": False, "error": f"{ended}" + (f" ({said[-1][:300]})" if said else "")}


def probe(kind: str, dim: int) -> dict[str, Any]:
    """In the child: a flat (or IVF-PQ) index on every GPU through imret's own build path, and one search whose
    nearest neighbours must be the queries themselves."""
    import numpy as np

    from imret.retrieval import PQ_MIN_TRAIN, build_index, search

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((PQ_MIN_TRAIN if kind == "ivfpq" else 2048, dim)).astype(np.float32)
    index = build_index(vectors, kind, "gpu", probe=False)
    found = search(index, vectors[:64], 1)[1][:, 0]
    hits = float(np.mean(found == np.arange(64)))
    if hits < (0.5 if kind == "ivfpq" else 1.0):
        raise SystemExit(f"the {kind} index found {hits:.0%} of the queries themselves")
    return {"kind": kind, "dim": dim, "self_hits": hits}


if __name__ == "__main__":  # the child: python -m imret.faiss_build probe KIND DIM
    _, action, kind_arg, dim_arg = sys.argv
    if action != "probe":
        raise SystemExit(f"unknown action {action}")
    try:
        print(json.dumps(probe(kind_arg, int(dim_arg))))
    except ImretError as error:
        raise SystemExit(f"imret: error: {error}") from None
