"""Average calibration error (ACE): the unweighted mean of the per-bin gaps.

``ACE = (1 / |B|) sum_{k in B} |acc_k - conf_k|`` over the non-empty bins B of the same equal-width
bins as :func:`calib.metrics.ece` (:mod:`calib.metrics.binning`). Unlike ECE, a bin counts the
same whatever its voxel count, so the few voxels of a lesion's confident bins weigh as much as
the background's millions (Neumann, Zisserman & Vedaldi 2018, "Relaxed softmax: efficient
confidence auto-calibration for safe pedestrian detection"; the metric the mL1-ACE loss of
Barfoot et al. 2024/2025 trains on, :func:`calib.losses.ace_loss`). A fraction; NaN for an
empty mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calib.metrics.binning import reliability_bins


def ace_from_bins(count: Any, conf_sum: Any, pos_sum: Any) -> float:
    """ACE from reliability bins (``count``, ``conf_sum``, ``pos_sum`` of length n_bins)."""
    count = np.asarray(count, dtype=np.float64)
    full = count > 0
    if not full.any():
        return float("nan")
    gaps = np.abs(np.asarray(pos_sum, np.float64)[full] - np.asarray(conf_sum, np.float64)[full])
    return float(np.mean(gaps / count[full]))


def average_calibration_error(probs: Any, labels: Any, mask: Any = None, n_bins: int = 20) -> float:
    """Foreground-class ACE of one volume inside ``mask`` (see module doc)."""
    return ace_from_bins(*reliability_bins(probs, labels, mask, n_bins))
