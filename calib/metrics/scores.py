"""Dice, Brier score and negative log-likelihood of one volume, inside a mask."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from calib.metrics._inputs import (
    check_probs_range,
    device_of,
    numpy_binary,
    numpy_mask,
    numpy_probs,
    shape_of,
    torch_binary,
    torch_mask,
    torch_probs,
    use_torch,
)

#: Probabilities are clipped to [NLL_EPS, 1 - NLL_EPS] in :func:`nll` (Keras' epsilon, as the
#: paper's Keras code clips its cross-entropy).
NLL_EPS = 1e-7


def _prepare(probs, labels, mask):
    """(p float64, y float64) of the voxels inside the mask, numpy or torch."""
    shape = shape_of(probs)
    if use_torch(probs, labels, mask):
        dev = device_of(probs, labels, mask)
        p = torch_probs(probs, dev).double()
        y = torch_binary("labels", labels, shape, dev).double()
        m = torch_mask(mask, shape, dev)
        return (p, y) if m is None else (p[m], y[m])
    p = numpy_probs(probs)
    y = numpy_binary("labels", labels, shape)
    m = numpy_mask(mask, shape)
    if m is not None:
        p, y = p[m.view(bool)], y[m.view(bool)]
    if p.size:
        check_probs_range(float(p.min()), float(p.max()))
    return p.astype(np.float64), y.astype(np.float64)


def dice(probs: Any, labels: Any, mask: Any = None) -> float:
    """Dice of the prediction ``probs > 0.5`` against ``labels`` inside ``mask``.

    ``p = 0.5`` counts as background, as ``np.round`` in the paper's code. When both the
    prediction and the label are empty the Dice is 1.0 (perfect agreement; the paper's code gets
    the same from its 1e-7 smoothing). An empty mask is the empty-empty case: 1.0.
    """
    p, y = _prepare(probs, labels, mask)
    pred = p > 0.5
    lab = y > 0.5
    inter = float((pred & lab).sum())
    total = float(pred.sum()) + float(lab.sum())
    return 1.0 if total == 0 else 2.0 * inter / total


def brier(probs: Any, labels: Any, mask: Any = None) -> float:
    """Mean squared error ``mean (p - y)^2`` over the voxels in ``mask``; NaN for an empty mask."""
    p, y = _prepare(probs, labels, mask)
    if p.numel() if isinstance(p, torch.Tensor) else p.size:
        return float(((p - y) ** 2).mean())
    return math.nan


def nll(probs: Any, labels: Any, mask: Any = None, eps: float = NLL_EPS) -> float:
    """Mean binary negative log-likelihood (nats) over ``mask``; p clipped to [eps, 1 - eps].

    NaN for an empty mask.
    """
    p, y = _prepare(probs, labels, mask)
    if isinstance(p, torch.Tensor):
        if not p.numel():
            return math.nan
        p = p.clamp(eps, 1 - eps)
        return float(-(y * torch.log(p) + (1 - y) * torch.log1p(-p)).mean())
    if not p.size:
        return math.nan
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
