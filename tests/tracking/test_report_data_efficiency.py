"""tracking.report.data_efficiency from a small synthetic set of runs: the table per size with its
intervals, subjects_needed, the figure and the section; collect_trials keeps the subset runs out
of the tables' runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from tracking import schema
from tracking.report import files as names
from tracking.report.data_efficiency import (data_efficiency_figure, data_efficiency_markdown,
                                             data_efficiency_tables)
from tracking.report.errors import WarningLog
from tracking.report.fetch import TrialRecord, TrialSet, collect_trials
from tracking.report.intervals import bootstrap_ci
from tracking.report.tables import method_label

SUBJECTS = [f"s{i}" for i in range(6)]
#: mean test ECE by (method, size): platt falls with n and is within 10 % of all from 4 on;
#: temperature is as good with 1 subject as with all
ECE = {("platt", "1"): 0.20, ("platt", "2"): 0.14, ("platt", "4"): 0.105, ("platt", "all"): 0.10,
       ("temperature", "1"): 0.051, ("temperature", "2"): 0.06, ("temperature", "4"): 0.05,
       ("temperature", "all"): 0.05}
N_ALL = 6.0


def _run(method: str, size: str | None, i: int) -> TrialRecord:
    metrics = {"best_val_loss": 1.0}
    if size is not None:
        metrics[schema.N_CALIB_SUBJECTS] = N_ALL if size == "all" else float(size)
    return TrialRecord(run_id=f"r{i}", parent_id="p", status="FINISHED", start_time=i, stage="calibrate",
                       dataset="brats18", weights="CE", method=method, fold=0, lr="",
                       trial_key=f"k{i}", protocol="honest", metrics=metrics, calib_subjects=size)


def _frames(phantom: bool):
    runs = [_run(m, s, i) for i, (m, s) in enumerate(ECE)]
    runs.append(_run("isotonic", None, 99))  # not covered: no tag, not in the table
    per = {}
    for r in runs:
        mean = ECE.get((r.method, r.calib_subjects), 0.3)
        spread = np.linspace(-0.01, 0.01, len(SUBJECTS))
        df = pd.DataFrame({"subject_id": SUBJECTS, "fold": 0, "dice": 0.8, "ece": mean + spread})
        if phantom:
            df["true_ece"] = mean / 2 + spread
        per[r.run_id] = df
    trials = TrialSet("1", "exp", "experiment", tuple(r for r in runs if not r.is_subset), ("p",), None, {}, 0,
                      (), tuple(r for r in runs if r.is_subset))
    return data_efficiency_tables(trials, "val_loss", lambda r: per[r.run_id], WarningLog()), per


def test_the_table_has_one_row_per_method_and_size_and_the_subjects_needed():
    frames, per = _frames(phantom=True)
    frame = frames["brats18"]
    assert list(frame["method"]) == ["platt"] * 4 + ["temperature"] * 4
    assert list(frame["calib_subjects"]) == ["1", "2", "4", "all"] * 2
    assert list(frame["n_calib"]) == [1, 2, 4, N_ALL] * 2
    assert (frame["n_test"] == len(SUBJECTS)).all()
    need = frame.drop_duplicates("method").set_index("method")["subjects_needed"]
    assert need.to_dict() == {"platt": "4", "temperature": "1"}
    row = frame.iloc[0]
    low, high = bootstrap_ci(per["r0"]["ece"])
    assert np.isclose(row["ece_pct_mean"], 100 * per["r0"]["ece"].mean())
    assert np.isclose(row["ece_pct_ci_low"], 100 * low) and np.isclose(row["ece_pct_ci_high"], 100 * high)
    assert np.isclose(row["true_ece_pct_mean"], 100 * per["r0"]["true_ece"].mean())


def test_without_truth_no_true_columns_and_without_tags_no_table():
    frames, _ = _frames(phantom=False)
    assert "true_ece_pct_mean" not in frames["brats18"]
    plain = TrialSet("1", "exp", "experiment", (_run("platt", None, 0),), ("p",), None, {}, 0)
    assert data_efficiency_tables(plain, "val_loss", lambda r: None, WarningLog()) == {}
    assert data_efficiency_markdown({}, names.data_efficiency_csv, names.data_efficiency_png) == ""


def test_the_figure_and_the_section(tmp_path):
    frames, _ = _frames(phantom=True)
    fig = data_efficiency_figure(frames["brats18"], "brats18")
    assert len(fig.axes) == 2  # test ECE and true ECE
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2 and lines[0].get_marker() != lines[1].get_marker()
    assert lines[0].get_color() != lines[1].get_color()
    assert fig.axes[0].get_xscale() == "log"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2", "4", "all (6)"]
    fig.savefig(tmp_path / "f.png")
    text = data_efficiency_markdown(frames, names.data_efficiency_csv, names.data_efficiency_png)
    assert text.startswith("## How many calibration subjects?")
    assert f"| CE | {method_label('platt')} | 10.00 | 6 | 4 | 10.50 |" in text
    assert "data_efficiency_brats18.csv" in text and "data_efficiency_brats18.png" in text


def test_collect_trials_keeps_subset_runs_out_of_the_tables(mlflow_store):
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("subjects")
    sweep = client.create_run(exp, tags={schema.ROLE: schema.ROLE_SWEEP}).info.run_id
    tags = {schema.ROLE: schema.ROLE_TRIAL, schema.PARENT_RUN_ID: sweep, schema.STAGE: "calibrate",
            schema.DATASET: "brats18", schema.WEIGHTS: "CE", schema.METHOD: "platt", schema.FOLD: "0",
            schema.LR: ""}
    for i, size in enumerate(("1", "all")):
        run = client.create_run(exp, tags={**tags, schema.TRIAL_KEY: f"k{i}", schema.CALIB_SUBJECTS: size})
        client.set_terminated(run.info.run_id, "FINISHED")
    other = client.create_run(exp, tags={**tags, schema.METHOD: "isotonic", schema.TRIAL_KEY: "k9"})
    client.set_terminated(other.info.run_id, "FINISHED")
    trials = collect_trials(client, "subjects", sweep)
    assert sorted((r.method, r.calib_subjects) for r in trials.runs) == [("isotonic", None), ("platt", "all")]
    assert [(r.method, r.calib_subjects) for r in trials.subset_runs] == [("platt", "1")]
