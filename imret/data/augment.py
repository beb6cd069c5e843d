"""Augmentation on the batch's device (kornia): uint8 images and masks in, normalised float images out.

Image and mask go through one `AugmentationSequential` call, so every geometric draw applies to both and
they stay aligned (masks are resampled nearest-neighbour; colour jitter touches the image only).
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn

from imret.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DeviceAugment(nn.Module):
    """Train: the recipe's crop, flip and colour jitter. Eval: a centre crop. Both: background zeroing (when
    asked) and ImageNet normalisation. Returns (images float [B,3,S,S], masks float {0,1} [B,1,S,S] or None)."""

    def __init__(self, cfg: AugmentConfig, image_size: int, load_size: int, training: bool,
                 zero_background: bool = False):  # fmt: skip
        super().__init__()
        size = (image_size, image_size)
        steps: list[nn.Module] = []
        if training and cfg.crop == "random":
            steps.append(K.RandomCrop(size))
        elif training and cfg.crop == "random_resized":
            steps.append(K.RandomResizedCrop(size, scale=(cfg.crop_scale_min, 1.0)))
        elif load_size != image_size:
            steps.append(K.CenterCrop(size))
        if training and cfg.hflip:
            steps.append(K.RandomHorizontalFlip())
        if training and cfg.color_jitter > 0:
            j = cfg.color_jitter
            steps.append(K.ColorJitter(0.4 * j, 0.4 * j, 0.4 * j, 0.1 * j, p=0.8))
        self.image_only = K.AugmentationSequential(*steps, data_keys=["input"]) if steps else None
        self.with_mask = K.AugmentationSequential(*steps, data_keys=["input", "mask"]) if steps else None
        self.zero_background = zero_background
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = images.to(self.mean.device, non_blocking=True).float().div_(255.0)
        m = masks.to(x.device, non_blocking=True).float() if masks is not None else None
        if m is not None and self.with_mask is not None:
            x, m = self.with_mask(x, m)
        elif self.image_only is not None:
            x = self.image_only(x)
        if self.zero_background:
            if m is None:
                raise ValueError("zero_background needs masks")
            x = x * m
        return (x - self.mean) / self.std, m


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """Normalised images back to [0, 1] RGB, for figures."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return images.float() * std + mean


def quarter_turns(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate each square image by turns[i] x 90 degrees counter-clockwise: exact, no resampling.
    Labels 0, 1, 2, 3 stand for 0, 90, 180 and 270 degrees."""
    out = torch.empty_like(images)
    for k in range(4):
        chosen = turns == k
        if chosen.any():
            out[chosen] = torch.rot90(images[chosen], k, dims=(-2, -1))
    return out
