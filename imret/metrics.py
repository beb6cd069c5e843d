"""Pure metric functions: numpy in, numpy or floats out, no distributed state.

Example-wise scores follow scikit-learn's `average="samples", zero_division=0`: each example's score, then the
mean over examples; "accuracy" is the example-wise Jaccard index. The study logged precision and recall
swapped; the tests hold these to scikit-learn.
"""

from __future__ import annotations

import numpy as np

THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


def _binary(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(bool)


def example_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Example-wise F1, precision, recall and accuracy (Jaccard) of multi-hot [N, C] arrays."""
    t, p = _binary(y_true), _binary(y_pred)
    tp = (t & p).sum(1).astype(np.float64)
    n_pred, n_true, union = p.sum(1), t.sum(1), (t | p).sum(1)

    def ratio(num: np.ndarray, den: np.ndarray) -> float:
        return float(np.mean(np.divide(num, den, out=np.zeros_like(num), where=den > 0)))

    return {
        "f1": ratio(2 * tp, (n_pred + n_true).astype(np.float64)),
        "precision": ratio(tp, n_pred.astype(np.float64)),
        "recall": ratio(tp, n_true.astype(np.float64)),
        "accuracy": ratio(tp, union.astype(np.float64)),
    }


def best_threshold(y_true: np.ndarray, y_prob: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> tuple[float, dict[str, float]]:
    """The threshold with the best example-wise F1 (the lowest such, on ties), and the scores there."""
    best: tuple[float, dict[str, float]] | None = None
    for threshold in thresholds:
        scores = example_scores(y_true, np.asarray(y_prob) >= threshold)
        if best is None or scores["f1"] > best[1]["f1"]:
            best = (float(threshold), scores)
    assert best is not None
    return best


def label_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise |a & b| / |a | b| of multi-hot rows; 0 where both rows are empty."""
    a, b = _binary(a), _binary(b)
    inter, union = (a & b).sum(-1).astype(np.float64), (a | b).sum(-1).astype(np.float64)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def mask_iou(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-image IoU of boolean masks [N, H, W]; 1 where both masks are empty (nothing to find, nothing found)."""
    p, t = _binary(pred), _binary(true)
    axes = tuple(range(1, p.ndim))
    inter, union = (p & t).sum(axes).astype(np.float64), (p | t).sum(axes).astype(np.float64)
    return np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
