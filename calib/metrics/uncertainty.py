"""How well a voxel-wise uncertainty points at the segmentation's errors.

The error map is ``E = (p > 0.5) != label`` inside the mask (the prediction of :func:`dice`).

* :func:`uncertainty_error_overlap` (Jungo et al., "Analyzing the quality and challenges of
  uncertainty estimations for brain tumor segmentation", Frontiers in Neuroscience 2020, the
  "U-E overlap"): Dice between the thresholded uncertainty map ``U = u > threshold`` and ``E``.
  Default uncertainty: the normalised binary entropy ``u = H(p) / ln 2`` in [0, 1] (Jungo et al.'s
  uncertainty for softmax outputs), default threshold 0.5 -- ``H(p) / ln 2 > 0.5`` is
  ``min(p, 1 - p) > 0.110``. Jungo et al. evaluate 11 thresholds (0.05 ... 0.95) of a min-max
  rescaled map and report the best one per method on the test set; we fix one threshold instead,
  so that nothing is chosen on the data being scored. Another map (the standard deviation of MC
  dropout or test-time flips) can be passed as ``uncertainty`` with its own threshold.
* :func:`error_detection_auroc`: area under the ROC curve of separating error voxels from
  correct ones by the uncertainty (default ``u = min(p, 1 - p)``, the distance of the probability
  from the nearest class), ties counted one half (the Mann-Whitney statistic, as
  ``sklearn.metrics.roc_auc_score``).

NaN rules: the overlap is 1.0 when both ``U`` and ``E`` are empty (nothing uncertain, nothing
wrong; Jungo et al.'s convention, as :func:`dice` for an empty mask); the AUROC is NaN when the
mask holds no error or no correct voxel (a ROC curve needs both).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.special import entr

from calib.metrics._inputs import (
    MetricInputError,
    device_of,
    numpy_mask,
    shape_of,
    to_numpy,
    to_torch,
    torch_mask,
    use_torch,
)
from calib.metrics.scores import _prepare

#: Default threshold of the normalised entropy in :func:`uncertainty_error_overlap`.
UEO_THRESHOLD = 0.5


def _uncertainty_values(uncertainty: Any, probs: Any, labels: Any, mask: Any, torch_path: bool):
    """The given uncertainty map inside the mask, float64 flat (numpy or torch)."""
    shape = shape_of(probs)
    if tuple(shape_of(uncertainty)) != tuple(shape):
        raise MetricInputError(f"uncertainty has shape {tuple(shape_of(uncertainty))} but probs "
                               f"have shape {tuple(shape)}")
    if torch_path:
        dev = device_of(probs, labels, mask)
        u = to_torch(uncertainty, dev).reshape(-1).double()
        m = torch_mask(mask, shape, dev)
        u = u if m is None else u[m]
        finite = bool(torch.isfinite(u).all()) if u.numel() else True
    else:
        u = to_numpy(uncertainty).reshape(-1).astype(np.float64)
        m = numpy_mask(mask, shape)
        u = u if m is None else u[m.view(bool)]
        finite = bool(np.isfinite(u).all())
    if not finite:
        raise MetricInputError("uncertainty must be finite")
    return u


def _errors(p, y):
    return (p > 0.5) != (y > 0.5)


def normalised_entropy(p):
    """``H(p) / ln 2`` of binary probabilities (numpy or torch), in [0, 1]; ``0 ln 0 = 0``."""
    if isinstance(p, torch.Tensor):
        return (torch.special.entr(p) + torch.special.entr(1 - p)) / math.log(2)
    return (entr(p) + entr(1 - p)) / math.log(2)


def uncertainty_error_overlap(probs: Any, labels: Any, mask: Any = None, uncertainty: Any = None,
                              threshold: float = UEO_THRESHOLD) -> float:
    """Dice between ``uncertainty > threshold`` and the error map, inside ``mask`` (module doc).

    Args:
        probs: foreground probabilities in [0, 1] (numpy or torch, any device, any shape).
        labels: binary labels of the same shape; mask: bool, or None for every voxel.
        uncertainty: a map of the same shape, or None for the normalised entropy of ``probs``.
        threshold: voxels with uncertainty strictly above it are "uncertain".

    Returns:
        ``2 |U & E| / (|U| + |E|)`` in [0, 1]; 1.0 when both are empty.
    """
    torch_path = use_torch(probs, labels, mask)  # the backend _prepare picks
    p, y = _prepare(probs, labels, mask)
    u = normalised_entropy(p) if uncertainty is None else \
        _uncertainty_values(uncertainty, probs, labels, mask, torch_path)
    err = _errors(p, y)
    unc = u > threshold
    inter = float((err & unc).sum())
    total = float(err.sum()) + float(unc.sum())
    return 1.0 if total == 0 else 2.0 * inter / total


def _auroc(score, positive) -> float:
    """Mann-Whitney AUROC of ``positive`` (bool) by ``score`` (float64), ties one half."""
    if isinstance(score, torch.Tensor):
        uniq, inv = torch.unique(score, sorted=True, return_inverse=True)
        n_pos = torch.bincount(inv, weights=positive.double(), minlength=uniq.numel())
        n_all = torch.bincount(inv, minlength=uniq.numel()).double()
        n_neg = n_all - n_pos
        neg_below = torch.cumsum(n_neg, 0) - n_neg
        pos_total, neg_total = float(n_pos.sum()), float(n_neg.sum())
        wins = float((n_pos * (neg_below + 0.5 * n_neg)).sum())
    else:
        uniq, inv = np.unique(score, return_inverse=True)
        n_pos = np.bincount(inv, weights=positive.astype(np.float64), minlength=uniq.size)
        n_neg = np.bincount(inv, minlength=uniq.size) - n_pos
        neg_below = np.cumsum(n_neg) - n_neg
        pos_total, neg_total = float(n_pos.sum()), float(n_neg.sum())
        wins = float((n_pos * (neg_below + 0.5 * n_neg)).sum())
    if pos_total == 0 or neg_total == 0:
        return math.nan
    return wins / (pos_total * neg_total)


def error_detection_auroc(probs: Any, labels: Any, mask: Any = None, uncertainty: Any = None) -> float:
    """AUROC of detecting the error voxels by their uncertainty, inside ``mask`` (module doc).

    ``uncertainty``: a map of the same shape as ``probs``, or None for ``min(p, 1 - p)``. 0.5 is
    chance, 1.0 means every error is more uncertain than every correct voxel. NaN when the mask
    holds no error or no correct voxel (or nothing at all).
    """
    torch_path = use_torch(probs, labels, mask)  # the backend _prepare picks
    p, y = _prepare(probs, labels, mask)
    if uncertainty is None:
        u = torch.minimum(p, 1 - p) if isinstance(p, torch.Tensor) else np.minimum(p, 1 - p)
    else:
        u = _uncertainty_values(uncertainty, probs, labels, mask, torch_path)
    return _auroc(u, _errors(p, y))
