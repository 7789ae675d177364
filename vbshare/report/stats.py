"""The statistics of the report: seed means with t-intervals, the paired t-test over seeds, and the per-example
tests (exact McNemar / sign test on correctness, Wilcoxon signed-rank on losses). Plain numbers in, numbers out."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

from ..errors import VBShareError

CONFIDENCE = 0.95


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean, sample std (ddof=1), CI low, CI high) of seed scores: mean ± t_{(1+c)/2, n-1} · std / sqrt(n).

    One value: std 0 and the interval NaN (no spread to estimate)."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, 0.0, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return mean, std, mean - half, mean + half


def _pair_arrays(values: Sequence[float], control: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The two samples of a paired test as float arrays, refused unless they pair one to one."""
    x, c = np.asarray(values, dtype=float), np.asarray(control, dtype=float)
    if len(x) != len(c):
        raise VBShareError(f"a paired test needs one control value per value, got {len(x)} and {len(c)}")
    return x, c


def paired_p(values: Sequence[float], control: Sequence[float]) -> float:
    """Two-sided paired t-test p-value of values[i] against control[i] (the same seed's runs).

    NaN when fewer than two pairs or when the differences do not vary (the t statistic is undefined)."""
    x, c = _pair_arrays(values, control)
    if len(x) < 2 or float(np.std(x - c, ddof=1)) == 0.0:
        return math.nan
    return float(stats.ttest_rel(x, c).pvalue)


def mcnemar_p(better: int, worse: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs of two classifiers scored on the same examples.

    better: examples this one gets right and the other wrong; worse: the reverse. Under the null each discordant
    example falls either way with probability 1/2: the two-sided binomial test of `better` in better + worse
    trials, min(1, 2 · P(X ≤ min(better, worse))). 1.0 when there is no discordant example (the two agree)."""
    better, worse = int(better), int(worse)
    if better < 0 or worse < 0:
        raise VBShareError(f"McNemar's test needs counts >= 0, got better={better} and worse={worse}")
    if better + worse == 0:
        return 1.0
    return float(stats.binomtest(better, better + worse, 0.5).pvalue)


def wilcoxon_p(values: Sequence[float], control: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of values[i] - control[i] (the same example's losses or errors).

    scipy.stats.wilcoxon with its defaults (zero differences dropped; scipy chooses the exact null distribution
    for small samples and the normal approximation for large ones, hundreds of examples always being large).
    1.0 when every difference is zero (the two agree on every example), NaN without pairs."""
    x, c = _pair_arrays(values, control)
    if len(x) == 0:
        return math.nan
    if not np.any(x != c):
        return 1.0
    return float(stats.wilcoxon(x, c).pvalue)

