"""Metric functions against scikit-learn and brute force, plus hand-checked cases."""

import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score

from imret.metrics import THRESHOLDS, best_threshold, example_scores, label_iou, mask_iou


@pytest.mark.parametrize("seed", range(5))
def test_example_scores_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.random((60, 7)) < 0.3
    y_pred = rng.random((60, 7)) < 0.4
    y_true[:3] = False  # empty rows on either side exercise zero_division
    y_pred[2:5] = False
    ours = example_scores(y_true, y_pred)
    kw = dict(average="samples", zero_division=0)
    assert ours["f1"] == pytest.approx(f1_score(y_true, y_pred, **kw))
    assert ours["precision"] == pytest.approx(precision_score(y_true, y_pred, **kw))
    assert ours["recall"] == pytest.approx(recall_score(y_true, y_pred, **kw))
    assert ours["accuracy"] == pytest.approx(jaccard_score(y_true, y_pred, **kw))


def test_precision_and_recall_by_hand():
    # one example: true {a, b}, predicted {a, c, d}: precision 1/3, recall 1/2, F1 0.4, Jaccard 1/4
    scores = example_scores(np.array([[1, 1, 0, 0]]), np.array([[1, 0, 1, 1]]))
    assert scores == pytest.approx({"precision": 1 / 3, "recall": 1 / 2, "f1": 0.4, "accuracy": 0.25})


def test_best_threshold_is_the_brute_force_argmax():
    rng = np.random.default_rng(0)
    y_true = rng.random((80, 6)) < 0.3
    y_prob = np.clip(y_true * 0.35 + rng.random((80, 6)) * 0.6, 0, 1)
    threshold, scores = best_threshold(y_true, y_prob)
    f1s = [f1_score(y_true, y_prob >= t, average="samples", zero_division=0) for t in THRESHOLDS]
    assert threshold == pytest.approx(THRESHOLDS[int(np.argmax(f1s))])
    assert scores["f1"] == pytest.approx(max(f1s))


def test_label_iou_rows_and_empty_rows():
    a = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]])
    b = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert label_iou(a, b) == pytest.approx([1 / 3, 0.0, 1.0, 0.0])
    rng = np.random.default_rng(1)
    x, y = rng.random((30, 9)) < 0.4, rng.random((30, 9)) < 0.4
    expected = [jaccard_score(r, s, zero_division=0) for r, s in zip(x, y)]
    assert label_iou(x, y) == pytest.approx(expected)


def test_mask_iou_per_image():
    pred = np.zeros((3, 4, 4), bool)
    true = np.zeros((3, 4, 4), bool)
    pred[0, :2], true[0, 1:3] = True, True  # 4 shared of 12 -> 1/3
    true[1, 0, 0] = True  # nothing predicted -> 0
    assert mask_iou(pred, true) == pytest.approx([1 / 3, 0.0, 1.0])  # both empty -> 1
    rng = np.random.default_rng(2)
    p, t = rng.random((5, 8, 8)) < 0.5, rng.random((5, 8, 8)) < 0.5
    assert mask_iou(p, t) == pytest.approx([jaccard_score(a.ravel(), b.ravel()) for a, b in zip(p, t)])


def test_the_threshold_is_chosen_on_one_half_and_scored_on_the_other(tmp_path):
    """Validation of a multi-label model, fed in uneven batches as ranks would: the threshold is the best one on
    the first seeded half, and the reported scores are scikit-learn's on the other half at that threshold."""
    import torch

    from imret.config import load_recipe
    from imret.metrics import best_threshold
    from imret.tasks.base import key_rank
    from imret.tasks.multilabel import MultilabelTask

    rng = np.random.default_rng(3)
    n, c = 300, 6
    prob = rng.uniform(size=(n, c))
    labels = (rng.uniform(size=(n, c)) < prob * 0.9).astype(np.float32)  # informative but noisy
    keys = [f"sample-{i}" for i in range(n)]
    (tmp_path / "r.yaml").write_text("")
    task = MultilabelTask(load_recipe(tmp_path / "r.yaml"), [f"c{i}" for i in range(c)], n)
    logits = torch.from_numpy(np.log(prob / (1 - prob))).float()
    identity = torch.nn.Identity()  # "images" are the logits, so the model is the identity
    rows = [task.val_outputs(identity, logits[a:b], None, torch.from_numpy(labels[a:b]), keys[a:b])
            for a, b in ((0, 97), (97, 98), (98, 300))]  # fmt: skip
    metrics = task.val_metrics({k: np.concatenate([r[k] for r in rows]) for k in rows[0]}, 0)

    scored = np.array([key_rank(key, 0, "threshold half") >= 0.5 for key in keys])
    threshold, _ = best_threshold(labels[~scored], prob[~scored])
    predicted = prob[scored] >= threshold
    assert metrics["threshold"] == threshold and metrics["threshold_images"] == (~scored).sum()
    assert metrics["scored_images"] == scored.sum() and 100 < scored.sum() < 200
    for name, fn in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score), ("accuracy", jaccard_score)):
        assert metrics[name] == pytest.approx(fn(labels[scored], predicted, average="samples", zero_division=0)), name
    assert metrics["f1_at_0.5"] == pytest.approx(f1_score(labels[scored], prob[scored] >= 0.5, average="samples", zero_division=0))
    everything = best_threshold(labels, prob)[1]["f1"]
    assert metrics["f1"] != pytest.approx(everything)  # not the optimistic score of choosing and scoring on the same images
