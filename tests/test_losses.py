import pytest
import torch
import torch.nn.functional as F

from imret.losses import dice_loss, margin_at, pairwise_label_iou, triplet_loss


def toy():
    """Three garment groups, two images each; same group = same tags (positives), no shared tags across groups."""
    labels = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                           [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.float32)  # fmt: skip
    centres = F.normalize(torch.eye(3, 8), dim=1)
    correct = F.normalize(centres.repeat_interleave(2, 0) + 0.05 * torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    inverted = correct[[2, 4, 0, 5, 1, 3]]  # each image sits in another group's place: same-tag pairs far apart
    return labels, correct, inverted


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
def test_a_correct_embedding_scores_lower_than_an_inverted_one(mining):
    labels, correct, inverted = toy()
    good, good_stats = triplet_loss(correct, labels, 0.5, 0.5, 0.0, mining)
    bad, bad_stats = triplet_loss(inverted, labels, 0.5, 0.5, 0.0, mining)
    assert good < bad and good == pytest.approx(0.0)
    assert good_stats["pos_distance"] < good_stats["neg_distance"]
    assert bad_stats["active_fraction"] == 1.0


def test_the_anchor_is_never_its_own_positive():
    labels = torch.eye(4)  # every image has a tag of its own: no positives at all
    loss, stats = triplet_loss(torch.randn(4, 3, requires_grad=True), labels, 1.0, 0.5, 0.0)
    assert stats["triplets"] == 0 and loss.item() == 0.0
    loss.backward()  # still a graph: the step goes on


def test_batch_hard_by_hand():
    # 1-d embedding: anchor 0 at 0.0 with positive 1 at 0.3 and negative 2 at 0.5; margin 0.4
    emb = torch.tensor([[0.0], [0.3], [0.5]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss, stats = triplet_loss(emb, labels, 0.4, 0.5, 0.0, "batch_hard")
    # anchors 0 and 1 have a positive and a negative: max(0, .3 - .5 + .4) = .2 and max(0, .3 - .2 + .4) = .5
    assert loss.item() == pytest.approx((0.2 + 0.5) / 2)
    assert stats["triplets"] == 2 and stats["active_fraction"] == 1.0


def test_pairwise_label_iou_and_margin_schedule():
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(pairwise_label_iou(labels), torch.tensor([[1, 1 / 3, 0], [1 / 3, 1, 0], [0, 0, 0]]))
    assert [margin_at(e, 0.1, 1.0, 3) for e in (0, 1, 3, 9)] == pytest.approx([0.1, 0.4, 1.0, 1.0])


def test_dice_loss():
    target = torch.zeros(2, 1, 4, 4)
    target[0, :, :2] = 1
    perfect = torch.where(target > 0, 20.0, -20.0)
    assert dice_loss(perfect, target) == pytest.approx(torch.zeros(2), abs=1e-6)
    assert dice_loss(-perfect, target)[0] > 0.9


def test_semi_hard_by_hand_differs_from_batch_hard():
    """1-d embedding, margin 0.2: A-images at 0.0 and 0.3, B-images at 0.35 and 0.9 (worked out below)."""
    emb = torch.tensor([[0.0], [0.3], [0.35], [0.9]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # batch-hard, per anchor (farthest positive - nearest negative + 0.2): .3-.35, .3-.05, .55-.05, .55-.6
    hard, _ = triplet_loss(emb, labels, 0.2, 0.5, 0.0, "batch_hard")
    assert hard.item() == pytest.approx((0.15 + 0.45 + 0.70 + 0.15) / 4)
    # semi-hard, per (anchor, positive): the nearest negative in (d_ap, d_ap + 0.2), else the farthest one:
    # (0,1): 0.35 -> 0.15; (1,0): none in (0.3, 0.5), farthest 0.6 -> 0; (2,3): none in (0.55, 0.75),
    # farthest 0.35 -> 0.40; (3,2): 0.6 -> 0.15
    semi, stats = triplet_loss(emb, labels, 0.2, 0.5, 0.0, "semi_hard")
    assert semi.item() == pytest.approx((0.15 + 0.0 + 0.40 + 0.15) / 4)
    assert stats["triplets"] == 4 and stats["active_fraction"] == pytest.approx(0.75)


def test_dice_at_a_partial_overlap_by_hand():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1  # 8 pixels
    logits = torch.full((1, 1, 4, 4), -30.0)
    logits[..., :3, :] = 30.0  # 12 predicted, 8 of them right
    assert dice_loss(logits, target).item() == pytest.approx(1 - (2 * 8 + 1) / (12 + 8 + 1), abs=1e-6)
