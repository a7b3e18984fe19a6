"""Beta calibration (Kull, Silva Filho & Flach, "Beta calibration: a well-founded and easily
implemented improvement on logistic calibration for binary classifiers", AISTATS 2017).

What it fits: three scalars ``a, b, c`` of the map ``logit(q) = a ln p - b ln(1 - p) + c`` from the
base probability ``p = sigmoid(z)`` to the calibrated ``q``. It is Platt scaling on the two
features ``ln p`` and ``-ln(1 - p)``, so it can bend the map differently near 0 and near 1 (Platt
is the special case ``a = b``: ``a z + c``); ``a = b = 1, c = 0`` is the identity. The features are
computed from the logit as ``logsigmoid(z)`` and ``logsigmoid(-z)``, finite for any ``z``.

Fitted, like Platt scaling, with CE on the cached logits in batches of 64 z-slices with the
calibration schedule (:func:`calib.training.fit`), starting at the identity. ``a`` and ``b`` are
left unconstrained: the map is monotone when both are >= 0 (Kull et al. refit without a term whose
coefficient comes out negative; we report the learned values instead, see :meth:`describe`).

Can it change the 0.5-threshold segmentation? Yes: ``q = 0.5`` moves to wherever
``a ln p - b ln(1 - p) + c = 0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calib.methods.logit_based import CALIBRATION_SCHEDULE, LogitCalibrator


class BetaMap(nn.Module):
    """``z -> a * ln sigmoid(z) - b * ln sigmoid(-z) + c`` for logits of any shape; starts at the
    identity ``a = b = 1, c = 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(()))
        self.b = nn.Parameter(torch.ones(()))
        self.c = nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.a * F.logsigmoid(z) - self.b * F.logsigmoid(-z) + self.c


class BetaCalibration(LogitCalibrator):
    """``logit(q) = a ln p - b ln(1 - p) + c``; parameters: the calibration schedule."""

    name = "beta"
    DEFAULTS = dict(CALIBRATION_SCHEDULE)

    def build_module(self) -> nn.Module:
        return BetaMap()

    @property
    def abc(self) -> tuple[float, float, float]:
        """The learned ``(a, b, c)``."""
        m = self.module
        return float(m.a.detach()), float(m.b.detach()), float(m.c.detach())

    def describe(self) -> dict[str, float]:
        a, b, c = self.abc
        return {"beta_a": a, "beta_b": b, "beta_c": c}
