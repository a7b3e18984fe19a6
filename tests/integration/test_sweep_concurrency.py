"""Launches sharing one MLflow server (PostgreSQL) and one two-node Ray cluster, as a team does
(fixtures in integration_stack.py): a second launch on a live experiment is refused in one line,
one with --force-concurrent runs beside it and the two never run a trial twice; the server
stopped mid-sweep and restarted loses nothing; a local SQLite store with a two-node cluster is
refused before any trial."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from integration_stack import fresh_database, run_mlflow_server
from support.grids import long_base_grid
from support.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 420  # two launches on two 1-CPU nodes of a busy 2-core machine
OUTAGE_S = 30


def _grid(path: Path, tmp: Path, base_epochs: int) -> Path:
    """Two folds: SD base models (long enough to be caught mid-training), Platt and auxiliary."""
    return long_base_grid(path, tmp / "data", tmp / "cache", base_epochs, name="it-concurrency",
                          methods={"platt": {}, "auxiliary": {"params": {"k": 5}}})


def _command(grid: Path, address: str, uri: str, experiment: str, work: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "sweeps" / "launch.py"), "--grid", str(grid), "--address", address,
            "--tracking-uri", uri, "--experiment", experiment, "--work-dir", str(work), "--no-report", *args]


def _env() -> dict[str, str]:
    # RAY_AUTH_MODE as the two-node cluster has it (a Ray started in this test process sets it
    # to "token", and drivers inheriting that lose their actors).
    return {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "RAY_AUTH_MODE": "disabled"}


def _start(command: list[str], cwd: Path, name: str):
    log = cwd / f"{name}.log"
    return subprocess.Popen(command, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=_env()), log


def _finish(proc, log: Path, what: str) -> str:
    try:
        proc.wait(LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{what} ran past {LAUNCH_TIMEOUT_S} s:\n{log.read_text()[-6000:]}")
    return log.read_text()


def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    from tracking import schema

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return (client, [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_TRIAL],
            [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_SWEEP])


def _wait_for(predicate, timeout: float, proc, log: Path):
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"condition not reached (launch rc {proc.poll()}):\n{log.read_text()[-6000:]}")


def _one_finished_run_per_key(trials, grid: Path) -> None:
    from sweeps.grid import load_grid
    from sweeps.plan import expand
    from tracking import schema

    plan = expand(load_grid(str(grid)))
    finished = sorted(r.data.tags[schema.TRIAL_KEY] for r in trials if r.info.status == "FINISHED")
    assert finished == sorted(t.key for t in plan.trials), [(r.info.run_name, r.info.status) for r in trials]
    assert not [r for r in trials if r.info.status == "RUNNING"]


def test_concurrent_launches_run_each_trial_once(ray_two_nodes: str, mlflow_server: str, tmp_path: Path):
    from tracking import schema

    experiment = f"calib-it-concurrent-{secrets.token_hex(3)}"
    grid = _grid(tmp_path / "grid.yaml", tmp_path, base_epochs=200)  # ~40 s of training
    first, first_log = _start(_command(grid, ray_two_nodes, mlflow_server, experiment, tmp_path / "work1"),
                              tmp_path, "first")
    try:
        def mid_training() -> bool:
            client, trials, _ = _runs(mlflow_server, experiment)
            return any(len(client.get_metric_history(r.info.run_id, schema.TRAIN_LOSS)) >= 2 for r in trials)

        _wait_for(mid_training, LAUNCH_TIMEOUT_S, first, first_log)
        _, _, (live,) = _runs(mlflow_server, experiment)
        # With --force-concurrent a launch runs beside the first, only what the first has not
        # claimed ...
        third, third_log = _start(_command(grid, ray_two_nodes, mlflow_server, experiment, tmp_path / "work3",
                                           "--resume", "--force-concurrent"), tmp_path, "third")
        try:
            # ... without it (the user thinks the first launch died), it is refused in one line.
            second = subprocess.run(_command(grid, ray_two_nodes, mlflow_server, experiment,
                                             tmp_path / "work2", "--resume"),
                                    cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
            lines = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
            assert second.returncode == 2 and len(lines) == 1, second.stderr[-4000:]
            _, _, sweeps = _runs(mlflow_server, experiment)
            named = [r for r in sweeps if r.info.run_id in lines[0]]  # the first or the third
            assert len(named) == 1 and f"host {named[0].data.tags[schema.DRIVER_HOST]}" in lines[0]
            assert re.search(r"heartbeat \d+ s ago", lines[0])
            text3 = _finish(third, third_log, "the concurrent launch")
        finally:
            if third.poll() is None:
                third.kill()
        text1 = _finish(first, first_log, "the first launch")
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, text1[-6000:]
    assert third.returncode == 0, text3[-6000:]
    _, trials, sweeps = _runs(mlflow_server, experiment)
    _one_finished_run_per_key(trials, grid)
    assert {r.info.status for r in sweeps} == {"FINISHED"} and len(sweeps) == 2
    # The base models the first launch was training were not trained again by the third.
    assert f"finished by sweep run {live.info.run_id}" in text3 or f"running in sweep run {live.info.run_id}" in text3
    assert "is live on experiment" in text3


def test_mlflow_server_outage_mid_sweep_loses_nothing(ray_two_nodes: str, tmp_path: Path):
    from tracking import schema

    experiment = "calib-it-outage"
    grid = _grid(tmp_path / "grid.yaml", tmp_path, base_epochs=12)
    port = free_port()
    server_dir = tmp_path / "server"
    with fresh_database() as database, contextlib.ExitStack() as first_server:
        server = first_server.enter_context(run_mlflow_server(server_dir, database, port=port))
        launch, log = _start(_command(grid, ray_two_nodes, server.uri, experiment, tmp_path / "work"),
                             tmp_path, "launch")
        try:
            def mid_sweep() -> bool:
                client, trials, _ = _runs(server.uri, experiment)
                done = [r for r in trials if r.info.status == "FINISHED"]
                busy = [r for r in trials if r.info.status == "RUNNING"
                        and client.get_metric_history(r.info.run_id, schema.TRAIN_LOSS)]
                return bool(done and busy)

            _wait_for(mid_sweep, LAUNCH_TIMEOUT_S, launch, log)
            first_server.close()  # the server goes away mid-sweep
            time.sleep(OUTAGE_S)
            assert launch.poll() is None, log.read_text()[-6000:]
            with run_mlflow_server(server_dir, database, port=port) as again:  # and comes back
                text = _finish(launch, log, "the launch across the outage")
                assert launch.returncode == 0, text[-6000:]
                _, trials, sweeps = _runs(again.uri, experiment)
        finally:
            if launch.poll() is None:
                launch.kill()
    _one_finished_run_per_key(trials, grid)
    assert len(trials) == len({r.data.tags[schema.TRIAL_KEY] for r in trials})  # not one duplicate
    assert [r.info.status for r in sweeps] == ["FINISHED"]


def test_a_local_store_with_a_two_node_cluster_is_refused(ray_two_nodes: str, tmp_path: Path):
    grid = _grid(tmp_path / "grid.yaml", tmp_path, base_epochs=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run(_command(grid, ray_two_nodes, uri, "calib-it-guard", tmp_path / "work"),
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-4000:]
    assert "2 nodes" in lines[0] and "mlflow server" in lines[0] and "--tracking-uri http://" in lines[0]
    _, trials, sweeps = _runs(uri, "calib-it-guard")
    assert trials == [] and sweeps == []  # stopped before any trial, before its sweep run
