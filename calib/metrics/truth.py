"""Metrics against the known probability ``p*`` a phantom's labels were drawn from.

* :func:`true_ece`: the label-free **true ECE**, ``sum_k (n_k / N) |mean_k p - mean_k p*|`` over
  the same ``n_bins`` equal-width, left-closed bins of ``p`` as :func:`calib.metrics.ece` (p = 1 in
  the last bin, empty bins skipped, bin membership exact for float32 ``p``). It is the quantity the
  sampled-label ECE estimates (``E|p - E[p* | p]|`` at the binning's resolution): ECE replaces
  ``mean_k p*`` by the fraction of label-1 voxels of the bin, a noisy, upward-biased estimate of it.
* :func:`p_star_distance`: ``mean |p - p*|``, voxel by voxel, without bins. By Jensen it is >= the
  true ECE (``|mean_k (p - p*)| <= mean_k |p - p*|``), and it also counts sharpness: a calibrated
  but blurry model (``p = E[p* | p]`` with ``p*`` varying inside a level set of ``p``) has true ECE
  0 and a positive distance. It is not a calibration error.

Both are fractions and NaN for an empty mask; numpy arrays or torch tensors (a GPU tensor runs on
its GPU), as every metric of :mod:`calib.metrics`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from calib.metrics._inputs import (
    MetricInputError,
    check_probs_range,
    device_of,
    numpy_mask,
    numpy_probs,
    shape_of,
    torch_mask,
    torch_probs,
    use_torch,
)
from calib.metrics.binning import _check_n_bins, ece_from_bins


def _masked_pair(probs: Any, true_probs: Any, mask: Any):
    """(p, p*) of the voxels inside ``mask``, flat float64, numpy or torch (module doc)."""
    shape = shape_of(probs)
    if tuple(shape_of(true_probs)) != tuple(shape):
        raise MetricInputError(f"true_probs has shape {tuple(shape_of(true_probs))} but probs have "
                               f"shape {tuple(shape)}")
    if use_torch(probs, true_probs, mask):
        dev = device_of(probs, true_probs, mask)
        p, t = torch_probs(probs, dev).double(), torch_probs(true_probs, dev).double()
        m = torch_mask(mask, shape, dev)
        return (p, t) if m is None else (p[m], t[m])
    p, t = numpy_probs(probs), numpy_probs(true_probs)
    m = numpy_mask(mask, shape)
    if m is not None:
        p, t = p[m.view(bool)], t[m.view(bool)]
    for a in (p, t):
        if a.size:
            check_probs_range(float(a.min()), float(a.max()))
    # float32 -> float64 is exact, so floor(p * n_bins) below is the real-number bin rule
    return p.astype(np.float64), t.astype(np.float64)


def true_reliability_bins(probs: Any, true_probs: Any, mask: Any = None, n_bins: int = 20):
    """Per-bin ``(count, conf_sum, true_sum)`` of one volume inside ``mask``: the bins of
    :func:`calib.metrics.reliability_bins` with the sum of ``p*`` in place of the label-1 count.

    Args:
        probs: predicted foreground probabilities in [0, 1], any shape.
        true_probs: ``p*``, the probability the labels were drawn from, the same shape.
        mask: bool (or 0/1) array of the same shape; ``None`` = every voxel.
        n_bins: number of equal-width bins over [0, 1].

    Returns:
        numpy arrays of length ``n_bins``: ``count`` int64, ``conf_sum`` and ``true_sum`` float64.
        They add across subjects, and :func:`calib.metrics.ece_from_bins` of them is the true ECE.

    Raises:
        MetricInputError: shapes differ, or values outside [0, 1] or NaN.
    """
    n_bins = _check_n_bins(n_bins)
    p, t = _masked_pair(probs, true_probs, mask)
    if isinstance(p, torch.Tensor):
        idx = torch.floor(p * n_bins).long().clamp_(max=n_bins - 1)
        count = torch.bincount(idx, minlength=n_bins)
        conf = torch.bincount(idx, weights=p, minlength=n_bins)
        true = torch.bincount(idx, weights=t, minlength=n_bins)
        return (count.cpu().numpy().astype(np.int64), conf.cpu().numpy(), true.cpu().numpy())
    idx = np.minimum(np.floor(p * n_bins).astype(np.intp), n_bins - 1)
    return (np.bincount(idx, minlength=n_bins).astype(np.int64),
            np.bincount(idx, weights=p, minlength=n_bins),
            np.bincount(idx, weights=t, minlength=n_bins))


def true_ece(probs: Any, true_probs: Any, mask: Any = None, n_bins: int = 20) -> float:
    """True ECE of one volume: ``sum_k (n_k / N) |mean_k p - mean_k p*|`` over the non-empty
    equal-width bins of ``p`` inside ``mask`` (module doc). Needs no label. A fraction in [0, 1];
    NaN for an empty mask.
    """
    return ece_from_bins(*true_reliability_bins(probs, true_probs, mask, n_bins))


def p_star_distance(probs: Any, true_probs: Any, mask: Any = None) -> float:
    """Mean ``|p - p*|`` over ``mask``, where ``p*`` (``true_probs``, same shape, in [0, 1]) is
    the probability the labels were drawn from -- known for phantoms.

    By Jensen it is >= the true ECE (:func:`true_ece`), and it counts sharpness too (how well
    ``p`` resolves ``p*``), so a calibrated but blurry model scores above 0. A fraction; NaN for
    an empty mask.
    """
    p, t = _masked_pair(probs, true_probs, mask)
    if isinstance(p, torch.Tensor):
        return float((p - t).abs().mean()) if p.numel() else math.nan
    return float(np.abs(p - t).mean()) if p.size else math.nan
