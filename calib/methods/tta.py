"""Test-time augmentation by flips, a training-free uncertainty baseline beside MC dropout
(Wang et al., "Aleatoric uncertainty estimation with test-time augmentation for medical image
segmentation with convolutional neural networks", Neurocomputing 2019).

What it does: the base U-Net, unchanged, runs on flipped copies of the image (and its brain mask)
-- MONAI's ``Flip`` along each subset of the spatial axes of :data:`FLIPS` -- each output is
flipped back with the same transform, and the prediction is the mean foreground probability over
the flips; :meth:`TestTimeFlips.predict_std` gives their standard deviation (population form,
``ddof = 0``), a voxel-wise uncertainty map, and :meth:`TestTimeFlips.predict_mean_std` both from
one set of passes. Parameters: ``flips`` -- ``"all"`` (default; every subset of the three axes, 8
passes) or ``"single"`` (identity plus one flip per axis, 4 passes).

Fitting: none. :meth:`TestTimeFlips.fit` only checks that base weights were given and scores the
method on ``val`` (mean BCE of the flip-mean inside the masks, as the closed-form methods do), so
its ``FitResult`` has 0 epochs and ``stop_reason = "training_free"``; the saved state is the base
net's weights, so a loaded method predicts without them.

Can it change the 0.5-threshold segmentation? Yes: the mean over flips can cross 0.5 where the
flipped passes disagree (the net is not flip-equivariant: its padding and pooling grid move).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from calib import metrics
from calib.methods.base import CalibrationMethod, SubjectRef, SubjectSet
from calib.methods.network_based import as_unet_config, load_weights, unet_inputs
from calib.methods.params import MethodError
from calib.nets import UNet3D
from calib.training import EpochResult, FitResult

#: Spatial axes flipped in each pass, by the ``flips`` parameter; () is the unflipped pass.
FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "single": ((), (0,), (1,), (2,)),
    "all": tuple(c for r in range(4) for c in itertools.combinations((0, 1, 2), r)),
}


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (the net and the metrics need no metadata)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else t


@torch.no_grad()
def flip_probabilities(net: UNet3D, image: torch.Tensor, mask: torch.Tensor,
                       flips: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """``sigmoid(net)`` of each flipped copy, flipped back: (len(flips), X, Y, Z) float32.

    ``image`` (C, X, Y, Z) and ``mask`` (X, Y, Z) bool on the net's device; each entry of
    ``flips`` lists spatial axes (0 = X, 1 = Y, 2 = Z) for ``monai.transforms.Flip``. The net runs
    in whatever mode it is in (eval for TTA).
    """
    from monai.transforms import Flip  # MONAI's transforms take seconds to import; only TTA needs them

    out = []
    for axes in flips:
        flip = Flip(spatial_axis=axes) if axes else None
        img = _plain(flip(image)) if flip else image
        msk = _plain(flip(mask[None])) if flip else mask[None]
        prob = torch.sigmoid(net(img[None], mask=msk[None]).float())[0]  # (1, X, Y, Z)
        out.append((_plain(flip(prob)) if flip else prob)[0])
    return torch.stack(out)


class TestTimeFlips(CalibrationMethod):
    """Mean (and standard deviation) of the base U-Net's probability over flipped inputs."""

    __test__ = False  # not a pytest class, whatever its name says

    name = "tta"

    def __init__(self, params: Mapping | None = None, **context):
        super().__init__(params, **context)
        if self.net_cfg is None:
            raise MethodError(f"method {self.name!r} runs the base network: net_cfg is required")
        self.net_cfg = as_unet_config(self.net_cfg)
        self.net = UNet3D(self.net_cfg)
        if self.base_weights is not None:
            load_weights(self.net, self.base_weights)
        self.net.set_dropout(None)

    @property
    def flips(self) -> tuple[tuple[int, ...], ...]:
        return FLIPS[self.params["flips"]]

    def fit(self, train: SubjectSet, val: SubjectSet, device: torch.device,
            callbacks: Sequence[Callable[[EpochResult], None]] = (),
            checkpoint_path: Path | None = None) -> FitResult:
        """No training (module doc): checks the base weights, scores ``val``; ``train``,
        ``callbacks`` and ``checkpoint_path`` are unused."""
        if self.base_weights is None:
            raise MethodError(f"method {self.name!r}: base_weights are required to fit")
        val.require("images", self.name)
        total, count = 0.0, 0
        for ref in val:
            mask = ref.mask
            n = int(mask.sum())
            if n:
                total += metrics.nll(self.predict_proba(ref, device)[mask], ref.label[mask]) * n
                count += n
        return FitResult(best_val_loss=total / count if count else float("nan"), best_epoch=0,
                         epochs_run=0, history=[], stop_reason="training_free")

    def predict_mean_std(self, subject: SubjectRef, device: torch.device | str = "cpu"
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation (ddof 0) over the flips of the foreground probability,
        each float32 (X, Y, Z), 0 outside the mask."""
        device = torch.device(device)
        self.net.to(device).eval()
        image, mask = unet_inputs(subject, device)
        probs = flip_probabilities(self.net, image[0], mask[0, 0], self.flips)
        self.net.to("cpu")
        mean = probs.mean(0).cpu().numpy()
        std = probs.std(0, correction=0).cpu().numpy()
        inside = subject.mask
        zero = np.float32(0.0)
        return (np.where(inside, mean, zero).astype(np.float32),
                np.where(inside, std, zero).astype(np.float32))

    def predict_std(self, subject: SubjectRef, device: torch.device | str = "cpu") -> np.ndarray:
        """The standard deviation over the flips, float32 (X, Y, Z); 0 outside the mask."""
        return self.predict_mean_std(subject, device)[1]

    def _predict_prob(self, subject: SubjectRef, device: torch.device) -> np.ndarray:
        return self.predict_mean_std(subject, device)[0]

    def describe(self) -> dict[str, float]:
        return {"tta_passes": float(len(self.flips))}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.net.load_state_dict(dict(state))
