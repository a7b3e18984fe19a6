"""Shared machinery of the methods that learn a small map on the base logits (cached only).

Platt scaling, the auxiliary conv, temperature scaling and local temperature scaling never run
the U-Net: they train on the base stage's logit cache (:mod:`calib.logits`) and predict from the
cached logits of the test subjects.

Two ways to fit (the method parameter ``optimizer``, for the methods whose recipe has it):

* ``"adam"`` -- the paper's recipe, :func:`calib.training.fit`: mini-batch Adam (lr 5e-3) on
  batches of 64 z-slices (or whole volumes for 3-D kernels), LR x0.1 on a plateau of the
  validation loss, early stopping. The auxiliary conv and LTS always train this way.
* ``"lbfgs"`` -- full batch, the default of Platt and temperature scaling, whose losses are
  (near-)convex in two or one parameter and which Adam at 5e-3 leaves short of the optimum (on
  logits exactly ``3 logit(p*)`` it ended at ``T = 1.82`` after 50 epochs, L-BFGS at 3.000): the
  mean BCE over the masked calibration voxels, subsampled to ``max_voxels`` exactly as the
  closed-form maps are (:func:`calib.methods.closed_form.calibration_voxels`), minimised in
  float64 on the CPU by ``torch.optim.LBFGS`` with a strong-Wolfe line search, polished by Newton
  steps (:func:`calib.methods.full_batch.minimise_bce`). Tolerance: the largest component of the
  loss's gradient at most 1e-9 (:data:`calib.methods.full_batch.GRAD_TOL`), reported as
  ``stop_reason = "converged"``; otherwise ``"max_iter"`` (500 L-BFGS iterations ran out) or
  ``"stalled"`` (neither L-BFGS nor Newton could lower it further). No epochs: ``epochs_run =
  best_epoch = 0``, no history, no checkpoint (a rerun refits the same map); ``best_val_loss`` is
  the mean BCE of the fitted map over the validation voxels
  (:func:`calib.methods.closed_form.masked_bce`, as the closed-form maps). The learned
  parameters go back to float32, so the saved state is the same tensors as Adam's.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from calib.data.batches import SliceBatches, VolumeLogitBatches
from calib.losses import bce_loss
from calib.methods.base import CalibrationMethod, SubjectRef, SubjectSet, no_autocast
from calib.methods.closed_form import calibration_voxels, masked_bce
from calib.methods.full_batch import MAX_ITER, minimise_bce
from calib.methods.params import MethodError
from calib.training import EpochResult, FitResult, fit

class LogitCalibrator(CalibrationMethod, abc.ABC):
    """A method defined by a small module mapping base logits to calibrated logits.

    Subclasses implement :meth:`build_module`; ``slice_wise`` tells whether the module works on
    z-slices ``(B, 1, X, Y)`` (True) or volumes ``(B, 1, X, Y, Z)`` (False).
    """


    def __init__(self, params: Mapping | None = None, **context):
        super().__init__(params, **context)
        self.module = self.build_module()

    @abc.abstractmethod
    def build_module(self) -> nn.Module:
        """The calibration map, initialised to the identity (the base model's probabilities)."""

    @property
    def slice_wise(self) -> bool:
        return True

    def _loss(self, module: nn.Module, batch: dict) -> torch.Tensor:
        with no_autocast(batch["logits"].device):
            return bce_loss(module(batch["logits"].float()), batch["label"], batch["mask"])

    def fit(self, train: SubjectSet, val: SubjectSet, device: torch.device,
            callbacks: Sequence[Callable[[EpochResult], None]] = (),
            checkpoint_path: Path | None = None) -> FitResult:
        if self.params.get("optimizer") == "lbfgs":
            return self._fit_full_batch(train, val)
        cfg = self.train_config()
        loader = SliceBatches if self.slice_wise else VolumeLogitBatches
        train_batches = loader(train.require("logits", self.name), train.subject_ids,
                               cfg.batch_size, shuffle=True, seed=cfg.seed)
        val_batches = loader(val.require("logits", self.name), val.subject_ids,
                             cfg.batch_size, shuffle=False)
        device = torch.device(device)
        try:
            return fit(self.module, self._loss, train_batches, lambda: val_batches(0), cfg, device,
                       checkpoint_path=checkpoint_path, callbacks=callbacks)
        finally:
            self.module.to("cpu")

    def _fit_full_batch(self, train: SubjectSet, val: SubjectSet) -> FitResult:
        """Minimise the mean BCE over ``train``'s (subsampled) masked voxels, full batch (module
        doc). The module must be elementwise in the logit (Platt, temperature)."""
        train.require("logits", self.name)
        val.require("logits", self.name)
        z, y = calibration_voxels(train, self.params["max_voxels"], self.params["seed"])
        if y.min() == y.max():
            # the likelihood has no finite optimum (b or 1/T runs off to infinity)
            raise MethodError(f"method {self.name!r}: the calibration voxels hold only label "
                              f"{int(y[0])}; a full-batch fit needs both classes")
        result = minimise_bce(self.module, z, y)
        if not (math.isfinite(result.gradient) and math.isfinite(result.loss)):
            raise MethodError(f"method {self.name!r}: the full-batch fit diverged ({result})")
        self.full_batch_fit = result
        stop = ("converged" if result.converged
                else "max_iter" if result.iterations >= MAX_ITER else "stalled")
        return FitResult(best_val_loss=masked_bce(val, self._map_flat), best_epoch=0, epochs_run=0,
                         history=[], stop_reason=stop)

    @torch.no_grad()
    def _map_flat(self, z: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (float64) of flat base logits, for elementwise modules."""
        out = self.module(torch.from_numpy(np.asarray(z, dtype=np.float32)))
        return expit(out.double().numpy())

    @torch.no_grad()
    def calibrated_logits(self, logits: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
        """Apply the learned map to logits (X, Y, Z) -> calibrated logits (X, Y, Z), float32."""
        device = torch.device(device)
        self.module.to(device).eval()
        z = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)).to(device)
        with no_autocast(device):
            if self.slice_wise:
                out = self.module(z.permute(2, 0, 1)[:, None])[:, 0].permute(1, 2, 0)
            else:
                out = self.module(z[None, None])[0, 0]
        self.module.to("cpu")
        return out.float().cpu().numpy()

    def _predict_prob(self, subject: SubjectRef, device: torch.device) -> np.ndarray:
        return expit(self.calibrated_logits(subject.logits, device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(dict(state))
