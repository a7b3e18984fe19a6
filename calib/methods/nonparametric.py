"""Non-parametric maps of the base probability: histogram binning and isotonic regression.

Both are fitted in closed form on the calibration voxels, without epochs, and subsample them
deterministically when there are more than ``max_voxels`` (default 2,000,000); see
:mod:`calib.methods.closed_form` for the fit, the ``FitResult`` (0 epochs, ``best_val_loss`` =
BCE on the validation voxels) and the subsampling rule. Their state -- bin edges and values, or the
isotonic thresholds -- is a pair of float64 tensors.
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


class HistogramBinning(ProbabilityMap):
    """Histogram binning (Zadrozny & Elkan, "Obtaining calibrated probability estimates from
    decision trees and naive Bayesian classifiers", ICML 2001).

    What it fits: ``n_bins`` (default 20) equal-mass bins of the base probability (edges at the
    quantiles of the calibration voxels' ``p``, duplicates merged, so heavily tied values -- the
    saturated background -- make fewer, not empty, bins); the calibrated probability of a voxel is
    the fraction of foreground labels among the calibration voxels of its bin. Bins are
    left-closed ``[e_k, e_k+1)``, the first and last reach to 0 and 1. A bin that holds no
    calibration voxel (possible between interpolated quantiles) maps to the midpoint of its
    edges.

    Library: scikit-learn has no histogram-binning calibrator, and its equal-mass
    ``KBinsDiscretizer(strategy="quantile")`` drops every bin narrower than 1e-8 -- where the
    equal-mass edges of a segmentation's background probabilities crowd -- and by default takes
    its quantiles from a random 200,000-point subsample; netcal has one but is not a dependency of
    the project, and would be one more package for a quantile and a bincount. So the edges are
    ``numpy.quantile`` (linear interpolation) and the bin means ``numpy.bincount``.

    The map is a step function; it is monotone whenever the bins' label fractions increase, which
    nothing forces (a noisy bin can fall below its neighbour). Can it change the 0.5-threshold
    segmentation? Yes: the bin around 0.5 maps to its label fraction, either side of 0.5.
    """

    name = "histogram_binning"
    STATE_KEYS = ("inner_edges", "values")

    def fit_probabilities(self, p: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
        edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, self.params["n_bins"] + 1)))
        inner = edges[1:-1]
        idx = np.searchsorted(inner, p, side="right")
        n_bins = inner.size + 1
        count = np.bincount(idx, minlength=n_bins)
        pos = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins)
        lo = np.concatenate([[0.0], inner])
        hi = np.concatenate([inner, [1.0]])
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
