"""Shared machinery of the maps of the base probability fitted in closed form, without epochs:
histogram binning, isotonic regression (:mod:`calib.methods.nonparametric`) and beta calibration
(:mod:`calib.methods.beta`).

They read the base stage's logit cache only (``uses = "logits"``) and fit a map of the base
probability ``p = sigmoid(z)`` on the calibration voxels -- the voxels inside the brain mask of the
subjects passed as ``train`` (the protocol passes the calibration split there). :meth:`fit` is
one closed-form (or convex, full-batch) fit, and its ``FitResult`` says so: ``epochs_run = 0``,
``best_epoch = 0``, ``stop_reason = "closed_form"``, no history; its ``best_val_loss`` is the mean
BCE (:func:`calib.metrics.nll`, probabilities clipped to [1e-7, 1 - 1e-7]) of the fitted map over
every voxel inside the masks of ``val``.

Subsampling: when the calibration voxels exceed ``max_voxels`` (default 2,000,000) each voxel is
kept with probability ``max_voxels / total``, drawn from ``numpy.random.default_rng([seed, i])``
for the i-th subject, so the same split and seed always fit the same map; the expected number of
kept voxels is ``max_voxels``.

The fitted state is a few float64 tensors (bin edges and values, isotonic thresholds, or three
coefficients), so these methods save and load through ``state_dict`` like every other
(:meth:`CalibrationMethod.save` stores tensors only).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from calib import metrics
from calib.methods.base import CalibrationMethod, SubjectRef, SubjectSet
from calib.methods.params import MethodError
from calib.training import EpochResult, FitResult


def calibration_voxels(subjects: SubjectSet, max_voxels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cached base logits and labels of the voxels inside the masks of ``subjects`` (flat float64
    and uint8), thinned deterministically to about ``max_voxels`` (module doc)."""
    refs = list(subjects)
    total = sum(int(r.mask.sum()) for r in refs)
    if total == 0:
        shown = ", ".join(subjects.subject_ids[:5]) + (" ..." if len(refs) > 5 else "")
        raise MethodError(f"no subject of {len(refs)} ({shown}) has a voxel inside its mask")
    keep_rate = min(1.0, max_voxels / total)
    logits, labels = [], []
    for i, ref in enumerate(refs):
        mask = ref.mask
        z = ref.logits[mask].astype(np.float64)
        y = ref.label[mask]
        if keep_rate < 1.0:
            keep = np.random.default_rng([seed, i]).random(z.size) < keep_rate
            z, y = z[keep], y[keep]
        logits.append(z)
        labels.append(y)
    return np.concatenate(logits), np.concatenate(labels).astype(np.uint8)


def masked_bce(val: SubjectSet, map_logits: Callable[[np.ndarray], np.ndarray]) -> float:
    """Mean BCE (:func:`calib.metrics.nll`, probabilities clipped to [1e-7, 1 - 1e-7]) of
    ``map_logits`` -- flat float64 base logits to calibrated probabilities -- over every voxel
    inside the masks of ``val``; NaN when the masks are empty."""
    total, count = 0.0, 0
    for ref in val:
        mask = ref.mask
        n = int(mask.sum())
        if n:
            q = map_logits(ref.logits[mask].astype(np.float64))
            total += metrics.nll(q, ref.label[mask]) * n
            count += n
    return total / count if count else float("nan")


class ClosedFormMap(CalibrationMethod, abc.ABC):
    """A map of the base probability fitted without epochs (module doc).

    Subclasses set ``STATE_KEYS`` and implement :meth:`fit_map` (the state from flat logits and
    labels) and :meth:`map_logits` (calibrated probabilities from base logits, any shape).
    """

    STATE_KEYS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Mapping | None = None, **context):
        super().__init__(params, **context)
        self._state: dict[str, torch.Tensor] | None = None

    @abc.abstractmethod
    def fit_map(self, z: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
        """The fitted state from base logits ``z`` (float64) and labels ``y`` (uint8 0/1)."""

    @abc.abstractmethod
    def map_logits(self, z: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (float64 in [0, 1], shape of ``z``) of base logits ``z``."""

    @property
    def fitted(self) -> bool:
        return self._state is not None

    def state(self) -> dict[str, np.ndarray]:
        """The fitted state as numpy arrays; MethodError before :meth:`fit` or a load."""
        if self._state is None:
            raise MethodError(f"method {self.name!r} has not been fitted (call fit or load a saved one)")
        return {k: v.numpy() for k, v in self._state.items()}

    def fit(self, train: SubjectSet, val: SubjectSet, device: torch.device,
            callbacks: Sequence[Callable[[EpochResult], None]] = (),
            checkpoint_path: Path | None = None) -> FitResult:
        """Fit on ``train``'s voxels and score on ``val``. ``device``, ``callbacks`` and
        ``checkpoint_path`` belong to the interface and are unused: no epochs, seconds of CPU."""
        train.require("logits", self.name)
        val.require("logits", self.name)
        z, y = calibration_voxels(train, self.params["max_voxels"], self.params["seed"])
        self._set_state(self.fit_map(z, y))
        return FitResult(best_val_loss=self.validation_loss(val), best_epoch=0, epochs_run=0,
                         history=[], stop_reason="closed_form")

    def validation_loss(self, val: SubjectSet) -> float:
        """Mean BCE of the fitted map over every voxel inside the masks of ``val``."""
        return masked_bce(val, self.map_logits)

    def _predict_prob(self, subject: SubjectRef, device: torch.device) -> np.ndarray:
        return self.map_logits(subject.logits.astype(np.float64)).astype(np.float32)

    def _set_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = {k: torch.as_tensor(v, dtype=torch.float64).detach().cpu().clone()
                       for k, v in state.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.state()  # raises before fit
        return {k: v.clone() for k, v in self._state.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.STATE_KEYS):
            raise RuntimeError(f"expected state keys {sorted(self.STATE_KEYS)}, got {sorted(state)}")
        self._set_state(state)
