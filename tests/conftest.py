"""Fixtures shared by the whole suite.

``ray_session``: ONE local Ray for the whole test session (2 CPUs, no dashboard), started by the
first test that asks for it and shut down at the end; its GCS address lets subprocess launches
join it (``--address``) instead of starting Ray of their own.
``mlflow_store``: a fresh SQLite MLflow store in the test's tmp folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """The session's local Ray; yields its GCS address (``host:port``)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if ray.is_initialized():  # someone else's session Ray: share it, leave it running
        yield ray.get_runtime_context().gcs_address
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """An empty SQLite store with MLflow's tables made once (migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)
    return path


@pytest.fixture
def mlflow_store(tmp_path, _mlflow_template) -> str:
    """Tracking URI of an empty SQLite MLflow store under ``tmp_path``."""
    shutil.copyfile(_mlflow_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
