"""Shared by the tracking tests: a sweep run on a real SQLite store."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tracking.runs import start_sweep_run
from tracking.store import get_or_create_experiment


@pytest.fixture
def store(mlflow_store):
    """(client, experiment id, sweep run) on a fresh SQLite store."""
    client = MlflowClient(mlflow_store)
    exp = get_or_create_experiment(client, "calib-test", mlflow_store)
    parent = start_sweep_run(client, exp, grid_name="test", grid_yaml="name: test\n", git_commit="abc")
    return client, exp, parent
