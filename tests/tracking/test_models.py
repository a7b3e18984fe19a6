"""tracking.models, tracking.logged_model, tracking.datasets, tracking.ui, tracking.system_metrics
and tracking.report.registry on a real SQLite MLflow store.

A trial's model is logged as a pyfunc LoggedModel of its run and must reload (mlflow.pyfunc)
and predict what the fitted method predicts; its splits are the run's input datasets; the
registry keeps the best calibrated method's fold models with the aliases calib.apply reads.
"""

from __future__ import annotations

import json
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from calib.apply import load_fitted
from calib.data.predictions import PredictionsConfig, import_predictions, logits_dir
from calib.data.predictions_phantom import write_prediction_phantoms
from calib.methods import SubjectRef, SubjectSet, build_method
from calib.methods.network_based import save_weights
from calib.nets import UNet3D, UNetConfig
from tracking import datasets, ui
from tracking import logged_model as lm
from tracking import models as tm
from tracking import system_metrics as sm
from tracking import schema
from tracking.report.fetch import TrialRecord
from tracking.report.registry import best_calibrated, register_best, registered_name
from tracking.report.selection import Selection

EXTERNAL = {"kind": "predictions", "dataset": "ext", "predictions": {"values": "probability"}}


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """An imported predictions cache and two fitted temperature calibrators (two 'folds')."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ext")
    ids = write_prediction_phantoms(root / "data", 5, scale=3.0, seed=7)
    cache = import_predictions(PredictionsConfig.make(root / "data/predictions", root / "data/labels"),
                               root / "cache", "ext")
    files = []
    for fold, (train, val) in enumerate(((ids[:2], ids[2:3]), (ids[1:3], ids[3:4]))):
        m = build_method("temperature", {"max_epochs": 10, "lr": 5e-2})
        m.fit(SubjectSet(train, cache, logits_dir(cache)), SubjectSet(val, cache, logits_dir(cache)), "cpu")
        files.append((m, m.save(root / f"method{fold}.pt")))
    return cache, ids, files


def _trial_run(client, exp, fold, **tags):
    return client.create_run(exp, tags={schema.ROLE: schema.ROLE_TRIAL, schema.FOLD: str(fold), **tags}).info.run_id


def test_a_logged_calibrator_reloads_and_predicts_the_same(external, mlflow_store, tmp_path):
    cache, ids, files = external
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = _trial_run(client, exp, 0)
    method, path = files[0]
    splits = {"fold": 0, "train": ids[:2], "val": ids[2:3], "calib": ids[:2], "test": ids[4:]}
    config = {"stage": "calibrate", "method": "temperature", "weights": "CE", "fold": 0, "data": EXTERNAL}
    model_id = lm.log_trial_lineage(client, run_id, exp, config, path, cache, splits, None, tmp_path / "s")
    client.set_terminated(run_id)

    run = client.get_run(run_id)
    assert [m.model_id for m in run.outputs.model_outputs] == [model_id]
    assert client.get_logged_model(model_id).status == LoggedModelStatus.READY
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"ext-fold0-train", "ext-fold0-val", "ext-fold0-calib", "ext-fold0-test"}
    meta = json.loads((cache / "meta.json").read_text())
    for name, i in inputs.items():
        assert i.dataset.digest == meta["hash"][:16]
        assert {t.key: t.value for t in i.tags}[datasets.DATA_CONTEXT] == name.rsplit("-", 1)[1]
        assert json.loads(i.dataset.profile)["num_subjects"] == len(splits[name.rsplit("-", 1)[1]])

    mlflow.set_tracking_uri(mlflow_store)
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/{model_id}")
    finally:
        mlflow.set_tracking_uri(None)
    sig = loaded.metadata.signature
    assert [s.name for s in sig.inputs.inputs] == ["logits", "mask"]
    s = SubjectRef(ids[4], cache, logits_dir(cache))
    out = loaded.predict({"logits": np.asarray(s.logits, np.float32), "mask": s.mask})
    np.testing.assert_allclose(out["probability"], method.predict_proba(s), atol=1e-7)
    assert "std" not in out

    folder = tm.download_model(tmp_path / "dl", run_id=run_id, tracking_uri=mlflow_store)
    assert load_fitted(folder).method == "temperature"


def test_a_logged_unet_model_reloads_with_its_signature(mlflow_store, tmp_path):
    torch.set_num_threads(1)
    cfg = UNetConfig.tiny(4, "brats18", levels=2, base=2)
    torch.manual_seed(0)
    net = UNet3D(cfg)
    weights = save_weights(net, tmp_path / "weights.pt")
    import dataclasses

    config = {"stage": "base", "method": "base", "weights": "SD", "fold": 1,
              "net": dataclasses.asdict(cfg), "data": {"dataset": "brats18"}}
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("u", artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = _trial_run(client, exp, 1)
    model_id = lm.log_trial_lineage(client, run_id, exp, config, weights, None, None, None, tmp_path / "s")
    mlflow.set_tracking_uri(mlflow_store)
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/{model_id}")
    finally:
        mlflow.set_tracking_uri(None)
    spec = {s.name: s for s in loaded.metadata.signature.inputs.inputs}
    assert spec["image"].shape == (4, -1, -1, -1)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((4, 9, 9, 6)).astype(np.float32)
    mask = np.ones((9, 9, 6), bool)
    mask[0] = False
    out = loaded.predict({"image": image, "mask": mask})["probability"]
    with torch.no_grad():
        ref = torch.sigmoid(net.eval()(torch.from_numpy(image)[None], mask=torch.from_numpy(mask)[None, None]))[0, 0]
    np.testing.assert_allclose(out, np.where(mask, ref.numpy(), 0.0), atol=1e-6)


def test_a_stage_file_that_is_no_model_is_tagged_not_fatal(mlflow_store, tmp_path):
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("f", artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = _trial_run(client, exp, 0)
    bogus = tmp_path / "weights.pt"
    bogus.write_text("not torch")
    config = {"stage": "base", "method": "base", "net": None, "data": {"dataset": "brats18"}}
    with pytest.warns(UserWarning, match="no MLflow model"):
        assert lm.log_trial_lineage(client, run_id, exp, config, bogus, None, None, None, tmp_path / "s") is None
    assert "weights" in client.get_run(run_id).data.tags[lm.MODEL_ERROR]


def test_experiment_kind_url_and_source_tags(mlflow_store):
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("k")
    url = ui.prepare_experiment(client, exp, mlflow_store)
    assert client.get_experiment(exp).tags[ui.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert url == f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning"
    assert ui.runs_page_url("https://user:pw@mlflow.example.org:8443/", "7") == \
        "https://mlflow.example.org:8443/#/experiments/7/runs?workflowType=machine_learning"
    assert ui.source_tags("sweeps/launch.py", "abc") == {
        "mlflow.source.name": "sweeps/launch.py", "mlflow.source.type": "LOCAL", "mlflow.source.git.commit": "abc"}


def test_system_metrics_are_logged_while_the_block_runs(mlflow_store, monkeypatch):
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("s")
    run_id = client.create_run(exp).info.run_id
    with sm.system_metrics(run_id, mlflow_store, enabled=True, sampling_interval=0.5):
        time.sleep(2.0)
    keys = set(client.get_run(run_id).data.metrics)
    assert "system/cpu_utilization_percentage" in keys and "system/system_memory_usage_megabytes" in keys
    other = client.create_run(exp).info.run_id
    with sm.system_metrics(other, mlflow_store, enabled=False):
        pass
    assert not client.get_run(other).data.metrics


def test_registry_keeps_the_best_calibrated_method_per_fold(external, mlflow_store, tmp_path):
    cache, ids, files = external
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("calib-x", artifact_location=(tmp_path / "mlruns").as_uri())
    runs = []
    for fold, (_, path) in enumerate(files):
        run_id = _trial_run(client, exp, fold)
        config = {"stage": "calibrate", "method": "temperature", "weights": "CE", "fold": fold, "data": EXTERNAL}
        lm.log_trial_lineage(client, run_id, exp, config, path, None, None, None, tmp_path / f"s{fold}")
        val_loss = [0.4, 0.3][fold]  # fold 1 validates better
        client.log_metric(run_id, "best_val_loss", val_loss)
        client.set_terminated(run_id)
        runs.append(TrialRecord(run_id, None, "FINISHED", 0, "calibrate", "ext", "CE", "temperature", fold, "",
                              f"k{fold}", metrics={"best_val_loss": val_loss}))
    # The registry follows the headline's choice, made on the val subjects (issue 21): platt has
    # the lower test ECE here, but temperature had the lower val ECE and was chosen.
    results = pd.DataFrame([
        {"dataset": "ext", "weights": "CE", "headline_by": "val_ece", "selected_on": "val",
         "chosen_method": "temperature", "chosen_lr": "", "chosen_criterion": 0.02, "n_candidates": 2,
         "n_subjects": 2, "base_ece_pct": 9.0, "chosen_ece_pct": 2.0, "base_dice": 0.8,
         "chosen_dice": 0.79, "verdict": "lower ECE"},
        {"dataset": "ext", "weights": "SD", "headline_by": "val_ece", "selected_on": "val",
         "chosen_method": "", "chosen_lr": "", "n_subjects": 2, "verdict": ""},
    ])
    best = best_calibrated(results)
    assert set(best) == {("ext", "CE")}  # a row with nothing chosen registers nothing
    assert best[("ext", "CE")]["method"] == "temperature" and best[("ext", "CE")]["selected_on"] == "val"
    sel = Selection("ext", "CE", "temperature", "", "single", tuple(runs), (), "val_loss")
    (reg,) = register_best(client, mlflow_store, "calib-x", results, [sel])
    name = registered_name("calib-x", "ext", "CE")
    assert reg.name == name == "calib-x-ext-CE" and reg.method == "temperature"
    assert str(client.get_model_version_by_alias(name, "best").version) == reg.versions[1]
    assert client.get_model_version_by_alias(name, "fold0").run_id == runs[0].run_id
    # a second report reuses the versions
    (again,) = register_best(client, mlflow_store, "calib-x", results, [sel])
    assert again.versions == reg.versions
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    # and calib.apply reads the registered model by its alias
    folder = tm.download_model(tmp_path / "dl", model_uri=f"models:/{name}@best", tracking_uri=mlflow_store)
    model = load_fitted(folder)
    s = SubjectRef(ids[4], cache, logits_dir(cache))
    np.testing.assert_allclose(model.predict(s.mask, logits=s.logits).prob, files[1][0].predict_proba(s), atol=1e-7)


def test_download_model_refuses_unfinished_and_unknown_runs(mlflow_store, tmp_path):
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("d")
    running = _trial_run(client, exp, 0)
    with pytest.raises(tm.ModelNotFound, match="RUNNING"):
        tm.download_model(tmp_path / "a", run_id=running, tracking_uri=mlflow_store)
    with pytest.raises(tm.ModelNotFound, match="no run"):
        tm.download_model(tmp_path / "b", run_id="0" * 32, tracking_uri=mlflow_store)
    with pytest.raises(tm.ModelNotFound, match="nope"):
        tm.download_model(tmp_path / "c", model_uri="models:/nope@best", tracking_uri=mlflow_store)
