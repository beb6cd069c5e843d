"""Metric learning (task.name: triplet): an L2-normalised embedding head (model.embedding_dim) trained with the
recipe's loss. `loss.name: triplet` is imret's own triplet loss with positives and negatives mined by tag overlap
and the margin growing on a schedule (task.*); the others are pytorch-metric-learning's pair losses on the same
tag-overlap pairs, or its proxy losses with one proxy per tag (imret.metric_losses). `loss.gather` computes the
loss over the global batch, every rank's embeddings.

Validation is bounded and does not depend on how batches fall on ranks: it scores a seeded sample of about
`task.val_sample` validation images, those whose key hashes below val_sample / split size (the same images on any
number of ranks, at any batch size), ordered by that hash and cut into chunks of `task.val_chunk`; the loss is
computed within each chunk (the triplet loss at its final margin, a pair loss on every pair, unmined, so epochs
compare), and averaged over the chunks weighted by what each one holds (mined triplets, positive pairs, tagged
images): a chunk with none adds nothing, rather than a zero. A leave-one-out retrieval score (label IoU of the 5
nearest sampled images) comes from the same sample. Warns when the embedding collapses."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from imret.errors import ImretError
from imret.losses import margin_at, triplet_loss
from imret.metric_losses import (
    PROXY_LOSSES, Proxies, gather_labels, gather_with_gradients, make_pair_loss, pair_loss, proxy_loss, tag_overlap_masks,
)  # fmt: skip
from imret.metrics import label_iou
from imret.models import RetrievalNet
from imret.tasks.base import Task, cpu, key_rank

log = logging.getLogger("imret.train")
COLLAPSE_DISTANCE = 1e-3
COUNTS = {"triplet": "triplets", "pair": "positive_pairs", "proxy": "tagged_images"}  # what weighs a chunk


class TripletTask(Task):
    name = "triplet"

    def __init__(self, recipe, classes, val_samples=0):
        super().__init__(recipe, classes, val_samples)
        loss = recipe.loss
        self.kind = "triplet" if loss.name == "triplet" else "proxy" if loss.name in PROXY_LOSSES else "pair"
        self.criterion = make_pair_loss(loss) if self.kind == "pair" else None

    def build_model(self) -> nn.Module:
        trunk, features = self.make_trunk()
        self.embedding_dim = self.recipe.model.embedding_dim
        head = nn.Linear(features, self.embedding_dim)
        proxies = None
        if self.kind == "proxy":
            sub_centers = int(self.recipe.loss.value("sub_centers") or 1)  # proxy_anchor: one proxy a tag
            proxies = Proxies(len(self.classes), self.embedding_dim, sub_centers)
        return RetrievalNet(trunk, head, embedding="head", normalize_head=True, proxies=proxies)

    def margin(self, epoch: int) -> float:
        t = self.recipe.task
        return margin_at(epoch, t.margin_start, t.margin_end, t.margin_epochs)

    def objective(self, embeddings: torch.Tensor, cosines: torch.Tensor | None, labels: torch.Tensor, margin: float,
                  mined: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:  # fmt: skip
        """(loss, 0-d statistics, what the loss averaged over: triplets, positive pairs or tagged images)."""
        t, loss = self.recipe.task, self.recipe.loss
        if self.kind == "triplet":
            value, stats = triplet_loss(embeddings, labels, margin, t.positive_min_iou, t.negative_max_iou, t.mining)
            return value, stats, stats["triplets"]
        if self.kind == "proxy":
            value, stats = proxy_loss(loss, cosines, labels)
            return value, stats, (labels.sum(1) > 0).sum().float()
        masks = tag_overlap_masks(labels, labels, t.positive_min_iou, t.negative_max_iou)
        value, stats = pair_loss(self.criterion, embeddings, embeddings, masks,
                                 loss if mined else dataclasses.replace(loss, miner="none"))  # fmt: skip
        return value, stats, stats["positive_pairs"]

    def train_loss(self, model, images, masks, labels, epoch):
        out = model(images)
        embeddings, cosines = out if isinstance(out, tuple) else (out, None)
        if self.recipe.loss.gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every rank computes the loss of the global batch; gradients flow back to the rank of each row
            embeddings, labels = gather_with_gradients(embeddings.float()), gather_labels(labels)
            cosines = gather_with_gradients(cosines) if cosines is not None else None
        margin = self.margin(epoch)
        value, stats, _ = self.objective(embeddings.float(), cosines, labels, margin)
        return value, {**stats, "margin": margin} if self.kind == "triplet" else stats

    def val_outputs(self, model, images, masks, labels, keys):
        fraction = min(1.0, self.recipe.task.val_sample / max(1, self.val_samples))
        ranks = np.array([key_rank(key, self.recipe.run.seed, "triplet validation") for key in keys])
        chosen = np.flatnonzero(ranks < fraction)
        out = model(images)
        embeddings, cosines = out if isinstance(out, tuple) else (out, None)
        rows = torch.from_numpy(chosen).to(embeddings.device)
        outputs = {"embedding": cpu(embeddings.float()[rows]), "labels": cpu(labels)[chosen], "rank": ranks[chosen]}
        if cosines is not None:
            outputs["cosines"] = cpu(cosines[rows])
        return outputs

    def val_metrics(self, outputs, epoch):
        order = np.argsort(outputs["rank"], kind="stable")
        embeddings = torch.from_numpy(outputs["embedding"][order])
        labels = torch.from_numpy(outputs["labels"][order])
        cosines = torch.from_numpy(outputs["cosines"][order]) if "cosines" in outputs else None
        chunk, margin = self.recipe.task.val_chunk, self.recipe.task.margin_end
        totals: dict[str, float] = defaultdict(float)
        weight = 0.0
        for start in range(0, len(labels), chunk):
            part = slice(start, start + chunk)
            value, stats, count = self.objective(embeddings[part], cosines[part] if cosines is not None else None,
                                                 labels[part], margin, mined=False)  # fmt: skip
            count = float(count)
            if not count:
                continue
            weight += count
            for name, stat in {"loss": value, **stats}.items():
                if name not in ("triplets", "positive_pairs", "negative_pairs") and math.isfinite(float(stat)):
                    totals[name] += float(stat) * count
        if not weight:
            raise ImretError(f"metric-learning validation: the {len(labels)} sampled validation images hold no "
                             f"{COUNTS[self.kind].replace('_', ' ')} (positives: label IoU >= task.positive_min_iou, "
                             f"negatives: <= task.negative_max_iou)")  # fmt: skip
        metrics = {name: total / weight for name, total in totals.items()}
        spread = float(embeddings.std(0).mean()) if len(embeddings) > 1 else 0.0
        if spread < COLLAPSE_DISTANCE:
            log.warning("metric embedding collapsed: validation embeddings are all the same point (spread %.2e)", spread)
        distances = torch.cdist(embeddings, embeddings).fill_diagonal_(float("inf"))
        neighbours = distances.topk(min(5, len(labels) - 1), largest=False).indices.numpy()
        iou = label_iou(labels.numpy()[:, None, :], labels.numpy()[neighbours]).mean()
        return {**metrics, COUNTS[self.kind]: weight, "sampled": float(len(labels)), "spread": spread,
                "val_iou_at_5": float(iou)}  # fmt: skip
