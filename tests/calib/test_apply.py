"""calib.apply: a fitted trial applied to a raw case gives NIfTI on the input's grid and the
trial's own test-fold prediction.

The trials here are real calib.stages runs (a tiny U-Net, one epoch, on BraTS-like phantoms
stored LPS at 1 mm and cached RAS at 2 mm), so the preprocessing that calib.apply repeats and
undoes is the one the trial's data went through.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d

from calib.apply import ApplyError, apply_model, load_fitted
from calib.data import DataError, discover, make_folds, preprocess_dataset, read_meta, write_phantoms
from calib.data.predictions import PredictionsConfig, import_predictions, logits_dir
from calib.data.predictions_phantom import write_prediction_phantoms
from calib.evaluate import evaluate_subject
from calib.methods import SubjectRef, SubjectSet, build_method, load_method
from calib.nets import UNetConfig
from calib.stages import make_split, run_base, run_calibrate
from calib.training import TrainConfig

SPACING, SHAPE = 2.0, (18, 18, 12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Phantoms, their cache, a split, a base (SD) model and a Platt + MC-decoder trial on it."""
    torch.set_num_threads(1)
    base_dir = tmp_path_factory.mktemp("apply")
    root = base_dir / "brats18"
    write_phantoms("brats18", root, 6, seed=0, shape=(36, 36, 24))
    cache = preprocess_dataset("brats18", root, base_dir / "cache", SPACING, SHAPE, workers=1, progress=False)
    folds = make_folds(read_meta(cache)["subjects"], 2, 0)
    split = make_split(cache, folds, 0)
    net_cfg = UNetConfig.tiny(4, "brats18", levels=2, base=2)
    train = TrainConfig(lr=1e-2, max_epochs=1, batch_size=2)
    cpu = torch.device("cpu")
    base = run_base("SD", net_cfg, train, split, base_dir / "base", cpu, None)
    trials = {}
    for method, params in (("platt", {"max_epochs": 2}), ("mc_decoder", {"max_epochs": 1, "n_samples": 4})):
        result = run_calibrate(method, params, "SD", net_cfg, train, split, base.weights,
                               base.extra_artifacts["logits"], base_dir / method, cpu)
        model_dir = base_dir / f"model-{method}"
        model_dir.mkdir()
        config = {"stage": "calibrate", "method": method, "weights": "SD", "dataset": "brats18",
                  "net": dataclasses.asdict(net_cfg),
                  "data": {"dataset": "brats18", "preprocessing": {"spacing": SPACING, "shape": list(SHAPE)}}}
        (model_dir / "trial_config.json").write_text(json.dumps(config))
        shutil.copy(result.weights, model_dir / "method.pt")
        shutil.copy(base.weights, model_dir / "base_weights.pt")
        trials[method] = (model_dir, result)
    subjects = {s.subject_id: s for s in discover("brats18", root).subjects}
    return {"root": root, "cache": cache, "split": split, "base": base, "trials": trials,
            "subjects": subjects, "dir": base_dir}


def _resample_to_cache(path: Path, cache: Path, sid: str) -> np.ndarray:
    """An output NIfTI resampled (world coordinates) onto the subject's cache grid."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    img = nib.load(str(path))
    src = MetaTensor(torch.as_tensor(np.asarray(img.dataobj, np.float32))[None], affine=torch.as_tensor(img.affine))
    info = read_meta(cache)["subject_info"][sid]
    out = SpatialResample(mode="bilinear", padding_mode="zeros")(
        src, dst_affine=torch.as_tensor(np.asarray(info["affine"])), spatial_size=SHAPE)
    return np.asarray(out[0])


@pytest.mark.parametrize("method", ["platt", "mc_decoder"])
def test_apply_to_a_test_subject_matches_the_trials_prediction(trained, tmp_path, method):
    model_dir, result = trained["trials"][method]
    split, cache = trained["split"], trained["cache"]
    sid = split.test_ids[0]
    files = trained["subjects"][sid]
    model = load_fitted(model_dir)
    out = apply_model(model, files.directory, tmp_path / "out")

    # on the model grid: exactly what the trial predicted for this subject ...
    logits = trained["base"].extra_artifacts["logits"] if method == "platt" else None
    ref = load_method(model_dir / "method.pt").predict_proba(SubjectRef(sid, cache, logits))
    np.testing.assert_allclose(out.prediction.prob, ref, atol=1e-6)
    subj = SubjectRef(sid, cache, None)
    row, _ = evaluate_subject(out.prediction.prob, subj.label, subj.mask)
    logged = result.per_subject.set_index("subject_id").loc[sid]
    assert row["dice"] == pytest.approx(logged["dice"], abs=1e-6)
    assert row["ece"] == pytest.approx(logged["ece"], abs=1e-6)
    assert (out.prediction.std is not None) == (method == "mc_decoder")
    if method == "mc_decoder":
        assert (out.prediction.std[subj.mask] > 0).any() and (out.prediction.std[~subj.mask] == 0).all()

    # ... written on the input's own grid (the LPS, 1 mm FLAIR), which maps back onto the cache grid
    flair = nib.load(str(files.images[0]))
    assert set(out.files) == ({"prob", "std"} if method == "mc_decoder" else {"prob"})
    for path in out.files.values():
        img = nib.load(str(path))
        assert img.shape == flair.shape
        np.testing.assert_allclose(img.affine, flair.affine, atol=1e-6)
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    back = _resample_to_cache(out.files["prob"], cache, sid)
    # The 1 mm voxel centres lie half-way between 2 mm ones, so 2 mm -> 1 mm -> 2 mm trilinear is
    # the blur [1/8, 3/4, 1/8] along each axis, exactly; a misplaced grid (a flip, a half-voxel
    # shift) would not give it. Compared where the blur stays inside the volume.
    blurred = out.prediction.prob
    for axis in range(3):
        blurred = correlate1d(blurred, [0.125, 0.75, 0.125], axis=axis, mode="constant")
    interior = np.zeros(SHAPE, bool)
    interior[1:-1, 1:-1, 1:-1] = True
    np.testing.assert_allclose(back[interior], blurred[interior], atol=1e-5)


def test_a_new_patient_without_label_and_bad_input(trained, tmp_path):
    model = load_fitted(trained["trials"]["platt"][0])
    sid = trained["split"].test_ids[0]
    src = trained["subjects"][sid]
    new = tmp_path / "new" / "Brats18_new_1"
    new.mkdir(parents=True)
    for path in src.images:
        shutil.copy(path, new / path.name.replace(sid, new.name))
    out = apply_model(model, new, tmp_path / "out")
    assert out.files["prob"].name == "Brats18_new_1_prob.nii.gz"
    assert nib.load(str(out.files["prob"])).shape == nib.load(str(src.images[0])).shape

    bad = new / f"{new.name}_t1.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match=str(bad)):
        apply_model(model, new, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    with pytest.raises(ApplyError, match="subject folder"):
        apply_model(model, src.images[0], tmp_path / "out3")


def test_cli_applies_a_model_folder_and_rejects_bad_input(trained, tmp_path):
    model_dir = trained["trials"]["platt"][0]
    subject = trained["subjects"][trained["split"].test_ids[0]].directory
    cmd = [sys.executable, "-m", "calib.apply", "--model-dir", str(model_dir), "--out", str(tmp_path / "o")]
    res = subprocess.run(cmd + ["--input", str(subject)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"{subject.name}_prob.nii.gz" in res.stdout
    res = subprocess.run(cmd + ["--input", str(tmp_path / "missing")], capture_output=True, text=True)
    assert res.returncode == 1 and "missing" in res.stderr
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 2 and "--input" in res.stderr


@pytest.mark.parametrize("fmt", ["nnunet", "nifti"])
def test_a_calibrator_of_external_predictions_applied_to_a_new_map(tmp_path, fmt):
    torch.set_num_threads(1)
    root = tmp_path / "ext"
    ids = write_prediction_phantoms(root, 5, scale=3.0, seed=4, fmt=fmt, axcodes="PIR")
    config = PredictionsConfig.make(root / "predictions", root / "labels")
    cache = import_predictions(config, tmp_path / "cache", "ext")
    calibrator = build_method("temperature", {"max_epochs": 30, "lr": 5e-2})
    calibrator.fit(SubjectSet(ids[:3], cache, logits_dir(cache)), SubjectSet(ids[3:4], cache, logits_dir(cache)),
                   torch.device("cpu"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    calibrator.save(model_dir / "method.pt")
    (model_dir / "trial_config.json").write_text(json.dumps({
        "stage": "calibrate", "method": "temperature", "weights": "CE",
        "data": {"kind": "predictions", "dataset": "ext", "predictions": {"values": "probability"}}}))
    model = load_fitted(model_dir)
    assert model.inputs == "logits"
    cid = ids[4]
    src = root / "predictions" / (f"{cid}.npz" if fmt == "nnunet" else f"{cid}.nii.gz")
    out = apply_model(model, src, tmp_path / "out")
    label = nib.load(str(root / "labels" / f"{cid}.nii.gz"))  # the case's own (PIR) grid
    written = nib.load(str(out.files["prob"]))
    assert written.shape == label.shape
    np.testing.assert_allclose(written.affine, label.affine, atol=1e-6)
    # the calibrated map equals the calibrator's prediction on the imported (RAS, padded) case
    info = json.loads((cache / "meta.json").read_text())["subject_info"][cid]
    cached = calibrator.predict_proba(SubjectRef(cid, cache, logits_dir(cache)))
    rx, ry, rz = info["ras_shape"]
    ras = nib.Nifti1Image(cached[:rx, :ry, :rz], np.asarray(info["ras_affine"]))
    from_ras = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.io_orientation(label.affine))
    expected = ras.as_reoriented(from_ras)  # nibabel's own way back to the label's (PIR) order
    np.testing.assert_allclose(expected.affine, label.affine, atol=1e-6)
    np.testing.assert_allclose(np.asarray(written.dataobj), np.asarray(expected.dataobj), atol=1e-6)
    with pytest.raises(ApplyError, match="probability/logit map"):
        apply_model(model, root / "predictions", tmp_path / "out2")
