"""The production topology on one machine, as pytest fixtures (registered in conftest.py).

- `mlflow_server`: a real `mlflow server` process on a fresh PostgreSQL database (the machine's
  server at 127.0.0.1:5432, user postgres, trust auth) with proxied artifacts; yields its URI.
- `ray_two_nodes`: a real two-node Ray cluster, `ray start --head` plus a second
  `ray start --address`, each its own process tree with its own loopback address, temp dir
  and custom resource (`node_head` / `node_worker`, see HEAD_RESOURCE / WORKER_RESOURCE);
  yields the GCS address.

Both are session-scoped (each takes seconds to start) and stop everything they started, and
drop the database, also when a test or the start-up itself fails. They stop only their own
processes (by process group), never `ray stop`, which would end every Ray on the machine.
Tests using them are marked `integration` (and `slow`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.ports import free_ports
from support.processes import start_process, stop_processes, tail, wait_healthy

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
HEAD_RESOURCE, WORKER_RESOURCE = "node_head", "node_worker"
# Each Ray node gets its own loopback address, as two hosts would have. Not 127.0.0.1: Ray
# rewrites an address of "127.0.0.1"/"localhost" into the machine's outward IP before it
# connects, and nothing here may leave the loopback range. 127.0.0.2/3 are loopback on Linux.
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
BIN = Path(sys.executable).parent  # the venv's console scripts: mlflow, ray
START_TIMEOUT_S = 180  # generous: two shared cores, other tests may run beside


def _unavailable(reason: str) -> None:
    """In CI the integration tier must run: a missing service fails it; elsewhere it skips."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


# ---- PostgreSQL ---------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(prefix: str = "calib_it") -> Iterator[str]:
    """Create an empty database `<prefix>_<random>`, yield its name, drop it afterwards."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2-binary is in the test extras")
    try:
        admin = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres",
                                 connect_timeout=5)
    except psycopg2.OperationalError as error:
        _unavailable(f"PostgreSQL at {PG_HOST}:{PG_PORT} (user {PG_USER}) unreachable: {error}")
    admin.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    name = f"{prefix}_{secrets.token_hex(6)}"
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        with admin.cursor() as cursor:
            # FORCE: a server that died mid-request may still hold connections.
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


# ---- MLflow server ------------------------------------------------------------------------


@dataclass(frozen=True)
class MlflowServer:
    """A running `mlflow server`: its URI, database, artifact root and log file."""

    uri: str
    database: str
    artifacts_dir: Path
    log: Path


@contextlib.contextmanager
def run_mlflow_server(
    workdir: Path,
    database: str,
    env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
    backend_from_env: bool = False,
    port: int | None = None,
) -> Iterator[MlflowServer]:
    """Run `mlflow server` on PostgreSQL `database` with proxied artifacts under `workdir`.

    `env`, `extra_args` and `backend_from_env` (no --backend-store-uri: the server reads
    MLFLOW_BACKEND_STORE_URI from `env`) let a test run the server as the Docker image does;
    `port` (default: a free one) lets a test restart a server where its clients expect it.
    Stops the server on exit, whatever happened.
    """
    if port is None:
        (port,) = free_ports(1)
    artifacts = workdir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log = workdir / "mlflow-server.log"
    uri = f"http://127.0.0.1:{port}"
    # The driver is named: SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, not installed.
    backend = f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"
    command = [
        str(BIN / "mlflow"), "server",
        *([] if backend_from_env else ["--backend-store-uri", backend]),
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        *extra_args,
    ]
    # The server runs from workdir, so nothing it might write lands in the repository.
    process = start_process(command, log, env)
    try:
        wait_healthy(f"{uri}/health", process, log, START_TIMEOUT_S, "mlflow server")
        yield MlflowServer(uri=uri, database=database, artifacts_dir=artifacts, log=log)
    finally:
        stop_processes(process)


@pytest.fixture(scope="session")
def mlflow_server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The session's MLflow server (details); most tests want `mlflow_server`, its URI."""
    workdir = tmp_path_factory.mktemp("mlflow-server")
    with fresh_database() as database, run_mlflow_server(workdir, database) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_process: MlflowServer) -> str:
    """URI (http://127.0.0.1:PORT) of a real MLflow server on PostgreSQL, artifacts proxied."""
    return mlflow_server_process.uri


# ---- Ray ----------------------------------------------------------------------------------

_WAIT_FOR_NODES = textwrap.dedent(
    """
    import json, sys, time
    import ray
    address, expected, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    deadline = time.monotonic() + timeout
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(json.dumps([{"node_id": n["NodeID"], "resources": n["Resources"]} for n in alive]))
    ray.shutdown()
    """
)


def ray_driver(script: str, *args: str, timeout: float = START_TIMEOUT_S) -> str:
    """Run a Python `script` in a fresh interpreter (a Ray driver of its own) and return stdout.

    Drivers run out of process so that the test process never holds a Ray connection that
    could clash with another test's local Ray.
    """
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"Ray driver failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def _ray_start(role: str, ip: str, temp_dir: Path, log: Path, args: list[str]) -> subprocess.Popen:
    # Every port a node opens is chosen here, so that two nodes on one machine (and any other
    # Ray on it) never collide on Ray's fixed defaults (10001, 52365, ...).
    agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(6)
    command = [
        str(BIN / "ray"), "start", *args,
        "--node-ip-address", ip,
        "--num-cpus", "1", "--num-gpus", "0",
        "--object-store-memory", str(100 * 1024 * 1024),
        "--temp-dir", str(temp_dir),
        "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env),
        "--metrics-export-port", str(metrics),
        "--node-manager-port", str(node_manager),
        "--object-manager-port", str(object_manager),
        "--disable-usage-stats",
        # --block: the command stays in the foreground, so stopping it stops this node only.
        "--block",
    ]
    # Authentication off, explicitly: otherwise `ray start` turns token auth on whenever some
    # earlier Ray on this machine left ~/.ray/auth_token, while a driver started with a clean
    # environment does not send it and is refused. With auth off, drivers connect whatever
    # their own RAY_AUTH_MODE (checked); this throwaway cluster lives on loopback addresses.
    # No drain on SIGTERM (Ray waits up to 30 s by default): this cluster serves no traffic.
    process = start_process(command, log, {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    })
    time.sleep(1.0)
    if process.poll() is not None:
        raise RuntimeError(f"ray start ({role}) exited ({process.returncode}):\n{tail(log)}")
    return process


def _ray_client_installed() -> bool:
    from ray._private.utils import get_ray_client_dependency_error

    return get_ray_client_dependency_error() is None


def _wait_port(host: str, port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray head exited ({process.returncode}):\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 1):
            return
        time.sleep(0.5)
    raise RuntimeError(f"ray head's GCS not listening after {START_TIMEOUT_S} s:\n{tail(log)}")


@pytest.fixture(scope="session")
def ray_two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """GCS address (127.0.0.2:PORT) of a running two-node Ray cluster.

    Head: 1 CPU, resource HEAD_RESOURCE, node IP HEAD_IP; worker: 1 CPU, WORKER_RESOURCE,
    WORKER_IP. A driver on this machine connects with `ray.init(address=...)` (or the launch
    command's `--address`) and needs no other setting.
    """
    logs = tmp_path_factory.mktemp("ray-logs")
    # Ray's unix socket paths must stay under ~107 bytes: short temp dirs directly in /tmp.
    temp_dirs = [Path(tempfile.mkdtemp(prefix=f"ray{i}_", dir="/tmp")) for i in range(2)]
    processes: list[subprocess.Popen] = []
    try:
        gcs_port, client_port = free_ports(2)
        address = f"{HEAD_IP}:{gcs_port}"
        head_log = logs / "head.log"
        head_args = ["--head", "--port", str(gcs_port), "--include-dashboard=false",
                     "--resources", json.dumps({HEAD_RESOURCE: 1})]
        if _ray_client_installed():  # else no client server starts, and the flag is refused
            head_args += ["--ray-client-server-port", str(client_port)]
        processes.append(_ray_start("head", HEAD_IP, temp_dirs[0], head_log, head_args))
        _wait_port(HEAD_IP, gcs_port, processes[0], head_log)
        processes.append(_ray_start("worker", WORKER_IP, temp_dirs[1], logs / "worker.log", [
            "--address", address, "--resources", json.dumps({WORKER_RESOURCE: 1}),
        ]))
        nodes = json.loads(ray_driver(_WAIT_FOR_NODES, address, "2", str(START_TIMEOUT_S)))
        if len(nodes) != 2:
            raise RuntimeError(
                f"expected 2 Ray nodes, found {len(nodes)}:\n{tail(head_log)}\n"
                f"{tail(logs / 'worker.log')}"
            )
        yield address
    finally:
        stop_processes(*processes)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
