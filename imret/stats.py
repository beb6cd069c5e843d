"""Statistics for comparing retrievals on the same queries: bootstrap intervals and paired tests.

The study compared masked and unmasked retrieval on different, unseeded query sets; here every model and
variant is scored on one seeded query set, so comparisons are paired (Wilcoxon signed-rank).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata, wilcoxon


def summary(values: np.ndarray, seed: int = 0, resamples: int = 10_000) -> dict[str, float | list[float]]:
    """Mean, standard deviation and a 95% percentile-bootstrap interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "ci95": [float(low), float(high)]}  # fmt: skip


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Wilcoxon signed-rank test of a - b over the same queries (zero differences dropped), with the matched-pairs
    rank-biserial correlation as effect size: +1 when every query is better under a, -1 under b. Its sign is the
    sign of the test's own statistic (W+ - W-), so it, not the mean difference, says which way a significant
    difference goes; the mean and the median difference come along for the reader."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    nonzero = diff[diff != 0]
    centre = {"mean_difference": float(diff.mean()), "median_difference": float(np.median(diff)), "n": int(len(diff))}
    if len(nonzero) == 0:
        return {**centre, "p_value": 1.0, "effect_size": 0.0}
    ranks = rankdata(np.abs(nonzero))  # ties share their average rank
    positive, negative = ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum()
    p_value = float(wilcoxon(diff, zero_method="wilcox").pvalue)
    return {**centre, "p_value": p_value, "effect_size": float((positive - negative) / (positive + negative))}


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (the family: every comparison in one report)."""
    order = np.argsort(p_values)
    adjusted = np.empty(len(p_values))
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()
