"""What the MLflow UI reads: the experiment's kind, a run's source, the runs page.

* **Source.** ``mlflow.source.name`` (the entry point), ``mlflow.source.type`` and
  ``mlflow.source.git.commit`` on every run (:func:`source_tags`).
* **Experiment.** Tagged ``mlflow.experimentKind = custom_model_development`` (MLflow 3.17), so
  the UI opens on its runs rather than the GenAI overview; :func:`runs_page_url` is the runs page.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mlflow.tracking import MlflowClient

from tracking import schema
from tracking.store import is_remote

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3.17: the model-training view
WORKFLOW_QUERY = "workflowType=machine_learning"
SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def source_tags(entry_point: str, git_commit: str | None) -> dict[str, str]:
    """The tags the MLflow UI reads a run's Source from (entry point, git commit)."""
    tags = {SOURCE_NAME: entry_point, SOURCE_TYPE: "LOCAL"}
    if git_commit:
        tags[schema.GIT_COMMIT] = git_commit
    return tags


def runs_page_url(tracking_uri: str, experiment_id: str, ui: str | None = None) -> str:
    """The experiment's runs page in the MLflow UI, in its model-training view.

    A server URI is its own UI; a local store is served by ``mlflow ui`` at ``ui`` (default
    http://127.0.0.1:5000).
    """
    base = tracking_uri if is_remote(tracking_uri) else (ui or DEFAULT_UI)
    parts = urlsplit(base)
    base = f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}".rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs?{WORKFLOW_QUERY}"


def prepare_experiment(client: MlflowClient, experiment_id: str, tracking_uri: str) -> str:
    """Tag the experiment so the UI opens on its runs; the URL of that page."""
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return runs_page_url(tracking_uri, experiment_id)
