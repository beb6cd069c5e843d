"""Losses: triplet loss with positives and negatives mined by tag overlap, its margin schedule, and Dice.

The study's triplet mining took the *less* similar image as the positive and let an anchor be its own
positive. Here a positive shares tags with the anchor (label IoU >= positive_min_iou), a negative shares
few (label IoU <= negative_max_iou), and the anchor is never either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_label_iou(labels: torch.Tensor) -> torch.Tensor:
    """[B, C] multi-hot -> [B, B] label IoU; 0 where both rows are empty."""
    labels = labels.float()
    inter = labels @ labels.T
    counts = labels.sum(1)
    union = counts[:, None] + counts[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def margin_at(epoch: int, start: float, end: float, epochs: int) -> float:
    """Linear growth from `start` at epoch 0 to `end` at epoch `epochs`, then flat."""
    return start + (end - start) * min(epoch, epochs) / epochs


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float, positive_min_iou: float,
                 negative_max_iou: float, mining: str = "batch_hard") -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """Mean hinge max(0, d(a,p) - d(a,n) + margin) over mined triplets, by L2 distance.

    batch_hard: per anchor, its farthest positive against its nearest negative.
    semi_hard: per (anchor, positive), the nearest negative farther than the positive but inside the margin,
    or, when there is none such, the farthest negative (as FaceNet's implementation in TF-Addons does: falling
    back to the hardest one pulls a young embedding into collapse).
    Returns the loss and statistics: the fraction of mined triplets with non-zero loss ("active"), and mean
    anchor-positive and anchor-negative distances.
    """
    dist = torch.cdist(embeddings.float(), embeddings.float()).clamp(min=0)
    iou = pairwise_label_iou(labels)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = (iou >= positive_min_iou) & ~eye
    negative = (iou <= negative_max_iou) & ~eye
    inf = torch.finfo(dist.dtype).max
    if mining == "batch_hard":
        usable = positive.any(1) & negative.any(1)
        d_pos = torch.where(positive, dist, torch.full_like(dist, -inf)).max(1).values[usable]
        d_neg = torch.where(negative, dist, torch.full_like(dist, inf)).min(1).values[usable]
    elif mining == "semi_hard":
        anchors, positives = torch.nonzero(positive & negative.any(1, keepdim=True), as_tuple=True)
        d_pos = dist[anchors, positives]
        d_an = dist[anchors]  # [P, B]
        neg = negative[anchors]
        semi = neg & (d_an > d_pos[:, None]) & (d_an < d_pos[:, None] + margin)
        easiest = torch.where(neg, d_an, torch.full_like(d_an, -inf)).max(1).values
        semi_hard = torch.where(semi, d_an, torch.full_like(d_an, inf)).min(1).values
        d_neg = torch.where(semi.any(1), semi_hard, easiest)
    else:
        raise ValueError(f"unknown mining {mining!r}")
    if d_pos.numel() == 0:  # no anchor with both a positive and a negative in this batch
        zero = embeddings.sum() * 0.0
        return zero, {"active_fraction": 0.0, "pos_distance": float("nan"), "neg_distance": float("nan"), "triplets": 0}
    hinge = F.relu(d_pos - d_neg + margin)
    d_pos, d_neg = d_pos.detach(), d_neg.detach()
    stats = {
        "active_fraction": float((hinge.detach() > 0).float().mean()),
        "pos_distance": float(d_pos.mean()),
        "neg_distance": float(d_neg.mean()),
        "triplets": int(d_pos.numel()),
    }
    return hinge.mean(), stats


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of each image [B]: 1 - (2|P*T| + eps) / (|P| + |T| + eps); average it for the batch loss."""
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    inter = (prob * target).sum(1)
    return 1 - (2 * inter + eps) / (prob.sum(1) + target.sum(1) + eps)
