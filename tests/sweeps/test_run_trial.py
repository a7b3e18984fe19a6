"""sweeps.run.trainable.run_trial and the executor's settling of its outcomes, on a real SQLite MLflow
store and the fake stage, without a Ray cluster (fast tier): Tune's ``report`` and Ray's node
queries are stubbed, everything else -- runs, tags, metrics, the checkpoint index -- is real."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import ray
import torch
from fake_stages import EPOCHS, FakeStage
from mlflow.tracking import MlflowClient
from ray import tune
from support.grids import tiny_grid

from sweeps.grid import load_grid
from sweeps.run.execute import ExecutionSettings, Executor
from sweeps.plan.graph import TrialGraph
from sweeps.plan import expand
from sweeps.run.resume import CheckpointIndex
from sweeps.plan.graph import UPSTREAM_RUN_CONFIG
from sweeps.run.trainable import ERROR_METRIC, RUN_ID_METRIC, STATUS_METRIC, TrialContext, run_trial
from tracking import schema
from tracking.runs import TrialOutcome, TrialRun, start_sweep_run
from tracking.store import get_or_create_experiment


@pytest.fixture
def env(tmp_path, mlflow_store, monkeypatch):
    """A plan of the tiny grid, a sweep run, a trial context, and the Tune reports made."""
    grid = tiny_grid(tmp_path / "grid.yaml", tmp_path / "no-data", tmp_path / "cache", methods={"platt": {}})
    plan = expand(load_grid(str(grid), require_data=False))
    client = MlflowClient(mlflow_store)
    exp = get_or_create_experiment(client, "calib-tiny", mlflow_store)
    parent = start_sweep_run(client, exp, grid_name="tiny", grid_yaml="name: tiny\n")
    reports: list[dict] = []
    monkeypatch.setattr(tune, "report", lambda metrics, **kw: reports.append(dict(metrics)))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-1"))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    # The MLflow model and datasets of a trial (tracking.logged_model) are tested on their own.
    monkeypatch.setattr("sweeps.run.trainable.log_trial_lineage", lambda *a, **k: None)
    threads = torch.get_num_threads()  # run_trial sets the trial's torch threads
    folds = {"0": ["s0", "s1"], "1": ["s2", "s3"]}
    ctx = TrialContext(tracking_uri=mlflow_store, experiment_id=exp, parent_run_id=parent,
                       data={"brats18": {"folds": folds, "cache_dir": str(tmp_path / "cache")}},
                       checkpoint_dir=str(tmp_path / "checkpoints"), stage_runner=FakeStage())
    yield SimpleNamespace(plan=plan, client=client, exp=exp, parent=parent, ctx=ctx, reports=reports,
                          tmp=tmp_path, uri=mlflow_store)
    torch.set_num_threads(threads)


def _trial(plan, stage, fold=0):
    return next(t for t in plan.trials if t.stage == stage and t.fold == fold)


def _runs_of(env, key):
    return [r for r in env.client.search_runs([env.exp], f"tags.`{schema.TRIAL_KEY}` = '{key}'")]


def test_a_trial_that_succeeds_ends_finished_and_reports_its_run(env):
    spec = _trial(env.plan, "pretrain")
    run_trial({"spec": spec.to_dict()}, env.ctx)
    (run,) = _runs_of(env, spec.key)
    last = env.reports[-1]
    assert last[STATUS_METRIC] == TrialOutcome.FINISHED and last[RUN_ID_METRIC] == run.info.run_id
    assert run.info.status == "FINISHED" and schema.ERROR not in run.data.tags
    assert run.data.tags[schema.NODE_ID] == "node-1" and run.data.tags[schema.PARENT_RUN_ID] == env.parent
    assert run.data.metrics[schema.N_SUBJECTS] == 2 and last[schema.DICE_MEAN] == run.data.metrics[schema.DICE_MEAN]
    steps = sorted(m.step for m in env.client.get_metric_history(run.info.run_id, schema.TRAIN_LOSS))
    assert steps == list(range(EPOCHS))
    assert [r["epoch"] for r in env.reports[:-1]] == list(range(EPOCHS))  # one Tune report per epoch
    assert CheckpointIndex(env.tmp / "checkpoints").read(spec.key)["epoch"] == EPOCHS - 1

    env.reports.clear()  # Ray retries a trial whose run is FINISHED: it only reports it again
    run_trial({"spec": spec.to_dict()}, env.ctx)
    assert env.reports == [{schema.BEST_VAL_LOSS: None, **{k: run.data.metrics[k] for k in schema.FINAL_METRICS},
                            STATUS_METRIC: TrialOutcome.FINISHED, RUN_ID_METRIC: run.info.run_id}]
    assert len(_runs_of(env, spec.key)) == 1


def test_a_permanent_failure_inside_the_stage_ends_the_run_failed_without_a_retry(env):
    spec = _trial(env.plan, "pretrain")
    ctx = TrialContext(**{**vars(env.ctx), "stage_runner": FakeStage(fail={"stage": "pretrain"})})
    run_trial({"spec": spec.to_dict()}, ctx)  # returns: Ray must not retry bad data
    (run,) = _runs_of(env, spec.key)
    assert run.info.status == "FAILED" and "corrupt subject" in run.data.tags[schema.ERROR]
    assert env.reports[-1][STATUS_METRIC] == TrialOutcome.FAILED
    assert "corrupt subject" in env.reports[-1][ERROR_METRIC]


def test_a_crash_is_raised_for_ray_and_the_retry_goes_on_in_the_same_run(env):
    spec = _trial(env.plan, "pretrain")
    ctx = TrialContext(**{**vars(env.ctx), "stage_runner": FakeStage(crash_once={"stage": "pretrain"},
                                                                     marker_dir=str(env.tmp))})
    with pytest.raises(RuntimeError, match="worker lost"):
        run_trial({"spec": spec.to_dict()}, ctx)
    (run,) = _runs_of(env, spec.key)
    assert run.info.status == "FAILED" and "worker lost" in run.data.tags[schema.ERROR]
    assert CheckpointIndex(env.tmp / "checkpoints").read(spec.key)["epoch"] == 1  # crashed at epoch 2

    run_trial({"spec": spec.to_dict()}, ctx)  # Ray's retry
    (again,) = _runs_of(env, spec.key)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags[schema.RESUMED_EPOCH] == "1" and schema.ERROR not in again.data.tags
    steps = [m.step for m in env.client.get_metric_history(run.info.run_id, schema.TRAIN_LOSS)]
    assert sorted(steps) == list(range(EPOCHS))  # every epoch once


def test_a_trial_without_a_finished_upstream_run_fails(env):
    spec = _trial(env.plan, "base")
    with pytest.raises(RuntimeError, match="has no FINISHED run"):
        run_trial({"spec": spec.to_dict()}, env.ctx)
    (run,) = _runs_of(env, spec.key)
    assert run.info.status == "FAILED" and spec.upstream in run.data.tags[schema.ERROR]


def test_a_trial_reads_its_upstream_run_given_in_its_config(env):
    up, spec = _trial(env.plan, "pretrain"), _trial(env.plan, "base")
    run_trial({"spec": up.to_dict()}, env.ctx)
    up_run = env.reports[-1][RUN_ID_METRIC]
    run_trial({"spec": spec.to_dict(), UPSTREAM_RUN_CONFIG: up_run}, env.ctx)
    (run,) = _runs_of(env, spec.key)
    assert run.info.status == "FINISHED" and env.reports[-1][STATUS_METRIC] == TrialOutcome.FINISHED


def test_a_trial_another_launch_finished_meanwhile_is_done_before(env):
    spec = _trial(env.plan, "pretrain")
    other = start_sweep_run(env.client, env.exp, grid_name="tiny", grid_yaml="name: tiny\n")
    TrialRun.open(env.client, env.exp, other, spec.key, {}, spec.label).finish()
    run_trial({"spec": spec.to_dict()}, env.ctx)
    last = env.reports[-1]
    assert last[STATUS_METRIC] == TrialOutcome.DONE_BEFORE and other in last[ERROR_METRIC]
    assert [r.data.tags[schema.PARENT_RUN_ID] for r in _runs_of(env, spec.key)] == [other]  # no run of ours


def _executor(env):
    settings = ExecutionSettings(storage_path=str(env.tmp / "ray"), launch_name="t")
    ex = Executor(env.plan, env.client, env.ctx, settings, {}, {}, out=io.StringIO())
    ex.graph, ex.total = TrialGraph(list(env.plan.trials), {}), len(env.plan.trials)
    return ex


def test_a_failed_upstream_skips_its_dependants(env):
    spec = _trial(env.plan, "pretrain")
    ctx = TrialContext(**{**vars(env.ctx), "stage_runner": FakeStage(fail={"stage": "pretrain", "fold": 0})})
    run_trial({"spec": spec.to_dict()}, ctx)
    ex = _executor(env)
    ex.trial_ended(spec, env.reports[-1], error=None)
    assert ex.outcomes[spec.key].status == TrialOutcome.FAILED
    assert "corrupt subject" in ex.outcomes[spec.key].error
    below = [t for t in env.plan.trials if t.fold == 0 and t.stage != "pretrain"]
    assert [ex.outcomes[t.key].status for t in below] == [TrialOutcome.SKIPPED] * len(below)
    assert all(spec.label in ex.outcomes[t.key].error for t in below if t.upstream == spec.key)
    assert not any(t.key in ex.outcomes for t in env.plan.trials if t.fold == 1)  # the other fold goes on


def test_the_executor_closes_what_a_dead_worker_left_running(env):
    spec = _trial(env.plan, "pretrain")
    run = TrialRun.open(env.client, env.exp, env.parent, spec.key, {}, spec.label)  # then the worker died
    ex = _executor(env)
    ex.trial_ended(spec, {}, error="RayActorError: the actor died unexpectedly")
    o = ex.outcomes[spec.key]
    assert o.status == TrialOutcome.FAILED and o.run_id == run.run_id and "RayActorError" in o.error
    closed = env.client.get_run(run.run_id)
    assert closed.info.status == "FAILED" and "RayActorError" in closed.data.tags[schema.ERROR]
    released = _trial(env.plan, "pretrain", fold=1)
    run_trial({"spec": released.to_dict()}, env.ctx)
    ex.trial_ended(released, env.reports[-1], error=None)
    assert ex.outcomes[released.key].status == TrialOutcome.FINISHED
