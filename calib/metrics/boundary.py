"""ECE restricted to a band around the label boundary, where aleatoric uncertainty lives.

The band holds every voxel within ``w`` voxels (26-neighbourhood, i.e. a (2w+1)^3 cube) of a voxel
of the other class: ``dilate(label, w) & ~erode(label, w)``. The volume's edge is not a boundary
(erosion treats the outside as foreground, dilation as background). Numpy inputs use
``scipy.ndimage``; tensors on a GPU use ``max_pool3d`` on that device -- the two agree exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import torch.nn.functional as F

from calib.metrics._inputs import MetricInputError, device_of, to_numpy, to_torch, use_torch
from calib.metrics.binning import ece


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
    """Bool volume of the voxels within ``band_voxels`` of the label boundary (see module doc).

    ``labels``: binary (X, Y, Z) volume (leading size-1 axes allowed); returns the same kind of
    array (numpy, or torch on the labels' device). An empty or full label gives an empty band.
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
                 band_mm: float | None = None, spacing_mm: float = 2.0, n_bins: int = 20) -> float:
    """:func:`calib.metrics.ece` over the voxels of ``mask`` within the boundary band.

    The band is ``band_voxels`` wide, or ``ceil(band_mm / spacing_mm)`` voxels when ``band_mm``
    is given (the preprocessed data are 2 mm isotropic). NaN when the band inside the mask is
    empty (e.g. a subject without lesion).
    """
    w = _band_voxels(band_voxels, band_mm, spacing_mm)
    band = boundary_band(labels, w)
    if mask is not None:
        if use_torch(probs, labels, mask):
            m = _volume("mask", to_torch(mask, band.device) != 0)
        else:
            m = _volume("mask", to_numpy(mask) != 0)
        if tuple(m.shape) != tuple(band.shape):
            raise MetricInputError(f"mask has shape {tuple(m.shape)} but labels {tuple(band.shape)}")
        band = band & m
    if use_torch(probs, labels, mask):
        dev = device_of(probs, labels, mask)
        p = _volume("probs", to_torch(probs, dev))
        lab = _volume("labels", to_torch(labels, dev))
        band = band.to(dev)
    else:
        p = _volume("probs", to_numpy(probs))
        lab = _volume("labels", to_numpy(labels))
    return ece(p, lab, band, n_bins)
