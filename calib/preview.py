"""One axial slice of one test subject's prediction, small enough to log with every trial.

The report's slice figure (image, label, true probability, base and calibrated probabilities and
their errors) is drawn from these previews, so it needs nothing but the MLflow store: no cache,
no network, no re-prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

#: Arrays of a preview (2-D, (X, Y), float32 / uint8 / bool) and its scalars.
PREVIEW_ARRAYS = ("image", "label", "mask", "prob", "true_prob")


def lesion_slice(label: np.ndarray, mask: np.ndarray) -> int:
    """The axial (z) index with the most label voxels; the mask's middle slice without a lesion.

    The choice depends on the label only, so the base model and every calibration of it show the
    same slice of the same subject.
    """
    per_z = np.asarray(label, dtype=bool).sum(axis=(0, 1))
    if per_z.any():
        return int(np.argmax(per_z))
    zs = np.flatnonzero(np.asarray(mask, dtype=bool).any(axis=(0, 1)))
    return int(zs[len(zs) // 2]) if len(zs) else label.shape[2] // 2


def preview_slice(subject, prob: np.ndarray) -> dict[str, np.ndarray]:
    """The preview of ``subject`` (a :class:`calib.methods.SubjectRef`) predicted as ``prob``
    (X, Y, Z): the first image channel, label, mask, prob and true probability (when the subject
    has one) on :func:`lesion_slice`, plus ``subject_id`` and ``z`` as 0-d arrays."""
    label, mask = subject.label, subject.mask
    z = lesion_slice(label, mask)
    image = subject.image
    # another network's imported predictions come without an image (a cache of zero channels)
    first = image[0, :, :, z] if image.shape[0] else np.zeros(label.shape[:2], np.float32)
    out = {"subject_id": np.asarray(str(subject.subject_id)), "z": np.asarray(z),
           "image": np.asarray(first, dtype=np.float32),
           "label": np.asarray(label[:, :, z], dtype=np.uint8),
           "mask": np.asarray(mask[:, :, z], dtype=bool),
           "prob": np.asarray(prob[:, :, z], dtype=np.float32)}
    true_prob = subject.true_prob
    if true_prob is not None:
        out["true_prob"] = np.asarray(true_prob[:, :, z], dtype=np.float32)
    return out


def keep_first_preview(predict: Callable, store: dict) -> Callable:
    """``predict`` that also fills ``store`` with the preview of the first subject it predicts."""
    def wrapped(subject):
        prob = predict(subject)
        if not store:
            store.update(preview_slice(subject, prob))
        return prob

    return wrapped


def save_preview(preview: dict, path: Path) -> Path:
    """Write a preview as a compressed ``.npz`` (a few KB), atomically."""
    from calib.atomic_io import save_npz

    save_npz(Path(path), **preview)
    return Path(path)


def load_preview(path: Path) -> dict[str, np.ndarray]:
    """Read a preview written by :func:`save_preview`."""
    with np.load(Path(path), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
