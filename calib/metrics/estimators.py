"""Estimators of the calibration error from sampled labels, to be set against the truth on phantoms.

Each takes one volume's foreground probabilities ``p``, binary labels ``y`` and a mask, and
estimates a calibration error of ``p``. On a phantom the probability ``p*`` the labels were drawn
from is known, so each can be compared with the label-free truth (:mod:`calib.metrics.truth`):
the L1 estimators with ``true_ece`` (20 equal-width bins, ``sum_k (n_k/N) |mean_k p - mean_k
p*|``), the L2 ones with :func:`true_l2_ce` (the same bins, ``sqrt(sum_k (n_k/N) (mean_k p -
mean_k p*)^2)``). Names (:data:`ESTIMATORS`; per-subject column ``ece_est_<name>``):

* ``width10``, ``width20`` (the paper's ECE), ``width40``: the plug-in ECE over 10 / 20 / 40
  equal-width, left-closed bins (:func:`calib.metrics.ece`). One 40-bin pass serves all three:
  ``floor(floor(40 p) / 2) = floor(20 p)``, so adjacent bins add exactly into the coarser ones.
* ``mass20``: adaptive ECE, 20 equal-mass bins (:func:`calib.metrics.adaptive_ece`; Nixon et al.
  2019).
* ``sweep``: the monotonic-sweep ECE of Roelofs, Cain, Shlens & Mozer, "Mitigating bias in
  calibration error estimation", AISTATS 2022 (ECE_sweep, equal mass). The voxels sorted by p
  (stable sort: equal p keep their voxel order, as the authors' ``em_monotonic_sweep`` in
  google-research/caltrain, which splits ties by rank too); with ``b`` bins, rank ``i`` is in bin
  ``floor(i b / N)``. ``b`` grows from 2 until the bins' label frequencies first decrease
  somewhere (non-decreasing is monotone, as in their code); the ECE (L1 here, to sit beside the
  true ECE; voxel-weighted) is that of the last monotone ``b``. Checking ``b`` costs O(b), the
  sweep O(b*^2): it stops at :data:`SWEEP_MAX_BINS` bins (a perfectly separating ``p`` never
  breaks monotonicity and would sweep to N), where bins of a 10^6-voxel mask still hold ~500
  voxels.
* ``l2_width20``, ``l2_width40``: the plug-in L2 calibration error ``sqrt(sum_k (n_k/N)
  (conf_k - acc_k)^2)``.
* ``debiased_l2_width20``, ``debiased_l2_width40``: Kumar, Liang & Ma, "Verified uncertainty
  calibration", NeurIPS 2019, Section 5: the plug-in squared error minus each bin's variance
  term, ``sum_k (n_k/N) [(conf_k - acc_k)^2 - acc_k (1 - acc_k) / (n_k - 1)]`` (bins with
  ``n_k < 2`` add 0, as ``unbiased_square_ce`` of their released code), then ``sqrt(max(0, .))``.
  Their estimator of the *squared* error is unbiased for the binned L2 error; the square root
  and the clip at 0 leave a small upward bias (much smaller than the plug-in's).
* ``debiased_width20``, ``debiased_width40``: an L1 version. The paper proves its result for L2
  only; for other norms the authors' released library (p-lambda/verified_calibration,
  ``normal_debiased_ce``, what ``get_calibration_error(..., p=1, debias=True)`` returns) corrects
  the plug-in ECE by a parametric bootstrap of each bin's label frequency: ``acc*_k ~
  N(acc_k, acc_k (1 - acc_k) / n_k)``, ``ECE* = sum_k (n_k/N) |conf_k - acc*_k|``, and the
  estimate ``2 ECE - mean(ECE*)`` subtracts the bootstrap's estimate of the plug-in's upward
  bias (``mean(ECE*) - ECE``). That is the justification: the plug-in's bias comes from the
  noise of ``acc_k`` passing through ``|.|``, which the resamples reproduce. Unlike the L2 one it
  is not exactly unbiased (the bias is estimated at ``acc_k``, not at the unknown truth), and it
  can be negative. :data:`DEBIAS_RESAMPLES` resamples in antithetic pairs (``z``, ``-z``: the
  library draws them independently; same expectation, no Monte-Carlo noise for a bin whose gap
  exceeds its noise), generator seeded with :data:`DEBIAS_SEED` on every call, so the same input
  gives the same value.

All return fractions (NaN for an empty mask). Inputs as the other metrics (numpy arrays or torch
tensors of one shape); torch tensors are brought to the CPU, since the sweep is sequential.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from calib.metrics.adaptive import _equal_mass_sums
from calib.metrics.binning import ece_from_bins, reliability_bins
from calib.metrics.scores import _prepare
from calib.metrics.truth import true_reliability_bins

#: The estimators, in report order.
ESTIMATORS = ("width10", "width20", "width40", "mass20", "sweep", "debiased_width20",
              "debiased_width40", "l2_width20", "l2_width40", "debiased_l2_width20",
              "debiased_l2_width40")
#: The norm each estimator estimates; its truth is ``true_ece`` (1) or ``true_ece_l2`` (2).
ESTIMATOR_NORM = {name: (2 if name.startswith(("l2_", "debiased_l2_")) else 1) for name in ESTIMATORS}
TRUTH_COLUMN = {1: "true_ece", 2: "true_ece_l2"}
#: The label-free L2 truth's column (per_subject.csv), beside ``true_ece``.
TRUE_L2_COLUMN = "true_ece_l2"
SWEEP_MAX_BINS = 2048
DEBIAS_RESAMPLES = 1000
DEBIAS_SEED = 0
_MASS_BINS = 20


def estimator_column(name: str) -> str:
    """The per-subject column of estimator ``name``: ``ece_est_<name>``."""
    return f"ece_est_{name}"


#: Every per-subject column this module adds (phantoms only): the estimates, then the L2 truth.
ESTIMATOR_COLUMNS = tuple(estimator_column(n) for n in ESTIMATORS) + (TRUE_L2_COLUMN,)


def _numpy_pair(probs, labels, mask):
    p, y = _prepare(probs, labels, mask)
    if isinstance(p, torch.Tensor):
        p, y = p.cpu().numpy(), y.cpu().numpy()
    return p, y


def _fold(a: np.ndarray, factor: int) -> np.ndarray:
    """Bins of ``len(a) / factor`` equal widths from ``len(a)`` ones (adjacent bins added)."""
    return a.reshape(-1, factor).sum(axis=1)


def l2_ce_from_bins(count, conf_sum, pos_sum) -> float:
    """Plug-in L2 calibration error ``sqrt(sum_k (n_k/N) (conf_k - acc_k)^2)``; NaN when empty."""
    count = np.asarray(count, np.float64)
    n = count.sum()
    if n == 0:
        return math.nan
    ok = count > 0
    gap = (np.asarray(conf_sum, np.float64)[ok] - np.asarray(pos_sum, np.float64)[ok]) / count[ok]
    return float(math.sqrt(float((count[ok] / n * gap ** 2).sum())))


def debiased_l2_ce_from_bins(count, conf_sum, pos_sum) -> float:
    """Kumar et al. (2019)'s debiased L2 calibration error from reliability bins (module doc)."""
    count = np.asarray(count, np.float64)
    n = count.sum()
    if n == 0:
        return math.nan
    ok = count >= 2  # a bin of one voxel adds nothing (its variance term is undefined)
    c = count[ok]
    acc = np.asarray(pos_sum, np.float64)[ok] / c
    conf = np.asarray(conf_sum, np.float64)[ok] / c
    square = float((c / n * ((conf - acc) ** 2 - acc * (1.0 - acc) / (c - 1.0))).sum())
    return float(math.sqrt(max(square, 0.0)))


def debiased_ece_from_bins(count, conf_sum, pos_sum, resamples: int = DEBIAS_RESAMPLES,
                           seed: int = DEBIAS_SEED) -> float:
    """The L1 debiased ECE of Kumar et al.'s library (``normal_debiased_ce``; module doc):
    ``2 ECE - mean over resamples of ECE*``, each bin's label frequency resampled from its normal
    approximation. Seeded: the same bins give the same value. NaN when empty."""
    count = np.asarray(count, np.float64)
    n = count.sum()
    if n == 0:
        return math.nan
    ok = count > 0
    c = count[ok]
    acc = np.asarray(pos_sum, np.float64)[ok] / c
    conf = np.asarray(conf_sum, np.float64)[ok] / c
    weight = c / n
    plugin = float((weight * np.abs(conf - acc)).sum())
    rng = np.random.default_rng(seed)
    sd = np.sqrt(acc * (1.0 - acc) / c)
    # antithetic pairs (z, -z): the same expectation as the library's independent draws, without
    # their Monte-Carlo noise where |conf - acc*| is linear (a bin whose gap exceeds its noise)
    z = rng.standard_normal((max(resamples // 2, 1), acc.size))
    draws = acc + sd * np.concatenate([z, -z])
    resampled = (np.abs(conf - draws) * weight).sum(axis=1)
    return 2.0 * plugin - float(resampled.mean())


def _sweep_sorted(ps: np.ndarray, ys: np.ndarray, max_bins: int) -> tuple[float, int]:
    """(L1 ECE, bins) of the monotonic sweep over sorted ``ps`` with labels ``ys`` (N >= 1)."""
    n = ps.size
    cp = np.concatenate([[0.0], np.cumsum(ps)])
    cy = np.concatenate([[0.0], np.cumsum(ys)])

    def bounds(b: int) -> np.ndarray:
        # rank i is in bin floor(i b / N): bin k starts at ceil(k N / b)
        return -(-np.arange(b + 1, dtype=np.int64) * n // b)

    best = bounds(1)
    for b in range(2, min(n - 1, max_bins) + 1):
        edges = bounds(b)
        acc = (cy[edges[1:]] - cy[edges[:-1]]) / np.diff(edges)
        if np.any(acc[1:] < acc[:-1]):
            break
        best = edges
    size = np.diff(best).astype(np.float64)
    gap = np.abs((cp[best[1:]] - cp[best[:-1]]) - (cy[best[1:]] - cy[best[:-1]]))
    return float(gap.sum() / n), int(size.size)


def sweep_ece(probs: Any, labels: Any, mask: Any = None, max_bins: int = SWEEP_MAX_BINS) -> float:
    """Monotonic-sweep ECE of Roelofs et al. (2022), equal mass, L1 (module doc); NaN when empty."""
    return sweep_bins(probs, labels, mask, max_bins)[0]


def sweep_bins(probs: Any, labels: Any, mask: Any = None, max_bins: int = SWEEP_MAX_BINS
               ) -> tuple[float, int]:
    """(sweep ECE, number of equal-mass bins the sweep kept); (NaN, 0) for an empty mask."""
    p, y = _numpy_pair(probs, labels, mask)
    if p.size == 0:
        return math.nan, 0
    order = np.argsort(p, kind="stable")
    return _sweep_sorted(p[order], y[order], max_bins)


def true_l2_ce(probs: Any, true_probs: Any, mask: Any = None, n_bins: int = 20) -> float:
    """The label-free L2 truth of a phantom: ``sqrt(sum_k (n_k/N) (mean_k p - mean_k p*)^2)`` over
    the equal-width bins of :func:`calib.metrics.true_ece`; NaN for an empty mask."""
    return l2_ce_from_bins(*true_reliability_bins(probs, true_probs, mask, n_bins))


def ece_estimates(probs: Any, labels: Any, mask: Any = None) -> dict[str, float]:
    """Every estimator of :data:`ESTIMATORS` on one volume inside ``mask``: name -> fraction
    (NaN for an empty mask). One 40-bin pass and one sort serve them all."""
    p, y = _numpy_pair(probs, labels, mask)
    if p.size == 0:
        return dict.fromkeys(ESTIMATORS, math.nan)
    bins40 = reliability_bins(p, y, None, n_bins=40)
    widths = {40: bins40, 20: tuple(_fold(a, 2) for a in bins40), 10: tuple(_fold(a, 4) for a in bins40)}
    order = np.argsort(p, kind="stable")
    ps, ys = p[order], y[order]
    out = {f"width{k}": ece_from_bins(*widths[k]) for k in (10, 20, 40)}
    out["mass20"] = ece_from_bins(*_equal_mass_sums(ps, ys, _MASS_BINS))
    out["sweep"] = _sweep_sorted(ps, ys, SWEEP_MAX_BINS)[0]
    for k in (20, 40):
        out[f"debiased_width{k}"] = debiased_ece_from_bins(*widths[k])
        out[f"l2_width{k}"] = l2_ce_from_bins(*widths[k])
        out[f"debiased_l2_width{k}"] = debiased_l2_ce_from_bins(*widths[k])
    return {name: float(out[name]) for name in ESTIMATORS}


def estimator_row(probs: Any, labels: Any, mask: Any, true_probs: Any) -> dict[str, float]:
    """The per-subject columns :data:`ESTIMATOR_COLUMNS` of one phantom volume: each estimate
    (``ece_est_<name>``) and the L2 truth ``true_ece_l2``."""
    row = {estimator_column(k): v for k, v in ece_estimates(probs, labels, mask).items()}
    row[TRUE_L2_COLUMN] = true_l2_ce(probs, true_probs, mask)
    return row
