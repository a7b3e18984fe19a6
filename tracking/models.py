"""MLflow as its users browse it: logged models, datasets, run sources, system metrics, the UI URL.

* **Models.** Every finished trial logs its fitted model as an MLflow pyfunc (a LoggedModel linked
  to the run, so the run's Models column and the experiment's Models page list it): the model
  folder of :mod:`calib.apply.model` (trial_config.json, the stage's weights or fitted method,
  the upstream base weights a logit calibrator needs) as the pyfunc's ``model`` artifact, and a
  tensor signature: ``{"image": (C, X, Y, Z) float32, "mask": (X, Y, Z) bool}`` for a U-Net model,
  ``{"logits": (X, Y, Z) float32, "mask": ...}`` for a calibrator of another network's
  predictions, both on the model's (preprocessed) grid; the output is ``{"probability": (X, Y, Z)}``
  plus ``"std"`` for MC dropout. ``mlflow.pyfunc.load_model(uri).predict(...)`` runs
  :meth:`calib.apply.FittedModel.predict`; for whole NIfTI cases use ``python -m calib.apply
  --model URI``, which reads the same folder (:func:`download_model`). Loading needs this
  repository importable (the pyfunc class lives here, loaded as MLflow "models from code" by
  ``tracking/pyfunc_model.py``, so no pickle; its requirements pin torch, MONAI, nibabel).
* **Datasets.** The splits a trial used, ``mlflow.log_input``-style: one dataset per fold and
  split (``<dataset>-fold<k>-<split>``), the preprocessed cache's hash as digest, contexts
  ``train`` / ``val`` / ``calib`` / ``test``.
* **Source.** ``mlflow.source.name`` (the entry point), ``mlflow.source.type`` and
  ``mlflow.source.git.commit`` on every run (:func:`source_tags`).
* **Experiment.** Tagged ``mlflow.experimentKind = custom_model_development`` (MLflow 3.17), so
  the UI opens on its runs rather than the GenAI overview; :func:`runs_page_url` is the runs page.
* **System metrics** (CPU, memory, disk, network; GPU with nvidia-ml-py) per trial run:
  :func:`system_metrics`.

Every call goes through an explicit MlflowClient / tracking URI and run id, never the global
active run (trials run in Ray workers, several per process over time).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.entities.logged_model_output import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from tracking import schema
from tracking.runs import FINISHED
from tracking.store import is_remote

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3.17: the model-training view
WORKFLOW_QUERY = "workflowType=machine_learning"
SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
DATA_CONTEXT = "mlflow.data.context"  # the tag MLflow's UI shows as a dataset's context
MODEL_NAME = "model"  # a LoggedModel's name when the trial config names nothing better
MODEL_ARTIFACT = "model"  # the model folder inside the pyfunc's artifacts
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")  # MLflow "models from code": no pickle
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
SPLITS = ("train", "val", "calib", "test")
MODEL_ERROR = "calib.model_error"  # on a trial run whose model could not be logged: why
#: What a logged model needs to load; the versions installed when it was logged are pinned.
REQUIREMENTS = ("mlflow", "torch", "monai", "nibabel", "numpy", "scipy", "pandas")


class ModelNotFound(ValueError):
    """A run or model URI that cannot be applied (unknown, unfinished, not a trial)."""


# ---- experiment, source, URL ---------------------------------------------------------------------

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


# ---- system metrics ------------------------------------------------------------------------------

@contextlib.contextmanager
def system_metrics(run_id: str, tracking_uri: str, enabled: bool = True,
                   sampling_interval: float = 10.0) -> Iterator[None]:
    """Log ``system/*`` metrics (CPU, memory, disk, network, GPU) of this process's machine to
    ``run_id`` every ``sampling_interval`` seconds while the block runs; nothing when disabled.

    A monitor that cannot start (psutil missing) is reported by MLflow and does not stop the trial.
    """
    if not enabled:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval, resume_logging=True,
                                   tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


# ---- datasets ------------------------------------------------------------------------------------

def _cache_digest(cache_dir: Path) -> str:
    """The preprocessed cache's config hash (its folder's suffix), as a dataset digest."""
    try:
        meta = json.loads((Path(cache_dir) / "meta.json").read_text())
        return str(meta["hash"])[:16]
    except (OSError, ValueError, KeyError):
        return Path(cache_dir).name.rsplit("-", 1)[-1][:16]


#: A cached subject's arrays (calib.data), as MLflow's tensor-spec schema (shown on the dataset).
_SUBJECT_SCHEMA = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1), "image"),
                          TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "label"),
                          TensorSpec(np.dtype(bool), (-1, -1, -1), "mask")]).to_json()


def log_trial_datasets(client: MlflowClient, run_id: str, dataset: str, cache_dir: Path,
                       splits: Mapping[str, Any]) -> list[str]:
    """Log the fold's splits as the run's input datasets; their names.

    ``splits`` is the trial's ``splits.json`` (``fold`` and the subject ids per split). Each split
    is one dataset ``<dataset>-fold<k>-<split>`` with the cache hash as digest, the cache folder
    as source, the subject count and ids as profile, and its split as context.
    """
    digest = _cache_digest(cache_dir)
    fold = splits.get("fold", "")
    inputs, names = [], []
    for split in SPLITS:
        ids = list(splits.get(split) or [])
        if not ids:
            continue
        name = f"{dataset}-fold{fold}-{split}"
        ds = Dataset(name=name, digest=digest, source_type="local",
                     source=json.dumps({"uri": str(Path(cache_dir).resolve().as_uri())}),
                     schema=json.dumps({"mlflow_tensorspec": {"features": _SUBJECT_SCHEMA, "targets": None}}),
                     profile=json.dumps({"num_subjects": len(ids), "subjects": ids[:200]}))
        inputs.append(DatasetInput(ds, tags=[InputTag(DATA_CONTEXT, split)]))
        names.append(name)
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    return names


# ---- the pyfunc ----------------------------------------------------------------------------------


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


def model_signature(inputs: str, channels: int | None, samples: bool) -> ModelSignature:
    """The tensor signature of a trial's pyfunc (module doc)."""
    vol = (-1, -1, -1)
    first = TensorSpec(np.dtype(np.float32), (channels or -1, *vol), "image") if inputs == "images" \
        else TensorSpec(np.dtype(np.float32), vol, "logits")
    outputs = [TensorSpec(np.dtype(np.float32), vol, "probability")]
    if samples:
        outputs.append(TensorSpec(np.dtype(np.float32), vol, "std"))
    return ModelSignature(inputs=Schema([first, TensorSpec(np.dtype(bool), vol, "mask")]),
                          outputs=Schema(outputs))


def _requirements() -> list[str]:
    reqs = []
    for name in REQUIREMENTS:
        try:
            reqs.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def build_model_dir(dest: Path, trial_config: Mapping[str, Any], stage_file: Path,
                    base_weights: Path | None = None) -> Path:
    """The model folder of :mod:`calib.apply.model` from a trial's files; returns ``dest``."""
    from calib.apply import BASE_WEIGHTS, METHOD_FILE, STAGE_WEIGHTS, TRIAL_CONFIG

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / TRIAL_CONFIG).write_text(json.dumps(dict(trial_config), indent=2, sort_keys=True, default=str))
    # the name calib.apply reads it by: a fitted method for calibrate trials, else U-Net weights
    shutil.copy2(stage_file, dest / (METHOD_FILE if trial_config.get("stage") == "calibrate" else STAGE_WEIGHTS))
    if base_weights is not None:
        shutil.copy2(base_weights, dest / BASE_WEIGHTS)
    return dest


def log_trial_model(client: MlflowClient, run_id: str, experiment_id: str, model_dir: Path,
                    tags: Mapping[str, str] | None = None, name: str = MODEL_NAME) -> str:
    """Log the model folder as a pyfunc LoggedModel ``name`` of ``run_id``; returns the model id."""
    from calib.apply import load_fitted

    fitted = load_fitted(model_dir)  # the signature comes from what the folder holds
    channels = (fitted.config.get("net") or {}).get("in_channels")
    signature = model_signature(fitted.inputs, channels, fitted.samples)
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id,
                                        tags={k: str(v) for k, v in (tags or {}).items()},
                                        model_type="calibrated-segmentation")
    try:
        with tempfile.TemporaryDirectory(prefix="calib-pyfunc-") as tmp, warnings.catch_warnings():
            # a tensor signature is given; MLflow's hints about type hints and input examples
            # (which would run the model while logging) are not for us
            warnings.filterwarnings("ignore", message=".*(type hints|input example).*", category=UserWarning)
            local = Path(tmp) / "model"
            mlflow_model = Model(artifact_path=logged.artifact_location, run_id=run_id,
                                 model_id=logged.model_id, model_uuid=logged.model_id)
            mlflow.pyfunc.save_model(str(local), python_model=str(PYFUNC_CODE),
                                     artifacts={MODEL_ARTIFACT: str(model_dir)}, signature=signature,
                                     pip_requirements=_requirements(), mlflow_model=mlflow_model)
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        client.finalize_logged_model(logged.model_id, "READY")
    except BaseException:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    return logged.model_id


def log_trial_lineage(client: MlflowClient, run_id: str, experiment_id: str, trial_config: Mapping[str, Any],
                      stage_file: Path, cache_dir: Path | None, splits: Mapping[str, Any] | None,
                      upstream_run_id: str | None, scratch: Path) -> str | None:
    """The sweep's one call after a stage finished: the splits as input datasets and the fitted
    model as a LoggedModel (with the upstream base weights a calibrate trial's model needs,
    downloaded from the upstream run). Returns the model id; None (tag ``calib.model_error``)
    when the stage's file is not a loadable model."""
    from tracking.runs import fetch_artifacts

    dataset = (trial_config.get("data") or {}).get("dataset") or trial_config.get("dataset", "")
    if cache_dir is not None and splits:
        log_trial_datasets(client, run_id, dataset, Path(cache_dir), splits)
    base = None
    external = (trial_config.get("data") or {}).get("kind") == "predictions"
    if external and trial_config.get("stage") != "calibrate":
        return None  # the "base model" of imported predictions is the other network: nothing to log
    if trial_config.get("stage") == "calibrate" and upstream_run_id and not external:
        base = fetch_artifacts(client, upstream_run_id, schema.WEIGHTS_FILE, Path(scratch) / "base")
    model_dir = build_model_dir(Path(scratch) / "model", trial_config, stage_file, base)
    tags = {schema.STAGE: trial_config.get("stage", ""), schema.DATASET: dataset,
            schema.WEIGHTS: trial_config.get("weights", ""), schema.METHOD: trial_config.get("method", ""),
            schema.FOLD: str(trial_config.get("fold", "")), schema.TRIAL_KEY: trial_config.get("trial_key", "")}
    # what the Models column and page show: e.g. brats18-CE-platt-fold0
    parts = (dataset, trial_config.get("weights"), trial_config.get("method"), f"fold{trial_config.get('fold', '')}")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(str(p) for p in parts if p))
    try:
        return log_trial_model(client, run_id, experiment_id, model_dir, tags, name=name or MODEL_NAME)
    except ValueError as exc:  # the stage's file is no loadable model (calib.apply says why)
        # The trial's results stand; the run says why it has no model instead of failing.
        from tracking.runs import one_line

        client.set_tag(run_id, MODEL_ERROR, one_line(str(exc)))
        warnings.warn(f"run {run_id}: no MLflow model logged: {exc}", stacklevel=2)
        return None


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
    from tracking.runs import fetch_artifacts, finished_trial_runs
    from tracking.store import resolve_tracking_uri

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
            return _assemble_from_run(client, run, dest, fetch_artifacts, finished_trial_runs)
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


def _assemble_from_run(client, run, dest: Path, fetch_artifacts, finished_trial_runs) -> Path:
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
    if config.get("stage") == "calibrate" and upstream and (config.get("data") or {}).get("kind") != "predictions":
        found = finished_trial_runs(client, run.info.experiment_id, [upstream])
        if upstream not in found:
            raise ModelNotFound(f"run {run_id}: its base model (trial {upstream}) has no FINISHED run")
        base = fetch_artifacts(client, found[upstream].info.run_id, f"{schema.WEIGHTS_DIR}/weights.pt", cache)
    return build_model_dir(dest / "model", config, files[0], base)
