"""The multi-label losses against pytorch-metric-learning itself (on one tag an image, where "shares tags" is "same
class", imret's pairs and proxies must give PML's own numbers) and against hand-computed multi-label cases."""

import math

import pytest
import torch
from pytorch_metric_learning import losses, miners

from imret.config import LossConfig
from imret.metric_losses import (
    Proxies, arcface_loss, make_pair_loss, mine, pair_loss, proxy_anchor_loss, tag_overlap_masks,
)  # fmt: skip


def single_label_batch(seed=0, n=24, classes=4, dim=8):
    gen = torch.Generator().manual_seed(seed)
    classes_of = torch.arange(n) % classes
    embeddings = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)
    return embeddings, classes_of, torch.nn.functional.one_hot(classes_of, classes).float()


@pytest.mark.parametrize("name", ["multi_similarity", "contrastive", "supcon", "circle"])
def test_pair_losses_on_tag_overlap_pairs_equal_pml_on_class_labels(name):
    embeddings, classes_of, tags = single_label_batch()
    config = LossConfig(name=name)
    masks = tag_overlap_masks(tags, tags, positive_min_iou=0.5, negative_max_iou=0.0)
    ours, stats = pair_loss(make_pair_loss(config), embeddings, embeddings, masks, config)
    theirs = make_pair_loss(config)(embeddings, classes_of)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5) and float(ours) > 0
    assert float(stats["positive_pairs"]) == 24 * 5 and float(stats["negative_pairs"]) == 24 * 18


def test_pairs_between_the_thresholds_are_neither_and_the_anchor_is_never_its_own():
    tags = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
    positive, negative = tag_overlap_masks(tags, tags, positive_min_iou=0.6, negative_max_iou=0.0)
    assert positive.tolist()[0] == [False, False, False, True]  # IoU 0.5 with row 1: neither
    assert negative.tolist()[0] == [False, False, True, False] and not positive.diagonal().any()
    gathered = torch.cat([tags[2:], tags])  # the anchors are rows 2.. of the gathered references
    positive, _ = tag_overlap_masks(tags, gathered, 0.6, 0.0, self_offset=2)
    assert positive[0].tolist() == [False, True, False, False, False, True] and not positive[0, 2]


@pytest.mark.parametrize("miner", ["multi_similarity", "pair_margin"])
def test_miners_keep_the_pairs_pmls_miners_keep(miner):
    embeddings, classes_of, tags = single_label_batch(seed=1)
    config = LossConfig(name="multi_similarity", miner=miner)
    if miner == "pair_margin":  # margins inside the spread of random unit vectors' distances (about 1.4)
        config.miner_pos_margin, config.miner_neg_margin = 1.3, 1.3
    masks = tag_overlap_masks(tags, tags, 0.5, 0.0)
    positive, negative = mine(masks, embeddings @ embeddings.T, config)
    pml = (miners.MultiSimilarityMiner(epsilon=0.1) if miner == "multi_similarity"
           else miners.PairMarginMiner(pos_margin=1.3, neg_margin=1.3))  # fmt: skip
    a1, p, a2, n = pml(embeddings, classes_of)
    assert set(zip(a1.tolist(), p.tolist())) == set(map(tuple, positive.nonzero().tolist()))
    assert set(zip(a2.tolist(), n.tolist())) == set(map(tuple, negative.nonzero().tolist()))
    assert 0 < positive.sum() < masks[0].sum() and 0 < negative.sum() < masks[1].sum()  # it did select


def test_proxy_anchor_on_one_hot_targets_equals_pml():
    embeddings, classes_of, tags = single_label_batch(seed=2)
    theirs = losses.ProxyAnchorLoss(num_classes=4, embedding_size=8)
    proxies = Proxies(4, 8)
    proxies.weight.data.copy_(theirs.proxies.data)
    ours = proxy_anchor_loss(proxies(embeddings), tags, alpha=32.0, margin=0.1)
    assert ours.detach().item() == pytest.approx(theirs(embeddings, classes_of).detach().item(), rel=1e-5)


def test_proxy_anchor_pulls_a_multi_label_image_to_each_of_its_tags_proxies():
    """Two images, three tags: image 0 has tags 0 and 1, image 1 has tag 1; alpha 2, margin 0.1."""
    cosines = torch.tensor([[0.9, 0.2, -0.3], [0.1, 0.8, 0.4]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    a, d = 2.0, 0.1
    pull = [math.log(1 + math.exp(-a * (0.9 - d))),  # tag 0: image 0
            math.log(1 + math.exp(-a * (0.2 - d)) + math.exp(-a * (0.8 - d)))]  # tag 1: images 0 and 1
    push = [math.log(1 + math.exp(a * (0.1 + d))),  # tag 0: image 1
            0.0,  # tag 1: no negative
            math.log(1 + math.exp(a * (-0.3 + d)) + math.exp(a * (0.4 + d)))]  # tag 2: both
    expected = sum(pull) / 2 + sum(push) / 3  # two proxies have a positive; all three are averaged for negatives
    assert float(proxy_anchor_loss(cosines, targets, alpha=a, margin=d)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("sub_centers", [1, 3])
def test_arcface_on_one_hot_targets_equals_pml(sub_centers):
    embeddings, classes_of, tags = single_label_batch(seed=3)
    if sub_centers == 1:
        theirs = losses.ArcFaceLoss(num_classes=4, embedding_size=8)
    else:
        theirs = losses.SubCenterArcFaceLoss(num_classes=4, embedding_size=8, sub_centers=sub_centers)
    proxies = Proxies(4, 8, sub_centers)
    proxies.weight.data.copy_(theirs.W.data.T)
    ours = arcface_loss(proxies(embeddings), tags, margin_degrees=28.6, scale=64.0)
    assert ours.detach().item() == pytest.approx(theirs(embeddings, classes_of).detach().item(), rel=1e-5)


def test_arcface_makes_each_tag_a_target_against_the_images_non_tags():
    """Image 0 has tags 0 and 1 of three, image 1 tag 2; scale 2, margin 30 degrees."""
    cosines = torch.tensor([[0.6, 0.5, 0.1], [0.2, -0.4, 0.7]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    s, m = 2.0, math.radians(30)

    def term(target_cos, others):  # -log softmax of the margin logit against the non-tags
        logit = s * math.cos(math.acos(target_cos) + m)
        return -logit + math.log(math.exp(logit) + sum(math.exp(s * c) for c in others))

    image0 = (term(0.6, [0.1]) + term(0.5, [0.1])) / 2  # tag 1 is not a competitor of tag 0, nor 0 of 1
    image1 = term(0.7, [0.2, -0.4])
    assert float(arcface_loss(cosines, targets, margin_degrees=30.0, scale=s)) == pytest.approx((image0 + image1) / 2)


def test_proxy_cosines_stay_float32_under_bf16_autocast():
    """Training runs under bf16 autocast; at ArcFace's scale of 64 a bf16 cosine would be off by a quarter logit."""
    proxies = Proxies(4, 8, sub_centers=2)
    embeddings = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cosines = proxies(embeddings)
    assert cosines.dtype == torch.float32 and torch.allclose(cosines, proxies(embeddings), atol=1e-6)
