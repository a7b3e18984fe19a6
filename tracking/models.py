"""A trial's logged model read back: the pyfunc class MLflow loads, and from a run id or a model
URI to a local model folder of :mod:`calib.apply.model` (what ``python -m calib.apply --run /
--model`` applies).

``mlflow.pyfunc.load_model(uri).predict(...)`` runs :meth:`calib.apply.FittedModel.predict`
through :class:`CalibratedSegmenter` (loading needs this repository importable); for whole
NIfTI cases use ``python -m calib.apply --model URI``, which reads the same folder
(:func:`download_model`). Models are written by :mod:`tracking.logged_model`.

Every call goes through an explicit MlflowClient / tracking URI and run id, never the global
active run (trials run in Ray workers, several per process over time).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from calib.vocabulary import CALIBRATE, PREDICTIONS_KIND
from tracking import schema
from tracking.runs import finished_trial_runs
from tracking.store import FINISHED, fetch_artifacts, resolve_tracking_uri

MODEL_ARTIFACT = "model"  # the model folder inside the pyfunc's artifacts


class ModelNotFound(ValueError):
    """A run or model URI that cannot be applied (unknown, unfinished, not a trial)."""


class CalibratedSegmenter(mlflow.pyfunc.PythonModel):
    """A finished trial as an MLflow pyfunc (module doc): arrays in, calibrated probability out."""

    def load_context(self, context) -> None:
        from calib.apply import load_fitted  # the science; imported where the model is loaded

        self._model = load_fitted(Path(context.artifacts[MODEL_ARTIFACT]))

    def predict(self, context, model_input, params=None):
        if not isinstance(model_input, Mapping):
            raise ValueError("input must be a dict of arrays: {'image' or 'logits', 'mask'}")
        device = (params or {}).get("device", "cpu")
        pred = self._model.predict(np.asarray(model_input["mask"], dtype=bool),
                                   image=model_input.get("image"), logits=model_input.get("logits"),
                                   device=device)
        out = {"probability": pred.prob}
        if pred.std is not None:
            out["std"] = pred.std
        return out


def build_model_dir(dest: Path, trial_config: Mapping[str, Any], stage_file: Path,
                    base_weights: Path | None = None) -> Path:
    """The model folder of :mod:`calib.apply.model` from a trial's files; returns ``dest``."""
    # calib.apply loads torch: deferred, so that reading the store (the report) does not
    from calib.apply import BASE_WEIGHTS, METHOD_FILE, STAGE_WEIGHTS, TRIAL_CONFIG

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / TRIAL_CONFIG).write_text(json.dumps(dict(trial_config), indent=2, sort_keys=True, default=str))
    # the name calib.apply reads it by: a fitted method for calibrate trials, else U-Net weights
    shutil.copy2(stage_file, dest / (METHOD_FILE if trial_config.get("stage") == CALIBRATE else STAGE_WEIGHTS))
    if base_weights is not None:
        shutil.copy2(base_weights, dest / BASE_WEIGHTS)
    return dest


@contextlib.contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """Set the process-wide tracking URI for the block, then put the previous one back.

    For the few MLflow internals that resolve through it whatever client called them (the
    registry resolving a ``models:/`` source); the sweep's own calls pass their URI explicitly.
    ``mlflow.set_tracking_uri`` mirrors the URI into ``$MLFLOW_TRACKING_URI``, which is
    therefore what was set before.
    """
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


# ---- from MLflow back to a model folder ----------------------------------------------------------

def run_model_id(client: MlflowClient, run_id: str) -> str | None:
    """The id of the model a run logged (its latest), or None."""
    run = client.get_run(run_id)
    outputs = getattr(run, "outputs", None)
    models = list(getattr(outputs, "model_outputs", None) or [])
    return models[-1].model_id if models else None


def resolve_model_id(client: MlflowClient, model_uri: str) -> str:
    """The LoggedModel id behind ``models:/m-<id>``, ``models:/<name>@<alias>`` or
    ``models:/<name>/<version>``, resolved through ``client`` (no global tracking URI)."""
    if not model_uri.startswith("models:/"):
        raise ModelNotFound(f"model URI {model_uri!r}: expected models:/<name>@<alias>, "
                            "models:/<name>/<version> or models:/m-<id>")
    ref = model_uri[len("models:/"):].strip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in ref:
        name, number = ref.rsplit("/", 1)
        version = client.get_model_version(name, number)
    else:
        return ref
    # MLflow's SQL registry keeps the logged model in the version's source (models:/m-<id>)
    source = version.source or ""
    model_id = version.model_id or (source[len("models:/"):] if source.startswith("models:/m-") else None)
    if not model_id:
        raise ModelNotFound(f"model {model_uri!r} (version {version.version}) is not linked to a logged model")
    return model_id


def download_model(dest: Path, run_id: str | None = None, model_uri: str | None = None,
                   tracking_uri: str | None = None) -> Path:
    """A local model folder (:mod:`calib.apply.model`) of a FINISHED trial run or a model URI.

    A run with a logged model is read through it; an older run without one is assembled from its
    artifacts (trial_config.json, weights/, and the upstream base run's weights). Unknown or
    unfinished runs and unknown URIs raise ModelNotFound.
    """
    if (run_id is None) == (model_uri is None):
        raise ModelNotFound("give exactly one of a run id or a model URI")
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    dest = Path(dest)
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise ModelNotFound(f"no run {run_id!r} in {uri}: {exc.message}") from None
        if run.data.tags.get(schema.ROLE) != schema.ROLE_TRIAL:
            raise ModelNotFound(f"run {run_id} is not a trial run (tag {schema.ROLE}="
                                f"{run.data.tags.get(schema.ROLE)!r}); give a trial's run id")
        if run.info.status != FINISHED:
            raise ModelNotFound(f"run {run_id} is {run.info.status}; only FINISHED trials can be applied")
        model_id = run_model_id(client, run_id)
        if model_id is None:
            return _assemble_from_run(client, run, dest)
        model_uri = f"models:/{model_id}"
    try:
        logged = client.get_logged_model(resolve_model_id(client, model_uri))
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged.artifact_location,
                                                         dst_path=str(dest), tracking_uri=uri))
    except MlflowException as exc:
        raise ModelNotFound(f"cannot resolve model {model_uri!r} in {uri}: {exc.message}") from None
    folder = local / "artifacts" / MODEL_ARTIFACT
    if not folder.is_dir():
        raise ModelNotFound(f"model {model_uri!r} is not a calibration trial's model (no artifacts/{MODEL_ARTIFACT})")
    return folder


def _assemble_from_run(client: MlflowClient, run, dest: Path) -> Path:
    """The model folder of a FINISHED trial run that logged no model (before models were logged)."""
    run_id = run.info.run_id
    cache = dest / "artifacts"
    config_path = fetch_artifacts(client, run_id, schema.TRIAL_CONFIG, cache)
    config = json.loads(Path(config_path).read_text())
    weights = fetch_artifacts(client, run_id, schema.WEIGHTS_DIR, cache)
    files = sorted(p for p in Path(weights).iterdir() if p.suffix == ".pt")
    if not files:
        raise ModelNotFound(f"run {run_id} has no model file under {schema.WEIGHTS_DIR}/")
    base = None
    upstream = run.data.tags.get(schema.UPSTREAM_KEY)
    if config.get("stage") == CALIBRATE and upstream and (config.get("data") or {}).get("kind") != PREDICTIONS_KIND:
        found = finished_trial_runs(client, run.info.experiment_id, [upstream])
        if upstream not in found:
            raise ModelNotFound(f"run {run_id}: its base model (trial {upstream}) has no FINISHED run")
        base = fetch_artifacts(client, found[upstream].info.run_id, schema.WEIGHTS_FILE, cache)
    return build_model_dir(dest / "model", config, files[0], base)
