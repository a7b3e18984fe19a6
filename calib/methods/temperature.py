"""Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017).

One scalar ``T > 0``: ``p = sigmoid(z / T)``. The standard post hoc baseline that the paper does not
include. ``T`` is parametrised as ``exp(log_t)`` so that it stays positive under either optimizer;
it is fitted by maximum likelihood (CE) on the cached logits of the masked calibration voxels,
full batch with L-BFGS by default (``optimizer: lbfgs``, to a gradient of 1e-9;
:mod:`calib.methods.logit_based`) or with Platt scaling's mini-batch Adam schedule
(``optimizer: adam``). Starts at ``T = 1``. On logits exactly ``3 logit(p*)`` with labels drawn
from ``p*`` (368,640 voxels), L-BFGS recovers ``T = 3.000``; Adam at 5e-3 on 64-slice batches,
3 steps an epoch there, was still climbing at 1.82 when its 50 epochs ran out.
"""

from __future__ import annotations

import torch
from torch import nn

from calib.methods.logit_based import LogitCalibrator


class Temperature(nn.Module):
    """``z -> z / exp(log_t)`` for logits of any shape."""

    def __init__(self) -> None:
        super().__init__()
        self.log_t = nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.exp(-self.log_t)


class TemperatureScaling(LogitCalibrator):
    """``p = sigmoid(z / T)``; parameters: ``optimizer`` (``"lbfgs"``, or ``"adam"`` with the
    calibration schedule: lr, batch_size, epochs, patience), ``max_voxels`` and ``seed`` (the
    full-batch subsample)."""

    name = "temperature"

    def build_module(self) -> nn.Module:
        return Temperature()

    @property
    def temperature(self) -> float:
        return float(torch.exp(self.module.log_t.detach()))

    def describe(self) -> dict[str, float | str]:
        """The fitted ``T`` and the optimizer that fitted it."""
        return {"temperature": self.temperature, "optimizer": self.params["optimizer"]}
