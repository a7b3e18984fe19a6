"""Which ECE estimate tracks the truth? (tracking.report.estimators), and both question files
(estimators_<dataset>.csv, train_time_<dataset>.csv) written by build_report from a store."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from test_report_store import _key, _Writer, fabricate_bins

from calib.metrics.estimators import ESTIMATOR_COLUMNS, ESTIMATORS, estimator_column
from tracking.report import files as names
from tracking.report.build import build_report
from tracking.report.estimators import ESTIMATOR_TABLE_COLUMNS, estimator_tables, estimators_markdown
from tracking.report.fetch import TrialRecord
from tracking.report.selection import Selection

IDS = [f"s{i}" for i in range(8)]


def _selection(dataset, weights, method):
    run = TrialRecord(run_id=f"{weights}-{method}", parent_id="p", status="FINISHED", start_time=0,
                      stage="calibrate", dataset=dataset, weights=weights, method=method, fold=0,
                      lr="", trial_key=f"{weights}{method}")
    return Selection(dataset, weights, method, "", "single", (run,), (), "val_loss")


def _synthetic():
    """Three methods whose true ECE is 0.02, 0.05, 0.08 (+ a subject spread); estimators built
    from the truth so their bias, RMSE and ranking are known by hand."""
    sel, tab = [], {}
    spread = np.linspace(-0.005, 0.005, 8)
    alternate = np.where(np.arange(8) % 2 == 0, 0.02, -0.02)
    for i, (weights, method) in enumerate((("CE-SD", "base"), ("CE-SD", "platt"), ("focal", "base"))):
        truth = 0.02 + 0.03 * i + spread
        frame = pd.DataFrame({"dice": 0.8, "ece": truth + 0.01, "true_ece": truth,
                              "true_ece_l2": truth}, index=pd.Index(IDS, name="subject_id"))
        frame[estimator_column("width20")] = truth + 0.01           # bias +1 pp, RMSE 1 pp, tau 1
        frame[estimator_column("sweep")] = truth + alternate         # bias 0, RMSE 2 pp, tau 1
        frame[estimator_column("mass20")] = 0.2 - truth              # order reversed: tau -1
        frame[estimator_column("l2_width20")] = truth + 0.005        # scored against true_ece_l2
        sel.append(_selection("phantom", weights, method))
        tab[("phantom", weights, method)] = frame
    # a real dataset (no p*): no estimator columns, no frame
    sel.append(_selection("brats18", "CE", "base"))
    tab[("brats18", "CE", "base")] = pd.DataFrame({"dice": [0.8], "ece": [0.05]},
                                                  index=pd.Index(["r1"], name="subject_id"))
    return sel, tab


def test_estimator_table_by_hand(tmp_path):
    sel, tab = _synthetic()
    frames = estimator_tables(sel, tab)
    assert set(frames) == {"phantom"}
    df = frames["phantom"]
    assert list(df.columns) == list(ESTIMATOR_TABLE_COLUMNS)
    assert list(df["estimator"]) == ["width20", "mass20", "sweep", "l2_width20"]  # module order
    r = df.set_index("estimator")
    assert r.loc["width20", "bias_pp"] == pytest.approx(1.0)
    assert r.loc["width20", "rmse_pp"] == pytest.approx(1.0)
    assert r.loc["width20", "kendall_tau"] == pytest.approx(1.0)
    assert r.loc["sweep", "bias_pp"] == pytest.approx(0.0, abs=1e-12)
    assert r.loc["sweep", "rmse_pp"] == pytest.approx(2.0)
    assert r.loc["mass20", "kendall_tau"] == pytest.approx(-1.0)
    assert r.loc["l2_width20", "truth"] == "true_ece_l2" and r.loc["width20", "truth"] == "true_ece"
    assert r.loc["l2_width20", "bias_pp"] == pytest.approx(0.5)
    assert set(r["n_pairs"]) == {24} and set(r["n_methods"]) == {3}
    assert r.loc["width20", "mean_truth_pct"] == pytest.approx(5.0)

    md = estimators_markdown(frames, names.estimators_csv)
    assert md.startswith("## Which ECE estimate tracks the truth?") and "estimators_phantom.csv" in md
    assert "Lowest RMSE: `l2_width20`" in md and "smallest |bias|: `sweep`" in md
    assert "highest Kendall τ: `width20`, `sweep`, `l2_width20`" in md
    assert "Skipped" in estimators_markdown({}, names.estimators_csv)


def test_one_method_has_no_ranking():
    sel, tab = _synthetic()
    frames = estimator_tables(sel[:1], tab)
    assert frames["phantom"]["kendall_tau"].isna().all()


# ---- end to end: a phantom store with CE-SD, a train-time weights value and estimator columns ----


def _per_subject(ids, fold, dice, ece, truth, rng):
    df = pd.DataFrame({"subject_id": ids, "fold": fold, "dice": dice, "ece": ece, "true_ece": truth,
                       "p_star_distance": truth + 0.01})
    for name in ESTIMATORS:
        df[estimator_column(name)] = truth + rng.normal(0.0, 0.002, len(ids))
    df["true_ece_l2"] = truth
    assert set(ESTIMATOR_COLUMNS) <= set(df.columns)
    return df


def _phantom_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("questions", artifact_location=(tmp_path / "art").as_uri())
    w = _Writer(client, tmp_path / "staging")
    sweep = w.run(exp, {"calib.role": "sweep"})
    rng = np.random.default_rng(0)
    ids, folds = [f"p{i}" for i in range(8)], np.arange(8) // 4
    # (weights, method) -> (test ECE offset, val ECE): platt is chosen on val for CE-SD
    cells = {("CE-SD", "base"): (0.06, 0.06), ("CE-SD", "platt"): (0.02, 0.01),
             ("CE-SD", "temperature"): (0.01, 0.03), ("focal", "base"): (0.03, 0.03),
             ("focal", "platt"): (0.015, 0.01)}
    for (weights, method), (offset, val) in cells.items():
        stage = "base" if method == "base" else "calibrate"
        for fold in (0, 1):
            sel = folds == fold
            sids = [s for s, k in zip(ids, sel) if k]
            truth = offset + 0.001 * np.arange(8)[sel]
            ps = _per_subject(sids, fold, 0.8, truth + 0.005, truth, rng)
            tags = {"calib.role": "trial", "calib.stage": stage, "calib.dataset": "phantom",
                    "calib.weights": weights, "calib.method": method, "calib.fold": str(fold),
                    "calib.lr": "", "calib.protocol": "honest",
                    "calib.trial_key": _key("phantom", weights, method, fold)}
            if stage == "calibrate":
                tags["calib.upstream_key"] = _key("phantom", weights, "base", fold)
            metrics = {"best_val_loss": 0.5, "dice_mean": 0.8, "ece_mean": float(ps["ece"].mean()),
                       "n_subjects": 4, "val_ece_mean": val}
            w.run(exp, tags, sweep, "FINISHED", metrics,
                  {"per_subject.csv": ps, "reliability_bins.csv": fabricate_bins(sids, truth, fold)})
    return uri


def test_build_report_writes_both_question_files(tmp_path):
    uri = _phantom_store(tmp_path)
    out = build_report("questions", tmp_path / "report", uri, log_artifacts=False)
    written = {p.name for p in out.files}
    assert {"train_time_phantom.csv", "estimators_phantom.csv"} <= written
    tt = pd.read_csv(tmp_path / "report" / "train_time_phantom.csv")
    (row,) = tt.itertuples(index=False)
    assert row.weights == "focal" and row.reference_method == "platt"  # chosen on val, not test
    assert row.ece_n_vs_reference == 8 and row.ece_verdict_vs_reference == "higher"
    assert row.posthoc_method == "platt"
    est = pd.read_csv(tmp_path / "report" / "estimators_phantom.csv")
    assert list(est["estimator"]) == list(ESTIMATORS)
    assert set(est["n_pairs"]) == {40} and set(est["n_methods"]) == {5}
    assert (est["rmse_pp"] < 1.0).all() and not math.isnan(est["kendall_tau"].iloc[0])
    report = (tmp_path / "report" / "report.md").read_text()
    assert report.index("## Does calibration help?") < report.index("## Train-time or post hoc?") \
        < report.index("## Which ECE estimate tracks the truth?") < report.index("## Rules")
