"""End to end: a tiny phantom grid with one test-time shift (datasets.<name>.shift): the base and
the calibrate trial score it (shift_<name>_* metrics, per_subject_shift.csv, the base's
logits_shift/), and the report writes shift_<dataset>.csv and its section."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from support.grids import PHANTOM, tiny_grid

from sweeps.launch_sweep import LaunchOptions, launch
from tracking import schema

pytestmark = pytest.mark.slow


def test_shift_is_scored_by_base_and_calibrator_and_reported(ray_session, tmp_path, mlflow_store):
    grid_file = tiny_grid(tmp_path / "grid.yaml", tmp_path / "data", tmp_path / "cache",
                          datasets={"brats18": {"phantom": PHANTOM, "shift": {"noisy": {"noise": 3.0}}}},
                          weights=["SD"], methods={"temperature": {}},
                          folds={"n_folds": 2, "seed": 0, "only": [0]})
    out = io.StringIO()
    rc = launch(LaunchOptions(grid=str(grid_file), tracking_uri=mlflow_store), out=out, err=out)
    assert rc == 0, out.getvalue()
    # fold 0 of 2 runs: the shift renders only fold 0's test subjects, beside the whole dataset's name
    (written,) = (tmp_path / "data" / "shifts" / "noisy").glob("brats18-test-*")
    rendered = json.loads((written / ".calib-phantom.json").read_text())["subjects"]

    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("calib-tiny")
    trials = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get(schema.ROLE) == schema.ROLE_TRIAL]
    assert sorted(r.data.tags[schema.STAGE] for r in trials) == ["base", "calibrate"]
    for r in trials:
        m = r.data.metrics
        for metric in ("ece", "dice", "true_ece"):
            assert 0 <= m[schema.shift_metric("noisy", metric)] <= 1
        rows = pd.read_csv(client.download_artifacts(r.info.run_id, schema.PER_SUBJECT_SHIFT,
                                                     str(tmp_path / r.info.run_id)))
        assert set(rows["shift"]) == {"none", "noisy"}
        assert sorted(rows.loc[rows["shift"] == "noisy", "subject_id"]) == \
            sorted(rows.loc[rows["shift"] == "none", "subject_id"]) == rendered
        assert m[schema.shift_metric("noisy", "ece")] == pytest.approx(
            rows.loc[rows["shift"] == "noisy", "ece"].mean())
        # per_subject.csv keeps its rows: in-distribution only
        per_subject = pd.read_csv(client.download_artifacts(r.info.run_id, schema.PER_SUBJECT,
                                                            str(tmp_path / r.info.run_id / "ps")))
        assert "shift" not in per_subject.columns and m[schema.ECE_MEAN] == pytest.approx(per_subject["ece"].mean())
        if r.data.tags[schema.STAGE] == "base":
            listed = [a.path for a in client.list_artifacts(r.info.run_id, schema.LOGITS_SHIFT_DIR)]
            assert listed == [f"{schema.LOGITS_SHIFT_DIR}/noisy"]

    report = Path(tmp_path / "work" / "report")
    table = pd.read_csv(report / "shift_brats18.csv")
    assert sorted(table["method"]) == ["base", "temperature"] and set(table["shift"]) == {"noisy"}
    assert table["ece_mean"].between(0, 1).all() and table["ece_mean_in"].between(0, 1).all()
    temp = table[table["method"] == "temperature"].iloc[0]
    assert 0 <= temp["ece_p_vs_base"] <= 1
    assert "## Under shift" in (report / "report.md").read_text()
