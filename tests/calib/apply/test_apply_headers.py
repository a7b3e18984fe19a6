"""Outputs carry the reference image's NIfTI header codes: qform / sform codes and xyzt units.

nibabel, given an affine, writes sform code 2 and qform code 0 whatever the input had; a viewer or
registration tool reading an output of a scanner-space (1/1) image would then misread its space.
The reference is the subject's first image (FLAIR), a prediction NIfTI itself, or for nnU-Net the
segmentation nnU-Net wrote beside the ``.npz``.
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from calib.apply import apply_model, load_fitted

CODES = [(1, 1), (2, 0)]


def _recode(path, qform: int, sform: int, units=("mm", "sec")) -> nib.Nifti1Image:
    """Rewrite ``path`` with the same voxels and affine but these header codes and units."""
    img = nib.load(str(path))
    data, affine = np.asarray(img.dataobj), img.affine
    out = nib.Nifti1Image(data, affine, header=img.header)
    out.set_qform(affine, code=qform)
    out.set_sform(affine, code=sform)
    out.header.set_xyzt_units(*units)
    nib.save(out, str(path))
    back = nib.load(str(path))
    assert (int(back.header["qform_code"]), int(back.header["sform_code"])) == (qform, sform)
    return back


def _assert_same_codes(written_path, ref: nib.Nifti1Image) -> None:
    written = nib.load(str(written_path))
    for key in ("qform_code", "sform_code"):
        assert int(written.header[key]) == int(ref.header[key]), key
    assert written.header.get_xyzt_units() == ref.header.get_xyzt_units()
    np.testing.assert_allclose(written.affine, ref.affine, atol=1e-6)
    np.testing.assert_allclose(written.header.get_qform(), ref.affine, atol=1e-5)


@pytest.mark.parametrize("qform, sform", CODES)
def test_a_subjects_output_has_its_flairs_codes(unet_model, tmp_path, qform, sform):
    root = tmp_path / "brats18"
    shutil.copytree(unet_model["root"], root)
    subject = next(p for p in sorted(root.glob("*/*")) if p.is_dir())
    flair = _recode(subject / f"{subject.name}_flair.nii.gz", qform, sform)
    out = apply_model(load_fitted(unet_model["model"]), subject, tmp_path / "out")
    _assert_same_codes(out.files["prob"], flair)


@pytest.mark.parametrize("qform, sform", CODES)
def test_a_prediction_maps_output_has_its_codes(external_models, tmp_path, qform, sform):
    ext = external_models["nifti"]
    path = tmp_path / f"{ext['ids'][0]}.nii.gz"
    shutil.copy(ext["data"] / "predictions" / path.name, path)
    ref = _recode(path, qform, sform, units=("mm", "msec"))
    out = apply_model(load_fitted(ext["model"]), path, tmp_path / "out")
    _assert_same_codes(out.files["prob"], ref)


@pytest.mark.parametrize("qform, sform", CODES)
def test_an_nnunet_output_has_the_segmentations_codes(external_models, tmp_path, qform, sform):
    ext = external_models["nnunet"]
    cid = ext["ids"][1]
    for suffix in (".npz", ".pkl", ".nii.gz"):
        shutil.copy(ext["data"] / "predictions" / f"{cid}{suffix}", tmp_path)
    seg = _recode(tmp_path / f"{cid}.nii.gz", qform, sform)
    out = apply_model(load_fitted(ext["model"]), tmp_path / f"{cid}.npz", tmp_path / "out")
    _assert_same_codes(out.files["prob"], seg)
