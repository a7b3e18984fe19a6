"""Adaptive (equal-mass) ECE: the bins hold equal numbers of voxels instead of equal widths.

Reference: Nixon et al., "Measuring calibration in deep learning", CVPR Workshops 2019 (adaptive
calibration error); Mukhoti et al., "Calibrating deep neural networks using focal loss", NeurIPS
2020 (AdaECE). Equal-width bins put almost every voxel of a segmentation in the first bin (the
background), where the positive-class ECE then measures little else; equal-mass bins spread the
resolution over where the voxels are.

Binning rule: the N voxels inside the mask, sorted by p; bin edges are the values at ranks
``floor(k N / n_bins)``, k = 1..n_bins-1; a voxel's bin is the number of edges <= p (bins are
left-closed, as in :func:`calib.metrics.ece`). Without ties bin k holds exactly the ranks
``[floor(k N / n), floor((k+1) N / n))``. Voxels with equal p always share a bin: a tie group that
straddles a rank edge goes whole into the upper bin, so bins may hold unequal counts or none
(empty bins are skipped). ``ECE = sum_k (n_k / N) |acc_k - conf_k|`` as for the fixed bins.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from calib.metrics.binning import _check_n_bins, ece_from_bins
from calib.metrics.scores import _prepare


def _equal_mass_sums(ps, ys, n_bins: int):
    """(count, conf_sum, pos_sum) of the equal-mass bins of sorted ``ps`` with labels ``ys``
    (numpy or torch, float64, flat, N >= 1); numpy arrays of length n_bins."""
    n = ps.shape[0]
    if isinstance(ps, torch.Tensor):
        ranks = torch.arange(1, n_bins, device=ps.device) * n // n_bins
        starts = torch.searchsorted(ps, ps[ranks], right=False)
        zero = torch.zeros(1, dtype=ps.dtype, device=ps.device)
        cp = torch.cat([zero, torch.cumsum(ps, 0)])
        cy = torch.cat([zero, torch.cumsum(ys, 0)])
        bounds = torch.cat([torch.zeros(1, dtype=starts.dtype, device=ps.device), starts,
                            torch.full((1,), n, dtype=starts.dtype, device=ps.device)])
        lo, hi = bounds[:-1], bounds[1:]
        return ((hi - lo).cpu().numpy().astype(np.int64), (cp[hi] - cp[lo]).cpu().numpy(),
                (cy[hi] - cy[lo]).cpu().numpy())
    ranks = np.arange(1, n_bins) * n // n_bins
    starts = np.searchsorted(ps, ps[ranks], side="left")
    bounds = np.concatenate([[0], starts, [n]])
    cp = np.concatenate([[0.0], np.cumsum(ps)])
    cy = np.concatenate([[0.0], np.cumsum(ys)])
    lo, hi = bounds[:-1], bounds[1:]
    return (hi - lo).astype(np.int64), cp[hi] - cp[lo], cy[hi] - cy[lo]


def adaptive_bins(probs: Any, labels: Any, mask: Any = None, n_bins: int = 20):
    """Per-bin ``(count, conf_sum, pos_sum)`` of the equal-mass bins of one volume (module doc).

    Inputs as :func:`calib.metrics.reliability_bins` (numpy arrays or torch tensors on any device;
    a GPU tensor is sorted on its GPU). Returns numpy arrays of length ``n_bins`` (empty bins have
    count 0); all zeros for an empty mask. Unlike the fixed bins they do not add across subjects
    (every volume has its own edges).
    """
    n_bins = _check_n_bins(n_bins)
    p, y = _prepare(probs, labels, mask)
    if isinstance(p, torch.Tensor):
        if p.numel() == 0:
            return np.zeros(n_bins, np.int64), np.zeros(n_bins), np.zeros(n_bins)
        ps, order = torch.sort(p)
        return _equal_mass_sums(ps, y[order], n_bins)
    if p.size == 0:
        return np.zeros(n_bins, np.int64), np.zeros(n_bins), np.zeros(n_bins)
    order = np.argsort(p, kind="stable")
    return _equal_mass_sums(p[order], y[order], n_bins)


def adaptive_ece(probs: Any, labels: Any, mask: Any = None, n_bins: int = 20) -> float:
    """Equal-mass ECE of one volume inside ``mask`` (module doc), a fraction; NaN for an empty mask.

    Args:
        probs: foreground probabilities in [0, 1] (numpy or torch, any device, any shape).
        labels: binary labels of the same shape; mask: bool, or None for every voxel.
        n_bins: number of equal-mass bins (20, as the fixed-width ECE).
    """
    return ece_from_bins(*adaptive_bins(probs, labels, mask, n_bins))
