"""``python -m tracking.apply``: a trial run or a registered model, resolved through MLflow (a real
SQLite store), applied to a folder of nnU-Net predictions case by case -- the MLflow half of
calib.apply, kept out of calib. Messages name the model by the URI the user gave."""

from __future__ import annotations

import dataclasses
import json
import shutil

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from calib.apply import apply_model, load_fitted
from calib.data.predictions import PredictionsConfig, import_predictions, logits_dir
from calib.data.predictions_phantom import write_prediction_phantoms
from calib.methods import SubjectSet, build_method
from calib.methods.network_based import save_weights
from calib.nets import UNet3D, UNetConfig
from tracking import apply as tapply
from tracking import logged_model
from tracking import models as tm
from tracking import schema

EXTERNAL = {"kind": "predictions", "dataset": "ext", "predictions": {"values": "probability"}}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """nnU-Net phantom predictions, their import, and a temperature calibrator fitted on two cases."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("apply-cmd")
    ids = write_prediction_phantoms(root / "data", 4, scale=3.0, seed=3, fmt="nnunet")
    cache = import_predictions(PredictionsConfig.make(root / "data/predictions", root / "data/labels"),
                               root / "cache", "ext")
    method = build_method("temperature", {"max_epochs": 10, "lr": 5e-2})
    method.fit(SubjectSet(ids[:2], cache, logits_dir(cache)), SubjectSet(ids[2:3], cache, logits_dir(cache)), "cpu")
    return root, ids, cache, method.save(root / "method.pt")


def _log(client, exp, config, stage_file, tmp_path) -> tuple[str, str]:
    run_id = client.create_run(exp, tags={schema.ROLE: schema.ROLE_TRIAL, schema.FOLD: "0"}).info.run_id
    model_id = logged_model.log_trial_lineage(client, run_id, exp, config, stage_file, None, None, None, tmp_path / "s")
    client.set_terminated(run_id)
    return run_id, model_id


def _main(capsys, *args) -> tuple[int, str, str]:
    try:
        rc = tapply.main([str(a) for a in args])
    except SystemExit as exc:  # argparse's one-line error
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_a_registered_model_and_a_run_applied_to_a_folder(fitted, mlflow_store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root, ids, _, method_file = fitted
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("a", artifact_location=(tmp_path / "mlruns").as_uri())
    config = {"stage": "calibrate", "method": "temperature", "weights": "CE", "fold": 0, "data": EXTERNAL}
    run_id, model_id = _log(client, exp, config, method_file, tmp_path)
    client.create_registered_model("calib-a-ext-CE")
    mlflow.set_tracking_uri(mlflow_store)  # the SQL registry resolves a models:/ source through it
    try:
        version = client.create_model_version("calib-a-ext-CE", f"models:/{model_id}", run_id=run_id,
                                              model_id=model_id)
    finally:
        mlflow.set_tracking_uri(None)
    client.set_registered_model_alias("calib-a-ext-CE", "best", version.version)
    uri = "models:/calib-a-ext-CE@best"

    # the reference: the same fitted method from a local model folder
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(method_file, local / "method.pt")
    (local / "trial_config.json").write_text(json.dumps(config))
    reference = load_fitted(local)

    for source in (["--model", uri], ["--run", run_id]):
        out = tmp_path / ("out-" + source[0].strip("-"))
        rc, stdout, stderr = _main(capsys, *source, "--tracking-uri", mlflow_store,
                                   "--input", root / "data" / "predictions", "--out", out)
        assert rc == 0, stderr
        assert sorted(p.name for p in out.iterdir()) == [f"{c}_prob.nii.gz" for c in ids]
        assert stdout.strip().splitlines()[-1].startswith(f"applied {len(ids)} of {len(ids)} case(s)")
        assert (uri if source[0] == "--model" else f"run {run_id}") in stdout.splitlines()[0]
        for cid in ids:
            want = apply_model(reference, root / "data" / "predictions" / f"{cid}.npz", tmp_path / "ref").files["prob"]
            np.testing.assert_array_equal(np.asarray(nib.load(str(out / f"{cid}_prob.nii.gz")).dataobj),
                                          np.asarray(nib.load(str(want)).dataobj))

    rc, _, stderr = _main(capsys, "--model", "models:/nope@best", "--tracking-uri", mlflow_store,
                          "--input", root / "data" / "predictions", "--out", tmp_path / "none")
    assert rc == 2 and "nope" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()


def test_an_error_while_applying_names_the_models_uri(fitted, mlflow_store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root, ids, _, _ = fitted
    cfg = UNetConfig.tiny(4, "brats18", levels=2, base=2)
    torch.manual_seed(0)
    weights = save_weights(UNet3D(cfg), tmp_path / "weights.pt")
    config = {"stage": "base", "method": "base", "weights": "SD", "fold": 0, "net": dataclasses.asdict(cfg),
              "data": {"dataset": "brats18", "preprocessing": {"spacing": 2.0, "shape": [12, 12, 8]}}}
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("u", artifact_location=(tmp_path / "mlruns").as_uri())
    _, model_id = _log(client, exp, config, weights, tmp_path)
    uri = f"models:/{model_id}"
    # a U-Net model given another network's prediction: that case is bad, and the model is named by its URI
    rc, stdout, stderr = _main(capsys, "--model", uri, "--tracking-uri", mlflow_store, "--input",
                               root / "data" / "predictions" / f"{ids[0]}.npz", "--out", tmp_path / "out")
    assert rc == 1
    assert f"from {uri} runs a U-Net on images" in stderr
    assert "calib-apply-" not in stderr + stdout  # the temporary download folder is never named
