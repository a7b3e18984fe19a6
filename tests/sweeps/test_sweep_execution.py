"""The Ray Tune glue with a fake stage (tests/sweeps/fake_stages.py): retries resume mid-way
without duplicate runs, a failing trial fails alone, --resume runs only what is missing,
--search optuna samples the MC learning rates, and trials run as a dependency graph (a
downstream trial starts while an unrelated upstream one still runs). Real Ray, real MLflow,
real data preparation."""

from __future__ import annotations

import io

import pytest
from support.grids import tiny_grid
from fake_stages import FakeStage
from mlflow.tracking import MlflowClient

from sweeps.grid import load_grid
from sweeps.launch_sweep import LaunchOptions, launch
from sweeps.plan import expand
from tracking import schema

pytestmark = pytest.mark.slow


def _trial_runs(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, [r for r in runs if r.data.tags.get(schema.ROLE) == "trial"], \
        [r for r in runs if r.data.tags.get(schema.ROLE) == "sweep"]


def test_retry_resume_and_isolated_failure(ray_session, phantom_root, shared_cache, tmp_path, mlflow_store):
    grid = tiny_grid(tmp_path / "grid.yaml", phantom_root, shared_cache, weights=["CE", "SD"],
                     methods={"platt": {}})
    plan = expand(load_grid(str(grid)))
    assert len(plan.trials) == 2 + 4 + 4
    fake = FakeStage(fail={"stage": "base", "weights": "SD", "fold": 1},
                     crash_once={"stage": "base", "weights": "CE", "fold": 0}, marker_dir=str(tmp_path))
    out = io.StringIO()
    rc = launch(LaunchOptions(grid=str(grid), tracking_uri=mlflow_store, report=False,
                              stage_runner=fake), out=out, err=out)
    assert rc == 1, out.getvalue()
    client, trials, sweeps = _trial_runs(mlflow_store, "calib-tiny")
    by_key = {}
    for r in trials:
        by_key.setdefault(r.data.tags[schema.TRIAL_KEY], []).append(r)
    assert all(len(v) == 1 for v in by_key.values()), "a retried trial got a second run"
    assert not [r for r in trials if r.info.status == "RUNNING"]

    failed = [t for t in plan.trials if t.stage == "base" and t.weights == "SD" and t.fold == 1][0]
    run = by_key[failed.key][0]
    assert run.info.status == "FAILED"
    assert "corrupt subject" in run.data.tags[schema.ERROR]
    skipped = [t.key for t in plan.trials if t.upstream == failed.key]
    assert len(skipped) == 1 and not any(k in by_key for k in skipped)
    others = [t for t in plan.trials if t.key != failed.key and t.key not in skipped]
    assert all(by_key[t.key][0].info.status == "FINISHED" for t in others)

    crashed = [t for t in plan.trials if t.stage == "base" and t.weights == "CE" and t.fold == 0][0]
    run = by_key[crashed.key][0]
    assert run.data.tags[schema.RESUMED_EPOCH] == "1"  # the retry went on from epoch 1's checkpoint
    steps = [m.step for m in client.get_metric_history(run.info.run_id, schema.TRAIN_LOSS)]
    assert sorted(steps) == [0, 1, 2, 3]
    assert sweeps[0].info.status == "FAILED"
    assert sweeps[0].data.metrics["trials_failed"] == 1 and sweeps[0].data.metrics["trials_skipped"] == 1
    text = out.getvalue()
    assert "SKIPPED" in text and "failed trials:" in text

    # --resume with the data fixed: only the failed trial and its dependants run.
    out = io.StringIO()
    rc = launch(LaunchOptions(grid=str(grid), tracking_uri=mlflow_store, report=False, resume=True,
                              stage_runner=FakeStage()), out=out, err=out)
    assert rc == 0, out.getvalue()
    client, trials, sweeps = _trial_runs(mlflow_store, "calib-tiny")
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert sorted(r.data.tags[schema.TRIAL_KEY] for r in finished) == sorted(t.key for t in plan.trials)
    newest = max(sweeps, key=lambda r: r.info.start_time)
    assert newest.data.tags[schema.RESUMED] == "true"
    assert len([r for r in trials if r.data.tags[schema.PARENT_RUN_ID] == newest.info.run_id]) == 2


def test_optuna_search_same_budget(ray_session, phantom_root, shared_cache, tmp_path, mlflow_store):
    grid = tiny_grid(tmp_path / "grid.yaml", phantom_root, shared_cache, weights=["SD"],
                     methods={"mc_decoder": {"lr": [1e-3, 1e-4]}})
    out = io.StringIO()
    # --max-concurrent wraps the searcher in Tune's ConcurrencyLimiter: exercised here too.
    rc = launch(LaunchOptions(grid=str(grid), tracking_uri=mlflow_store, report=False, search="optuna",
                              max_concurrent=1, stage_runner=FakeStage()), out=out, err=out)
    assert rc == 0, out.getvalue()
    _, trials, _ = _trial_runs(mlflow_store, "calib-tiny")
    calib = [r for r in trials if r.data.tags[schema.STAGE] == "calibrate"]
    assert len(calib) == 4  # 2 folds x 2 samples, as the grid's 2 LRs
    for r in calib:
        assert r.data.tags[schema.SEARCH] == "optuna"
        assert 1e-5 <= float(r.data.tags[schema.LR]) <= 1e-3
        assert r.info.status == "FINISHED"
    assert len({r.data.tags[schema.LR] for r in calib}) == 4


def test_unusable_data_is_reported_and_its_trials_skipped(ray_session, phantom_root, shared_cache,
                                                          tmp_path, mlflow_store):
    empty = tmp_path / "empty"
    (empty / "brats18").mkdir(parents=True)
    grid = tiny_grid(tmp_path / "grid.yaml", phantom_root, shared_cache, weights=["SD"],
                     datasets=["brats18"], data={"root": str(empty), "cache": str(shared_cache)})
    out, err = io.StringIO(), io.StringIO()
    rc = launch(LaunchOptions(grid=str(grid), tracking_uri=mlflow_store, report=False,
                              stage_runner=FakeStage()), out=out, err=err)
    assert rc == 1
    line = [ln for ln in err.getvalue().splitlines() if ln.startswith("error: data of brats18")]
    assert line and str(empty / "brats18") in line[0] and "Traceback" not in err.getvalue()
    assert "SKIPPED  2 trials of brats18" in out.getvalue()  # 2 base models, then
    assert "SKIPPED  4 trials of brats18" in out.getvalue()  # their 4 calibrations
    _, trials, sweeps = _trial_runs(mlflow_store, "calib-tiny")
    assert trials == [] and sweeps[0].info.status == "FAILED"


def test_downstream_trials_start_while_an_unrelated_upstream_runs(ray_session, phantom_root, shared_cache,
                                                                   tmp_path, mlflow_store):
    grid = tiny_grid(tmp_path / "grid.yaml", phantom_root, shared_cache, methods={"platt": {}})
    plan = expand(load_grid(str(grid)))
    assert sorted((t.stage, t.fold) for t in plan.trials) == sorted(
        (s, f) for s in ("pretrain", "base", "calibrate") for f in (0, 1))
    # Pretraining of fold 1 holds at its epoch 1 until fold 0's calibration has run: with
    # stages in waves that could never happen (it would wait out the fake's timeout).
    fake = FakeStage(hold={"stage": "pretrain", "fold": 1}, release={"stage": "calibrate", "fold": 0},
                     marker_dir=str(tmp_path))
    out = io.StringIO()
    rc = launch(LaunchOptions(grid=str(grid), tracking_uri=mlflow_store, report=False, stage_runner=fake),
                out=out, err=out)
    assert rc == 0, out.getvalue()
    _, trials, _ = _trial_runs(mlflow_store, "calib-tiny")
    by = {(r.data.tags[schema.STAGE], int(r.data.tags[schema.FOLD])): r for r in trials}
    assert len(by) == len(trials) == 6 and {r.info.status for r in trials} == {"FINISHED"}
    held = by[("pretrain", 1)].info
    for stage in ("base", "calibrate"):  # fold 0's chain ran while fold 1 still pretrained
        assert by[(stage, 0)].info.start_time < held.end_time, stage
    assert by[("calibrate", 0)].info.end_time <= held.end_time
    assert (tmp_path / "released").exists()
    # Fold 1's own dependants waited for it, and each read its upstream's run.
    assert by[("base", 1)].info.start_time >= held.end_time
    assert by[("calibrate", 1)].info.start_time >= by[("base", 1)].info.end_time
    assert by[("base", 1)].data.tags[schema.UPSTREAM_KEY] == by[("pretrain", 1)].data.tags[schema.TRIAL_KEY]
    assert "busy " in out.getvalue() and "2 slots" in out.getvalue()
