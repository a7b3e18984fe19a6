"""Input handling shared by the metrics: backend choice, shape checks, validation.

Backend rule: if any input is a torch tensor on a non-CPU device the metric runs in torch on that
device; otherwise it runs in numpy (CPU tensors are viewed as numpy arrays without a copy).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class MetricInputError(ValueError):
    """Inputs of a metric have the wrong shape, dtype or values."""


def use_torch(*arrays: Any) -> bool:
    """True when some input is a torch tensor that lives off the CPU."""
    return any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in arrays if a is not None)


def to_numpy(a: Any) -> np.ndarray:
    """A numpy view of ``a`` (torch CPU tensors without a copy; bf16 goes through float32)."""
    if isinstance(a, torch.Tensor):
        a = a.detach()
        if a.dtype == torch.bfloat16:
            a = a.float()
        return a.cpu().numpy()
    return np.asarray(a)


def to_torch(a: Any, device: torch.device) -> torch.Tensor:
    """``a`` as a torch tensor on ``device``."""
    if isinstance(a, torch.Tensor):
        return a.detach().to(device)
    return torch.as_tensor(np.asarray(a), device=device)


def device_of(*arrays: Any) -> torch.device:
    for a in arrays:
        if isinstance(a, torch.Tensor) and a.device.type != "cpu":
            return a.device
    return torch.device("cpu")


def same_shape(name: str, ref_shape: tuple[int, ...], other_shape: tuple[int, ...]) -> None:
    """Shapes must agree, up to size-1 axes (so (1, X, Y, Z) probs go with (X, Y, Z) labels)."""
    if tuple(ref_shape) == tuple(other_shape):
        return
    if tuple(s for s in ref_shape if s != 1) != tuple(s for s in other_shape if s != 1):
        raise MetricInputError(f"{name} has shape {tuple(other_shape)} but probs have shape {tuple(ref_shape)}")


def check_probs_range(pmin: float, pmax: float) -> None:
    # NaN fails both comparisons, so it is reported here too
    if not (pmin >= 0.0 and pmax <= 1.0):
        raise MetricInputError(f"probs must be finite probabilities in [0, 1]; found values in [{pmin}, {pmax}]")


def numpy_probs(probs: Any) -> np.ndarray:
    """Flat float32/float64 probabilities (float16 widened exactly to float32)."""
    p = to_numpy(probs)
    if p.dtype == np.float16:
        p = p.astype(np.float32)
    if p.dtype not in (np.float32, np.float64):
        raise MetricInputError(f"probs must be floating point, got dtype {p.dtype}")
    return p.reshape(-1)


def numpy_binary(name: str, a: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Flat uint8 {0, 1} array from a binary bool / integer / float array (others rejected)."""
    arr = to_numpy(a)
    same_shape(name, shape, arr.shape)
    flat = arr.reshape(-1)
    if flat.dtype == np.bool_:
        return flat.view(np.uint8)
    if flat.size == 0:
        return flat.astype(np.uint8)
    if flat.dtype == np.uint8:
        if flat.max() > 1:
            raise MetricInputError(f"{name} must be binary (0/1); found value {int(flat.max())}")
        return flat
    bad = (flat != 0) & (flat != 1)
    if bad.any():
        raise MetricInputError(f"{name} must be binary (0/1); found value {flat[bad][0]!r}")
    return flat.astype(np.uint8)


def numpy_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """Flat uint8 mask (None stays None); non-bool masks are read as ``mask != 0``."""
    if mask is None:
        return None
    m = to_numpy(mask)
    same_shape("mask", shape, m.shape)
    m = m.reshape(-1)
    return m.view(np.uint8) if m.dtype == np.bool_ else (m != 0).view(np.uint8)


def torch_probs(probs: Any, device: torch.device) -> torch.Tensor:
    p = to_torch(probs, device)
    if p.dtype in (torch.float16, torch.bfloat16):
        p = p.float()
    if p.dtype not in (torch.float32, torch.float64):
        raise MetricInputError(f"probs must be floating point, got dtype {p.dtype}")
    p = p.reshape(-1)
    if p.numel():
        check_probs_range(float(p.min()), float(p.max()))
    return p


def torch_binary(name: str, a: Any, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    t = to_torch(a, device)
    same_shape(name, shape, tuple(t.shape))
    t = t.reshape(-1)
    if t.dtype != torch.bool and t.numel():
        bad = (t != 0) & (t != 1)
        if bool(bad.any()):
            raise MetricInputError(f"{name} must be binary (0/1); found value {t[bad][0].item()!r}")
    return t != 0


def torch_mask(mask: Any, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    m = to_torch(mask, device)
    same_shape("mask", shape, tuple(m.shape))
    return m.reshape(-1) != 0


def shape_of(a: Any) -> tuple[int, ...]:
    return tuple(a.shape) if hasattr(a, "shape") else np.shape(a)
