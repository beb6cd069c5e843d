"""Augmentation on the batch's device: uint8 images and masks in, normalised float images out.

Every random draw is one batched tensor op on the device, and nothing is read back to the host: kornia's
augmentation modules crop sample by sample and read each box back (`int(tensor)`), hundreds of device
syncs a batch, so imret draws the boxes itself and applies them all with one `grid_sample`. Image and mask
share that sampling grid, so they stay aligned (masks nearest-neighbour); colour jitter (kornia's
functional colour ops, per-sample factors) touches the image only. `torch.compile(fullgraph=True)` accepts
the whole module, which is the test that nothing in it waits on the host.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import kornia.enhance
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER_PROBABILITY = 0.8
ASPECT_RATIOS = (3 / 4, 4 / 3)  # random resized crop, as torchvision and kornia draw them


class AugmentSettings(Protocol):
    """What the augmentation reads of a recipe's `augment` section (imret.config.AugmentConfig)."""

    crop: str  # none | random | random_resized
    crop_scale_min: float
    hflip: bool
    color_jitter: float


class DeviceAugment(nn.Module):
    """Train: the recipe's crop, flip and colour jitter. Eval: a centre crop. Both: background zeroing (when
    asked) and the model's normalisation (`normalisation`: mean, std and the interpolation of a resized crop;
    ImageNet's and bilinear when not given). Returns (images float [B,3,S,S], masks float {0,1} [B,1,S,S] or None)."""

    def __init__(self, cfg: AugmentSettings, image_size: int, load_size: int, training: bool,
                 zero_background: bool = False, normalisation: dict[str, Any] | None = None):  # fmt: skip
        super().__init__()
        self.size, self.load_size = image_size, load_size
        self.crop = cfg.crop if training else "none"
        self.crop_scale_min = cfg.crop_scale_min
        self.hflip = training and cfg.hflip
        self.jitter = cfg.color_jitter if training else 0.0
        self.zero_background = zero_background
        normalisation = normalisation or {}
        self.interpolation = normalisation.get("interpolation", "bilinear")
        self.register_buffer("mean", torch.tensor(normalisation.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(normalisation.get("std", IMAGENET_STD)).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = images.to(self.mean.device, non_blocking=True).float().div_(255.0)
        m = masks.to(x.device, non_blocking=True).float() if masks is not None else None
        if self.crop != "none" or self.hflip:
            grid = F.affine_grid(self.draw_boxes(len(x), x.device), [len(x), 1, self.size, self.size], align_corners=False)
            x = F.grid_sample(x, grid, mode=self.interpolation, padding_mode="border", align_corners=False)
            if self.interpolation == "bicubic":  # cubic weights overshoot past the pixel range
                x = x.clamp_(0.0, 1.0)
            m = F.grid_sample(m, grid, mode="nearest", align_corners=False) if m is not None else None
        elif self.load_size != self.size:
            x, m = centre_crop(x, self.size), centre_crop(m, self.size) if m is not None else None
        if self.jitter > 0:
            x = colour_jitter(x, self.jitter)
        if self.zero_background:
            if m is None:
                raise ValueError("zero_background needs masks")
            x = x * m
        return (x - self.mean) / self.std, m

    def draw_boxes(self, count: int, device: torch.device) -> torch.Tensor:
        """One crop box per sample as the affine map [count, 2, 3] from output to input coordinates (-1..1).

        random: an image_size window at a uniform integer offset, so the grid lands on pixel centres and the
        crop copies pixels exactly. random_resized: area fraction uniform in [crop_scale_min, 1], aspect ratio
        log-uniform in 3/4..4/3, each side capped at the full image (torchvision retries such draws instead).
        none: the centre window, as in evaluation."""
        if self.crop == "random":
            side = torch.full((count, 2), self.size / self.load_size, device=device)
            span = self.load_size - self.size + 1
            start = torch.randint(0, span, (count, 2), device=device).float() / self.load_size
        elif self.crop == "random_resized":
            area = torch.empty(count, device=device).uniform_(self.crop_scale_min, 1.0)
            ratio = torch.empty(count, device=device).uniform_(*map(math.log, ASPECT_RATIOS)).exp()
            side = torch.stack([(area * ratio).sqrt(), (area / ratio).sqrt()], 1).clamp(max=1.0)
            start = torch.rand(count, 2, device=device) * (1 - side)
        else:  # a flip alone: the centre crop evaluation takes, so training and evaluation frame alike
            side = torch.full((count, 2), self.size / self.load_size, device=device)
            start = torch.full((count, 2), float((self.load_size - self.size) // 2) / self.load_size, device=device)
        centre = 2 * start + side - 1
        sign = torch.ones(count, device=device)
        if self.hflip:
            sign = torch.where(torch.rand(count, device=device) < 0.5, -sign, sign)
        theta = torch.zeros(count, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 1, 1] = sign * side[:, 0], side[:, 1]
        theta[:, :, 2] = centre
        return theta


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


def colour_jitter(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation factors in 1 ± 0.4·strength, hue shift within ± 0.1·strength of a
    turn, all drawn per sample and applied to 80% of them (the rest get the identity factors)."""
    count, device = len(x), x.device
    applied = torch.rand(count, device=device) < JITTER_PROBABILITY

    def factor(spread: float, identity: float) -> torch.Tensor:
        drawn = torch.empty(count, device=device).uniform_(identity - spread, identity + spread)
        return torch.where(applied, drawn, torch.full_like(drawn, identity))

    # torchvision's formulas, as kornia's ColorJitter applies them, in a fixed order
    x = kornia.enhance.adjust_brightness_accumulative(x, factor(0.4 * strength, 1.0))
    x = kornia.enhance.adjust_contrast_with_mean_subtraction(x, factor(0.4 * strength, 1.0))
    x = kornia.enhance.adjust_saturation_with_gray_subtraction(x, factor(0.4 * strength, 1.0))
    return kornia.enhance.adjust_hue(x, factor(0.1 * strength, 0.0) * 2 * math.pi)


def denormalise(images: torch.Tensor, normalisation: dict[str, Any] | None = None) -> torch.Tensor:
    """Normalised images back to [0, 1] RGB (ImageNet's normalisation unless another is given), for figures and
    for masking an image after its normalisation."""
    normalisation = normalisation or {}
    mean = torch.tensor(normalisation.get("mean", IMAGENET_MEAN), device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(normalisation.get("std", IMAGENET_STD), device=images.device).view(1, 3, 1, 1)
    return images.float() * std + mean


def quarter_turns(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate each square image by turns[i] x 90 degrees counter-clockwise: exact, no resampling, and no
    boolean indexing (which reads the selection's size back to the host). Labels 0, 1, 2, 3 stand for 0, 90,
    180 and 270 degrees."""
    rotations = torch.stack([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
    return rotations[turns, torch.arange(len(images), device=images.device)]
