"""The report leaves a degenerate base model (tag calib.degenerate) and its calibrations out of
the tables' means and tests, and names them under each table."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from test_report_store import _key, _Writer, fabricate_bins, per_subject_frame

from tracking.report import ReportError, ReportWarning
from tracking.report.build import build_report, compute_report

REASON = "saturated logits: median |logit| in the mask 900.0 > 88.7"


def _store(tmp_path, degenerate_folds=(1,)):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("guard", artifact_location=(tmp_path / "art").as_uri())
    w = _Writer(client, tmp_path / "staging")
    sweep = w.run(exp, {"calib.role": "sweep"})
    ids, folds = [f"s{i}" for i in range(8)], np.arange(8) // 4
    for weights in ("CE", "SD"):
        for fold in (0, 1):
            sel = folds == fold
            sids = [s for s, k in zip(ids, sel) if k]
            bad = weights == "SD" and fold in degenerate_folds
            # a collapsed model: Dice 0, ECE = 1 - prevalence; its Platt hardly better
            dice = np.zeros(4) if bad else 0.8 + 0.01 * np.arange(8)[sel]
            ece = np.full(4, 0.92) if bad else 0.03 + 0.001 * np.arange(8)[sel]
            base_tags = {"calib.degenerate": REASON} if bad else {}
            w.trial(exp, sweep, "base", "brats18", weights, "base", fold, "",
                    per_subject_frame(sids, folds[sel], dice, ece),
                    fabricate_bins(sids, ece, fold), extra_tags=base_tags)
            w.trial(exp, sweep, "calibrate", "brats18", weights, "platt", fold, "",
                    per_subject_frame(sids, folds[sel], dice, ece - 0.01),
                    fabricate_bins(sids, ece - 0.01, fold + 10),
                    extra_tags={"calib.upstream_key": _key("brats18", weights, "base", fold, "")})
    return uri


def test_degenerate_models_are_left_out_and_named(tmp_path):
    uri = _store(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = compute_report("guard", uri)
    (excluded,) = data.trials.excluded
    assert (excluded.dataset, excluded.weights, excluded.fold) == ("brats18", "SD", 1)
    assert excluded.reason == REASON and excluded.n_calibrations == 1
    res = data.results.set_index(["weights", "method"])
    # SD keeps fold 0 only, for the base model and its calibration alike (paired subjects)
    assert res.loc[("SD", "base"), "n_subjects"] == 4 and res.loc[("SD", "platt"), "n_subjects"] == 4
    assert res.loc[("SD", "base"), "dice_mean"] == pytest.approx(np.mean(0.8 + 0.01 * np.arange(4)))
    assert res.loc[("CE", "base"), "n_subjects"] == 8
    messages = [str(w.message) for w in caught if issubclass(w.category, ReportWarning)]
    assert any("degenerate base model brats18/SD fold 1" in m for m in messages)

    out = build_report("guard", tmp_path / "report", uri, log_artifacts=False)
    for name in ("table_brats18.md", "table_brats18.tex", "report.md"):
        text = (out.out_dir / name).read_text()
        assert "degenerate" in text and "SD fold 1" in text, name


def test_weights_whose_every_model_is_degenerate_leave_the_tables(tmp_path):
    uri = _store(tmp_path, degenerate_folds=(0, 1))
    # CE models are fine: the report still builds, SD is gone from it
    data = compute_report("guard", uri)
    assert set(data.results["weights"]) == {"CE"} and len(data.trials.excluded) == 2


def test_every_model_degenerate_names_them(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("guard", artifact_location=(tmp_path / "art").as_uri())
    w = _Writer(client, tmp_path / "staging")
    sweep = w.run(exp, {"calib.role": "sweep"})
    ps = per_subject_frame(["a"], [0], [0.0], [0.9])
    w.trial(exp, sweep, "base", "brats18", "SD", "base", 0, "", ps, fabricate_bins(["a"], [0.9], 0),
            extra_tags={"calib.degenerate": REASON})
    with pytest.raises(ReportError, match="every base model is degenerate.*brats18/SD fold 0"):
        compute_report("guard", uri)
