"""The phantom writer's files: one synthesized subject (calib.data.phantom.PhantomSubject) saved
in the real BraTS 2018 / ISLES 2018 layout (calib.data.layouts), NIfTI with qform = sform."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .layouts import (BRATS_LABEL, BRATS_TRUE_PROB, ISLES_4D, ISLES_FOLDER, ISLES_LABEL, ISLES_TRUE_PROB,
                      brats_path, isles_path)


def save(array: np.ndarray, affine: np.ndarray, path: Path, time_step: float | None = None) -> None:
    """``array`` as NIfTI at ``path`` on ``affine`` (mm, qform = sform code 1); ``time_step``: the
    4th pixdim (s) of a time series."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if time_step is not None:
        zooms = list(img.header.get_zooms())
        zooms[3] = time_step
        img.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def write_brats(subject, root: Path) -> None:
    """A BraTS-like PhantomSubject under ``root/<group>/<id>/`` (images, seg, true probability)."""
    folder = root / subject.group / subject.subject_id
    for kind, array in subject.images.items():
        save(array, subject.affine, brats_path(folder, subject.subject_id, kind))
    save(subject.label, subject.affine, brats_path(folder, subject.subject_id, BRATS_LABEL))
    save(subject.true_prob, subject.affine, brats_path(folder, subject.subject_id, BRATS_TRUE_PROB))


def write_isles(subject, root: Path, index: int) -> None:
    """An ISLES-like PhantomSubject under ``root/TRAINING/<id>/`` (SMIR folders, unique numbers)."""
    folder = root / ISLES_FOLDER / subject.subject_id
    # SMIR object numbers are unique per file in the real data; keep them unique here too.
    kinds = [*subject.images, ISLES_LABEL, ISLES_4D, ISLES_TRUE_PROB]
    num = {kind: 345000 + 10 * index + k for k, kind in enumerate(kinds)}
    for kind, array in subject.images.items():
        save(array, subject.affine, isles_path(folder, kind, num[kind]))
    save(subject.label, subject.affine, isles_path(folder, ISLES_LABEL, num[ISLES_LABEL]))
    save(subject.extra[ISLES_4D], subject.affine, isles_path(folder, ISLES_4D, num[ISLES_4D]),
          time_step=subject.zooms_extra[0])
    save(subject.true_prob, subject.affine, isles_path(folder, ISLES_TRUE_PROB, num[ISLES_TRUE_PROB]))
