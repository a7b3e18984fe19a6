"""External predictions (calib.data.predictions, calib.data.nnunet): orientation, checks, import.

The alignment tests build one case by hand with an asymmetric label (a block in the patient's
right, anterior, superior corner), store it in a non-RAS order, and write the prediction as NIfTI
and as nnU-Net would -- the array in SimpleITK's [k, j, i] order with properties written out by
hand from what SimpleITK reports for such a file (an LPS-stored NIfTI has ITK direction = identity)
-- so the reader is checked against nnU-Net's conventions, not against its own writer.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy.special import expit

from calib.data import DataError, load_subject
from calib.data.predictions import (
    PredictionsConfig,
    check_predictions,
    discover_predictions,
    import_predictions,
    load_case,
    logits_dir,
)
from calib.data.predictions_phantom import write_prediction_phantoms
from calib.logits import load_logits

SHAPE_LPS = (10, 12, 7)  # stored axes: towards Left, Posterior, Superior
SPACING = (1.0, 1.5, 2.0)
ORIGIN_RAS = np.array([20.0, 30.0, -5.0])  # world position of voxel (0, 0, 0)


def _lps_affine() -> np.ndarray:
    a = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    a[:3, 3] = ORIGIN_RAS
    return a


def _asymmetric_label() -> np.ndarray:
    """A block at the patient's right (small i: +x is towards small i in LPS), anterior (small j),
    superior (large k) corner of the stored LPS array."""
    label = np.zeros(SHAPE_LPS, np.uint8)
    label[1:4, 2:5, 4:6] = 1
    return label


def _dataset(tmp_path, write_prediction, masks: bool = False):
    pred_dir, lab_dir = tmp_path / "pred", tmp_path / "lab"
    pred_dir.mkdir()
    lab_dir.mkdir()
    label = _asymmetric_label()
    nib.save(nib.Nifti1Image(label, _lps_affine()), str(lab_dir / "c1.nii.gz"))
    prob = np.where(label == 1, 0.9, 0.2).astype(np.float32)
    write_prediction(pred_dir, prob)
    mask_dir = None
    if masks:
        mask_dir = tmp_path / "masks"
        mask_dir.mkdir()
        flair = np.full(SHAPE_LPS, 5.0, np.float32)
        flair[:, :, 0] = 0.0  # the lowest slice is outside
        nib.save(nib.Nifti1Image(flair, _lps_affine()), str(mask_dir / "c1.nii.gz"))
    return PredictionsConfig.make(pred_dir, lab_dir, masks=mask_dir)


def _nifti_writer(pred_dir, prob):
    nib.save(nib.Nifti1Image(prob, _lps_affine()), str(pred_dir / "c1.nii.gz"))


def _nifti_reoriented_writer(pred_dir, prob):
    """The same map stored in RAS order: other voxel axes, same space as the LPS label."""
    img = nib.as_closest_canonical(nib.Nifti1Image(prob, _lps_affine()))
    nib.save(img, str(pred_dir / "c1.nii.gz"))


def _nnunet_sitk_writer(pred_dir, prob):
    # what SimpleITKIO + export_prediction write: sitk.GetArrayFromImage order [k, j, i], two
    # softmax channels; sitk geometry of an LPS-stored NIfTI: direction identity, LPS origin
    probs = np.stack([1.0 - prob, prob]).transpose(0, 3, 2, 1).astype(np.float16)
    np.savez_compressed(pred_dir / "c1.npz", probabilities=probs)
    origin_lps = (-ORIGIN_RAS[0], -ORIGIN_RAS[1], ORIGIN_RAS[2])
    props = {"sitk_stuff": {"spacing": SPACING, "origin": origin_lps,
                            "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)},
             "spacing": list(SPACING[::-1]), "shape_before_cropping": list(SHAPE_LPS[::-1]),
             "bbox_used_for_cropping": [[0, s] for s in SHAPE_LPS[::-1]]}
    with open(pred_dir / "c1.pkl", "wb") as fh:
        pickle.dump(props, fh)
    nib.save(nib.Nifti1Image((prob > 0.5).astype(np.uint8), _lps_affine()), str(pred_dir / "c1.nii.gz"))


def _nnunet_nibabel_reorient_writer(pred_dir, prob):
    # NibabelIOWithReorient: the image reoriented to RAS, then get_fdata().transpose(2, 1, 0)
    img = nib.Nifti1Image(prob, _lps_affine())
    ras = img.as_reoriented(nib.io_orientation(img.affine))
    data = np.asarray(ras.dataobj)
    probs = np.stack([1.0 - data, data]).transpose(0, 3, 2, 1).astype(np.float32)
    np.savez_compressed(pred_dir / "c1.npz", probabilities=probs)
    props = {"nibabel_stuff": {"original_affine": img.affine, "reoriented_affine": ras.affine},
             "spacing": [float(z) for z in ras.header.get_zooms()[::-1]]}
    with open(pred_dir / "c1.pkl", "wb") as fh:
        pickle.dump(props, fh)


@pytest.mark.parametrize("writer", [_nifti_writer, _nifti_reoriented_writer, _nnunet_sitk_writer,
                                    _nnunet_nibabel_reorient_writer],
                         ids=["nifti-lps", "nifti-ras", "nnunet-sitk", "nnunet-nibabel-reorient"])
def test_prediction_loads_aligned_with_its_label_in_ras(tmp_path, writer):
    config = _dataset(tmp_path, writer)
    (files,), problems = discover_predictions(config)
    assert problems == []
    case, problems = load_case(files, config)
    assert problems == [], problems
    # RAS order: the LPS shape with x and y reversed, no axis swapped
    assert case.logits.shape == case.label.shape == case.mask.shape == SHAPE_LPS
    np.testing.assert_array_equal(expit(case.logits) > 0.5, case.label.astype(bool))
    np.testing.assert_allclose(expit(case.logits[case.label == 1]), 0.9, atol=1e-3)
    # the block is where the LPS file put it in space: right = large x index in RAS order
    ras = np.flip(_asymmetric_label(), axis=(0, 1))
    np.testing.assert_array_equal(case.label, ras)
    ijk = np.argwhere(case.label == 1).mean(axis=0)
    centre_world = case.grid.ras_affine @ np.r_[ijk, 1.0]
    lps_ijk = np.argwhere(_asymmetric_label() == 1).mean(axis=0)
    np.testing.assert_allclose(centre_world, _lps_affine() @ np.r_[lps_ijk, 1.0], atol=1e-4)
    # the grid undoes the reordering
    back = case.grid.from_ras(case.label)
    assert back.shape == case.grid.shape


def test_mask_folder_with_a_threshold_rule(tmp_path):
    config = _dataset(tmp_path, _nifti_writer, masks=True)
    case, problems = load_case(discover_predictions(config)[0][0], config)
    assert problems == []
    assert not case.mask[:, :, 0].any() and case.mask[:, :, 1:].all()


def test_multiclass_union_and_logits(tmp_path):
    pred_dir, lab_dir = tmp_path / "pred", tmp_path / "lab"
    pred_dir.mkdir()
    lab_dir.mkdir()
    aff = np.eye(4)
    label = np.zeros((6, 5, 4), np.uint8)
    label[1, :, :] = 1
    label[2, :, :] = 3
    label[3, :, :] = 2  # class 2 is not in the foreground below
    nib.save(nib.Nifti1Image(label, aff), str(lab_dir / "a.nii.gz"))
    logits = np.zeros((6, 5, 4, 4), np.float32)  # (X, Y, Z, C)
    for c in range(4):
        logits[label == c, c] = 4.0
    nib.save(nib.Nifti1Image(logits, aff), str(pred_dir / "a.nii.gz"))
    config = PredictionsConfig.make(pred_dir, lab_dir, values="logit", foreground=[1, 3])
    case, problems = load_case(discover_predictions(config)[0][0], config)
    assert problems == []
    np.testing.assert_array_equal(case.label, np.isin(label, [1, 3]))
    # union of two classes against two: logsumexp(4, 0) - logsumexp(0, 0) inside, the reverse outside
    inside = np.logaddexp(4.0, 0.0) - np.logaddexp(0.0, 0.0)
    np.testing.assert_allclose(case.logits[label == 1], inside, rtol=1e-5)
    np.testing.assert_allclose(case.logits[label == 0], -inside, rtol=1e-5)
    # without a foreground rule four classes are a problem naming the file
    config = PredictionsConfig.make(pred_dir, lab_dir, values="logit")
    _, problems = load_case(discover_predictions(config)[0][0], config)
    assert [p.kind for p in problems] == ["bad_dimensions"] and "foreground" in problems[0].message


def test_check_names_every_kind_of_problem(tmp_path):
    root = tmp_path / "ext"
    write_prediction_phantoms(root, 5, seed=3)
    pred, lab = root / "predictions", root / "labels"
    (pred / "case_000.nii.gz").unlink()  # missing case
    img = nib.load(str(lab / "case_001.nii.gz"))  # shape mismatch with its label
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), img.affine), str(pred / "case_001.nii.gz"))
    img = nib.load(str(pred / "case_002.nii.gz"))  # probabilities outside [0, 1]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 3.0, img.affine), str(pred / "case_002.nii.gz"))
    img = nib.load(str(pred / "case_003.nii.gz"))  # NaN
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(pred / "case_003.nii.gz"))
    report = check_predictions(PredictionsConfig.make(pred, lab))
    by_case = {p.subject: p for p in report.problems}
    assert sorted(by_case) == ["case_000", "case_001", "case_002", "case_003"]
    assert by_case["case_000"].kind == "missing_modality" and by_case["case_000"].path.endswith("case_000.nii.gz")
    assert by_case["case_001"].kind == "shape_mismatch" and by_case["case_001"].path == str(pred / "case_001.nii.gz")
    assert by_case["case_002"].kind == "prob_range"
    assert by_case["case_003"].kind == "nonfinite"

    cmd = [sys.executable, "-m", "calib.data", "check", "--predictions", str(pred), "--labels", str(lab), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 1, res.stderr
    assert json.loads(res.stdout)["n_problems"] == 4
    # the importer refuses the same data and leaves nothing behind
    with pytest.raises(DataError, match="case_000.nii.gz: prediction missing"):
        import_predictions(PredictionsConfig.make(pred, lab), tmp_path / "cache", "ext")
    assert not (tmp_path / "cache").exists()


def test_cli_check_clean_and_bad_arguments(tmp_path):
    root = tmp_path / "ext"
    write_prediction_phantoms(root, 2, fmt="nnunet", seed=1)
    base = [sys.executable, "-m", "calib.data", "check"]
    ok = subprocess.run(base + ["--predictions", str(root / "predictions"), "--labels", str(root / "labels"),
                                "--masks", str(root / "masks")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "predictions" in ok.stdout and "2 subject(s), OK" in ok.stdout
    bad = subprocess.run(base + ["--predictions", str(root / "nowhere"), "--labels", str(root / "labels")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "nowhere" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_nnunet_properties_refuse_foreign_pickles(tmp_path):
    root = tmp_path / "ext"
    write_prediction_phantoms(root, 1, fmt="nnunet")
    pkl = root / "predictions" / "case_000.pkl"
    pkl.write_bytes(pickle.dumps({"sitk_stuff": subprocess.Popen}))  # a class that is no plain value
    report = check_predictions(PredictionsConfig.make(root / "predictions", root / "labels"))
    assert [p.kind for p in report.problems] == ["unreadable"]
    assert "refusing" in report.problems[0].message and report.problems[0].path == str(pkl)  # named once


@pytest.mark.parametrize("fmt", ["nifti", "nnunet"])
def test_import_writes_both_caches_padded_and_is_reused(tmp_path, fmt):
    root = tmp_path / "ext"
    ids = write_prediction_phantoms(root, 3, fmt=fmt, seed=2)
    config = PredictionsConfig.make(root / "predictions", root / "labels", masks=root / "masks")
    cache = import_predictions(config, tmp_path / "cache", "ext")
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["subjects"] == ids and meta["kind"] == "predictions"
    shapes = {tuple(meta["subject_info"][c]["ras_shape"]) for c in ids}
    assert len(shapes) > 1  # the phantoms differ in size, so padding was needed
    common = tuple(meta["shape"])
    assert common == tuple(np.max(list(shapes), axis=0))
    for cid in ids:
        vol = load_logits(logits_dir(cache), cid)
        subj = load_subject(cache, cid)
        assert vol.logits.shape == subj.label.shape == common
        np.testing.assert_array_equal(vol.mask, subj.mask)
        np.testing.assert_array_equal(vol.label, subj.label * subj.mask)  # 0 outside the mask there
        # the padding lies outside the mask
        rx, ry, rz = meta["subject_info"][cid]["ras_shape"]
        assert not subj.mask[rx:].any() and not subj.mask[:, ry:].any() and not subj.mask[:, :, rz:].any()
        # labels come from the label files, in RAS order
        grid_label = nib.load(str(root / "labels" / f"{cid}.nii.gz"))
        ras = nib.as_closest_canonical(grid_label)
        np.testing.assert_array_equal(subj.label[:rx, :ry, :rz], np.asarray(ras.dataobj) > 0)
    mtime = (cache / "meta.json").stat().st_mtime_ns
    assert import_predictions(config, tmp_path / "cache", "ext") == cache  # a cache hit
    assert (cache / "meta.json").stat().st_mtime_ns == mtime
