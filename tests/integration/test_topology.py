"""Smoke test of the production topology on one machine (fixtures in integration_stack.py).

A driver process connects to the two-node Ray cluster with an address, as the launch command's
`--address` does, places one task on each node by custom resource, and the node ids it saw are
logged to a run on the MLflow server together with an artifact; everything is then read back
through the server alone.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from integration_stack import HEAD_RESOURCE, WORKER_RESOURCE, MlflowServer, ray_driver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_PLACE_TASKS = textwrap.dedent(
    """
    import json, sys
    import ray
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

    @ray.remote(num_cpus=1)
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    placed = {
        name: ray.get(where.options(resources={name: 1}).remote(), timeout=120)
        for name in sys.argv[2:]
    }
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    print(json.dumps({"placed": placed, "nodes": nodes}))
    ray.shutdown()
    """
)


def test_tasks_land_on_both_nodes_and_runs_read_back_through_the_server(
    ray_two_nodes: str, mlflow_server: str, mlflow_server_process: MlflowServer, tmp_path: Path
) -> None:
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    # Ray: one task per node, steered by the nodes' custom resources.
    report = json.loads(ray_driver(_PLACE_TASKS, ray_two_nodes, HEAD_RESOURCE, WORKER_RESOURCE))
    nodes, placed = report["nodes"], report["placed"]
    assert len(nodes) == 2
    assert placed[HEAD_RESOURCE] != placed[WORKER_RESOURCE]
    assert HEAD_RESOURCE in nodes[placed[HEAD_RESOURCE]]
    assert WORKER_RESOURCE in nodes[placed[WORKER_RESOURCE]]

    # MLflow: a run with the node ids and an artifact, through the server's REST API only.
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.create_experiment("calib-it-topology")
    # --serve-artifacts: the client only ever sees the proxy scheme, never a storage path.
    assert client.get_experiment(experiment_id).artifact_location.startswith("mlflow-artifacts:")
    run = client.create_run(experiment_id, tags={"calib.role": "trial"})
    for name, node_id in placed.items():
        client.set_tag(run.info.run_id, f"ray.{name}", node_id)
    client.log_metric(run.info.run_id, "dice_mean", 0.5)
    artifact = tmp_path / "per_subject.csv"
    artifact.write_text("subject_id,fold,dice,ece\ns1,0,0.8,0.05\n")
    client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.FINISHED))

    # Read back with a new client: tags, metric, status, and the artifact's bytes.
    reader = MlflowClient(tracking_uri=mlflow_server)
    stored = reader.get_run(run.info.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.metrics["dice_mean"] == 0.5
    assert {stored.data.tags[f"ray.{name}"] for name in placed} == set(placed.values())
    listed = [f.path for f in reader.list_artifacts(run.info.run_id)]
    assert listed == ["per_subject.csv"]
    downloaded = Path(reader.download_artifacts(run.info.run_id, "per_subject.csv", str(tmp_path / "dl")))
    assert downloaded.read_text() == artifact.read_text()
    # ...and the bytes really went through the server into its artifact destination.
    # (this run's only: other tests of the session log to the same server)
    stored_files = [p for p in mlflow_server_process.artifacts_dir.rglob("per_subject.csv")
                    if run.info.run_id in p.parts]
    assert len(stored_files) == 1 and stored_files[0].read_text() == artifact.read_text()
