"""Metric learning: a 128-d L2-normalised head trained with triplet loss, positives and negatives mined by
tag overlap, the margin growing on a schedule.

Validation is bounded and does not depend on how batches fall on ranks: it scores a seeded sample of about
`VAL_SAMPLE` validation images, those whose key hashes below VAL_SAMPLE / split size (the same images on any
number of ranks, at any batch size), ordered by that hash and cut into chunks of `VAL_CHUNK`; triplets are
mined within each chunk at the final margin (comparable across epochs). The loss is the mean over all mined
triplets (a chunk without a triplet adds nothing, rather than a zero), and the mining statistics are weighted
the same way. A leave-one-out retrieval score (label IoU of the 5 nearest sampled images) comes from the same
sample. Warns when the embedding collapses."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from imret.errors import ImretError
from imret.losses import margin_at, triplet_loss
from imret.metrics import label_iou
from imret.models import RetrievalNet
from imret.tasks.base import Task, cpu, key_rank

log = logging.getLogger("imret.train")
COLLAPSE_DISTANCE = 1e-3
VAL_SAMPLE = 4096
VAL_CHUNK = 256


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

    def val_outputs(self, model, images, masks, labels, keys):
        fraction = min(1.0, VAL_SAMPLE / max(1, self.val_samples))
        ranks = np.array([key_rank(key, self.recipe.run.seed, "triplet validation") for key in keys])
        chosen = np.flatnonzero(ranks < fraction)
        embeddings = model(images).float()
        return {"embedding": cpu(embeddings[torch.from_numpy(chosen).to(embeddings.device)]),
                "labels": cpu(labels)[chosen], "rank": ranks[chosen]}  # fmt: skip

    def val_metrics(self, outputs, epoch):
        order = np.argsort(outputs["rank"], kind="stable")
        embeddings = torch.from_numpy(outputs["embedding"][order])
        labels = torch.from_numpy(outputs["labels"][order])
        totals = {"loss": 0.0, "active_fraction": 0.0, "pos_distance": 0.0, "neg_distance": 0.0}
        triplets = 0
        for start in range(0, len(labels), VAL_CHUNK):
            loss, stats = self._loss(embeddings[start : start + VAL_CHUNK], labels[start : start + VAL_CHUNK],
                                     self.recipe.task.margin_end)  # fmt: skip
            count = int(stats["triplets"])
            if count:
                triplets += count
                for name, value in {"loss": loss, **stats}.items():
                    if name in totals:
                        totals[name] += float(value) * count
        if not triplets:
            raise ImretError(f"triplet validation: no anchor in the {len(labels)} sampled validation images has both "
                             f"a positive (label IoU >= task.positive_min_iou) and a negative (<= task.negative_max_iou)")  # fmt: skip
        metrics = {name: total / triplets for name, total in totals.items()}
        spread = float(embeddings.std(0).mean()) if len(embeddings) > 1 else 0.0
        if spread < COLLAPSE_DISTANCE:
            log.warning("triplet embedding collapsed: validation embeddings are all the same point (spread %.2e)", spread)
        distances = torch.cdist(embeddings, embeddings).fill_diagonal_(float("inf"))
        neighbours = distances.topk(min(5, len(labels) - 1), largest=False).indices.numpy()
        iou = label_iou(labels.numpy()[:, None, :], labels.numpy()[neighbours]).mean()
        return {**metrics, "triplets": float(triplets), "sampled": float(len(labels)), "spread": spread,
                "val_iou_at_5": float(iou)}  # fmt: skip
