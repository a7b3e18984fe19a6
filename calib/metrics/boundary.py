"""ECE restricted to a band around a segmentation boundary, where aleatoric uncertainty lives.

The band around a binary volume holds every voxel within ``w`` voxels (26-neighbourhood, i.e. a
(2w+1)^3 cube) of a voxel of the other class: ``dilate(seg, w) & ~erode(seg, w)``. The volume's
edge is not a boundary (erosion treats the outside as foreground, dilation as background). Numpy
inputs use ``scipy.ndimage``; tensors on a GPU use ``max_pool3d`` on that device -- the two agree
exactly.

Which boundary (``band`` of :func:`boundary_ece`):

* ``"prediction"`` (default): the prediction's 0.5 surface, ``seg = probs > 0.5`` (as Dice). The
  band is a function of ``p`` alone, so for a calibrated model (labels drawn from ``p``) the
  labels inside it are still drawn from ``p`` and its ECE estimates 0.
* ``"label"``: the label's boundary (the earlier definition). The band then depends on the labels
  it scores: it leaves out the voxels whose whole neighbourhood is background (all labelled 0)
  or foreground (all labelled 1), so even a perfectly calibrated model scores above 0 there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import torch.nn.functional as F

from calib.metrics._inputs import MetricInputError, device_of, to_numpy, to_torch, use_torch
from calib.metrics.binning import ece

#: Boundaries a band can follow (module doc); the first is the default.
BANDS = ("prediction", "label")


def _volume(name: str, a: Any):
    """Drop leading size-1 axes until the array is 3-D (X, Y, Z)."""
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise MetricInputError(f"{name} must be one 3-D volume (X, Y, Z), got shape {tuple(a.shape)}")
    return a


def _band_voxels(band_voxels: int, band_mm: float | None, spacing_mm: float) -> int:
    if band_mm is not None:
        if not (band_mm > 0 and spacing_mm > 0):
            raise MetricInputError(f"band_mm and spacing_mm must be positive, got {band_mm!r}, {spacing_mm!r}")
        return max(1, math.ceil(band_mm / spacing_mm - 1e-9))
    if isinstance(band_voxels, bool) or not isinstance(band_voxels, (int, np.integer)) or band_voxels < 1:
        raise MetricInputError(f"band_voxels must be a positive integer, got {band_voxels!r}")
    return int(band_voxels)


def boundary_band(labels: Any, band_voxels: int = 2):
    """Bool volume of the voxels within ``band_voxels`` of the boundary of a binary volume (see
    module doc).

    ``labels``: binary (X, Y, Z) volume (a label, or a thresholded prediction; leading size-1 axes
    allowed); returns the same kind of array (numpy, or torch on the input's device). An empty or
    full volume gives an empty band.
    """
    w = _band_voxels(band_voxels, None, 1.0)
    if use_torch(labels):
        lab = _volume("labels", to_torch(labels, device_of(labels)) != 0).float()[None, None]
        k = 2 * w + 1
        dil = F.max_pool3d(lab, k, stride=1, padding=w) > 0
        # max_pool pads with -inf, so outside voxels never count as background: border = foreground
        ero = ~(F.max_pool3d(1 - lab, k, stride=1, padding=w) > 0)
        return (dil & ~ero)[0, 0]
    lab = _volume("labels", to_numpy(labels) != 0)
    cube = np.ones((3, 3, 3), bool)
    dil = ndi.binary_dilation(lab, structure=cube, iterations=w)
    ero = ndi.binary_erosion(lab, structure=cube, iterations=w, border_value=1)
    return dil & ~ero


def boundary_ece(probs: Any, labels: Any, mask: Any = None, band_voxels: int = 2,
                 band_mm: float | None = None, spacing_mm: float = 2.0, n_bins: int = 20,
                 band: str = "prediction") -> float:
    """:func:`calib.metrics.ece` over the voxels of ``mask`` within the boundary band.

    ``band``: ``"prediction"`` (default) follows the prediction's 0.5 surface (``probs > 0.5``),
    which does not depend on the labels; ``"label"`` follows the label boundary, which does and so
    scores a calibrated model above 0 (module doc). The band is ``band_voxels`` wide, or
    ``ceil(band_mm / spacing_mm)`` voxels when ``band_mm`` is given (the preprocessed data are
    2 mm isotropic). NaN when the band inside the mask is empty (e.g. nothing predicted, or no
    lesion with ``band="label"``).
    """
    if band not in BANDS:
        raise MetricInputError(f"unknown boundary band {band!r}; valid choices: {', '.join(BANDS)}")
    w = _band_voxels(band_voxels, band_mm, spacing_mm)
    gpu = use_torch(probs, labels, mask)
    if gpu:
        dev = device_of(probs, labels, mask)
        p = _volume("probs", to_torch(probs, dev))
        lab = _volume("labels", to_torch(labels, dev))
    else:
        p = _volume("probs", to_numpy(probs))
        lab = _volume("labels", to_numpy(labels))
    if tuple(lab.shape) != tuple(p.shape):
        raise MetricInputError(f"labels have shape {tuple(lab.shape)} but probs {tuple(p.shape)}")
    sel = boundary_band(p > 0.5 if band == "prediction" else lab, w)
    if mask is not None:
        m = _volume("mask", (to_torch(mask, dev) if gpu else to_numpy(mask)) != 0)
        if tuple(m.shape) != tuple(sel.shape):
            raise MetricInputError(f"mask has shape {tuple(m.shape)} but probs {tuple(sel.shape)}")
        sel = sel & m
    return ece(p, lab, sel, n_bins)
