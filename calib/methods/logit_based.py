"""Shared machinery of the methods that learn a small map on the base logits (cached only).

Platt scaling, the auxiliary conv and temperature scaling never run the U-Net: they train on the
base stage's logit cache (:mod:`calib.logits`) in batches of 64 z-slices (or whole volumes for 3-D
kernels) and predict from the cached logits of the test subjects.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from calib.data.batches import SliceBatches, VolumeLogitBatches
from calib.losses import bce_loss
from calib.methods.base import CalibrationMethod, SubjectRef, SubjectSet, no_autocast
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
