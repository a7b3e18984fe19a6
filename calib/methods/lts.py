"""Local temperature scaling (Ding, Han, Liu & Niethammer, "Local temperature scaling for
probability calibration", ICCV 2021).

What it fits: a small convolutional net that maps the base logits of a z-slice to a positive
temperature per voxel, ``T(x) > 0``; the calibrated probability is ``sigmoid(z(x) / T(x))``.
Trained with CE on the cached logits in batches of 64 z-slices with mini-batch Adam (lr 5e-3, LR
x0.1 on a plateau, :mod:`calib.methods.logit_based`, :func:`calib.training.fit`).

Stop rule: a plateau of the validation loss. The shared calibration schedule stops 6 epochs after
the best epoch, i.e. 2 epochs after the first LR cut (x0.1 after 4 epochs without a relative
improvement of 1e-4); on an Adam overshoot at 5e-3 that is before the loss has settled (a
phantom: best at epoch 8, stopped at 14 while the loss still fell at the cut LR), and a grid's
``max_epochs`` (3 in the demo) cut it shorter still. LTS instead stops when its best validation
loss has not improved by ``min_rel_improvement`` through :data:`~calib.methods.recipes.LTS_PLATEAU_CUTS`
(2) LR cuts, that is ``early_stop_patience = 3 (lr_patience + 1)`` epochs (12 with the paper's
``lr_patience = 3``: no improvement at three successive LRs, 5e-3, 5e-4, 5e-5), and keeps its best
epoch. ``max_epochs`` is a guard, :data:`~calib.methods.recipes.LTS_MAX_EPOCHS` (200), that the
calibrate stage's schedule does not replace (a grid may set ``methods.lts.params.max_epochs``);
``stop_reason = "max_epochs"`` says the guard, not the plateau, ended the fit. Explicit
``early_stop_patience`` / ``max_epochs`` parameters override both.

Can it change the 0.5-threshold segmentation? No, by construction: ``T > 0`` keeps the sign of
the logit, so ``p > 0.5`` exactly where the base model's ``sigmoid(z) > 0.5``, and the Dice equals
that of the base probabilities on the same (cached) logits. Float rounding could still flip a
voxel whose ``|z|`` is below the resolution of a float32 sigmoid near 0.5 (``sigmoid(1e-8)`` rounds
to 0.5 but ``sigmoid(1e-8 / 0.01)`` does not); :meth:`LocalTemperatureScaling._predict_prob`
therefore keeps every voxel on its base side of 0.5 explicitly (a change of at most one float32
step at 0.5, and only for such voxels).

Our net against the paper's: Ding et al. predict the temperature with a tree of gated, dilated
5x5 convolutions over the logits and optionally the image, ``T = relu(. + 1) + 1e-8``. Here the
temperature branch reads the logits only: a 3x3 conv and a dilated 3x3 conv (``hidden`` channels,
leaky ReLU) then a 1x1 conv, ``T = T_MIN + softplus(.)``, which keeps a gradient everywhere
(relu has none below 0). The temperature branch sees the logits clipped to ``[-LOGIT_CLIP,
LOGIT_CLIP]`` (beyond that sigmoid is saturated anyway), so that the -100 the U-Net writes
outside the brain mask does not swamp the features of voxels at the mask's edge; edges are
padded by replicating the border (as the auxiliary conv). The head starts at zero weights and a
bias giving ``T = 1``: training starts from the base model's probabilities.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit
from torch import nn

from calib.methods.base import SubjectRef
from calib.methods.logit_based import LogitCalibrator

#: Lowest temperature (a 100-fold sharpening of the logit).
T_MIN = 0.01
#: The temperature branch reads logits clipped to this magnitude (sigmoid(20) = 1 - 2e-9).
LOGIT_CLIP = 20.0
#: The smallest float32 above 0.5: where the base says foreground, LTS never reports <= 0.5.
_ABOVE_HALF = np.nextafter(np.float32(0.5), np.float32(1.0))


class LocalTemperature(nn.Module):
    """``z (B, 1, X, Y) -> z / T(z)`` with a positive temperature map ``T`` of the same shape."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, hidden, 3, padding=1, padding_mode="replicate")
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2, padding_mode="replicate")
        self.head = nn.Conv2d(hidden, 1, 1)
        with torch.no_grad():
            self.head.weight.zero_()
            # softplus(b) = 1 - T_MIN, so that T = 1 everywhere at the start
            self.head.bias.fill_(math.log(math.expm1(1.0 - T_MIN)))

    def temperature(self, z: torch.Tensor) -> torch.Tensor:
        """The temperature map ``T(z) >= T_MIN``, (B, 1, X, Y)."""
        h = torch.clamp(z, -LOGIT_CLIP, LOGIT_CLIP) / LOGIT_CLIP
        h = F.leaky_relu(self.conv1(h), 0.01)
        h = F.leaky_relu(self.conv2(h), 0.01)
        return T_MIN + F.softplus(self.head(h))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.temperature(z)


class LocalTemperatureScaling(LogitCalibrator):
    """``p = sigmoid(z / T(z))`` with a learned per-voxel ``T > 0``; parameters: ``hidden``
    (channels of the temperature net, 8) and the calibration schedule (lr 5e-3, 64 slices, ...)
    with the plateau stop rule of the module doc."""

    name = "lts"

    def build_module(self) -> nn.Module:
        # The only calibrator with random initial weights: seed them from the method's own seed,
        # not from the global RNG, whose state depends on what ran before in a reused worker.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.train_config().seed)
            return LocalTemperature(self.params["hidden"])

    @torch.no_grad()
    def temperature_map(self, logits: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
        """The learned temperature of each voxel of ``logits`` (X, Y, Z), float32 (X, Y, Z)."""
        device = torch.device(device)
        self.module.to(device).eval()
        z = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)).to(device)
        t = self.module.temperature(z.permute(2, 0, 1)[:, None])[:, 0].permute(1, 2, 0)
        self.module.to("cpu")
        return t.float().cpu().numpy()

    def _predict_prob(self, subject: SubjectRef, device: torch.device) -> np.ndarray:
        logits = subject.logits
        prob = expit(self.calibrated_logits(logits, device)).astype(np.float32)
        # keep each voxel on the side of 0.5 that the base probabilities put it on (module doc)
        base_fg = expit(logits) > 0.5
        return np.where(base_fg, np.maximum(prob, _ABOVE_HALF), np.minimum(prob, np.float32(0.5)))

    def describe(self) -> dict[str, float]:
        return {"lts_parameters": float(sum(p.numel() for p in self.module.parameters()))}
