"""Paired significance tests, Holm correction and Pareto fronts: pure functions over arrays.

References: Wilcoxon (1945) signed-rank test via ``scipy.stats.wilcoxon`` (two-sided, zero
differences dropped — scipy's default ``zero_method="wilcox"``, exact null distribution for small
samples without ties); Holm (1979), "A simple sequentially rejective multiple test procedure".

With tied or zero differences and n <= 13, scipy's ``method="auto"`` runs an exact permutation
test over all 2^n sign flips, calling its statistic once per flip (about 0.35 s per test at n = 12;
a report makes hundreds of tests). :func:`wilcoxon_paired` runs that same exact test through
``scipy.stats.permutation_test`` with a vectorised statistic: the ranks of |d| do not change when
signs flip, so the statistic of every flip is one matrix product. Same null distribution, same p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05

#: Up to this many pairs scipy's wilcoxon(method="auto") tests tied or zero differences exactly by
#: permutation (2^13 < its 9999 resamples); above it, asymptotically.
_EXACT_PERMUTATION_MAX_N = 13


@dataclass(frozen=True)
class PairedTest:
    """Result of one paired test: the p-value and the number of subjects it used."""

    p: float  # NaN when no subject is common to both sides
    n: int


def wilcoxon_paired(a: pd.Series, b: pd.Series) -> PairedTest:
    """Two-sided Wilcoxon signed-rank test of ``a`` against ``b``, paired by index (subject id).

    Only subjects present and finite on both sides enter. All differences zero → p = 1 (the two
    are identical, which scipy would report with a division warning).
    """
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    n = len(both)
    if n == 0:
        return PairedTest(float("nan"), 0)
    diff = both["a"].to_numpy(float) - both["b"].to_numpy(float)
    if np.all(diff == 0):
        return PairedTest(1.0, n)
    if n <= _EXACT_PERMUTATION_MAX_N:
        nonzero = diff != 0
        ranks = np.zeros(n)  # zeros are dropped (zero_method="wilcox"): rank 0, never counted
        ranks[nonzero] = stats.rankdata(np.abs(diff[nonzero]))
        if not nonzero.all() or len(np.unique(ranks[nonzero])) < nonzero.sum():
            # tied or zero differences: where scipy's "auto" runs the exact permutation test
            return PairedTest(_signed_rank_permutation_p(diff, ranks), n)
    res = stats.wilcoxon(both["a"].to_numpy(float), both["b"].to_numpy(float),
                         alternative="two-sided")
    return PairedTest(float(res.pvalue), n)


def _signed_rank_permutation_p(diff: np.ndarray, ranks: np.ndarray) -> float:
    """Two-sided exact p of the signed-rank statistic R+ = sum of the ranks of the positive
    differences over all 2^n sign flips of ``diff`` (scipy's statistic and null distribution).
    ``ranks``: average ranks of |diff| among the nonzero differences, 0 for the zeros."""
    def r_plus(d: np.ndarray, axis: int) -> np.ndarray:
        return (np.moveaxis(d, axis, -1) > 0) @ ranks

    res = stats.permutation_test((diff,), r_plus, permutation_type="samples", vectorized=True,
                                 n_resamples=np.inf, alternative="two-sided")
    return float(res.pvalue)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values, same order as given; NaN entries stay NaN and are not counted.

    With the m finite p-values sorted ascending p(1) ≤ … ≤ p(m), the adjusted value of p(i) is
    max over j ≤ i of min(1, (m − j + 1) · p(j)); comparing it to α controls the family-wise error.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def pareto_front(dice: Sequence[float], ece: Sequence[float]) -> np.ndarray:
    """Boolean mask of non-dominated points (Dice higher is better, ECE lower is better).

    Point i is dominated when some other point j has ece_j ≤ ece_i and dice_j ≥ dice_i with one of
    them strict (docs/architecture.md, "Report"). Identical points do not dominate each other; a
    point with a NaN coordinate is never on the front.
    """
    d = np.asarray(dice, dtype=float)
    e = np.asarray(ece, dtype=float)
    ok = np.isfinite(d) & np.isfinite(e)
    front = ok.copy()
    for i in np.flatnonzero(ok):
        others = ok.copy()
        others[i] = False
        dominated = others & (e <= e[i]) & (d >= d[i]) & ((e < e[i]) | (d > d[i]))
        front[i] = not dominated.any()
    return front


@dataclass(frozen=True)
class Comparison:
    """Per-method outcome of one metric within one dataset × weights."""

    mean: dict[str, float]
    best: str
    p_vs_best: dict[str, float]  # NaN for the best itself (after Holm when asked)
    bold: dict[str, bool]
    n_vs_best: dict[str, int]


def compare_to_best(values: dict[str, pd.Series], higher_is_better: bool,
                    use_holm: bool = False, order: Sequence[str] | None = None) -> Comparison:
    """Best method by mean, every other method tested against it; bold = best or p ≥ 0.05.

    ``values`` maps method → per-subject values indexed by subject id. Ties in the mean go to the
    method listed first in ``order`` (default: the dict's order). A method whose test has no
    common subject (p NaN) is not bold.
    """
    order = list(order or values)
    means = {m: float(values[m].mean()) for m in order}
    finite = [m for m in order if np.isfinite(means[m])]
    if not finite:
        return Comparison(means, "", {m: np.nan for m in order}, {m: False for m in order},
                          {m: 0 for m in order})
    sign = -1.0 if higher_is_better else 1.0
    best = min(finite, key=lambda m: sign * means[m])  # min is stable: first in order on ties
    others = [m for m in order if m != best]
    tests = {m: wilcoxon_paired(values[m], values[best]) for m in others}
    raw = [tests[m].p for m in others]
    adj = holm(raw) if use_holm else np.asarray(raw, dtype=float)
    p = {best: np.nan} | {m: float(v) for m, v in zip(others, adj)}
    bold = {m: (m == best) or bool(np.isfinite(p[m]) and p[m] >= ALPHA) for m in order}
    n = {best: int(values[best].notna().sum())} | {m: tests[m].n for m in others}
    return Comparison(means, best, p, bold, n)


def compare_to_reference(values: dict[str, pd.Series], reference: str,
                         use_holm: bool = False) -> dict[str, float]:
    """p-value of every method against ``reference`` (the base model); NaN for the reference."""
    others = [m for m in values if m != reference]
    raw = [wilcoxon_paired(values[m], values[reference]).p for m in others]
    adj = holm(raw) if use_holm else np.asarray(raw, dtype=float)
    return {reference: np.nan} | {m: float(v) for m, v in zip(others, adj)}
