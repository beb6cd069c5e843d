"""Backbones, heads and the U-Net; each model declares the layer that is its retrieval embedding.

The study evaluated every model on the 512-d pooled features, so its trained 128-d triplet embedding was
never measured. Here `model.embed(x)` returns the declared embedding and `model.embedding` names it.

A backbone is one of imret's own (`resnet18`, torchvision's; `small-cnn`) or any timm model (`timm:<name>`,
created with `num_classes=0`: its pooled features). Each brings the input normalisation its weights expect
(timm's pretrained config for a timm model, ImageNet's for the others). Published weights are read from a local
file or a local cache, never downloaded during a run: timm's from the Hugging Face cache, torchvision's
ResNet18 from the torch hub cache (downloaded there when the machine is online, as torchvision does).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import nn

from imret.data.augment import IMAGENET_MEAN, IMAGENET_STD
from imret.errors import ImretError, did_you_mean

IMAGENET_URLS = {"resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth"}
PRETRAINED = ("pretrained", "imagenet")  # model.init values that read published weights


def imagenet_normalisation() -> dict[str, Any]:
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bilinear"}


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
TIMM_PREFIX = "timm:"


@dataclass
class Backbone:
    trunk: nn.Module  # images -> pooled features [B, features]
    features: int
    initialisation: str  # how its weights were set, for meta.json and the report
    normalisation: dict[str, Any] = field(default_factory=imagenet_normalisation)  # mean, std, interpolation


def make_backbone(name: str, image_size: int, init: str = "scratch", weights: str | None = None) -> Backbone:
    """The trunk named by model.backbone, initialised as model.init says (scratch, pretrained|imagenet, run)."""
    if name.startswith(TIMM_PREFIX):
        backbone = timm_backbone(name.removeprefix(TIMM_PREFIX), image_size, init, weights)
    elif name in BACKBONES:
        trunk, features = BACKBONES[name]()
        backbone = Backbone(trunk, features, "scratch (Kaiming)")
        if init in PRETRAINED:
            state, origin = imagenet_state_dict(name, weights)
            load_trunk_weights(trunk, state)
            backbone.initialisation = f"imagenet ({origin})"
    else:
        raise ImretError(f"model.backbone: unknown '{name}'{did_you_mean(name, BACKBONES, n=3)}; choose one of "
                         f"{', '.join(BACKBONES)}, or timm:<name> for any timm model")  # fmt: skip
    if init == "run":
        backbone.initialisation = load_run_trunk(backbone.trunk, weights or "", name)
    return backbone


# ---------------------------------------------------------------- timm


def timm_backbone(name: str, image_size: int, init: str, weights: str | None) -> Backbone:
    import timm

    if not timm.is_model(name):
        raise ImretError(f"model.backbone: timm has no model '{name}'{did_you_mean(name, timm.list_models(), n=3)}")
    trunk = create_timm(name, image_size)
    initialisation = "scratch (timm's initialisation)"
    if init in PRETRAINED:
        path = Path(weights).expanduser() if weights else cached_timm_weights(name)
        if not path.is_file():
            raise ImretError(f"model.weights: {path} does not exist")
        check_weights_fit(trunk, path, f"timm:{name}")
        # timm's own loading adapts what the size changes (a ViT's position embeddings), and only reads the file
        trunk = create_timm(name, image_size, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        initialisation = f"pretrained ({path})"
    return Backbone(trunk, feature_width(trunk, image_size), initialisation, timm_normalisation(name))


def timm_normalisation(name: str) -> dict[str, Any]:
    """The mean, std and interpolation of a timm model's pretrained config (its weights were trained with them)."""
    import timm

    config = timm.models.get_pretrained_cfg(name)
    if config is None:
        return imagenet_normalisation()
    interpolation = config.interpolation if config.interpolation in ("bilinear", "bicubic") else "bilinear"
    return {"mean": list(config.mean), "std": list(config.std), "interpolation": interpolation}


def create_timm(name: str, image_size: int, **kwargs: Any) -> nn.Module:
    """A timm model without its classifier; models with a fixed input size (ViT and its kin) built for image_size,
    the rest take any size and refuse the argument."""
    import timm

    try:
        try:
            return timm.create_model(name, num_classes=0, img_size=image_size, **kwargs)
        except TypeError:
            return timm.create_model(name, num_classes=0, **kwargs)
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise ImretError(f"model.backbone: timm:{name} at {image_size} px: {' '.join(str(exc).split())[:300]}") from None


def feature_width(trunk: nn.Module, image_size: int) -> int:
    """The width of the pooled features, from one forward pass (some models add a projection after pooling)."""
    was_training = trunk.training
    trunk.eval()
    with torch.no_grad():
        width = trunk(torch.zeros(1, 3, image_size, image_size)).shape[1]
    trunk.train(was_training)
    return int(width)


def cached_timm_weights(name: str) -> Path:
    """A timm model's published weights in the local caches (Hugging Face's, or torch hub's for the few that come
    from a URL), never downloaded; otherwise one line saying how to provide them."""
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    config = timm.models.get_pretrained_cfg(name)
    if config is None:
        raise ImretError(f"model.init: pretrained: timm publishes no weights for {name}; use model.init: scratch")
    if config.hf_hub_id:
        repo, _, revision = config.hf_hub_id.partition("@")
        for filename in [config.hf_hub_filename] if config.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE}, repo {repo})"
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(config.url)
        if cached.is_file():
            return cached
        where = f"the torch hub cache ({cached})"
    raise ImretError(f"model.init: pretrained: the weights of timm:{name} are not in {where}; on a machine with "
                     f"internet run: python -c \"import timm; timm.create_model('{name}', pretrained=True)\" and copy "
                     f"its cache here, or pass --set model.weights=/path/to/model.safetensors")  # fmt: skip


def check_weights_fit(module: nn.Module, path: Path, what: str) -> None:
    """Refuse, in one line, a weights file that does not hold every tensor of the module at its shape (timm loads
    without a strict check once the classifier is dropped, so another architecture's file would leave it at random).
    Position embeddings may differ in size: timm resamples them to the image size."""
    import timm

    held = timm.models.load_state_dict(str(path))
    wrong = [key for key, value in module.state_dict().items() if not key.endswith("num_batches_tracked")
             and (key not in held or (held[key].shape != value.shape and "pos_embed" not in key))]  # fmt: skip
    if wrong:
        raise ImretError(f"model.weights: {path} does not fit {what}: {len(wrong)} of its tensors are missing or of "
                         f"another shape (first: {', '.join(wrong[:3])})")  # fmt: skip


class RetrievalNet(nn.Module):
    """trunk -> pooled features -> head. `embedding` is "pooled" (the trunk's features) or "head" (the head's
    output, L2-normalised for metric learning). With `proxies` (the proxy losses' learnable tag proxies) the forward
    pass returns (embeddings, cosines to each tag's proxy). `freeze_trunk` holds the trunk fixed: no gradients, and
    its BatchNorm statistics stay as they are (eval mode) while the heads warm up."""

    def __init__(self, trunk: nn.Module, head: nn.Module, embedding: str, normalize_head: bool = False,
                 proxies: nn.Module | None = None):  # fmt: skip
        super().__init__()
        self.trunk, self.head = trunk, head
        self.embedding = embedding
        self.normalize_head = normalize_head
        self.proxies = proxies
        self.trunk_frozen = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.trunk_frozen:
            return self.trunk(x)
        with torch.no_grad():
            return self.trunk(x)

    def head_output(self, features: torch.Tensor) -> torch.Tensor:
        out = self.head(features)
        return F.normalize(out, dim=1) if self.normalize_head else out

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.head_output(self.features(x))
        return out if self.proxies is None else (out, self.proxies(out))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        return features if self.embedding == "pooled" else self.head_output(features)

    def freeze_trunk(self, frozen: bool) -> None:
        self.trunk_frozen = frozen
        self.trunk.train(self.training and not frozen)

    def train(self, mode: bool = True) -> RetrievalNet:
        super().train(mode)
        self.trunk.train(mode and not self.trunk_frozen)
        return self


class SegmentationNet(nn.Module):
    """U-Net (segmentation-models-pytorch) with a ResNet18 encoder, or a timm one (`timm:<name>`, smp's `tu-`
    encoders: convolutional backbones with a feature pyramid), one output channel (logits). Its embedding is the
    encoder's pooled deepest feature map. `freeze_trunk` holds the encoder fixed while the decoder warms up, as
    RetrievalNet's does its trunk."""

    embedding = "encoder.pooled"

    def __init__(self, backbone: str = "resnet18"):
        super().__init__()
        import segmentation_models_pytorch as smp

        if backbone == "resnet18":
            encoder = "resnet18"
        elif backbone.startswith(TIMM_PREFIX):
            encoder = "tu-" + backbone.removeprefix(TIMM_PREFIX)
        else:
            raise ImretError(f"model.backbone: the U-Net's encoder is resnet18 or timm:<name>, got '{backbone}'")
        try:
            self.unet = smp.Unet(encoder_name=encoder, encoder_weights=None, classes=1)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ImretError(f"model.backbone: smp's U-Net cannot use {backbone} as its encoder ({' '.join(str(exc).split())}): "
                             f"it needs a convolutional backbone with a feature pyramid, e.g. timm:resnet50, "
                             f"timm:convnext_tiny, timm:efficientnet_b0") from None  # fmt: skip
        self.embedding_dim = self.unet.encoder.out_channels[-1]
        self.trunk_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)

    def freeze_trunk(self, frozen: bool) -> None:
        """No gradients for the encoder (the decoder's skip connections still read it), and its BatchNorm statistics
        stay as they are. Its parameters, not a no_grad block, carry this: smp's forward is not ours to split."""
        self.trunk_frozen = frozen
        self.unet.encoder.requires_grad_(not frozen)
        self.unet.encoder.train(self.training and not frozen)

    def train(self, mode: bool = True) -> SegmentationNet:
        super().train(mode)
        self.unet.encoder.train(mode and not self.trunk_frozen)
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet.encoder(x)[-1].mean(dim=(2, 3))


# ---------------------------------------------------------------- initialisation


def imagenet_cache_path(backbone: str) -> Path:
    """Where the torch hub cache keeps torchvision's ImageNet weights for `backbone` (a key of IMAGENET_URLS)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(IMAGENET_URLS[backbone])


def imagenet_state_dict(backbone: str, local_file: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's ImageNet weights: from `local_file`, else the torch hub cache, else downloaded into it.
    Returns the state dict and where it came from. Offline without them: one line saying how to provide them."""
    if local_file:
        path = Path(local_file).expanduser()
        if not path.is_file():
            raise ImretError(f"model.weights: {path} does not exist")
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    if backbone not in IMAGENET_URLS:
        raise ImretError(f"model.init: pretrained (imagenet) has no published weights for backbone '{backbone}' (have: "
                         f"{', '.join(IMAGENET_URLS)}, and timm:<name>)")  # fmt: skip
    url, cached = IMAGENET_URLS[backbone], imagenet_cache_path(backbone)
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


def load_trunk_weights(trunk: nn.Module, state: dict[str, torch.Tensor], allow_extra: bool = False) -> None:
    """Load a backbone's weights, ignoring a classifier (`fc.*`); every trunk weight must be there, and nothing else
    unless `allow_extra` (a timm U-Net encoder holds only the layers of its feature pyramid)."""
    state = features_only_names({k: v for k, v in state.items() if not k.startswith("fc.")}, trunk)
    # nn.Module's own method: smp's ResNet encoder overrides load_state_dict and returns nothing
    missing, unexpected = nn.Module.load_state_dict(trunk, state, strict=False)
    if missing or (unexpected and not allow_extra):
        raise ImretError(f"weights do not fit the backbone: missing {missing[:3]}, unexpected {unexpected[:3]}")


def features_only_names(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """A timm model's weights under the names its features_only form (a U-Net's timm encoder) gives them: that form
    lifts a top-level Sequential's children to the top (ConvNeXt's `stages.0.*` is `stages_0.*`). Keys the module
    already has are kept as they are."""
    names = set(module.state_dict())
    renamed = {}
    for key, value in state.items():
        flat = re.sub(r"^([^.]+)\.(\d+)\.", r"\1_\2.", key)
        renamed[flat if key not in names and flat in names else key] = value
    return renamed


def load_run_trunk(trunk: nn.Module, run_dir: str, backbone: str, allow_extra: bool = False) -> str:
    """Start from another run's exported model (the study's triplet-from-classifier suggestion): a retrieval run's
    trunk, or a segmentation run's U-Net encoder."""
    import json

    model_dir = Path(run_dir) / "model"
    meta_path, weights_path = model_dir / "meta.json", model_dir / "weights.pt"
    if not meta_path.is_file() or not weights_path.is_file():
        raise ImretError(f"model.weights: {run_dir} has no exported model (model/meta.json, model/weights.pt)")
    meta = json.loads(meta_path.read_text())
    if meta.get("backbone") != backbone:
        raise ImretError(f"model.weights: {run_dir} has backbone {meta.get('backbone')}, this recipe {backbone}")
    prefix = "trunk."
    if meta.get("task") == "segmentation":
        prefix = "unet.encoder.model." if backbone.startswith(TIMM_PREFIX) else "unet.encoder."
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    load_trunk_weights(trunk, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, allow_extra)
    return f"run {run_dir} ({meta.get('task')}, epoch {meta.get('epoch')})"


def initialise_encoder(unet: nn.Module, backbone: str, init: str, weights: str | None) -> str:
    """The U-Net encoder's initialisation: torchvision's ResNet18 weights, a timm model's published weights, or
    another run's trunk or encoder. A timm encoder (smp's `tu-`) holds the timm model's layers under their own
    names in `encoder.model`, only those of its feature pyramid."""
    timm_encoder = backbone.startswith(TIMM_PREFIX)
    target = unet.encoder.model if timm_encoder else unet.encoder
    if init == "scratch":
        return "scratch"
    if init == "run":
        return load_run_trunk(target, weights or "", backbone, allow_extra=timm_encoder)
    if not timm_encoder:
        state, origin = imagenet_state_dict(backbone, weights)
        load_trunk_weights(target, state)
        return f"imagenet ({origin})"
    import timm

    name = backbone.removeprefix(TIMM_PREFIX)
    path = Path(weights).expanduser() if weights else cached_timm_weights(name)
    if not path.is_file():
        raise ImretError(f"model.weights: {path} does not exist")
    load_trunk_weights(target, timm.models.load_state_dict(str(path)), allow_extra=True)
    return f"pretrained ({path})"
