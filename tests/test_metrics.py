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
