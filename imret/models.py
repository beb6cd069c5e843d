"""Backbones, heads and the U-Net; each model declares the layer that is its retrieval embedding.

The study evaluated every model on the 512-d pooled features, so its trained 128-d triplet embedding was
never measured. Here `model.embed(x)` returns the declared embedding and `model.embedding` names it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import nn

from imret.errors import ImretError

IMAGENET_URLS = {"resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth"}


def _resnet18() -> tuple[nn.Module, int]:
    from torchvision.models import resnet18

    trunk = resnet18()  # torchvision initialises convolutions with Kaiming (fan_out, relu)
    trunk.fc = nn.Identity()
    return trunk, 512


def _small_cnn() -> tuple[nn.Module, int]:
    """A five-stage CNN about 5x cheaper than ResNet18 at 64 px: for CPU demos and tests, no pretrained weights."""

    def stage(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))  # fmt: skip

    trunk = nn.Sequential(stage(3, 32), stage(32, 64), stage(64, 128), stage(128, 192), stage(192, 256),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return trunk, 256


# Open set: add a backbone here. Each returns (trunk giving pooled features [B, F], F).
BACKBONES: dict[str, Callable[[], tuple[nn.Module, int]]] = {"resnet18": _resnet18, "small-cnn": _small_cnn}


def make_backbone(name: str) -> tuple[nn.Module, int]:
    if name not in BACKBONES:
        raise ImretError(f"model.backbone: unknown '{name}', choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]()


class RetrievalNet(nn.Module):
    """trunk -> pooled features -> head. `embedding` is "pooled" (the trunk's features) or "head"
    (the L2-normalised head output, for metric learning)."""

    def __init__(self, trunk: nn.Module, head: nn.Module, embedding: str, normalize_head: bool = False):
        super().__init__()
        self.trunk, self.head = trunk, head
        self.embedding = embedding
        self.normalize_head = normalize_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.trunk(x))
        return F.normalize(out, dim=1) if self.normalize_head else out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self(x) if self.embedding == "head" else self.trunk(x)


class SegmentationNet(nn.Module):
    """U-Net with a ResNet18 encoder, one output channel (logits). Its embedding is the encoder's pooled
    deepest feature map."""

    embedding = "encoder.pooled"

    def __init__(self):
        super().__init__()
        import segmentation_models_pytorch as smp

        self.unet = smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet.encoder(x)[-1].mean(dim=(2, 3))


# ---------------------------------------------------------------- initialisation


def imagenet_state_dict(backbone: str, local_file: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's ImageNet weights: from `local_file`, else the torch hub cache, else downloaded into it.
    Returns the state dict and where it came from. Offline without them: one line saying how to provide them."""
    if local_file:
        path = Path(local_file).expanduser()
        if not path.is_file():
            raise ImretError(f"model.weights: {path} does not exist")
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    if backbone not in IMAGENET_URLS:
        raise ImretError(f"model.init: imagenet has no weights for backbone '{backbone}' (have: {', '.join(IMAGENET_URLS)})")
    url = IMAGENET_URLS[backbone]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True), str(cached)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
    except (URLError, OSError, RuntimeError) as exc:
        raise ImretError(
            f"ImageNet weights for {backbone} are not in {cached} and could not be downloaded ({exc}); "
            f"fetch {url} on a machine with internet, then pass --set model.weights=/path/to/{cached.name} "
            f"or copy the file to {cached}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return state, f"{url} (cached at {cached})"


def load_trunk_weights(trunk: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a backbone's weights, ignoring a classifier (`fc.*`); every trunk weight must be there."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # nn.Module's own method: smp's ResNet encoder overrides load_state_dict and returns nothing
    missing, unexpected = nn.Module.load_state_dict(trunk, state, strict=False)
    if missing or unexpected:
        raise ImretError(f"weights do not fit the backbone: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_run_trunk(trunk: nn.Module, run_dir: str, backbone: str) -> str:
    """Start from another run's exported model (the study's triplet-from-classifier suggestion)."""
    import json

    model_dir = Path(run_dir) / "model"
    meta_path, weights_path = model_dir / "meta.json", model_dir / "weights.pt"
    if not meta_path.is_file() or not weights_path.is_file():
        raise ImretError(f"model.weights: {run_dir} has no exported model (model/meta.json, model/weights.pt)")
    meta = json.loads(meta_path.read_text())
    if meta.get("backbone") != backbone:
        raise ImretError(f"model.weights: {run_dir} has backbone {meta.get('backbone')}, this recipe {backbone}")
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    load_trunk_weights(trunk, {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")})
    return f"run {run_dir} ({meta.get('task')}, epoch {meta.get('epoch')})"


def initialise_trunk(trunk: nn.Module, backbone: str, init: str, weights: str | None) -> str:
    """Apply the recipe's initialisation; returns how the model was initialised, for meta.json and the report."""
    if init == "scratch":
        return "scratch (Kaiming)"
    if init == "imagenet":
        state, origin = imagenet_state_dict(backbone, weights)
        load_trunk_weights(trunk, state)
        return f"imagenet ({origin})"
    return load_run_trunk(trunk, weights or "", backbone)
