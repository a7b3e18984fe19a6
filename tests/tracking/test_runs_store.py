"""tracking.store: tracking URI resolution, the reachability check, the UI command."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from support.ports import free_port

from tracking.store import TrackingError, check_reachable, resolve_tracking_uri, ui_command


def test_uri_precedence_and_absolute_paths(tmp_path):
    assert resolve_tracking_uri(None, env={}, cwd=tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert resolve_tracking_uri(None, env=env, cwd=tmp_path) == "http://mlflow:5000"
    assert resolve_tracking_uri("sqlite:///runs/x.db", env=env, cwd=tmp_path) == f"sqlite:///{tmp_path / 'runs/x.db'}"
    assert resolve_tracking_uri("sqlite:////abs/x.db", env={}, cwd=tmp_path) == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("postgresql://u@db/mlflow", env={}, cwd=tmp_path) == "postgresql://u@db/mlflow"


def test_unreachable_server_fails_fast_with_the_uri():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError) as info:
        check_reachable(uri, timeout_s=3)
    assert time.monotonic() - start < 20
    assert uri in str(info.value) and "unreachable" in str(info.value)


def test_sqlite_store_is_created(tmp_path):
    uri = f"sqlite:///{tmp_path / 'sub' / 'mlflow.db'}"
    check_reachable(uri)
    assert (tmp_path / "sub" / "mlflow.db").exists()


def test_two_launches_creating_one_new_store_both_succeed(tmp_path):
    # The first client of a new SQLite store makes MLflow's tables; two at once used to race
    # (the second failed with "duplicate column name"): check_reachable serialises them.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = f"from tracking.store import check_reachable; check_reachable({uri!r}, timeout_s=60)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors


def test_ui_command():
    assert ui_command("sqlite:////a b/mlflow.db") == "mlflow ui --backend-store-uri 'sqlite:////a b/mlflow.db'"
    assert "http://h:5000" in ui_command("http://h:5000")
