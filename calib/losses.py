"""Training losses on logits, restricted to a mask: binary cross-entropy and soft Dice (the
paper's), and three train-time calibration losses (focal, spatially varying label smoothing,
CE + marginal L1 average calibration error).

Shapes: ``logits`` (N, 1, X, Y, Z) (or any shape), ``labels`` the same shape or without the
channel axis, values in {0, 1} (soft labels in [0, 1] work too); ``mask`` bool of the labels'
shape (or broadcastable), ``None`` meaning every voxel counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from calib.loss_recipes import LOSS_PARAMS, loss_params  # noqa: F401  (re-exported: the stages use them)

#: Smoothing of the soft Dice ratio; keeps an empty prediction of an empty label at loss 0.
DICE_SMOOTH = 1e-7


def _align(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None):
    labels = torch.as_tensor(labels, device=logits.device)
    if labels.dim() == logits.dim() - 1:
        labels = labels.unsqueeze(1)
    if labels.shape != logits.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}")
    if mask is not None:
        mask = torch.as_tensor(mask, device=logits.device)
        if mask.dim() == logits.dim() - 1:
            mask = mask.unsqueeze(1)
        mask = mask.bool().expand_as(logits)
    # losses in float32 even under bf16 autocast: sums over millions of voxels
    return logits.float(), labels.float(), mask


def bce_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against ``labels`` over the masked voxels.

    Computed from logits (log-sum-exp form), so saturated logits give finite losses. An empty
    mask gives 0 with a zero gradient (nothing to learn from), not NaN.
    """
    logits, labels, mask = _align(logits, labels, mask)
    per_voxel = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    if mask is None:
        return per_voxel.mean()
    m = mask.float()
    return (per_voxel * m).sum() / m.sum().clamp_min(1.0)


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                   per_image: bool = False) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 sum(p*y) + s) / (sum(p) + sum(y) + s)`` with ``p = sigmoid(logits)``.

    As the paper's code (Eelbode et al.'s L1 soft Dice), the sums run over the whole batch by
    default; ``per_image=True`` computes one Dice per image and averages them. Voxels outside
    ``mask`` are left out of every sum; ``s`` = :data:`DICE_SMOOTH`.
    """
    logits, labels, mask = _align(logits, labels, mask)
    probs = torch.sigmoid(logits)
    if mask is not None:
        m = mask.float()
        probs, labels = probs * m, labels * m
    dims = tuple(range(1, logits.dim())) if per_image else tuple(range(logits.dim()))
    inter = (probs * labels).sum(dim=dims)
    denom = probs.sum(dim=dims) + labels.sum(dim=dims)
    dice = (2 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)
    return 1.0 - dice.mean()


def _masked_mean(per_voxel: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_voxel.mean()
    m = mask.float()
    return (per_voxel * m).sum() / m.sum().clamp_min(1.0)


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
               gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss ``-(1 - p_t)^gamma log p_t`` averaged over the masked voxels.

    Lin et al. 2017, "Focal loss for dense object detection" (no class weight alpha); Mukhoti et
    al. 2020, "Calibrating deep neural networks using focal loss", on its calibration effect: the
    factor ``(1 - p_t)^gamma`` stops rewarding ever more confident correct voxels. ``p_t`` is the
    probability of the voxel's label; ``gamma = 0`` is :func:`bce_loss` exactly. ``log p_t`` comes
    from the log-sum-exp form, so saturated logits stay finite.
    """
    if gamma < 0:
        raise ValueError(f"focal loss: gamma must be >= 0, got {gamma}")
    logits, labels, mask = _align(logits, labels, mask)
    ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # -log p_t
    # 1 - p_t from logits without cancellation: sigmoid of the logit signed against the label
    one_minus_pt = torch.sigmoid(torch.where(labels > 0.5, -logits, logits))
    return _masked_mean(one_minus_pt.pow(gamma) * ce if gamma else ce, mask)


def svls_kernel(sigma: float, size: int = 3, centre: str = "gaussian") -> torch.Tensor:
    """The (size, size, size) smoothing kernel of SVLS, summing to 1 (``sigma`` in voxels).

    ``centre="gaussian"``: the normalised isotropic Gaussian, so ``sigma -> 0`` is the identity
    (SVLS becomes CE). ``centre="neighbours"``: the published code's rule (Islam & Glocker 2021),
    the centre weight set to the sum of the neighbours' weights, so the voxel's own label keeps
    half the weight whatever ``sigma``.
    """
    if sigma < 0 or size < 1 or size % 2 == 0:
        raise ValueError(f"svls: sigma must be >= 0 and size a positive odd number, got "
                         f"sigma={sigma}, size={size}")
    if centre not in ("gaussian", "neighbours"):
        raise ValueError(f"svls: unknown centre {centre!r}; valid choices: gaussian, neighbours")
    r = torch.arange(size, dtype=torch.float64) - size // 2
    d2 = r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2
    if sigma == 0:
        kernel = (d2 == 0).double()
    else:
        kernel = torch.exp(-d2 / (2.0 * sigma * sigma))
    kernel = kernel / kernel.sum()
    if centre == "neighbours":
        c = (size // 2,) * 3
        neighbours = 1.0 - kernel[c]
        if neighbours > 0:
            kernel[c] = neighbours
            kernel = kernel / kernel.sum()
    return kernel.float()


def svls_labels(labels: torch.Tensor, mask: torch.Tensor | None, kernel: torch.Tensor) -> torch.Tensor:
    """Labels (N, 1, X, Y, Z) smoothed by ``kernel`` over the voxels inside ``mask``.

    A normalised convolution: ``conv(y * m) / conv(m)``, so voxels outside the mask neither
    count as background nor shrink the weights at the mask's edge; outside the mask the hard
    label is kept (those voxels carry no loss).
    """
    k = kernel.to(labels.device, labels.dtype)[None, None]
    pad = kernel.shape[-1] // 2
    m = torch.ones_like(labels) if mask is None else mask.to(labels.dtype)
    num = F.conv3d(F.pad(labels * m, (pad,) * 6), k)
    den = F.conv3d(F.pad(m, (pad,) * 6), k)
    return torch.where(den > 0, num / den.clamp_min(1e-12), labels)


def svls_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
              sigma: float = 1.0, size: int = 3, centre: str = "gaussian") -> torch.Tensor:
    """Spatially varying label smoothing (Islam & Glocker, IPMI 2021): CE against the labels
    smoothed in 3-D by :func:`svls_kernel`, averaged over the masked voxels.

    Needs 5-D logits (N, 1, X, Y, Z). A voxel deep inside a structure keeps its hard label; at a
    boundary the target becomes the local fraction of foreground, where annotators disagree.
    """
    logits, labels, mask = _align(logits, labels, mask)
    if logits.dim() != 5:
        raise ValueError(f"svls: logits must be (N, 1, X, Y, Z), got {tuple(logits.shape)}")
    soft = svls_labels(labels, mask, svls_kernel(sigma, size, centre))
    per_voxel = F.binary_cross_entropy_with_logits(logits, soft, reduction="none")
    return _masked_mean(per_voxel, mask)


def _ace_one_class(q: torch.Tensor, t: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Hard-binned ACE of probabilities ``q`` against targets ``t`` (flat), differentiable in q.

    The bins are :mod:`calib.metrics.binning`'s (``floor(q * n)`` in float64, q = 1 in the last
    bin); the assignment carries no gradient, the bin means of q do (Barfoot et al. 2024).
    """
    idx = torch.floor(q.detach().double() * n_bins).long().clamp_(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=q.dtype, device=q.device).index_add_(0, idx, torch.ones_like(q))
    conf = torch.zeros(n_bins, dtype=q.dtype, device=q.device).index_add_(0, idx, q)
    acc = torch.zeros(n_bins, dtype=q.dtype, device=q.device).index_add_(0, idx, t)
    full = count > 0
    if not bool(full.any()):
        return q.sum() * 0.0
    return ((acc[full] - conf[full]).abs() / count[full]).mean()


def marginal_ace(probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                 n_bins: int = 20) -> torch.Tensor:
    """Marginal L1 average calibration error (mL1-ACE) per volume, averaged over the batch.

    For each volume (first axis) and each class -- foreground ``p`` against ``y``, background
    ``1 - p`` against ``1 - y`` -- the mean over non-empty equal-width bins of
    ``|mean target - mean probability|``, inside the mask; the class mean, then the batch mean.
    The foreground term equals :func:`calib.metrics.average_calibration_error`.
    """
    terms = []
    for i in range(probs.shape[0]):
        p, y = probs[i].reshape(-1), labels[i].reshape(-1)
        if mask is not None:
            keep = mask[i].reshape(-1)
            p, y = p[keep], y[keep]
        if p.numel() == 0:
            continue
        # 1 - p in float64 is exact for float32 p: the background bins follow the metric's rule
        terms.append((_ace_one_class(p, y, n_bins)
                      + _ace_one_class((1.0 - p.double()).to(p.dtype), 1.0 - y, n_bins)) / 2)
    return torch.stack(terms).mean() if terms else probs.sum() * 0.0


def ace_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
             weight: float = 1.0, n_bins: int = 20) -> torch.Tensor:
    """CE plus ``weight`` x the hard-binned mL1-ACE (:func:`marginal_ace`), per volume in the mask.

    Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image
    Segmentation" (arXiv 2506.03942) and its MICCAI 2024 predecessor, hard-binned variant, with
    CE as the segmentation term (the paper pairs it with Dice + CE).
    """
    if weight < 0:
        raise ValueError(f"ace loss: weight must be >= 0, got {weight}")
    logits, labels, mask = _align(logits, labels, mask)
    ce = bce_loss(logits, labels, mask)
    if weight == 0:
        return ce
    return ce + weight * marginal_ace(torch.sigmoid(logits), labels, mask, n_bins)


#: Losses by the short names the stages use ("ce" = cross-entropy, "sd" = soft Dice, and the
#: train-time calibration losses).
LOSSES = {"ce": bce_loss, "sd": soft_dice_loss, "focal": focal_loss, "svls": svls_loss,
          "ace": ace_loss}
def get_loss(name: str):
    """The loss function called ``name``; unknown names list the valid ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid choices: {sorted(LOSSES)}") from None


def build_loss(name: str, params: Mapping[str, Any] | None = None) -> Callable[..., torch.Tensor]:
    """``loss(logits, labels, mask)`` for loss ``name`` with its parameters resolved."""
    fn = get_loss(name)
    resolved = loss_params(name, params)
    return partial(fn, **resolved) if resolved else fn
