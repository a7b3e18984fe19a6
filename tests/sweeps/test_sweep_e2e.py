"""End to end with the real stages (calib.stages on tiny phantoms), real Ray and real MLflow:
the stored runs follow the run schema of docs/architecture.md; a trial on corrupt data fails alone; a launch whose
driver is SIGKILLed, then --resume, ends with one FINISHED run per trial key and none RUNNING."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from support.grids import ISLES_PHANTOM, PHANTOM, long_base_grid, tiny_grid
from mlflow.tracking import MlflowClient

from sweeps.grid import load_grid
from sweeps.run.data_prep import prepare_dataset
from sweeps.launch_sweep import LaunchOptions, git_commit, launch
from sweeps.plan import expand
from tracking import schema

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _runs(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_TRIAL]
    sweeps = [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_SWEEP]
    return client, trials, sweeps


def _artifact_files(client, run_id: str, path: str = "") -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path or None):
        out |= _artifact_files(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def test_launch_stores_runs_by_the_schema(ray_session, phantom_root, shared_cache, tmp_path, mlflow_store):
    grid_file = tiny_grid(tmp_path / "grid.yaml", phantom_root, shared_cache)
    plan = expand(load_grid(str(grid_file)))
    out = io.StringIO()
    rc = launch(LaunchOptions(grid=str(grid_file), tracking_uri=mlflow_store), out=out, err=out)
    text = out.getvalue()
    assert rc == 0, text
    assert f"mlflow ui --backend-store-uri {mlflow_store}" in text
    assert "total" in text and "wall time" in text
    assert "degenerate base models:" in text

    client, trials, sweeps = _runs(mlflow_store, "calib-tiny")
    assert len(sweeps) == 1
    sweep = sweeps[0]
    assert sweep.info.status == "FINISHED"
    grid_yaml = yaml.safe_load(Path(client.download_artifacts(sweep.info.run_id, schema.GRID_FILE, str(tmp_path))).read_text())
    assert grid_yaml["name"] == "tiny" and grid_yaml["folds"]["n_folds"] == 2
    if git_commit():
        assert sweep.data.tags[schema.GIT_COMMIT] == git_commit()

    assert sorted(r.data.tags[schema.TRIAL_KEY] for r in trials) == sorted(t.key for t in plan.trials)
    folds = prepare_dataset(load_grid(str(grid_file)), "brats18").folds
    for r in trials:
        tags, spec = r.data.tags, plan.by_key[r.data.tags[schema.TRIAL_KEY]]
        assert r.info.status == "FINISHED"
        assert tags[schema.PARENT_RUN_ID] == sweep.info.run_id
        assert (tags[schema.STAGE], tags[schema.DATASET], tags[schema.WEIGHTS], tags[schema.METHOD]) == \
            (spec.stage, "brats18", "CE", spec.method)
        assert tags[schema.FOLD] == str(spec.fold) and tags[schema.LR] == ""
        assert tags[schema.PROTOCOL] == "honest"
        m = r.data.metrics
        assert 0 <= m[schema.DICE_MEAN] <= 1 and 0 <= m[schema.ECE_MEAN] <= 1
        assert m[schema.N_SUBJECTS] == len(folds[spec.fold])
        assert m[schema.COMPUTE_SECONDS] > 0 and m[schema.BEST_VAL_LOSS] > 0
        steps = [h.step for h in client.get_metric_history(r.info.run_id, schema.TRAIN_LOSS)]
        # a full-batch fit (L-BFGS: Platt's default) runs no epochs; every other fit logs each one
        full_batch = spec.config["params"].get("optimizer") == "lbfgs"
        assert steps == list(range(len(steps))) and bool(steps) != full_batch
        assert len(client.get_metric_history(r.info.run_id, schema.VAL_LOSS)) == len(steps)

        files = _artifact_files(client, r.info.run_id)
        assert {schema.PER_SUBJECT, schema.RELIABILITY_BINS, schema.TRIAL_CONFIG, schema.SPLITS,
                schema.PREVIEW} <= files
        assert any(f.startswith(schema.WEIGHTS_DIR + "/") for f in files)
        if spec.stage == "base":
            assert any(f.startswith(schema.LOGITS_DIR + "/") for f in files)
        local = Path(client.download_artifacts(r.info.run_id, schema.PER_SUBJECT, str(tmp_path / r.info.run_id)))
        per_subject = pd.read_csv(local)
        assert list(per_subject.columns[:4]) == list(schema.PER_SUBJECT_COLUMNS)
        assert sorted(per_subject.subject_id) == sorted(folds[spec.fold])
        bins = pd.read_csv(client.download_artifacts(r.info.run_id, schema.RELIABILITY_BINS, str(tmp_path / r.info.run_id)))
        assert list(bins.columns) == list(schema.RELIABILITY_COLUMNS)
        cfg = json.loads(Path(client.download_artifacts(r.info.run_id, schema.TRIAL_CONFIG, str(tmp_path / r.info.run_id))).read_text())
        assert cfg["trial_key"] == spec.key and cfg["stage"] == spec.stage
        # which data fitted what: the split ids, and the fit split by stage and method
        splits = json.loads(Path(client.download_artifacts(r.info.run_id, schema.SPLITS, str(tmp_path / r.info.run_id))).read_text())
        assert sorted(splits["test"]) == sorted(folds[spec.fold]) and splits["protocol"] == "honest"
        assert not set(splits["calib"]) & set(splits["train"]) and splits["calib"]
        post_hoc = spec.stage == "calibrate" and not spec.method.startswith("mc_")
        assert tags[schema.FIT_SPLIT] == ("calib" if post_hoc else "train")
        if spec.stage == "base":
            assert schema.GUARD_FOREGROUND_FRACTION in m and schema.GUARD_MEDIAN_ABS_LOGIT in m
            assert (schema.DEGENERATE in tags) == ("degenerate base models: none" not in text)

    report_dir = Path(grid_yaml["work_dir"]) / "report"
    assert (report_dir / "results_long.csv").exists(), text

    # A dry run now sees every trial FINISHED in the store.
    out = io.StringIO()
    assert launch(LaunchOptions(grid=str(grid_file), tracking_uri=mlflow_store, dry_run=True), out=out) == 0
    total = [line.split() for line in out.getvalue().splitlines() if line.startswith("total")][0]
    assert total[1] == total[-1] == str(len(plan.trials))


def test_corrupt_data_fails_alone(ray_session, phantom_root, tmp_path, mlflow_store):
    cache = tmp_path / "cache"  # private: it gets corrupted
    grid_file = tiny_grid(tmp_path / "grid.yaml", phantom_root, cache, weights=["SD"],
                          methods={"platt": {}},
                          datasets={"brats18": {"phantom": PHANTOM}, "isles18": {"phantom": ISLES_PHANTOM}})
    grid = load_grid(str(grid_file))
    prepared = prepare_dataset(grid, "isles18")
    victim = sorted(Path(prepared.cache_dir).glob("*.npz"))[0]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated on disk

    out = io.StringIO()
    rc = launch(LaunchOptions(grid=str(grid_file), tracking_uri=mlflow_store, report=False), out=out, err=out)
    assert rc == 1, out.getvalue()
    _, trials, _ = _runs(mlflow_store, "calib-tiny")
    by = {(r.data.tags[schema.DATASET], r.data.tags[schema.STAGE], r.data.tags[schema.FOLD]): r for r in trials}
    assert len(by) == len(trials)  # no duplicate run after the retry
    for fold in ("0", "1"):
        bad = by[("isles18", "base", fold)]
        assert bad.info.status == "FAILED"
        assert bad.data.tags[schema.ERROR]
        assert ("isles18", "calibrate", fold) not in by  # skipped: its base model failed
        assert by[("brats18", "base", fold)].info.status == "FINISHED"
        assert by[("brats18", "calibrate", fold)].info.status == "FINISHED"
    assert not [r for r in trials if r.info.status == "RUNNING"]


def _wait_for(predicate, timeout: float, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def _long_base_grid(tmp_path, phantom_root, shared_cache, epochs: int) -> Path:
    # long enough that the signal lands mid-training
    return long_base_grid(tmp_path / "grid.yaml", phantom_root, shared_cache, epochs)


def _launch_and_signal(grid_file: Path, mlflow_store: str, address: str, sig: int, tmp_path: Path) -> int:
    """Start a launch in a subprocess joined to the session's Ray, send ``sig`` once a trial is
    three epochs in; the driver's exit status."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "sweeps" / "launch.py"), "--grid", str(grid_file),
                             "--tracking-uri", mlflow_store, "--address", address, "--no-report"],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env,
                            # A test run in the background inherits SIGINT ignored: undo that, so
                            # the driver gets Python's KeyboardInterrupt as from a terminal.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    client = MlflowClient(mlflow_store)

    def mid_training() -> bool:
        exp = client.get_experiment_by_name("calib-tiny")
        if exp is None:
            return False
        for r in client.search_runs([exp.experiment_id], "tags.`calib.role` = 'trial'"):
            if len(client.get_metric_history(r.info.run_id, schema.TRAIN_LOSS)) >= 3:
                return True
        return False

    try:
        assert _wait_for(mid_training, 240, proc), (tmp_path / "driver.log").read_text()
        os.kill(proc.pid, sig)
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_interrupted_driver_closes_its_runs(ray_session, phantom_root, shared_cache, tmp_path, mlflow_store):
    grid_file = _long_base_grid(tmp_path, phantom_root, shared_cache, epochs=400)
    rc = _launch_and_signal(grid_file, mlflow_store, ray_session, signal.SIGINT, tmp_path)
    assert rc == 130, (tmp_path / "driver.log").read_text()
    _, trials, sweeps = _runs(mlflow_store, "calib-tiny")
    assert trials and all(r.info.status == "KILLED" for r in trials + sweeps)
    assert all("KeyboardInterrupt" in r.data.tags[schema.ERROR] for r in trials)


def test_sigkilled_driver_then_resume(ray_session, phantom_root, shared_cache, tmp_path, mlflow_store):
    grid_file = _long_base_grid(tmp_path, phantom_root, shared_cache, epochs=40)
    plan = expand(load_grid(str(grid_file)))
    _launch_and_signal(grid_file, mlflow_store, ray_session, signal.SIGKILL, tmp_path)
    _, trials, sweeps = _runs(mlflow_store, "calib-tiny")
    assert [r for r in trials + sweeps if r.info.status == "RUNNING"]  # what the crash left behind

    out = io.StringIO()
    rc = launch(LaunchOptions(grid=str(grid_file), tracking_uri=mlflow_store, report=False, resume=True),
                out=out, err=out)
    assert rc == 0, out.getvalue()
    assert "closed" in out.getvalue()
    _, trials, sweeps = _runs(mlflow_store, "calib-tiny")
    assert not [r for r in trials + sweeps if r.info.status == "RUNNING"]
    finished = [r.data.tags[schema.TRIAL_KEY] for r in trials if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted(t.key for t in plan.trials)  # exactly one per key
    killed = [r for r in trials if r.info.status == "KILLED"]
    assert killed and all(r.data.tags[schema.ERROR] for r in killed)
    # The interrupted base models went on from the checkpoint the dead launch left.
    resumed = [r for r in trials if r.info.status == "FINISHED" and schema.RESUMED_EPOCH in r.data.tags]
    assert resumed, out.getvalue()
