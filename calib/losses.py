"""Training losses on logits: binary cross-entropy and soft Dice, both restricted to a mask.

Shapes: ``logits`` (N, 1, X, Y, Z) (or any shape), ``labels`` the same shape or without the
channel axis, values in {0, 1} (soft labels in [0, 1] work too); ``mask`` bool of the labels'
shape (or broadcastable), ``None`` meaning every voxel counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


#: Losses by the short names the grids use ("ce" = cross-entropy, "sd" = soft Dice).
LOSSES = {"ce": bce_loss, "sd": soft_dice_loss}


def get_loss(name: str):
    """The loss function called ``name``; unknown names list the valid ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid choices: {sorted(LOSSES)}") from None
