"""Metric learning: a 128-d L2-normalised head trained with triplet loss, positives and negatives mined by
tag overlap, the margin growing on a schedule. The validation loss is the training objective on validation
batches at the final margin (comparable across epochs); the mining statistics and a leave-one-out retrieval
score (label IoU of the 5 nearest validation images) come from the whole validation set. Warns when the
embedding collapses."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from imret.losses import margin_at, triplet_loss
from imret.metrics import label_iou
from imret.models import RetrievalNet
from imret.tasks.base import Task, cpu

log = logging.getLogger("imret.train")
COLLAPSE_DISTANCE = 1e-3


class TripletTask(Task):
    name = "triplet"

    def build_model(self) -> nn.Module:
        trunk, features = self.make_trunk()
        self.embedding_dim = self.recipe.model.embedding_dim
        head = nn.Linear(features, self.embedding_dim)
        return RetrievalNet(trunk, head, embedding="head", normalize_head=True)

    def margin(self, epoch: int) -> float:
        t = self.recipe.task
        return margin_at(epoch, t.margin_start, t.margin_end, t.margin_epochs)

    def _loss(self, embeddings, labels, margin):
        t = self.recipe.task
        return triplet_loss(embeddings, labels, margin, t.positive_min_iou, t.negative_max_iou, t.mining)

    def train_loss(self, model, images, masks, labels, epoch):
        margin = self.margin(epoch)
        loss, stats = self._loss(model(images).float(), labels, margin)
        return loss, {**stats, "margin": margin}

    def val_outputs(self, model, images, masks, labels):
        embeddings = model(images).float()
        loss, _ = self._loss(embeddings, labels, self.recipe.task.margin_end)
        # a batch-level loss, repeated per sample: the mean over samples weights batches by their size
        per_sample = torch.full((len(images),), float(loss))
        return {"loss": cpu(per_sample), "embedding": cpu(embeddings), "labels": cpu(labels)}

    def val_metrics(self, outputs, epoch):
        embeddings, labels = torch.from_numpy(outputs["embedding"]), torch.from_numpy(outputs["labels"])
        _, stats = self._loss(embeddings, labels, self.recipe.task.margin_end)
        spread = float(embeddings.std(0).mean())
        if spread < COLLAPSE_DISTANCE:
            log.warning("triplet embedding collapsed: validation embeddings are all the same point (spread %.2e)", spread)
        distances = torch.cdist(embeddings, embeddings).fill_diagonal_(float("inf"))
        neighbours = distances.topk(min(5, len(labels) - 1), largest=False).indices.numpy()
        iou = label_iou(outputs["labels"][:, None, :], outputs["labels"][neighbours]).mean()
        return {"loss": float(np.mean(outputs["loss"])), **{k: float(v) for k, v in stats.items()}, "spread": spread,
                "val_iou_at_5": float(iou)}  # fmt: skip
