"""Losses: triplet loss with positives and negatives mined by tag overlap, its margin schedule, and Dice.

The study's triplet mining took the *less* similar image as the positive and let an anchor be its own
positive. Here a positive shares tags with the anchor (label IoU >= positive_min_iou), a negative shares
few (label IoU <= negative_max_iou), and the anchor is never either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_iou_matrix(labels: torch.Tensor, ref_labels: torch.Tensor) -> torch.Tensor:
    """[B, C] and [R, C] multi-hot -> [B, R] label IoU; 0 where both rows are empty."""
    labels, ref_labels = labels.float(), ref_labels.float()
    inter = labels @ ref_labels.T
    union = labels.sum(1)[:, None] + ref_labels.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def pairwise_label_iou(labels: torch.Tensor) -> torch.Tensor:
    """[B, C] multi-hot -> [B, B] label IoU; 0 where both rows are empty."""
    return label_iou_matrix(labels, labels)


def margin_at(epoch: int, start: float, end: float, epochs: int) -> float:
    """Linear growth from `start` at epoch 0 to `end` at epoch `epochs`, then flat."""
    return start + (end - start) * min(epoch, epochs) / epochs


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float, positive_min_iou: float,
                 negative_max_iou: float, mining: str = "batch_hard") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Mean hinge max(0, d(a,p) - d(a,n) + margin) over mined triplets, by L2 distance.

    batch_hard: per anchor, its farthest positive against its nearest negative.
    semi_hard: per (anchor, positive), the nearest negative farther than the positive but inside the margin,
    or, when there is none such, the farthest negative (as FaceNet's implementation in TF-Addons does: falling
    back to the hardest one pulls a young embedding into collapse).
    Every anchor (and pair) is scored and the invalid ones masked out, so nothing here has a data-dependent
    shape to read back from the device; semi-hard mining holds a [B, B, B] tensor (a batch, never a dataset).
    Returns the loss (0, still a graph, when the batch holds no triplet) and 0-d tensor statistics: the
    number of triplets, the fraction of them with non-zero loss ("active"), and mean anchor-positive and
    anchor-negative distances (NaN without triplets).
    """
    dist = torch.cdist(embeddings.float(), embeddings.float()).clamp(min=0)
    iou = pairwise_label_iou(labels)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = (iou >= positive_min_iou) & ~eye
    negative = (iou <= negative_max_iou) & ~eye
    big = torch.finfo(dist.dtype).max
    if mining == "batch_hard":  # [B]: one triplet per anchor
        valid = positive.any(1) & negative.any(1)
        d_pos = torch.where(positive, dist, -big).amax(1)
        d_neg = torch.where(negative, dist, big).amin(1)
    elif mining == "semi_hard":  # [B, B]: one triplet per (anchor, positive) pair; [a, p, n] below
        valid = positive & negative.any(1, keepdim=True)
        d_pos = dist
        d_an, neg = dist[:, None, :], negative[:, None, :]
        semi = neg & (d_an > d_pos[:, :, None]) & (d_an < d_pos[:, :, None] + margin)
        easiest = torch.where(neg, d_an, -big).amax(2)
        semi_hard = torch.where(semi, d_an, big).amin(2)
        d_neg = torch.where(semi.any(2), semi_hard, easiest)
    else:
        raise ValueError(f"unknown mining {mining!r}")
    hinge = torch.where(valid, F.relu(d_pos - d_neg + margin), 0.0)
    count = valid.sum()
    per = count.clamp(min=1)
    nan = torch.full((), float("nan"), device=dist.device)

    def masked_mean(values: torch.Tensor) -> torch.Tensor:
        return torch.where(count > 0, torch.where(valid, values.detach(), 0.0).sum() / per, nan)

    stats = {"triplets": count.float(), "active_fraction": masked_mean((hinge > 0).float()),
             "pos_distance": masked_mean(d_pos), "neg_distance": masked_mean(d_neg)}  # fmt: skip
    return hinge.sum() / per, stats


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of each image [B]: 1 - (2|P*T| + eps) / (|P| + |T| + eps); average it for the batch loss."""
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    inter = (prob * target).sum(1)
    return 1 - (2 * inter + eps) / (prob.sum(1) + target.sum(1) + eps)
