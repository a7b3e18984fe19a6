"""Platt scaling (Platt 1999): a 1x1 convolution on the base logit, 2 weights, trained with CE.

``p = sigmoid(a * z + b)`` per voxel: logistic regression of the label on the cached base logit.
Fitted by maximum likelihood on the masked calibration voxels, full batch with L-BFGS by default
(``optimizer: lbfgs``: the likelihood optimum, to a gradient of 1e-9; :mod:`calib.methods.logit_based`)
or, as the paper, with mini-batch Adam on batches of 64 z-slices (``optimizer: adam``, lr 5e-3 and
the calibration schedule of calib.methods.recipes; the paper grid keeps this). Starts at the
identity ``a = 1, b = 0``.
"""

from __future__ import annotations

import torch
from torch import nn

from calib.methods.logit_based import LogitCalibrator


class PointwiseConv(nn.Module):
    """A 1x1 (``dims=2``) or 1x1x1 (``dims=3``) convolution with one input and one output channel,
    parameters shaped as ``nn.Conv2d(1, 1, 1)`` / ``nn.Conv3d(1, 1, 1)``, computed as the equal
    elementwise ``weight * z + bias``: on the CPU torch's convolution kernels take ~40x longer for
    a single channel. Starts at the identity.
    """

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones((1, 1) + (1,) * dims))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.weight.reshape(()) + self.bias.reshape(())


class PlattScaling(LogitCalibrator):
    """``p = sigmoid(a z + b)``; parameters: ``optimizer`` (``"lbfgs"``, or ``"adam"`` with the
    calibration schedule: lr 5e-3, 64 slices, ...), ``max_voxels`` and ``seed`` (the full-batch
    subsample)."""

    name = "platt"

    def build_module(self) -> nn.Module:
        return PointwiseConv()

    @property
    def weight_bias(self) -> tuple[float, float]:
        """The learned ``(a, b)``."""
        return float(self.module.weight.detach().reshape(())), float(self.module.bias.detach().reshape(()))

    def describe(self) -> dict[str, float | str]:
        """The fitted ``(a, b)`` and the optimizer that fitted them."""
        a, b = self.weight_bias
        return {"platt_a": a, "platt_b": b, "optimizer": self.params["optimizer"]}
