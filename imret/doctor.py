"""`imret doctor`: what this machine gives imret, one check at a time. What a user pastes into a bug report, and
runs on a new GPU machine before a week of training: Python and torch, the CUDA runtime and driver, each GPU,
NCCL, nvJPEG on each GPU, the FAISS build and whether its GPU kernels run here (the probe a study runs before
it trains), shared memory, cores per GPU, the DataLoader start method, the accelerate config in effect, W&B's
mode, and which AWS_* variables are set (names only). Each check is ok, warning or error, with the fix; only an
error fails the command (a machine without a GPU is not one). Nothing here imports the serve, S3 or W&B packages.
"""

from __future__ import annotations

import importlib.util
import io
import multiprocessing
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from imret.errors import ImretError
from imret.system import usable_cores

MIN_SHM_BYTES = 1 << 30  # DataLoader workers hand batches over through /dev/shm (Docker's default is 64 MiB)
MIN_CORES_PER_GPU = 4  # even with data.decode: gpu, a loader core reads a few thousand samples a second


@dataclass
class Check:
    name: str
    status: str  # ok | warning | error
    detail: str
    fix: str = ""


def python_check() -> list[Check]:
    version = platform.python_version()
    if sys.version_info < (3, 10):
        return [Check("python", "error", f"{version} ({sys.executable})", "imret needs Python 3.10 or newer")]
    return [Check("python", "ok", f"{version} ({sys.executable})")]


def torch_check() -> list[Check]:
    import torchvision

    detail = f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA runtime {torch.version.cuda or 'none (a CPU build)'}"
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 4):
        return [Check("torch", "error", detail, "imret needs torch 2.4 or newer")]
    return [Check("torch", "ok", detail)]


def cuda_checks() -> list[Check]:
    from imret.faiss_build import driver_version, gpus

    if not torch.cuda.is_available():
        if Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi"):
            return [Check("cuda", "error", f"this machine has NVIDIA devices and torch sees no CUDA GPU (CUDA runtime: "
                          f"{torch.version.cuda or 'none, a CPU build of torch'})",
                          "install a CUDA build of torch that this driver supports (pytorch.org's selector), or check "
                          "CUDA_VISIBLE_DEVICES")]  # fmt: skip
        return [Check("cuda", "warning", "no CUDA GPU visible: training, embedding and FAISS run on the CPU")]
    checks = [Check("cuda", "ok", f"driver: {driver_version()}; {torch.cuda.device_count()} GPU(s)")]
    for gpu in gpus():
        major = int(gpu["capability"].split(".")[0])
        detail = (f"{gpu['name']}, {gpu['memory_gib']} GiB, compute capability {gpu['capability']}, "
                  f"bf16: {'yes' if major >= 8 else 'no'}")  # fmt: skip
        if major < 7:
            checks.append(Check(f"gpu {gpu['index']}", "warning", detail, "FAISS's GPU builds need compute capability "
                                "7.0 (Volta) or newer: build indexes with --device cpu"))  # fmt: skip
        elif major < 8:
            checks.append(Check(f"gpu {gpu['index']}", "warning", detail, "no bf16 in hardware: train.mixed_precision "
                                "auto trains in float32; set fp16 for mixed precision"))  # fmt: skip
        else:
            checks.append(Check(f"gpu {gpu['index']}", "ok", detail))
    return checks


def nccl_check() -> list[Check]:
    if not torch.cuda.is_available():
        return [Check("nccl", "ok", "not used without GPUs (gloo runs CPU ranks)")]
    if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
        return [Check("nccl", "error", "this torch has no NCCL", "install a CUDA build of torch with NCCL")]
    version = ".".join(map(str, torch.cuda.nccl.version()))
    return [Check("nccl", "ok", f"NCCL {version}")]


def tiny_jpeg() -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.linspace(0, 255, 48 * 64 * 3).reshape(48, 64, 3).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def nvjpeg_checks() -> list[Check]:
    """Decode one JPEG on each GPU with the call `data.decode: gpu` uses; it must match libjpeg's decoding closely."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not torch.cuda.is_available():
        return [Check("nvjpeg", "ok", "not used without GPUs (data.decode auto decodes in the loader workers)")]
    data = torch.frombuffer(bytearray(tiny_jpeg()), dtype=torch.uint8)
    reference = decode_jpeg(data, mode=ImageReadMode.RGB).int()
    checks = []
    for index in range(torch.cuda.device_count()):
        name = f"nvjpeg gpu {index}"
        try:
            decoded = decode_jpeg([data], mode=ImageReadMode.RGB, device=f"cuda:{index}")[0].cpu().int()
        except RuntimeError as exc:
            checks.append(Check(name, "error", f"decoding failed: {' '.join(str(exc).split())[:300]}",
                                "set data.decode: cpu (and --decode cpu for imret embed)"))  # fmt: skip
            continue
        difference = (decoded - reference).abs().float().mean().item()
        status = "ok" if decoded.shape == reference.shape and difference < 3 else "error"
        checks.append(Check(name, status, f"a 64x48 JPEG decoded, mean difference from libjpeg {difference:.2f} grey levels",
                            "" if status == "ok" else "set data.decode: cpu (and --decode cpu for imret embed)"))  # fmt: skip
    return checks


def faiss_checks() -> list[Check]:
    from imret.faiss_build import CPU_CHOICE, GPU_FIX, describe_builds, describe_gpus, load_faiss, probe_verdict

    try:
        faiss = load_faiss()
    except ImretError as exc:
        return [Check("faiss", "error", str(exc).split(":")[0], str(exc).split(": ", 1)[-1])]
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    detail = f"{describe_builds()}, FAISS {faiss.__version__}, GPU support: {'yes, ' + str(gpus) + ' GPU(s)' if gpus else 'no'}"
    if not torch.cuda.is_available():
        return [Check("faiss", "ok", detail)]
    if not gpus:
        return [Check("faiss", "error", f"{detail}; this machine has CUDA GPUs", f"{GPU_FIX}; {CPU_CHOICE}")]
    checks = [Check("faiss", "ok", detail)]
    for kind in ("flat", "ivfpq"):
        verdict = probe_verdict(kind, 128)
        if verdict["ok"]:
            checks.append(Check(f"faiss gpu probe {kind}", "ok", f"a {kind} index searched on {describe_gpus()}"))
        else:
            checks.append(Check(f"faiss gpu probe {kind}", "error", f"on {describe_gpus()} the probe {verdict['error']}",
                                f"install a FAISS with kernels for these GPUs ({GPU_FIX}), {CPU_CHOICE}"))  # fmt: skip
    return checks


def shm_check() -> list[Check]:
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return [Check("shared memory", "warning", "no /dev/shm", "loader workers need shared memory; set data.workers=0")]
    size = stat.f_blocks * stat.f_frsize
    detail = f"/dev/shm: {size / 2**30:.1f} GiB"
    if size < MIN_SHM_BYTES:
        return [Check("shared memory", "warning", detail, "loader workers pass batches through /dev/shm: give it more "
                      "(docker run --shm-size=16g, or a Kubernetes emptyDir with medium: Memory)")]  # fmt: skip
    return [Check("shared memory", "ok", detail)]


def cores_check() -> list[Check]:
    cores, gpus = usable_cores(), torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus:
        return [Check("cores", "ok", f"{cores} cores usable by this process")]
    per_gpu = cores / gpus
    detail = f"{cores} usable cores for {gpus} GPU(s): {per_gpu:.1f} a GPU"
    if per_gpu < MIN_CORES_PER_GPU:
        return [Check("cores", "warning", detail, "the loader will starve the GPUs: keep data.decode gpu (the default "
                      "on CUDA) and ask the scheduler for more cores a GPU")]  # fmt: skip
    return [Check("cores", "ok", detail + " (data.decode: cpu needs 15-25 a fast GPU; gpu needs a few)")]


def start_method_check() -> list[Check]:
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_context().get_start_method()
    if method == "spawn":
        return [Check("dataloader start method", "warning", method,
                      "spawned loader workers import torch again at every start: slower, but correct")]
    return [Check("dataloader start method", "ok", method)]


def accelerate_check() -> list[Check]:
    import yaml
    from accelerate.commands.config import default_config_file

    settings = [f"{name}={value}" for name, value in sorted(os.environ.items()) if name.startswith("ACCELERATE_")]
    path = Path(os.environ.get("ACCELERATE_CONFIG_FILE", default_config_file))
    if path.is_file():
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            return [Check("accelerate", "warning", f"{path}: unreadable ({exc})", f"fix or delete {path}")]
        keys = ("distributed_type", "num_processes", "num_machines", "mixed_precision", "gpu_ids")
        settings.append(f"{path}: " + ", ".join(f"{k}={config.get(k)}" for k in keys if k in config))
    return [Check("accelerate", "ok", "; ".join(settings) or "no config file and no ACCELERATE_* variables: "
                  "accelerate launch starts one process per visible GPU")]  # fmt: skip


def wandb_check() -> list[Check]:
    from imret.monitor import wandb_mode

    mode = wandb_mode("auto")
    installed = importlib.util.find_spec("wandb") is not None
    detail = f"log.wandb_mode auto resolves to {mode}" + ("" if installed else "; wandb is not installed")
    if not installed and mode != "disabled":
        return [Check("wandb", "warning", detail, "runs still write metrics.jsonl; pip install wandb, or "
                      "set log.wandb_mode: disabled")]  # fmt: skip
    return [Check("wandb", "ok", detail)]


def aws_check() -> list[Check]:
    names = sorted(name for name in os.environ if name.startswith("AWS_"))
    return [Check("aws", "ok", ("set: " + ", ".join(names)) if names else "no AWS_* variables (s3:// shards read "
                  "~/.aws or the instance's role)")]  # fmt: skip


CHECKS: tuple[Callable[[], list[Check]], ...] = (
    python_check, torch_check, cuda_checks, nccl_check, nvjpeg_checks, faiss_checks, shm_check, cores_check,
    start_method_check, accelerate_check, wandb_check, aws_check,
)  # fmt: skip


def run_checks() -> list[Check]:
    """Every check; one that breaks is reported as an error with its message, and the others still run."""
    checks = []
    for check in CHECKS:
        try:
            checks += check()
        except Exception as exc:  # a broken check is reported as one, never a crash of the doctor
            name = check.__name__.removesuffix("_checks").removesuffix("_check").replace("_", " ")
            checks.append(Check(name, "error", f"the check failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"))
    return checks


def as_json(checks: list[Check]) -> dict[str, list[dict[str, str]]]:
    return {"checks": [asdict(check) for check in checks]}


def format_checks(checks: list[Check]) -> str:
    width = max(len(check.name) for check in checks)
    lines = []
    for check in checks:
        lines.append(f"{check.status:8s} {check.name:{width}s}  {check.detail}")
        if check.fix:
            lines.append(f"{'':8s} {'':{width}s}  fix: {check.fix}")
    return "\n".join(lines)
