"""A launch's checks before any trial (no Ray needed): another live launch on the experiment
refuses it in one line (exit 2), and a local tracking store with a Ray cluster on another machine
is refused with the advice to run an MLflow server."""

from __future__ import annotations

import io
import re

import pytest
from mlflow.tracking import MlflowClient
from support.grids import tiny_grid

from sweeps.cli import main
from sweeps.launch_sweep import EXIT_USAGE, LaunchOptions, launch
from tracking import schema
from tracking.lease import driver_tags
from tracking.runs import start_sweep_run
from tracking.store import get_or_create_experiment


def _runs(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_a_live_launch_refuses_a_second_one(phantom_root, shared_cache, tmp_path, mlflow_store):
    grid = tiny_grid(tmp_path / "grid.yaml", phantom_root, shared_cache)
    client = MlflowClient(mlflow_store)
    exp = get_or_create_experiment(client, "calib-tiny", mlflow_store)
    live = start_sweep_run(client, exp, grid_name="tiny", grid_yaml="",
                           extra_tags=driver_tags(timeout_s=120))
    for resume in (False, True):  # --resume never takes over a live launch either
        out, err = io.StringIO(), io.StringIO()
        rc = launch(LaunchOptions(grid=str(grid), tracking_uri=mlflow_store, resume=resume), out=out, err=err)
        assert rc == EXIT_USAGE
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: another launch is live")
        tags = client.get_run(live).data.tags
        assert live in lines[0] and f"host {tags[schema.DRIVER_HOST]}" in lines[0]
        age = re.search(r"heartbeat (\d+) s ago", lines[0])
        assert age and int(age.group(1)) < 120
        assert "--force-concurrent" in lines[0]
    assert [r.info.run_id for r in _runs(mlflow_store, "calib-tiny")] == [live]  # nothing started
    assert client.get_run(live).info.status == "RUNNING"  # and nothing closed

    # Once its heartbeat is older than its timeout the launch is dead: not refused any more
    # (checked with a dry run, which starts nothing).
    client.set_tag(live, schema.HEARTBEAT, "1.0")
    out = io.StringIO()
    assert launch(LaunchOptions(grid=str(grid), tracking_uri=mlflow_store, dry_run=True), out=out) == 0


@pytest.mark.parametrize("address", ["10.255.255.1:6379", "ray://10.255.255.1:10001"])
def test_a_local_store_with_a_remote_cluster_is_refused(phantom_root, shared_cache, tmp_path, mlflow_store,
                                                        address):
    grid = tiny_grid(tmp_path / "grid.yaml", phantom_root, shared_cache)
    for uri in (mlflow_store, (tmp_path / "mlruns").as_uri()):
        err = io.StringIO()
        rc = launch(LaunchOptions(grid=str(grid), tracking_uri=uri, address=address), out=io.StringIO(), err=err)
        assert rc == EXIT_USAGE
        line = err.getvalue().strip()
        assert len(line.splitlines()) == 1 and uri in line and address in line
        assert "mlflow server" in line and "--tracking-uri http://" in line
    assert _runs(mlflow_store, "calib-tiny") == []


def test_lease_timeout_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--grid", "demo", "--lease-timeout", "0"])
    assert exc.value.code == EXIT_USAGE
    assert "--lease-timeout" in capsys.readouterr().err
