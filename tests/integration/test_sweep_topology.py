"""The sweep on the production topology, on one machine (fixtures in integration_stack.py).

`sweeps/launch.py --address ... --tracking-uri http://...` runs a small grid on the two-node Ray
cluster and records it on the MLflow server (PostgreSQL, proxied artifacts), as a RayJob would on
Kubernetes. Then everything is read back through the server alone: every trial run FINISHED,
trials placed on both Ray nodes (the node tags the trials record), artifacts downloaded through
the server's proxy, and the report built from the server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from integration_stack import HEAD_IP, WORKER_IP, ray_driver
from support.grids import tiny_grid

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "calib-it-sweep-topology"
# Measured on a 2-core machine: launch ~25 s, report ~5 s. Ten times that for a busy CI machine;
# a launch that waits for resources no node has would otherwise hang until the tier's limit.
LAUNCH_TIMEOUT_S = 300
REPORT_TIMEOUT_S = 120

_LIST_NODES = textwrap.dedent(
    """
    import json, sys
    import ray
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    print(json.dumps({n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}))
    ray.shutdown()
    """
)


def _small_grid(path: Path, tmp: Path) -> Path:
    """Two folds x (pretrain, base CE, platt, auxiliary): 8 trials in 3 waves of 2, each trial
    1 CPU, so that each wave fills both 1-CPU nodes. Data root and cache on the one file system
    both nodes see (on a real cluster: a shared volume)."""
    return tiny_grid(path, tmp / "data", tmp / "cache", name="it-topology",
                     methods={"platt": {}, "auxiliary": {"params": {"k": 5}}})


def _run(what: str, command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` to its end; a test failure naming ``what`` if it runs past ``timeout``."""
    # RAY_AUTH_MODE as the cluster has it: a Ray started in this test process (the slow tier's
    # ray_session) sets it to "token" here, and drivers inheriting that lose their actors.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "RAY_AUTH_MODE": "disabled"}
    # cwd: a temp folder, so that nothing a command writes lands in the repository.
    try:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:  # killed; say how far it got
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                    for x in (exc.stdout, exc.stderr))
        pytest.fail(f"{what} ran past {timeout} s\nstdout:\n{out[-6000:]}\n"
                    f"stderr:\n{err[-6000:]}")


def test_sweep_runs_on_both_nodes_and_reads_back_through_the_server(
    ray_two_nodes: str, mlflow_server: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from sweeps.grid import load_grid
    from sweeps.plan import expand
    from tracking import schema

    grid_file = _small_grid(tmp_path / "grid.yaml", tmp_path)
    plan = expand(load_grid(str(grid_file)))
    nodes = json.loads(ray_driver(_LIST_NODES, ray_two_nodes))
    assert sorted(nodes.values()) == [HEAD_IP, WORKER_IP]

    launch = _run("the launch", [
        sys.executable, str(REPO / "sweeps" / "launch.py"), "--grid", str(grid_file),
        "--address", ray_two_nodes, "--tracking-uri", mlflow_server, "--experiment", EXPERIMENT,
        "--work-dir", str(tmp_path / "work"), "--no-report",  # the report is built below, alone
    ], tmp_path, LAUNCH_TIMEOUT_S)
    log = f"stdout:\n{launch.stdout[-6000:]}\nstderr:\n{launch.stderr[-6000:]}"
    assert launch.returncode == 0, log

    # Runs, through the server's REST API only.
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, log
    # Proxied artifacts: clients see the server's scheme, never a path on its disk.
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    trials = [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_TRIAL]
    sweeps = [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_SWEEP]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED", log
    assert sorted(r.data.tags[schema.TRIAL_KEY] for r in trials) == sorted(t.key for t in plan.trials)
    assert {r.info.status for r in trials} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in trials]

    # Placement: the trials used both nodes, and each run names the node it ran on, consistently.
    used = {r.data.tags[schema.NODE_ID] for r in trials}
    assert used == set(nodes), f"trials ran on {used}, the cluster's nodes are {nodes}"
    for r in trials:
        assert r.data.tags[schema.NODE_IP] == nodes[r.data.tags[schema.NODE_ID]]

    # Artifacts download through the server's proxy.
    for r in trials:
        assert r.info.artifact_uri.startswith("mlflow-artifacts:"), r.info.artifact_uri
        where = tmp_path / "downloads" / r.info.run_id
        per_subject = pd.read_csv(client.download_artifacts(r.info.run_id, schema.PER_SUBJECT, str(where)))
        bins = pd.read_csv(client.download_artifacts(r.info.run_id, schema.RELIABILITY_BINS, str(where)))
        assert list(per_subject.columns[:4]) == list(schema.PER_SUBJECT_COLUMNS)
        assert len(per_subject) == r.data.metrics[schema.N_SUBJECTS] > 0
        assert list(bins.columns) == list(schema.RELIABILITY_COLUMNS) and len(bins) > 0

    # The report, from the server alone: nothing the launch left on this disk is there any more.
    for left in ("work", "data", "cache", "downloads"):
        shutil.rmtree(tmp_path / left)
    report_dir = tmp_path / "report"
    report = _run("the report", [
        sys.executable, "-m", "tracking.report", "--experiment", EXPERIMENT,
        "--tracking-uri", mlflow_server, "--out", str(report_dir),
    ], tmp_path, REPORT_TIMEOUT_S)
    assert report.returncode == 0, f"{report.stdout[-4000:]}\n{report.stderr[-4000:]}"
    results = pd.read_csv(report_dir / "results_long.csv")
    # One row per dataset x weights x method: base, platt, auxiliary of brats18 / CE.
    assert sorted(results["method"]) == ["auxiliary", "base", "platt"], results
