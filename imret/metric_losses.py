"""pytorch-metric-learning's losses, made multi-label: who is a positive comes from tag overlap, not class ids.

PML's losses and miners take one class id per image; an apparel image has several tags. imret keeps its rule (a
positive shares tags with the anchor, label IoU >= task.positive_min_iou; a negative shares few, IoU <=
task.negative_max_iou; never the anchor itself, and pairs in between are neither) and hands PML's pair losses
exactly those pairs as an `indices_tuple`, with no labels, so PML computes its own loss on imret's pairs.

The proxy losses learn one proxy per tag. PML builds their positives from one-hot labels, so imret computes them
from the cosines to the proxies with a multi-hot target; on one-hot targets both equal PML's (tests/test_metric_losses.py):
- proxy_anchor: an image is a positive of the proxy of each of its tags and a negative of every other proxy; PML's
  formula (Kim et al. 2020) then applies unchanged, per proxy, over the batch.
- arcface (subcenter_arcface: with K sub-centres a tag, the closest one counting): each of an image's tags is its
  own softmax target, against the image's non-tags only (its other tags are neither target nor competitor), with
  the angular margin on the target; an image's loss is the mean over its tags.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imret.config import LossConfig
from imret.losses import label_iou_matrix

PAIR_LOSSES = ("multi_similarity", "contrastive", "supcon", "ntxent", "circle")
PROXY_LOSSES = ("proxy_anchor", "arcface", "subcenter_arcface")
Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def tag_overlap_masks(labels: torch.Tensor, ref_labels: torch.Tensor, positive_min_iou: float,
                      negative_max_iou: float, self_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Positive and negative masks [B, R] of anchors (labels) against references (ref_labels); anchor i is
    reference i + self_offset (the anchors' own rows among gathered references), never its own pair."""
    iou = label_iou_matrix(labels, ref_labels)
    rows = torch.arange(len(labels), device=labels.device)
    itself = torch.zeros_like(iou, dtype=torch.bool)
    itself[rows, rows + self_offset] = True
    return (iou >= positive_min_iou) & ~itself, (iou <= negative_max_iou) & ~itself


def mine(masks: tuple[torch.Tensor, torch.Tensor], similarity: torch.Tensor, loss: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs a miner keeps, by PML's rules on imret's masks (PML's miners take class ids). multi_similarity:
    a positive less similar than the anchor's most similar negative + epsilon, a negative more similar than its
    least similar positive - epsilon (Wang et al. 2019). pair_margin: positives farther than miner_pos_margin, negatives
    nearer than miner_neg_margin (L2 distance of the normalised embeddings)."""
    positive, negative = masks
    if loss.miner == "none":
        return positive, negative
    if loss.miner == "multi_similarity":
        epsilon = loss.value("miner_epsilon")
        hardest_negative = torch.where(negative, similarity, -math.inf).amax(1, keepdim=True)
        easiest_positive = torch.where(positive, similarity, math.inf).amin(1, keepdim=True)
        return positive & (similarity - epsilon < hardest_negative), negative & (similarity + epsilon > easiest_positive)
    distance = (2 - 2 * similarity).clamp(min=0).sqrt()
    return positive & (distance > loss.value("miner_pos_margin")), negative & (distance < loss.value("miner_neg_margin"))


def pair_indices(positive: torch.Tensor, negative: torch.Tensor) -> Pairs:
    """PML's pair format (anchors of positives, positives, anchors of negatives, negatives). torch.where of a mask
    is a nonzero: the step's one read of the device (the pair counts) that PML's index tuples make unavoidable."""
    a1, p = torch.where(positive)
    a2, n = torch.where(negative)
    return a1, p, a2, n


def make_pair_loss(loss: LossConfig) -> nn.Module:
    """The PML loss object with the recipe's parameters (PML's defaults where unset)."""
    from pytorch_metric_learning import losses

    if loss.name == "multi_similarity":
        return losses.MultiSimilarityLoss(alpha=loss.value("alpha"), beta=loss.value("beta"), base=loss.value("base"))
    if loss.name == "contrastive":
        return losses.ContrastiveLoss(pos_margin=loss.value("pos_margin"), neg_margin=loss.value("neg_margin"))
    if loss.name in ("supcon", "ntxent"):  # SupCon is NT-Xent with every positive of an anchor at once
        return losses.SupConLoss(temperature=loss.value("temperature"))
    if loss.name == "circle":
        return losses.CircleLoss(m=loss.value("margin"), gamma=loss.value("gamma"))
    raise ValueError(f"not a pair loss: {loss.name}")


def pair_loss(criterion: nn.Module, embeddings: torch.Tensor, ref_embeddings: torch.Tensor,
              masks: tuple[torch.Tensor, torch.Tensor], loss: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """PML's loss on the (mined) tag-overlap pairs of the anchors against the references, in float32; and 0-d
    statistics: the pairs used and their mean cosine similarity (NaN without such pairs)."""
    embeddings, ref_embeddings = embeddings.float(), ref_embeddings.float()
    similarity = F.normalize(embeddings, dim=1) @ F.normalize(ref_embeddings, dim=1).T
    positive, negative = mine(masks, similarity.detach(), loss)
    with torch.autocast(embeddings.device.type, enabled=False):
        value = criterion(embeddings, None, pair_indices(positive, negative), ref_embeddings, None)
    stats = {"positive_pairs": positive.sum().float(), "negative_pairs": negative.sum().float(),
             "pos_similarity": masked_mean(similarity, positive), "neg_similarity": masked_mean(similarity, negative)}  # fmt: skip
    return value, stats


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum()
    mean = torch.where(mask, values.detach(), 0.0).sum() / count.clamp(min=1)
    return torch.where(count > 0, mean, torch.full_like(mean, math.nan))


class Proxies(nn.Module):
    """One learnable proxy a tag (K sub-centres a tag for sub-centre ArcFace): cosines of embeddings to each."""

    def __init__(self, classes: int, dim: int, sub_centers: int = 1):
        super().__init__()
        self.classes, self.sub_centers = classes, sub_centers
        self.weight = nn.Parameter(torch.empty(classes * sub_centers, dim))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, classes]: each embedding's cosine to each tag's proxy (its closest sub-centre), in float32: under bf16
        autocast the product would be rounded to ~0.004, a quarter of a logit at ArcFace's scale of 64."""
        with torch.autocast(embeddings.device.type, enabled=False):
            cosines = F.normalize(embeddings.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).T
        return cosines.view(len(embeddings), self.classes, self.sub_centers).amax(2)


def masked_log1p_sum_exp(values: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """log(1 + sum of exp(values) where mask), along `dim`: 0 where the mask is empty."""
    masked = torch.where(mask, values, -math.inf)
    zero = torch.zeros_like(masked.narrow(dim, 0, 1))
    return torch.logsumexp(torch.cat([zero, masked], dim=dim), dim=dim)


def proxy_anchor_loss(cosines: torch.Tensor, targets: torch.Tensor, alpha: float, margin: float) -> torch.Tensor:
    """Proxy-Anchor (Kim et al. 2020) with multi-hot targets [B, C]: per proxy, log(1 + sum over its positives of
    exp(-alpha (cos - margin))), averaged over the proxies that have a positive in the batch, plus log(1 + sum over
    its negatives of exp(alpha (cos + margin))), averaged over all proxies."""
    positive = targets.bool()
    pulled = masked_log1p_sum_exp(-alpha * (cosines - margin), positive, dim=0)
    pushed = masked_log1p_sum_exp(alpha * (cosines + margin), ~positive, dim=0)
    with_positives = positive.any(0)
    return (pulled * with_positives).sum() / with_positives.sum().clamp(min=1) + pushed.mean()


def arcface_loss(cosines: torch.Tensor, targets: torch.Tensor, margin_degrees: float, scale: float) -> torch.Tensor:
    """Additive angular margin (Deng et al. 2019) with multi-hot targets [B, C]: for each tag c of image i, the
    cross-entropy of s cos(theta_ic + m) against s cos(theta_ij) of the image's non-tags j; the mean over an image's
    tags, then over the images that have one. Beyond theta = pi - m, cos(theta + m) is replaced by the monotonic
    cos(theta) - m sin(m), as PML does."""
    margin = math.radians(margin_degrees)
    positive = targets.bool()
    theta = torch.acos(cosines.clamp(-1 + 1e-7, 1 - 1e-7))
    target_logit = torch.where(theta + margin < math.pi, torch.cos(theta + margin), cosines - margin * math.sin(margin))
    competitors = torch.logsumexp(torch.where(positive, -math.inf, scale * cosines), dim=1, keepdim=True)
    per_tag = F.softplus(competitors - scale * target_logit)  # -log(e^{s t} / (e^{s t} + sum over non-tags))
    tags = positive.sum(1)
    per_image = torch.where(positive, per_tag, 0.0).sum(1) / tags.clamp(min=1)
    tagged = tags > 0
    return (per_image * tagged).sum() / tagged.sum().clamp(min=1)


def proxy_loss(loss: LossConfig, cosines: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if loss.name == "proxy_anchor":
        value = proxy_anchor_loss(cosines, targets, loss.value("alpha"), loss.value("margin"))
    else:
        value = arcface_loss(cosines, targets, loss.value("margin"), loss.value("scale"))
    positive = targets.bool()
    return value, {"pos_similarity": masked_mean(cosines, positive), "neg_similarity": masked_mean(cosines, ~positive)}


def gather_with_gradients(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows in rank order, each rank's slice keeping its gradient path back to that rank. Every rank
    then computes the same global loss; the backward pass sums each slice's gradients back to its rank, and DDP's
    average over ranks makes the step exactly one process's step on the global batch."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(rows.contiguous()))


def gather_labels(labels: torch.Tensor) -> torch.Tensor:
    """Every rank's labels in rank order (no gradients: a plain all_gather)."""
    import torch.distributed as dist

    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts)

