"""Multi-label classification (the study's experiments 1-2 and the fine-tuned model): sigmoid outputs, BCE.
Validation reports example-wise F1, precision, recall and accuracy at the threshold that maximises F1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imret.data.augment import denormalise
from imret.metrics import best_threshold, example_scores
from imret.models import RetrievalNet
from imret.tasks.base import Task, cpu


class MultilabelTask(Task):
    name = "multilabel"
    threshold = 0.5  # until the first validation picks the best one

    def build_model(self) -> nn.Module:
        trunk, features = self.make_trunk()
        self.embedding_dim = features
        return RetrievalNet(trunk, nn.Linear(features, len(self.classes)), embedding="pooled")

    def train_loss(self, model, images, masks, labels, epoch):
        return F.binary_cross_entropy_with_logits(model(images).float(), labels), {}

    def val_outputs(self, model, images, masks, labels, keys):
        logits = model(images).float()
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
        return {"loss": cpu(loss), "prob": cpu(torch.sigmoid(logits)), "labels": cpu(labels)}

    def val_metrics(self, outputs, epoch):
        threshold, scores = best_threshold(outputs["labels"], outputs["prob"])
        self.threshold = threshold
        at_half = example_scores(outputs["labels"], outputs["prob"] >= 0.5)
        return {"loss": float(np.mean(outputs["loss"])), **scores, "threshold": threshold, "f1_at_0.5": at_half["f1"]}

    def export_meta(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {"threshold": metrics["threshold"]}

    def val_figure(self, model, images, masks, labels, out: Path) -> Path:
        """Example predictions: each image with its predicted tags (at the best threshold) and true tags."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        count = min(6, len(images))
        prob = torch.sigmoid(model(images[:count]).float()).cpu().numpy()
        fig, axes = plt.subplots(1, count, figsize=(2.4 * count, 3.2), squeeze=False)
        for i, ax in enumerate(axes[0]):
            ax.imshow(denormalise(images[i : i + 1])[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy())
            predicted = [c for c, p in zip(self.classes, prob[i]) if p >= self.threshold]
            true = [c for c, t in zip(self.classes, labels[i].tolist()) if t]
            ax.set_title(f"pred: {', '.join(predicted[:4])}\ntrue: {', '.join(true)}", fontsize=7)
            ax.set_axis_off()
        fig.tight_layout()
        fig.savefig(out, dpi=80)
        plt.close(fig)
        return out
