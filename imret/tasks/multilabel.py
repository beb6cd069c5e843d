"""Multi-label classification (the study's experiments 1-2 and the fine-tuned model): sigmoid outputs, BCE.
Validation reports example-wise F1, precision, recall and accuracy at the threshold that maximises F1."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imret.metrics import best_threshold, example_scores
from imret.models import RetrievalNet
from imret.tasks.base import Task, cpu


class MultilabelTask(Task):
    name = "multilabel"

    def build_model(self) -> nn.Module:
        trunk, features = self.make_trunk()
        self.embedding_dim = features
        return RetrievalNet(trunk, nn.Linear(features, len(self.classes)), embedding="pooled")

    def train_loss(self, model, images, masks, labels, epoch):
        return F.binary_cross_entropy_with_logits(model(images).float(), labels), {}

    def val_outputs(self, model, images, masks, labels):
        logits = model(images).float()
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
        return {"loss": cpu(loss), "prob": cpu(torch.sigmoid(logits)), "labels": cpu(labels)}

    def val_metrics(self, outputs, epoch):
        threshold, scores = best_threshold(outputs["labels"], outputs["prob"])
        at_half = example_scores(outputs["labels"], outputs["prob"] >= 0.5)
        return {"loss": float(np.mean(outputs["loss"])), **scores, "threshold": threshold, "f1_at_0.5": at_half["f1"]}

    def export_meta(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {"threshold": metrics["threshold"]}
