from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imret.config import Recipe
from imret.models import imagenet_normalisation, make_backbone


class Task:
    """Subclasses set `name`, `needs_masks`, and implement build_model, train_loss, val_outputs, val_metrics."""

    name = ""
    needs_masks = False

    def __init__(self, recipe: Recipe, classes: list[str], val_samples: int = 0):
        self.recipe, self.classes = recipe, classes
        self.val_samples = val_samples  # the validation split's size, for tasks that sample it
        self.initialisation = ""
        self.embedding_dim = 0
        self.normalisation = imagenet_normalisation()  # the backbone's, once build_model has made it

    def make_trunk(self) -> tuple[nn.Module, int]:
        model = self.recipe.model
        backbone = make_backbone(model.backbone, self.recipe.data.image_size, model.init, model.weights)
        self.initialisation, self.normalisation = backbone.initialisation, backbone.normalisation
        if model.grad_checkpointing:
            backbone.trunk.set_grad_checkpointing(True)
        return backbone.trunk, backbone.features

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_loss(self, model: nn.Module, images: torch.Tensor, masks: torch.Tensor | None,
                   labels: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:  # fmt: skip
        """The batch's loss and statistics to log; tensors stay on the device (the loop reads them once per
        log interval), so nothing here may read a value back (`float(tensor)`, `.item()`, boolean indexing)."""
        raise NotImplementedError

    def val_outputs(self, model: nn.Module, images: torch.Tensor, masks: torch.Tensor | None,
                    labels: torch.Tensor, keys: list[str]) -> dict[str, np.ndarray]:  # fmt: skip
        """Arrays gathered from every rank for val_metrics, concatenated along their first axis: one row per
        sample, or per batch for a task that sums as it goes (multilabel)."""
        raise NotImplementedError

    def val_metrics(self, outputs: dict[str, np.ndarray], epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def export_meta(self, metrics: dict[str, float]) -> dict[str, Any]:
        """Task-specific entries of model/meta.json."""
        return {}

    def val_figure(self, model: nn.Module, images: torch.Tensor, masks: torch.Tensor | None, labels: torch.Tensor,
                   out: Path) -> Path | None:  # fmt: skip
        """Optionally draw example predictions of one validation batch into `out`."""
        return None


def key_rank(key: str, seed: int, purpose: str) -> float:
    """A uniform number in [0, 1) drawn from a sample's key, a seed and what it is drawn for: a split or a sample
    of the validation set that is the same on any number of ranks, at any batch size, in any order. Each purpose
    draws independently, so the images that chose a model's epoch or threshold are not also its queries."""
    return int.from_bytes(hashlib.sha256(f"{purpose}\0{seed}\0{key}".encode()).digest()[:8], "little") / 2**64


def cpu(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()
