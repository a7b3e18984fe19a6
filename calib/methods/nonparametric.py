"""Non-parametric maps of the base probability: histogram binning and isotonic regression.

Both are fitted in closed form on the calibration voxels, without epochs, and subsample them
deterministically when there are more than ``max_voxels`` (default 2,000,000); see
:mod:`calib.methods.closed_form` for the fit, the ``FitResult`` (0 epochs, ``best_val_loss`` =
BCE on the validation voxels) and the subsampling rule. Their state -- bin edges and values, or the
isotonic thresholds -- is a pair of float64 tensors (the same keys whatever the binning).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit

from calib.methods.closed_form import ClosedFormMap


class ProbabilityMap(ClosedFormMap):
    """A map ``q = f(p)`` of the base probability ``p = sigmoid(z)``; subclasses implement
    :meth:`fit_probabilities` and :meth:`apply`."""

    def fit_map(self, z: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
        return self.fit_probabilities(expit(z), y)

    def fit_probabilities(self, p: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def apply(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (float64, same shape) of base probabilities ``p``."""
        raise NotImplementedError

    def map_logits(self, z: np.ndarray) -> np.ndarray:
        return self.apply(expit(z))


def equal_width_edges(n_bins: int) -> np.ndarray:
    """The ``n_bins - 1`` inner edges of ``n_bins`` bins of width ``1 / n_bins`` on [0, 1]."""
    return np.linspace(0.0, 1.0, n_bins + 1)[1:-1]


def equal_mass_edges(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner edges of at most ``n_bins`` bins holding about equal numbers of the values ``p``,
    tie-aware: a value held by more voxels than a bin's share (the float floor of a segmentation's
    background) gets a bin of its own, and the bins left are shared out by mass among the other
    values -- quantile edges would instead coincide there and leave one bin for everything above.

    Greedy from the bottom: with ``k`` bins left for the ``m`` values left, the next bin takes the
    next ``ceil(m / k)`` sorted values, extended to the end of a run of equal values -- or ended
    before the run when the run alone exceeds that share, so that it fills the next bin alone.
    Each edge lies halfway between the last value of a bin and the first of the next (bins are
    left-closed).
    """
    ps = np.sort(np.asarray(p, dtype=np.float64))
    n, start, left, edges = ps.size, 0, n_bins, []
    while left > 1 and start < n:
        share = -(-(n - start) // left)
        end = start + share  # first index of the next bin
        if end >= n:
            break
        # never split a run of equal values; a run larger than a share gets a bin of its own
        run_lo = int(np.searchsorted(ps, ps[end - 1], side="left"))
        run_hi = int(np.searchsorted(ps, ps[end - 1], side="right"))
        end = run_lo if run_lo > start and run_hi - run_lo > share else run_hi
        if end >= n:
            break
        edge = 0.5 * (ps[end - 1] + ps[end])
        edges.append(edge if edge > ps[end - 1] else ps[end])  # adjacent floats: the upper one
        start, left = end, left - 1
    return np.asarray(edges, dtype=np.float64)


def _merge(count: np.ndarray, pos: np.ndarray, edges: list, k: int) -> None:
    """Merge bin ``k + 1`` into bin ``k`` in place (lists), dropping the edge between them."""
    count[k] += count.pop(k + 1)
    pos[k] += pos.pop(k + 1)
    edges.pop(k)


def merge_bins(inner: np.ndarray, count: np.ndarray, pos: np.ndarray, min_count: int,
               monotone: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge bins until each holds at least ``min_count`` voxels and, with ``monotone``, the label
    fractions do not decrease from bin to bin. Returns ``(inner edges, counts, positives)``.

    Sparse bins first: the bin with the fewest voxels (the lowest such bin on a tie) merges with
    the neighbour that holds fewer, until none is under ``min_count`` or one bin is left. Then
    pool adjacent violators over the bins: a bin whose label fraction is below its left
    neighbour's merges with it, repeatedly, which leaves a non-decreasing step function that
    keeps the ranking of the base probabilities (ties only between bins the labels cannot
    order). Deterministic.
    """
    edges, c, s = list(inner), [int(v) for v in count], [float(v) for v in pos]
    while len(c) > 1 and min(c) < min_count:
        k = int(np.argmin(c))
        if k == 0 or (k < len(c) - 1 and c[k + 1] < c[k - 1]):
            _merge(c, s, edges, k)
        else:
            _merge(c, s, edges, k - 1)
    if monotone:
        k = 0
        while k < len(c) - 1:
            if s[k + 1] * c[k] < s[k] * c[k + 1]:  # fraction k + 1 < fraction k (no division)
                _merge(c, s, edges, k)
                k = max(k - 1, 0)
            else:
                k += 1
    return (np.asarray(edges, dtype=np.float64), np.asarray(c, dtype=np.int64),
            np.asarray(s, dtype=np.float64))


class HistogramBinning(ProbabilityMap):
    """Histogram binning (Zadrozny & Elkan, "Obtaining calibrated probability estimates from
    decision trees and naive Bayesian classifiers", ICML 2001).

    What it fits: bins of the base probability ``p``; the calibrated probability of a voxel is the
    fraction of foreground labels among the calibration voxels of its bin. Bins are left-closed
    ``[e_k, e_k+1)``, the first and last reach to 0 and 1. Parameters:

    * ``binning``: ``"equal_width"`` (default, Zadrozny & Elkan's) -- ``n_bins`` (20) bins of
      width ``1 / n_bins``; or ``"equal_mass"`` -- about equally many calibration voxels per bin,
      tie-aware (:func:`equal_mass_edges`).
    * ``min_bin_count`` (:data:`~calib.methods.recipes.MIN_BIN_COUNT`, 100): a bin with fewer
      calibration voxels merges with a neighbour (:func:`merge_bins`), so no bin's value rests on
      a handful of voxels and none is empty.
    * ``monotone`` (default true): adjacent bins whose label fractions decrease are merged (pool
      adjacent violators over the bins), so the map is non-decreasing and keeps the ranking.
      Zadrozny & Elkan do not do this; ``monotone: false`` is their plain binning, whose noisy
      bins can fall below their neighbours (on a 3x overconfident phantom, 1 of 20 did).

    Ties at the float floor: a real network puts almost every voxel (98.7 % on BraTS) at
    ``p <= 2^-24`` and a few percent near 1. Equal-mass quantile edges all land on the floor value
    there, so the old ``numpy.quantile`` binning left one bin for every voxel above the floor --
    the whole foreground mapped to one value. Equal-width edges do not move with the data, and the
    tie-aware equal-mass edges give the floor one bin and share the rest out above it.

    Library: scikit-learn has no histogram-binning calibrator (its ``KBinsDiscretizer`` drops bins
    narrower than 1e-8, where a segmentation's background crowds); netcal has one but is not a
    dependency. Can it change the 0.5-threshold segmentation? Yes: the bin around 0.5 maps to its
    label fraction, either side of 0.5.
    """

    name = "histogram_binning"
    STATE_KEYS = ("inner_edges", "values")

    def fit_probabilities(self, p: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
        n_bins = self.params["n_bins"]
        if self.params["binning"] == "equal_width":
            inner = equal_width_edges(n_bins)
        else:
            inner = equal_mass_edges(p, n_bins)
        idx = np.searchsorted(inner, p, side="right")
        count = np.bincount(idx, minlength=inner.size + 1)
        pos = np.bincount(idx, weights=y.astype(np.float64), minlength=inner.size + 1)
        inner, count, pos = merge_bins(inner, count, pos, self.params["min_bin_count"],
                                       self.params["monotone"])
        lo = np.concatenate([[0.0], inner])
        hi = np.concatenate([inner, [1.0]])
        # an empty bin remains only when there are no voxels at all (min_bin_count >= 1)
        values = np.where(count > 0, pos / np.maximum(count, 1), (lo + hi) / 2)
        return {"inner_edges": torch.from_numpy(inner.astype(np.float64)),
                "values": torch.from_numpy(values.astype(np.float64))}

    def apply(self, p: np.ndarray) -> np.ndarray:
        state = self.state()
        return state["values"][np.searchsorted(state["inner_edges"], p, side="right")]

    def describe(self) -> dict[str, float]:
        return {"hist_bins": float(self._state["values"].numel())} if self.fitted else {}


class IsotonicCalibration(ProbabilityMap):
    """Isotonic regression of the label on the base probability (Zadrozny & Elkan, "Transforming
    classifier scores into accurate multiclass probability estimates", KDD 2002), with
    ``sklearn.isotonic.IsotonicRegression(increasing=True, y_min=0, y_max=1,
    out_of_bounds="clip")``.

    What it fits: the non-decreasing step function of ``p`` closest to the labels in squared
    error (pool adjacent violators); scikit-learn interpolates linearly between its thresholds
    and clips outside the fitted range. We keep its ``X_thresholds_`` / ``y_thresholds_`` as
    tensors and predict with ``numpy.interp``, which is the same piecewise-linear map with the
    same clipping, so a saved method needs no pickled scikit-learn object.

    Monotone (non-decreasing) by construction. Can it change the 0.5-threshold segmentation? Yes:
    the fitted map need not cross 0.5 at ``p = 0.5``.
    """

    name = "isotonic"
    STATE_KEYS = ("x_thresholds", "y_thresholds")

    def fit_probabilities(self, p: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(increasing=True, y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(p, y.astype(np.float64))
        return {"x_thresholds": torch.from_numpy(np.asarray(iso.X_thresholds_, dtype=np.float64)),
                "y_thresholds": torch.from_numpy(np.asarray(iso.y_thresholds_, dtype=np.float64))}

    def apply(self, p: np.ndarray) -> np.ndarray:
        state = self.state()
        return np.interp(p, state["x_thresholds"], state["y_thresholds"])

    def describe(self) -> dict[str, float]:
        return {"isotonic_steps": float(self._state["x_thresholds"].numel())} if self.fitted else {}
