"""Apparel segmentation: U-Net with a ResNet18 encoder, one output channel, Dice loss; validation reports
example-wise IoU at probability 0.5 and draws a grid of images, true masks and predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from imret.data.augment import denormalise
from imret.losses import dice_loss
from imret.metrics import mask_iou
from imret.models import TIMM_PREFIX, SegmentationNet, initialise_encoder, timm_normalisation
from imret.tasks.base import Task, cpu


class SegmentationTask(Task):
    name = "segmentation"
    needs_masks = True

    def build_model(self) -> nn.Module:
        m = self.recipe.model
        model = SegmentationNet(m.backbone)
        self.initialisation = initialise_encoder(model.unet, m.backbone, m.init, m.weights)
        self.embedding_dim = model.embedding_dim
        if m.backbone.startswith(TIMM_PREFIX):
            self.normalisation = timm_normalisation(m.backbone.removeprefix(TIMM_PREFIX))
            model.unet.encoder.model.set_grad_checkpointing(m.grad_checkpointing)  # timm's features_only model
        return model

    def train_loss(self, model, images, masks, labels, epoch):
        return dice_loss(model(images), masks).mean(), {}

    def val_outputs(self, model, images, masks, labels, keys):
        logits = model(images)
        pred = (torch.sigmoid(logits.float()) > 0.5).squeeze(1)
        return {"loss": cpu(dice_loss(logits, masks)), "iou": mask_iou(cpu(pred), cpu(masks.squeeze(1)))}

    def val_metrics(self, outputs, epoch):
        return {"loss": float(np.mean(outputs["loss"])), "iou": float(np.mean(outputs["iou"]))}

    def val_figure(self, model, images, masks, labels, out: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        count = min(6, len(images))
        pred = (torch.sigmoid(model(images[:count]).float()) > 0.5).squeeze(1).cpu().numpy()
        true = masks[:count].squeeze(1).cpu().numpy()
        shown = denormalise(images[:count], self.normalisation).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        fig, axes = plt.subplots(count, 3, figsize=(6, 2 * count), squeeze=False)
        for row in range(count):
            for col, (picture, title) in enumerate([(shown[row], "image"), (true[row], "true mask"), (pred[row], "prediction")]):
                axes[row, col].imshow(picture, cmap=None if col == 0 else "gray", vmin=0, vmax=1 if col else None)
                axes[row, col].set_axis_off()
                if row == 0:
                    axes[row, col].set_title(title)
        fig.tight_layout()
        fig.savefig(out, dpi=80)
        plt.close(fig)
        return out
