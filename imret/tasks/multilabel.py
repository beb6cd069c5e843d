"""Multi-label classification (the study's experiments 1-2 and the fine-tuned model): sigmoid outputs, BCE.

Validation reports example-wise F1, precision, recall and accuracy at a decision threshold chosen without
looking at the images it is scored on: the validation images are split in two halves by a seeded hash of
their keys (the same halves on any number of ranks); the threshold (swept 0.05-0.95) that maximises F1 on
the first half is the one reported, with the scores it gets on the second half, beside F1 at 0.5 on the same
second half. Each batch contributes sums per half and threshold, so memory does not grow with the split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imret.data.augment import denormalise
from imret.metrics import THRESHOLDS
from imret.models import RetrievalNet
from imret.tasks.base import Task, cpu, key_rank

log = logging.getLogger("imret.train")
SCORES = ("f1", "precision", "recall", "accuracy")  # example-wise; accuracy is the Jaccard index


def example_scores_per_threshold(prob: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """[B, T, 4]: each example's F1, precision, recall and Jaccard at each threshold (0 where undefined, as
    scikit-learn's zero_division=0)."""
    predicted = prob[:, None, :] >= thresholds[None, :, None]
    true = labels.bool()[:, None, :]
    tp = (predicted & true).sum(2).float()
    n_pred, n_true, union = predicted.sum(2).float(), true.sum(2).float(), (predicted | true).sum(2).float()

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    return torch.stack([ratio(2 * tp, n_pred + n_true), ratio(tp, n_pred), ratio(tp, n_true), ratio(tp, union)], 2)


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
        """One row per batch: the loss sum and, per half (0: chooses the threshold, 1: is scored at it), the
        image count and the sums of each example score at each threshold."""
        logits = model(images).float()
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
        seed = self.recipe.run.seed
        half = torch.tensor([key_rank(key, seed, "threshold half") >= 0.5 for key in keys], device=logits.device)
        scores = example_scores_per_threshold(torch.sigmoid(logits), labels, torch.from_numpy(THRESHOLDS).to(logits))
        membership = torch.stack([half == h for h in (0, 1)]).float()  # [2, B]
        by_half = (membership[:, :, None, None] * scores).sum(1)  # [2, T, 4]; not a matmul, which autocast makes bf16
        counts = membership.sum(1)
        return {"loss_sum": cpu(loss.sum())[None], "half_count": cpu(counts)[None], "half_scores": cpu(by_half)[None]}

    def val_metrics(self, outputs, epoch):
        counts, sums = outputs["half_count"].sum(0), outputs["half_scores"].sum(0)
        choosing, reporting = (sums[h] / counts[h] if counts[h] else np.full(sums[h].shape, np.nan) for h in (0, 1))
        best = int(np.argmax(choosing[:, 0])) if counts[0] else int(np.flatnonzero(THRESHOLDS == 0.5)[0])
        self.threshold = float(THRESHOLDS[best])
        if not counts[1]:
            log.warning("validation: no image fell in the half that the threshold is scored on (%d images in all)",
                        int(counts.sum()))  # fmt: skip
        at_half = reporting[int(np.flatnonzero(THRESHOLDS == 0.5)[0])]
        return {"loss": float(outputs["loss_sum"].sum() / counts.sum()), **dict(zip(SCORES, map(float, reporting[best]))),
                "threshold": self.threshold, "f1_at_0.5": float(at_half[0]),
                "threshold_images": float(counts[0]), "scored_images": float(counts[1])}  # fmt: skip

    def export_meta(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {"threshold": metrics["threshold"],
                "threshold_split": {"chosen_on": int(metrics["threshold_images"]), "scored_on": int(metrics["scored_images"])}}  # fmt: skip

    def val_figure(self, model, images, masks, labels, out: Path) -> Path:
        """Example predictions: each image with its predicted tags (at the chosen threshold) and true tags."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        count = min(6, len(images))
        prob = torch.sigmoid(model(images[:count]).float()).cpu().numpy()
        fig, axes = plt.subplots(1, count, figsize=(2.4 * count, 3.2), squeeze=False)
        for i, ax in enumerate(axes[0]):
            ax.imshow(denormalise(images[i : i + 1], self.normalisation)[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy())
            predicted = [c for c, p in zip(self.classes, prob[i]) if p >= self.threshold]
            true = [c for c, t in zip(self.classes, labels[i].tolist()) if t]
            ax.set_title(f"pred: {', '.join(predicted[:4])}\ntrue: {', '.join(true)}", fontsize=7)
            ax.set_axis_off()
        fig.tight_layout()
        fig.savefig(out, dpi=80)
        plt.close(fig)
        return out
