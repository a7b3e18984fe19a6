"""The logit-based calibrators, unchanged, on another network's imported predictions.

Phantom predictions are overconfident by a known factor (``p = sigmoid(3 * logit(p*))``, labels
drawn from ``p*``); after importing them (calib.data.predictions) Platt, temperature and the
auxiliary conv are fitted on some cases and scored on others: the ECE and the true calibration
error (mean |p - p*| in the mask, measurable only because the phantom knows p*) must fall.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.special import expit

from calib import metrics
from calib.data.predictions import PredictionsConfig, import_predictions, logits_dir
from calib.data.predictions_phantom import write_prediction_phantoms
from calib.methods import SubjectSet, build_method

SCALE = 3.0


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ext")
    ids = write_prediction_phantoms(root, 8, scale=SCALE, seed=5, fmt="nnunet", axcodes="LPI")
    config = PredictionsConfig.make(root / "predictions", root / "labels", masks=root / "masks")
    cache = import_predictions(config, root / "cache", "ext")
    truth = {}
    for cid in ids:  # p* in the caches' RAS order, padded like them
        img = nib.as_closest_canonical(nib.load(str(root / "truth" / f"{cid}.nii.gz")))
        truth[cid] = np.asarray(img.dataobj, dtype=np.float32)
    return cache, ids, truth


def _scores(prob_of, subjects, truth):
    eces, true_errors = [], []
    for s in subjects:
        prob, mask = prob_of(s), s.mask
        t = np.zeros_like(prob)
        t[tuple(slice(0, n) for n in truth[s.subject_id].shape)] = truth[s.subject_id]
        eces.append(metrics.ece(prob, s.label, mask))
        true_errors.append(float(np.abs(prob[mask] - t[mask]).mean()))
    return float(np.mean(eces)), float(np.mean(true_errors))


@pytest.mark.parametrize("method", ["platt", "temperature", "auxiliary"])
def test_calibrators_fix_overconfident_external_predictions(imported, method):
    cache, ids, truth = imported
    sets = {name: SubjectSet(part, cache_dir=cache, logits_dir=logits_dir(cache))
            for name, part in (("train", ids[:4]), ("val", ids[4:6]), ("test", ids[6:]))}
    # few slices per epoch here: a larger step than the paper recipe so the fit converges
    calibrator = build_method(method, {"max_epochs": 100, "lr": 1e-2})
    calibrator.fit(sets["train"], sets["val"], torch.device("cpu"))
    base_ece, base_true = _scores(lambda s: np.where(s.mask, expit(s.logits), 0.0), sets["test"], truth)
    ece, true_error = _scores(lambda s: calibrator.predict_proba(s), sets["test"], truth)
    assert base_ece > 0.04  # the phantom network is clearly overconfident
    assert ece < 0.6 * base_ece, (method, base_ece, ece)
    assert true_error < 0.75 * base_true, (method, base_true, true_error)
    if method == "temperature":  # the fitted T undoes the known factor
        assert calibrator.temperature == pytest.approx(SCALE, rel=0.25)
