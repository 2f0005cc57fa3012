"""Statistics for comparing runs over seeds: bootstrap intervals, Welch's t-test, and seeds needed.

Used by ``prism reproduce`` (is the claim's number inside its band?) and ``prism sweep-report`` (is the best
setting really better than the others, and how many seeds would tell?). Distribution functions come from
SciPy (installed with scikit-learn); everything here is deterministic for the same inputs.

- :func:`bootstrap_ci`: percentile bootstrap interval of the mean (seeded resampling).
- :func:`welch_t_test`: two-sided Welch's unequal-variance t-test (``scipy.stats.ttest_ind(equal_var=False)``).
- :func:`seeds_needed`: seeds per setting for a two-sided two-sample t-test at level ``alpha`` to detect the
  observed difference with probability ``power``, given the observed spread (exact power through the
  noncentral t distribution, as G*Power computes it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
#: Fewer seeds than this per setting and a p-value is flagged: two or fewer samples say little about spread.
MIN_SEEDS_FOR_TEST = 3
#: :func:`seeds_needed` gives up above this many seeds per setting (the difference is negligible).
MAX_SEEDS = 1000


def bootstrap_ci(values: Sequence[float], level: float = CI_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: ``resamples`` resamples with replacement (NumPy generator
    seeded with ``seed``, so the same values always give the same interval). One value: ``(x, x)``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """``(t, p)`` of the two-sided Welch's t-test of ``mean(a) == mean(b)``; None when either side has fewer
    than 2 values (no variance). Two constant, equal samples give ``(0, 1)``; constant, different ones
    ``(±inf, 0)``."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return None
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:  # SciPy returns nan here; the answer is plain
        diff = a.mean() - b.mean()
        return (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    result = stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def power_two_sample(effect: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided two-sample t-test with ``n`` samples per group to detect a standardized
    difference ``effect`` (Cohen's d) at level ``alpha``."""
    from scipy import stats

    df = 2 * n - 2
    noncentrality = abs(effect) * math.sqrt(n / 2.0)
    critical = stats.t.ppf(1.0 - alpha / 2.0, df)
    return float(stats.nct.sf(critical, df, noncentrality) + stats.nct.cdf(-critical, df, noncentrality))


def seeds_needed(a: Sequence[float], b: Sequence[float], alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Seeds per setting that would detect ``mean(a) - mean(b)`` against the pooled sample std of ``a`` and
    ``b`` with probability ``power`` (two-sided, level ``alpha``). None when either side has fewer than 2
    values, or when the difference is zero or would need more than :data:`MAX_SEEDS` seeds."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return None
    pooled = math.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2))
    diff = abs(a.mean() - b.mean())
    if diff == 0:
        return None
    if pooled == 0:
        return 2
    effect = diff / pooled
    for n in range(2, MAX_SEEDS + 1):
        if power_two_sample(effect, n, alpha) >= power:
            return n
    return None
