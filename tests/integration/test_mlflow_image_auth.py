"""The MLflow image's server configuration, run for real: basic auth on PostgreSQL.

The server gets what docker/mlflow.Dockerfile gives it (the backend URI `postgresql+psycopg2://`
and docker/mlflow/basic_auth.ini) plus the environment the Kubernetes manifests and compose
fill from Secrets (PG*, MLFLOW_AUTH_ADMIN_*, MLFLOW_FLASK_SERVER_SECRET_KEY). Then the account
set-up of infra/k8s/README.md is replayed: the admin creates the sweep's user over REST, and that
user logs a run with an artifact; anonymous and wrong-password requests are refused.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from integration_stack import PG_HOST, PG_PORT, PG_USER, fresh_database, run_mlflow_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _request(url: str, user: str | None = None, password: str | None = None,
             body: dict | None = None) -> int:
    """HTTP status of a GET (or a JSON POST when `body` is given), with optional basic auth."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_image_config_serves_authenticated_users_only(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("flask_wtf", reason="basic auth needs Flask-WTF (mlflow[auth])")
    from mlflow.tracking import MlflowClient

    dockerfile = (REPO_ROOT / "docker" / "mlflow.Dockerfile").read_text()
    # The ENV line of the runtime stage (a continuation line ending in the value).
    backend_uri = re.search(r"^\s+MLFLOW_BACKEND_STORE_URI=(\S+)$", dockerfile, re.M).group(1)
    admin_password, sweep_password = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    with fresh_database("calib_it_auth") as database:
        env = {
            "PGHOST": PG_HOST, "PGPORT": str(PG_PORT), "PGDATABASE": database, "PGUSER": PG_USER,
            "MLFLOW_BACKEND_STORE_URI": backend_uri,
            "MLFLOW_AUTH_CONFIG_PATH": str(REPO_ROOT / "docker" / "mlflow" / "basic_auth.ini"),
            "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        }
        with run_mlflow_server(tmp_path, database, env=env, backend_from_env=True,
                               extra_args=("--app-name", "basic-auth")) as server:
            search = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
            assert _request(search) == 401
            assert _request(search, "admin", "wrong-password-123") == 401
            assert _request(search, "admin", admin_password) == 200

            # infra/k8s/README.md, step 5: the admin creates the sweep's account.
            create_user = f"{server.uri}/api/2.0/mlflow/users/create"
            body = {"username": "sweep", "password": sweep_password}
            assert _request(create_user, body=body) == 401
            assert _request(create_user, "admin", admin_password, body=body) == 200

            # The Ray pods' view: credentials in MLFLOW_TRACKING_USERNAME / _PASSWORD.
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "sweep")
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", sweep_password)
            client = MlflowClient(tracking_uri=server.uri)
            experiment_id = client.create_experiment("calib-it-auth")
            run = client.create_run(experiment_id)
            artifact = tmp_path / "reliability_bins.csv"
            artifact.write_text("subject_id,bin,count,conf_sum,pos_sum\ns1,0,10,0.2,0\n")
            client.log_artifact(run.info.run_id, str(artifact))
            downloaded = client.download_artifacts(run.info.run_id, artifact.name, str(tmp_path / "dl"))
            assert Path(downloaded).read_text() == artifact.read_text()
            # The users live in the tracking database itself (database_uri = postgresql+psycopg2://).
            assert _request(search, "sweep", sweep_password) == 200
    import psycopg2  # noqa: E402 - after the server is gone: the database was dropped

    with psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres") as conn:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            assert cursor.fetchone() is None
