"""End to end with the real stages, Ray and MLflow: a tiny phantom grid with
``calib_subjects: [1, all]`` for temperature scaling fits each trial on the calib subjects it says
(splits.json), tags them, and the report writes data_efficiency_<dataset>.csv."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from support.grids import tiny_grid

from sweeps.grid import load_grid
from sweeps.launch_sweep import LaunchOptions, launch
from sweeps.plan import expand
from tracking import schema

pytestmark = pytest.mark.slow


def test_calib_subjects_fit_on_the_subsets_and_report_their_ece(ray_session, phantom_root, shared_cache,
                                                                tmp_path, mlflow_store):
    # 3 folds of the 6 phantoms, fold 0 only: 4 in the pool -> 1 train, 1 val, 2 calib
    grid_file = tiny_grid(tmp_path / "grid.yaml", phantom_root, shared_cache,
                          methods={"temperature": {}}, calib_fraction=0.4,
                          folds={"n_folds": 3, "seed": 0, "only": [0]}, calib_subjects=[1, "all"])
    plan = expand(load_grid(str(grid_file)))
    out = io.StringIO()
    assert launch(LaunchOptions(grid=str(grid_file), tracking_uri=mlflow_store), out=out, err=out) == 0, \
        out.getvalue()

    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("calib-tiny")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=100)
            if r.data.tags.get(schema.STAGE) == "calibrate"]
    assert sorted(r.data.tags[schema.CALIB_SUBJECTS] for r in runs) == ["1", "all"]
    calib = {}
    for r in runs:
        spec = plan.by_key[r.data.tags[schema.TRIAL_KEY]]
        assert str(spec.calib_subjects) == r.data.tags[schema.CALIB_SUBJECTS]
        assert r.info.run_name == spec.label
        path = client.download_artifacts(r.info.run_id, schema.SPLITS, str(tmp_path / r.info.run_id))
        splits = json.loads(Path(path).read_text())
        calib[r.data.tags[schema.CALIB_SUBJECTS]] = splits
        assert r.data.metrics[schema.N_CALIB_SUBJECTS] == len(splits["calib"])
    assert len(calib["1"]["calib"]) == 1 and len(calib["all"]["calib"]) == 2
    assert set(calib["1"]["calib"]) < set(calib["all"]["calib"])
    assert calib["1"]["test"] == calib["all"]["test"]

    report = tmp_path / "work" / "report"
    table = pd.read_csv(report / "data_efficiency_brats18.csv", dtype={"calib_subjects": str})
    assert list(table["calib_subjects"]) == ["1", "all"] and set(table["method"]) == {"temperature"}
    assert list(table["n_calib"]) == [1, 2] and "true_ece_pct_mean" in table
    assert (report / "data_efficiency_brats18.png").exists()
    assert "## How many calibration subjects?" in (report / "report.md").read_text()
    # the subset run is not a second temperature row of the tables
    results = pd.read_csv(report / "results_long.csv")
    assert (results["method"] == "temperature").sum() == 1
