"""Phantom external predictions: another "network"'s output whose miscalibration is known.

Each case has a true foreground probability ``p*`` defined in world coordinates (a smooth random
field plus a lesion-like blob in the patient's right, anterior, superior quadrant, so that a flip
of any axis shows), labels drawn voxel-wise from Bernoulli(``p*``), and a prediction
``p = sigmoid(scale * logit(p*))``: ``scale`` 1 is a perfectly calibrated network, ``scale`` > 1
an overconfident one (the usual failure of segmentation networks). Written as a predictions
dataset (:mod:`calib.data.predictions`) in NIfTI or nnU-Net v2 form, stored in any axis order,
with an ellipsoidal mask, and the true map in ``truth/`` (which real predictions never have) so
tests can measure the calibration error itself.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import DataError
from .nnunet import write_nnunet_probabilities
from .synth import WaveField, grid_affine, sigmoid

PHANTOM_FORMATS = ("nifti", "nnunet")


def _world(affine: np.ndarray, shape) -> np.ndarray:
    """World position (mm, RAS) of every voxel centre: float32 (3, *shape)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    return (np.tensordot(affine[:3, :3], ijk, axes=1) + affine[:3, 3][:, None, None, None]).astype(np.float32)


def _case_maps(rng: np.random.Generator, affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """(true logit, head mask) on a grid; the world origin is the head centre."""
    xyz = _world(affine, shape)
    field = WaveField(rng, (12.0, 30.0))(xyz)
    blob_centre = np.array([8.0, 6.0, 4.0], dtype=np.float32)[:, None, None, None]  # right, anterior, superior
    blob = np.exp(-np.sum(((xyz - blob_centre) / 5.0) ** 2, axis=0))
    logit = 2.0 * field + 6.0 * blob - 1.5
    radii = np.array([13.0, 13.0, 10.0], dtype=np.float32)[:, None, None, None]
    mask = np.sum((xyz / radii) ** 2, axis=0) < 1.0
    return logit.astype(np.float32), mask


def write_prediction_phantoms(out: Path, n_cases: int, scale: float = 3.0, seed: int = 0,
                              fmt: str = "nifti", values: str = "probability", axcodes: str = "LPS",
                              spacing: float = 1.0, base_shape=(28, 28, 20)) -> list[str]:
    """Write ``out/{predictions,labels,masks,truth}/`` for ``n_cases`` cases; their ids.

    ``fmt`` "nifti" writes ``<case>.nii.gz`` holding the probability (``values`` probability) or
    the logit; "nnunet" writes ``<case>.npz`` (2-class softmax, float16 as older nnU-Net versions
    save it) + ``<case>.pkl`` (SimpleITKIO properties) and nnU-Net's argmax ``<case>.nii.gz``
    beside them. Case grids differ by a few voxels so importing must pad. Deterministic in ``seed``.
    """
    if fmt not in PHANTOM_FORMATS:
        raise DataError(f"format {fmt!r} unknown; valid choices: {', '.join(PHANTOM_FORMATS)}")
    out = Path(out)
    folders = {k: out / k for k in ("predictions", "labels", "masks", "truth")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n_cases):
        cid = f"case_{i:03d}"
        extent = tuple(int(s + rng.integers(0, 3)) for s in base_shape)
        affine, shape = grid_affine(axcodes, np.full(3, float(spacing)), extent, np.zeros(3))
        true_logit, mask = _case_maps(rng, affine, shape)
        p_true = sigmoid(true_logit)
        label = (rng.random(shape) < p_true).astype(np.uint8)
        pred_logit = (scale * true_logit).astype(np.float32)
        pred = sigmoid(pred_logit)

        def save(folder: str, data: np.ndarray) -> None:
            nib.save(nib.Nifti1Image(data, affine), str(folders[folder] / f"{cid}.nii.gz"))

        save("labels", label)
        save("masks", mask.astype(np.uint8))
        save("truth", p_true)
        if fmt == "nnunet":
            probs = np.stack([1.0 - pred, pred]).astype(np.float16)
            write_nnunet_probabilities(folders["predictions"] / f"{cid}.npz", probs, affine)
            save("predictions", (pred > 0.5).astype(np.uint8))  # nnU-Net's segmentation beside
        else:
            save("predictions", pred if values == "probability" else pred_logit)
        ids.append(cid)
    return ids
