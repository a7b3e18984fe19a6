"""Reliability bins and the binned calibration errors (ECE, MCE, top-label ECE).

Binning rule (the paper's public code, ``fast_ece`` in ``my_utils/metrics.py``): ``n_bins`` equal
bins over [0, 1], left-closed ``[k/n, (k+1)/n)``, with p = 1 in the last bin. A voxel's bin is
``floor(p * n_bins)`` evaluated in float64 (then p = 1 folded into bin n-1). For float32 (and
float16) probabilities this product is *exact* (a 24-bit mantissa times n < 2**29 fits in 53
bits), so bin membership is the real-number rule ``p >= k/n`` with no float32 drift at the
edges: ``np.float32(0.15)`` (= 0.150000006) is in bin 3, ``np.float32(0.95)`` (= 0.949999988) in
bin 18. For float64 inputs the product is correctly rounded, which puts the decimal literals
k/20 (0.05, 0.1, ..., 0.95) in the bin they open.

Per bin we keep ``count`` (voxels), ``conf_sum`` (sum of p) and ``pos_sum`` (foreground voxels).
These add across subjects, so a pooled ECE is ``ece_from_bins(sum of counts, ...)``.
``ECE = sum_k (n_k / N) |acc_k - conf_k|`` over non-empty bins (empty bins skipped),
``acc_k = pos_sum_k / n_k``, ``conf_k = conf_sum_k / n_k``, N = voxels in the mask.
An empty mask (N = 0) gives NaN for every metric here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from calib.metrics._inputs import (
    MetricInputError,
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

#: Voxels per numpy chunk: the temporaries of one chunk stay in the CPU cache, which makes the
#: binning several times faster than whole-array passes (see bench/metrics.py).
CHUNK = 1 << 16


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise MetricInputError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def _bins_numpy(p: np.ndarray, y: np.ndarray, m: np.ndarray | None, n_bins: int):
    """Chunked binning; ``p`` float32/64, ``y`` uint8 {0,1}, ``m`` uint8 {0,1} or None (flat)."""
    width = n_bins + 1  # slot n_bins holds p == 1 until it is folded into the last bin
    # rows of the (rows, width) table: code = y (+ 2 * m); with a mask only codes 2, 3 count
    rows = 2 if m is None else 4
    count = np.zeros(rows * width, np.int64)
    conf = np.zeros(rows * width, np.float64)
    f64 = np.empty(CHUNK, np.float64)
    key = np.empty(CHUNK, np.intp)
    off = np.empty(CHUNK, np.intp)
    code = np.empty(CHUNK, np.uint8)
    scale = np.float64(n_bins)
    for start in range(0, p.size, CHUNK):
        pc = p[start:start + CHUNK]
        L = pc.size
        check_probs_range(float(pc.min()), float(pc.max()))
        np.multiply(pc, scale, out=f64[:L])           # exact for float32 input
        np.copyto(key[:L], f64[:L], casting="unsafe")  # truncation == floor since p >= 0
        yc = y[start:start + CHUNK]
        if m is None:
            np.multiply(yc, width, out=off[:L])
        else:
            np.left_shift(m[start:start + CHUNK], 1, out=code[:L])
            np.add(code[:L], yc, out=code[:L])
            np.multiply(code[:L], width, out=off[:L])
        np.add(key[:L], off[:L], out=key[:L])
        count += np.bincount(key[:L], minlength=rows * width)
        conf += np.bincount(key[:L], weights=pc, minlength=rows * width)
    count = count.reshape(rows, width)[rows - 2:]
    conf = conf.reshape(rows, width)[rows - 2:]
    cnt = count[0] + count[1]
    pos = count[1].copy()
    csum = conf[0] + conf[1]
    return _fold_top(cnt, n_bins), _fold_top(csum, n_bins), _fold_top(pos, n_bins)


def _fold_top(a: np.ndarray, n_bins: int) -> np.ndarray:
    out = a[:n_bins].copy()
    out[n_bins - 1] += a[n_bins]
    return out


def _bins_torch(p: torch.Tensor, y: torch.Tensor, m: torch.Tensor | None, n_bins: int):
    """Same rule on any torch device (p float32/64, y bool, m bool or None; flat)."""
    if m is not None:
        p, y = p[m], y[m]
    idx = torch.floor(p.double() * n_bins).long().clamp_(max=n_bins - 1)
    both = torch.bincount(idx * 2 + y.long(), minlength=2 * n_bins).view(n_bins, 2)
    conf = torch.bincount(idx, weights=p.double(), minlength=n_bins)
    return (both.sum(1).cpu().numpy().astype(np.int64), conf.cpu().numpy(),
            both[:, 1].cpu().numpy().astype(np.int64))


def reliability_bins(probs: Any, labels: Any, mask: Any = None, n_bins: int = 20):
    """Per-bin ``(count, conf_sum, pos_sum)`` of one volume, inside ``mask``.

    Args:
        probs: foreground probabilities in [0, 1], any shape (numpy array or torch tensor on any
            device; float16/bfloat16/float32/float64).
        labels: binary labels (bool, integer or float 0/1) of the same shape (size-1 axes may
            differ).
        mask: bool (or 0/1) array of the same shape; ``None`` = every voxel.
        n_bins: number of equal bins over [0, 1].

    Returns:
        numpy arrays of length ``n_bins``: ``count`` int64, ``conf_sum`` float64, ``pos_sum``
        int64. They add across subjects (see :func:`ece_from_bins`).

    Raises:
        MetricInputError: shapes differ, probabilities outside [0, 1] or NaN, non-binary labels.
    """
    n_bins = _check_n_bins(n_bins)
    shape = shape_of(probs)
    if use_torch(probs, labels, mask):
        dev = device_of(probs, labels, mask)
        return _bins_torch(torch_probs(probs, dev), torch_binary("labels", labels, shape, dev),
                           torch_mask(mask, shape, dev), n_bins)
    return _bins_numpy(numpy_probs(probs), numpy_binary("labels", labels, shape),
                       numpy_mask(mask, shape), n_bins)


def _per_bin(count, conf_sum, pos_sum):
    count = np.asarray(count, dtype=np.float64)
    conf_sum = np.asarray(conf_sum, dtype=np.float64)
    pos_sum = np.asarray(pos_sum, dtype=np.float64)
    if not (count.shape == conf_sum.shape == pos_sum.shape) or count.ndim != 1:
        raise MetricInputError("count, conf_sum and pos_sum must be 1-D arrays of one length; got shapes "
                               f"{count.shape}, {conf_sum.shape}, {pos_sum.shape}")
    nz = count > 0  # empty bins are skipped
    return count[nz], pos_sum[nz] / count[nz], conf_sum[nz] / count[nz]


def ece_from_bins(count, conf_sum, pos_sum) -> float:
    """ECE from reliability bins: ``sum_k (n_k/N) |acc_k - conf_k|``; NaN when N = 0.

    Pool subjects by summing their bins first (e.g. ``bins.groupby("bin").sum()``).
    """
    n, acc, conf = _per_bin(count, conf_sum, pos_sum)
    if n.size == 0:
        return float("nan")
    return float(np.sum(n / n.sum() * np.abs(acc - conf)))


def mce_from_bins(count, conf_sum, pos_sum) -> float:
    """Maximum calibration error ``max_k |acc_k - conf_k|`` over non-empty bins; NaN when N = 0."""
    _, acc, conf = _per_bin(count, conf_sum, pos_sum)
    return float(np.max(np.abs(acc - conf))) if acc.size else float("nan")


def ece(probs: Any, labels: Any, mask: Any = None, n_bins: int = 20) -> float:
    """Expected calibration error of one volume, as the paper's code (see module doc).

    A fraction in [0, 1] (tables show %). NaN for an empty mask.
    """
    return ece_from_bins(*reliability_bins(probs, labels, mask, n_bins))


def mce(probs: Any, labels: Any, mask: Any = None, n_bins: int = 20) -> float:
    """Maximum calibration error of one volume over the same bins as :func:`ece`."""
    return mce_from_bins(*reliability_bins(probs, labels, mask, n_bins))


def top_label_ece(probs: Any, labels: Any, mask: Any = None, n_bins: int = 20) -> float:
    """ECE of the predicted class (Guo et al. 2017) instead of the foreground class.

    Prediction ``p > 0.5`` (as Dice), confidence ``max(p, 1 - p)`` (p = 0.5 -> background with
    confidence 0.5), accuracy = fraction of correct predictions; the same ``n_bins`` bins over
    [0, 1] (so only the upper half is populated). NaN for an empty mask.
    """
    n_bins = _check_n_bins(n_bins)
    shape = shape_of(probs)
    if use_torch(probs, labels, mask):
        dev = device_of(probs, labels, mask)
        p = torch_probs(probs, dev)
        y = torch_binary("labels", labels, shape, dev)
        pred = p > 0.5
        conf = torch.where(pred, p, 1 - p)  # 1 - p is exact for p >= 0.5 (Sterbenz)
        return ece_from_bins(*_bins_torch(conf, pred == y, torch_mask(mask, shape, dev), n_bins))
    p = numpy_probs(probs)
    y = numpy_binary("labels", labels, shape)
    if p.size:
        check_probs_range(float(p.min()), float(p.max()))
    pred = p > 0.5
    conf = np.where(pred, p, 1 - p)
    correct = (pred == y.view(bool)).view(np.uint8)
    return ece_from_bins(*_bins_numpy(conf, correct, numpy_mask(mask, shape), n_bins))


def classwise_ece(probs: Any, labels: Any, mask: Any = None, n_bins: int = 20) -> float:
    """Class-wise ECE over both classes (Kull et al., "Beyond temperature scaling: obtaining
    well-calibrated multiclass probabilities with Dirichlet calibration", NeurIPS 2019).

    The mean of the foreground ECE (:func:`ece`) and the background ECE -- confidence ``1 - p``,
    accuracy = fraction of background labels, the same ``n_bins`` left-closed bins over ``1 - p``
    (``1 - p`` is computed in float64: exact for float32 ``p``, so the background bins are the
    real-number rule too). NaN for an empty mask.

    For two classes the background term differs from the foreground one only through the binning:
    per bin ``|acc - conf|`` is the same for a class and its complement, but the background's bins
    over ``1 - p`` are the foreground's bins closed on the other side (``p`` in
    ``(1 - (k+1)/n, 1 - k/n]``), so a voxel exactly on a bin edge ``k/n`` -- for instance
    p = 0 or p = 0.5 -- changes bins. Without such voxels class-wise ECE equals :func:`ece`.
    """
    n_bins = _check_n_bins(n_bins)
    shape = shape_of(probs)
    if use_torch(probs, labels, mask):
        dev = device_of(probs, labels, mask)
        p = torch_probs(probs, dev)
        y = torch_binary("labels", labels, shape, dev)
        m = torch_mask(mask, shape, dev)
        fg = ece_from_bins(*_bins_torch(p, y, m, n_bins))
        bg = ece_from_bins(*_bins_torch(1.0 - p.double(), ~y, m, n_bins))
        return (fg + bg) / 2
    p = numpy_probs(probs)
    y = numpy_binary("labels", labels, shape)
    m = numpy_mask(mask, shape)
    fg = ece_from_bins(*_bins_numpy(p, y, m, n_bins))
    bg = ece_from_bins(*_bins_numpy(1.0 - p.astype(np.float64), 1 - y, m, n_bins))
    return (fg + bg) / 2
