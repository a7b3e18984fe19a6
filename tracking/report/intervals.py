"""Uncertainty of the report's means: a seeded subject-level bootstrap, and what a test can reach.

* :func:`bootstrap_ci`: the 95 % percentile interval of a mean over subjects from B = 2000
  resamples of the subjects with replacement (Efron & Tibshirani 1993, ch. 13). Vectorised: one
  (B, n) index draw, one mean per row. The generator is seeded with :data:`BOOTSTRAP_SEED` for
  every call, so the same command gives the same interval (and two means over the same subjects
  are resampled with the same draws).
* :func:`smallest_wilcoxon_p`: the smallest two-sided p the exact Wilcoxon signed-rank test can
  give with n non-zero paired differences, 2 / 2^n (all differences of one sign); with 6 subjects
  it is 0.031, so no multiple-comparison correction over a dozen methods can leave a verdict.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 2000
CI_LEVEL = 0.95


def bootstrap_ci(values, resamples: int = BOOTSTRAP_RESAMPLES, level: float = CI_LEVEL,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """(low, high) percentile interval of the mean of ``values`` (one per subject; NaN dropped).

    No value: (NaN, NaN); one value: that value twice (a resample can only repeat it).
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def smallest_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p of the exact Wilcoxon signed-rank test with ``n`` pairs: 2 / 2^n
    (capped at 1). NaN for n < 1."""
    if n < 1:
        return float("nan")
    return min(1.0, 2.0 / 2.0 ** n)


def smallest_p_line(ns: Iterable[int]) -> str:
    """One sentence for under a table: the smallest attainable two-sided Wilcoxon p per number of
    subjects that occurs in it."""
    values = sorted({int(n) for n in ns if n and n > 0})
    if not values:
        return ""
    parts = [f"n = {n}: {_p(smallest_wilcoxon_p(n))}" for n in values]
    return ("Smallest two-sided Wilcoxon p attainable with the subjects tested (exact, 2/2^n): "
            + "; ".join(parts) + ".")


def _p(x: float) -> str:
    return f"{x:.2e}" if x < 1e-3 else f"{x:.3f}"
