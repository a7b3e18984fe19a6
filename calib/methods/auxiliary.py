"""Auxiliary conv (Rousseau et al. 2021): one convolution of kernel k on the base logit.

A generalised Platt scaling in which neighbouring voxels' logits shift a voxel's calibration.
As the paper: a 2-D ``k x k`` conv on z-slices, trained with CE on batches of 64 cached slices,
``k = 5`` by default (the paper also tried 7, 9 and 11; ``k = 1``, Platt scaling, is allowed).
``dims=3`` swaps in a ``k x k x k`` conv trained on whole cached volumes (batches of 2 volumes).

Edges are padded by replicating the border logit (our choice; Keras' 'same' convolution pads
zeros): zero padding would mean a logit of 0 (p = 0.5) beyond the volume, which the calibrator
would have to learn around; the volume border lies outside the brain mask in practice. The kernel
starts as the identity (centre tap 1, others 0, bias 0).
"""

from __future__ import annotations

import torch
from torch import nn

from calib.methods.logit_based import LogitCalibrator
from calib.methods.platt import PointwiseConv


class AuxiliaryConv(LogitCalibrator):
    """One conv on the logits; parameters ``k`` (5), ``dims`` (2) and the calibration schedule.

    ``batch_size`` defaults to 64 slices for ``dims=2`` and 2 volumes for ``dims=3``.
    """

    name = "auxiliary"

    @property
    def slice_wise(self) -> bool:
        return self.params["dims"] == 2

    def build_module(self) -> nn.Module:
        k, dims = self.params["k"], self.params["dims"]
        if k == 1:
            return PointwiseConv(dims)  # Platt scaling; same parameters, far faster than a conv
        conv_cls = nn.Conv2d if dims == 2 else nn.Conv3d
        conv = conv_cls(1, 1, kernel_size=k, padding=k // 2, padding_mode="replicate")
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[(0, 0) + (k // 2,) * dims] = 1.0
            conv.bias.zero_()
        return conv

    def describe(self) -> dict[str, float]:
        w = self.module.weight.detach()
        k, dims = self.params["k"], self.params["dims"]
        return {"aux_centre_weight": float(w[(0, 0) + (k // 2,) * dims]),
                "aux_weight_sum": float(w.sum()), "aux_bias": float(self.module.bias.detach()[0])}
