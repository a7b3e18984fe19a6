"""A grid dataset of kind ``predictions``: another network's output calibrated by the sweep.

Config and plan: the dataset's keys are validated (names, folders, values), it has no
pretrain/base training -- a ``base`` trial per fold scores the imported predictions and only the
logit-based methods run, weights ``external``. End to end (slow): real Ray, real MLflow, phantom
predictions in nnU-Net's format; the report ranks the methods and registers the best one, and
``tracking.apply --run`` writes a calibrated map on a case's own grid.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from calib.data.predictions_phantom import write_prediction_phantoms
from sweeps.grid import GridError, load_grid
from sweeps.plan import expand
from tracking import schema

REPO = Path(__file__).resolve().parents[2]


def _grid(tmp_path: Path, data: Path, **dataset) -> Path:
    grid = {
        "name": "ext", "seed": 0, "protocol": "honest", "calib_fraction": 0.4,
        "work_dir": str(tmp_path / "work"),
        "datasets": {"mynet": {"kind": "predictions", "predictions": str(data / "predictions"),
                               "labels": str(data / "labels"), "masks": str(data / "masks"),
                               "values": "probability", **dataset}},
        "folds": {"n_folds": 3, "seed": 0},
        "training": {"calibrate": {"max_epochs": 20}},
        "methods": {"platt": {}, "temperature": {}, "isotonic": {}, "tta": {},
                    "finetune": {"lr": {"CE": 1e-4, "CE-SD": 1e-3, "SD": 1e-3}}},
        "resources": {"calibrate": {"cpu": 1}},
        "execution": {"max_failures": 1},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ext") / "data"
    write_prediction_phantoms(root, 9, scale=3.0, seed=11, fmt="nnunet", base_shape=(22, 22, 14))
    return root


def test_plan_has_an_imported_base_and_only_logit_methods(tmp_path, data):
    grid = load_grid(str(_grid(tmp_path, data)))
    ds = grid.dataset("mynet")
    assert ds.kind == "predictions" and ds.predictions.masks == data / "masks"
    plan = expand(grid)
    assert plan.counts() == {("base", "base"): 3, ("calibrate", "platt"): 3, ("calibrate", "temperature"): 3,
                             ("calibrate", "isotonic"): 3}  # finetune and tta need a network
    assert {t.weights for t in plan.trials} == {"external"} and not any(t.stage == "pretrain" for t in plan.trials)
    for t in plan.trials:
        assert t.config["data"]["kind"] == "predictions" and t.config["net"] is None
        if t.stage == "calibrate":
            assert plan.by_key[t.upstream].stage == "base" and plan.by_key[t.upstream].fold == t.fold
    # the resolved grid loads back to the same plan
    again = tmp_path / "again.yaml"
    again.write_text(grid.to_yaml())
    assert [t.key for t in expand(load_grid(str(again))).trials] == [t.key for t in plan.trials]
    # the reading rule is part of the trial key
    other = expand(load_grid(str(_grid(tmp_path, data, foreground=[1]))))
    assert not {t.key for t in other.trials} & {t.key for t in plan.trials}


@pytest.mark.parametrize("change, match", [
    ({"values": "logits"}, r"datasets.mynet.values: unknown values 'logits' \(did you mean 'logit'\?\)"),
    ({"labels": None}, r"datasets.mynet.labels: is required"),
    ({"mask": "x"}, r"datasets.mynet.mask: unknown key \(did you mean 'masks'\?\)"),
    ({"foreground": [0]}, r"datasets.mynet.foreground: must be >= 1"),
])
def test_bad_predictions_keys_are_one_clear_error(tmp_path, data, change, match):
    with pytest.raises(GridError, match=match):
        load_grid(str(_grid(tmp_path, data, **change)))


def test_missing_folders_and_no_logit_method(tmp_path, data):
    with pytest.raises(GridError, match=r"the labels folder .*nowhere does not exist"):
        load_grid(str(_grid(tmp_path, data, labels=str(tmp_path / "nowhere"))))
    path = _grid(tmp_path, data)
    grid = yaml.safe_load(path.read_text())
    grid["methods"] = {"finetune": {"lr": {"CE": 1e-4, "CE-SD": 1e-3, "SD": 1e-3}}, "tta": {}}
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(GridError, match=r"kind predictions runs only the logit-based methods"):
        load_grid(str(path))


def test_the_example_grid_parses():
    grid = load_grid(str(REPO / "sweeps" / "grids" / "external-example.yaml"), require_data=False)
    assert expand(grid).counts() == {("base", "base"): 3, **{("calibrate", m): 3 for m in (
        "platt", "temperature", "auxiliary", "lts", "beta", "histogram_binning", "isotonic")}}


@pytest.mark.slow
def test_launch_calibrates_external_predictions_end_to_end(ray_session, tmp_path, data, mlflow_store):
    from sweeps.launch_sweep import LaunchOptions, launch

    grid_file = _grid(tmp_path, data)
    out = io.StringIO()
    rc = launch(LaunchOptions(grid=str(grid_file), tracking_uri=mlflow_store), out=out, err=out)
    text = out.getvalue()
    assert rc == 0, text
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("calib-ext")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=100)
            if r.data.tags.get(schema.ROLE) == schema.ROLE_TRIAL]
    assert len(runs) == 12 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert r.data.tags[schema.WEIGHTS] == "external"
        models = r.outputs.model_outputs
        assert (len(models) == 1) == (r.data.tags[schema.STAGE] == "calibrate")
        assert {i.dataset.name.rsplit("-", 1)[1] for i in r.inputs.dataset_inputs} == {"train", "val", "calib", "test"}
    # the calibrators fit on calib, the imported base is scored as is; every method beats it on ECE
    results = pd.read_csv(tmp_path / "work" / "report" / "results_long.csv")
    assert set(results["weights"]) == {"external"}
    ece = results.set_index("method")["ece_pct_mean"]
    assert ece["platt"] < ece["base"] and ece["temperature"] < ece["base"] and ece["isotonic"] < ece["base"]
    assert "registered models:/calib-ext-mynet-external@best" in text

    # tracking.apply --run on one test case of a calibrate trial: its own grid, the trial's prediction
    trial = next(r for r in runs if r.data.tags[schema.METHOD] == "platt")
    splits = json.loads(Path(client.download_artifacts(trial.info.run_id, schema.SPLITS, str(tmp_path))).read_text())
    case = splits["test"][0]
    res = subprocess.run([sys.executable, "-m", "tracking.apply", "--run", trial.info.run_id, "--tracking-uri",
                          mlflow_store, "--input", str(data / "predictions" / f"{case}.npz"),
                          "--mask", str(data / "masks" / f"{case}.nii.gz"), "--out", str(tmp_path / "applied")],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    written = nib.load(str(tmp_path / "applied" / f"{case}_prob.nii.gz"))
    label = nib.load(str(data / "labels" / f"{case}.nii.gz"))
    assert written.shape == label.shape
    np.testing.assert_allclose(written.affine, label.affine, atol=1e-6)
    per_subject = pd.read_csv(client.download_artifacts(trial.info.run_id, schema.PER_SUBJECT, str(tmp_path / "ps")))
    from calib import metrics

    mask = np.asarray(nib.load(str(data / "masks" / f"{case}.nii.gz")).dataobj) > 0
    prob = np.asarray(written.dataobj)
    logged = per_subject.set_index("subject_id").loc[case]
    assert metrics.ece(prob, np.asarray(label.dataobj), mask) == pytest.approx(logged["ece"], abs=1e-6)
