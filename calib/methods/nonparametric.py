"""Non-parametric maps of the base probability: histogram binning and isotonic regression.

Both read the base stage's logit cache only (``uses = "logits"``), turn the cached logits into
base probabilities ``p = sigmoid(z)`` and fit a map ``p -> q`` on the calibration voxels -- the
voxels inside the brain mask of the subjects passed as ``train`` (the protocol passes the
calibration split there). They have no epochs: :meth:`fit` is one closed-form fit, and its
``FitResult`` says so (``epochs_run = 0``, ``stop_reason = "closed_form"``, no history); its
``best_val_loss`` is the mean BCE (:func:`calib.metrics.nll`, p clipped to [1e-7, 1 - 1e-7]) of the
fitted map over the voxels of ``val``.

Subsampling: when the calibration voxels exceed ``max_voxels`` (default 2,000,000) each voxel is
kept with probability ``max_voxels / total``, drawn from ``numpy.random.default_rng([seed, i])``
for the i-th subject, so the same split and seed always fit the same map. The expected number of
kept voxels is ``max_voxels``.

The fitted state is a few tensors (bin edges and values, or the isotonic thresholds), so a method
saves and loads through ``state_dict`` like every other (:meth:`CalibrationMethod.save` stores
tensors only).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit

from calib import metrics
from calib.methods.base import CalibrationMethod, SubjectRef, SubjectSet
from calib.methods.params import MethodError
from calib.training import EpochResult, FitResult

#: Calibration voxels fitted at most (in expectation; see the module doc).
MAX_VOXELS = 2_000_000


def base_probability(subject: SubjectRef) -> np.ndarray:
    """``sigmoid`` of one subject's cached base logits, float64 (X, Y, Z)."""
    return expit(subject.logits.astype(np.float64))


def calibration_voxels(subjects: SubjectSet, max_voxels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Base probabilities and labels of the voxels inside the masks of ``subjects`` (flat float64
    and uint8), thinned deterministically to about ``max_voxels`` (module doc)."""
    refs = list(subjects)
    total = sum(int(r.mask.sum()) for r in refs)
    if total == 0:
        raise MethodError(f"no subject of {len(refs)} ({', '.join(subjects.subject_ids[:5])}"
                          f"{' ...' if len(refs) > 5 else ''}) has a voxel inside its mask")
    keep_rate = min(1.0, max_voxels / total)
    probs, labels = [], []
    for i, ref in enumerate(refs):
        mask = ref.mask
        p = base_probability(ref)[mask]
        y = ref.label[mask]
        if keep_rate < 1.0:
            keep = np.random.default_rng([seed, i]).random(p.size) < keep_rate
            p, y = p[keep], y[keep]
        probs.append(p)
        labels.append(y)
    return np.concatenate(probs), np.concatenate(labels).astype(np.uint8)


class ProbabilityMap(CalibrationMethod, abc.ABC):
    """A monotone-ish map of the base probability fitted in closed form (module doc).

    Subclasses implement :meth:`fit_map` (set the state from flat ``p``, ``y``) and :meth:`apply`
    (``p -> q`` for any array of base probabilities).
    """

    uses = "logits"
    DEFAULTS = {"max_voxels": MAX_VOXELS, "seed": 0}

    def __init__(self, params: Mapping | None = None, **context):
        super().__init__(params, **context)
        self._state: dict[str, torch.Tensor] | None = None

    @abc.abstractmethod
    def fit_map(self, p: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
        """The fitted state from base probabilities ``p`` (float64) and labels ``y`` (0/1)."""

    @abc.abstractmethod
    def apply(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (float64, same shape) of base probabilities ``p``."""

    @property
    def fitted(self) -> bool:
        return self._state is not None

    def _require_fitted(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            raise MethodError(f"method {self.name!r} has not been fitted (call fit or load a saved one)")
        return self._state

    def fit(self, train: SubjectSet, val: SubjectSet, device: torch.device,
            callbacks: Sequence[Callable[[EpochResult], None]] = (),
            checkpoint_path: Path | None = None) -> FitResult:
        """Fit the map on ``train``'s voxels; score it on ``val``. ``device``, ``callbacks`` and
        ``checkpoint_path`` are accepted for the interface and unused (no epochs, seconds of work)."""
        train.require("logits", self.name)
        val.require("logits", self.name)
        p, y = calibration_voxels(train, self.params["max_voxels"], self.params["seed"])
        self._state = {k: v.detach().cpu() for k, v in self.fit_map(p, y).items()}
        return FitResult(best_val_loss=self.validation_loss(val), best_epoch=0, epochs_run=0,
                         history=[], stop_reason="closed_form")

    def validation_loss(self, val: SubjectSet) -> float:
        """Mean BCE of the fitted map over every voxel inside the masks of ``val``."""
        total, count = 0.0, 0
        for ref in val:
            mask = ref.mask
            n = int(mask.sum())
            if n:
                q = self.apply(base_probability(ref)[mask])
                total += metrics.nll(q, ref.label[mask]) * n
                count += n
        return total / count if count else float("nan")

    def _predict_prob(self, subject: SubjectRef, device: torch.device) -> np.ndarray:
        return self.apply(base_probability(subject)).astype(np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._require_fitted().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.STATE_KEYS)
        if set(state) != expected:
            raise RuntimeError(f"expected state keys {sorted(expected)}, got {sorted(state)}")
        self._state = {k: torch.as_tensor(v, dtype=torch.float64).detach().cpu().clone()
                       for k, v in state.items()}

    STATE_KEYS: tuple[str, ...] = ()


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
    DEFAULTS = {**ProbabilityMap.DEFAULTS, "n_bins": 20}
    STATE_KEYS = ("inner_edges", "values")

    def fit_map(self, p: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
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
        state = self._require_fitted()
        inner = state["inner_edges"].numpy()
        return state["values"].numpy()[np.searchsorted(inner, p, side="right")]

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

    def fit_map(self, p: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(increasing=True, y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(p, y.astype(np.float64))
        return {"x_thresholds": torch.from_numpy(np.asarray(iso.X_thresholds_, dtype=np.float64)),
                "y_thresholds": torch.from_numpy(np.asarray(iso.y_thresholds_, dtype=np.float64))}

    def apply(self, p: np.ndarray) -> np.ndarray:
        state = self._require_fitted()
        return np.interp(p, state["x_thresholds"].numpy(), state["y_thresholds"].numpy())

    def describe(self) -> dict[str, float]:
        return {"isotonic_steps": float(self._state["x_thresholds"].numel())} if self.fitted else {}
