"""Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017).

One scalar ``T > 0``: ``p = sigmoid(z / T)``. The standard post hoc baseline that the paper does not
include. ``T`` is parametrised as ``exp(log_t)`` so that it stays positive under Adam; it is fitted
with CE on cached logits with the same schedule as Platt scaling. Starts at ``T = 1``.
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
    """``p = sigmoid(z / T)``; parameters: the calibration schedule."""

    name = "temperature"

    def build_module(self) -> nn.Module:
        return Temperature()

    @property
    def temperature(self) -> float:
        return float(torch.exp(self.module.log_t.detach()))

    def describe(self) -> dict[str, float]:
        return {"temperature": self.temperature}
