"""Regression tests of a sweep's guarantees under failure, with the real stages, real Ray and a
real MLflow store (slow tier): a trial worker SIGKILLed mid-training is retried inside its own
MLflow run and goes on from its checkpoint; a launch whose heartbeat has timed out is dead, and
--resume takes over its experiment (refused while the heartbeat is fresh)."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from support.grids import long_base_grid

from sweeps.grid import load_grid
from sweeps.launch_sweep import EXIT_USAGE, LaunchOptions, launch
from sweeps.plan import expand
from tracking import schema
from tracking.lease import lease_of

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "calib-tiny"
WAIT_S = 240  # for anything a launch must reach on two busy cores


def _runs(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return (client, [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_TRIAL],
            [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_SWEEP])


def _wait_for(predicate, timeout: float, proc=None, log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = predicate()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    pytest.fail(f"condition not reached in {timeout} s" + (f"\n{log.read_text()[-4000:]}" if log else ""))


def _grid(tmp_path: Path, phantom_root: Path, cache: Path, epochs: int) -> Path:
    """Two SD base models long enough to be caught mid-training, and their Platt calibrations."""
    return long_base_grid(tmp_path / "grid.yaml", phantom_root, cache, epochs)


def _start_driver(grid: Path, uri: str, address: str, tmp_path: Path, *args: str):
    log = tmp_path / "driver.log"
    proc = subprocess.Popen([sys.executable, str(REPO / "sweeps" / "launch.py"), "--grid", str(grid),
                             "--tracking-uri", uri, "--address", address, "--no-report", *args],
                            cwd=tmp_path, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, log


def _epochs(client, run) -> int:
    return len(client.get_metric_history(run.info.run_id, schema.TRAIN_LOSS))


def _one_finished_run_per_key(trials, plan) -> None:
    finished = sorted(r.data.tags[schema.TRIAL_KEY] for r in trials if r.info.status == "FINISHED")
    assert finished == sorted(t.key for t in plan.trials)
    assert not [r for r in trials if r.info.status == "RUNNING"]


def test_sigkilled_worker_is_retried_in_its_run_from_its_checkpoint(ray_session, phantom_root, shared_cache,
                                                                    tmp_path, mlflow_store):
    grid = _grid(tmp_path, phantom_root, shared_cache, epochs=30)
    plan = expand(load_grid(str(grid)))
    proc, log = _start_driver(grid, mlflow_store, ray_session, tmp_path)
    try:
        def training_base():
            client, trials, _ = _runs(mlflow_store)
            for r in trials:
                if r.data.tags[schema.STAGE] == "base" and schema.WORKER_PID in r.data.tags \
                        and _epochs(client, r) >= 3:
                    return r
            return None

        victim = _wait_for(training_base, WAIT_S, proc, log)
        pid = int(victim.data.tags[schema.WORKER_PID])
        os.kill(pid, signal.SIGKILL)  # the worker process, not the driver
        assert proc.wait(WAIT_S) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    client, trials, sweeps = _runs(mlflow_store)
    _one_finished_run_per_key(trials, plan)
    key = victim.data.tags[schema.TRIAL_KEY]
    (run,) = [r for r in trials if r.data.tags[schema.TRIAL_KEY] == key]  # retried in the same run
    assert run.info.run_id == victim.info.run_id and run.info.status == "FINISHED"
    assert int(run.data.tags[schema.WORKER_PID]) != pid
    assert int(run.data.tags[schema.RESUMED_EPOCH]) >= 1  # from its checkpoint, not from epoch 0
    steps = [m.step for m in client.get_metric_history(run.info.run_id, schema.TRAIN_LOSS)]
    assert sorted(steps) == list(range(30))  # every epoch once
    assert "RETRY" in log.read_text() and sweeps[0].info.status == "FINISHED"


def test_dead_launch_times_out_then_resume_takes_over(ray_session, phantom_root, shared_cache, tmp_path,
                                                      mlflow_store):
    timeout = 15
    grid = _grid(tmp_path, phantom_root, shared_cache, epochs=40)
    plan = expand(load_grid(str(grid)))
    proc, log = _start_driver(grid, mlflow_store, ray_session, tmp_path, "--lease-timeout", str(timeout))
    try:
        def mid_training():
            client, trials, _ = _runs(mlflow_store)
            return any(_epochs(client, r) >= 2 for r in trials)

        _wait_for(mid_training, WAIT_S, proc, log)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    client, _, (dead,) = _runs(mlflow_store)
    # Its driver was on a node that vanished with it: only the heartbeat can tell it is dead.
    client.set_tag(dead.info.run_id, schema.DRIVER_MACHINE, "a-lost-node")
    assert lease_of(client.get_run(dead.info.run_id)).alive

    err = io.StringIO()  # while the heartbeat is fresh, a --resume is refused
    assert launch(LaunchOptions(grid=str(grid), tracking_uri=mlflow_store, report=False, resume=True),
                  out=io.StringIO(), err=err) == EXIT_USAGE
    line = err.getvalue().strip()
    assert dead.info.run_id in line and f"host {dead.data.tags[schema.DRIVER_HOST]}" in line
    assert re.search(r"heartbeat \d+ s ago", line) and len(line.splitlines()) == 1

    _wait_for(lambda: not lease_of(client.get_run(dead.info.run_id)).alive, timeout + 30)
    out = io.StringIO()
    rc = launch(LaunchOptions(grid=str(grid), tracking_uri=mlflow_store, report=False, resume=True),
                out=out, err=out)
    assert rc == 0, out.getvalue()
    assert "closed" in out.getvalue()
    client, trials, sweeps = _runs(mlflow_store)
    _one_finished_run_per_key(trials, plan)
    old = client.get_run(dead.info.run_id)
    assert old.info.status == "KILLED" and f"timeout {timeout} s" in old.data.tags[schema.ERROR]
    killed = [r for r in trials if r.data.tags[schema.PARENT_RUN_ID] == dead.info.run_id]
    assert killed and {r.info.status for r in killed} <= {"KILLED", "FINISHED"}
    assert max(sweeps, key=lambda r: r.info.start_time).info.status == "FINISHED"
