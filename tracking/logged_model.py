"""A finished trial's fitted model, logged: an MLflow pyfunc LoggedModel linked to the run (the
run's Models column and the experiment's Models page list it), with the splits as its inputs.

The pyfunc's ``model`` artifact is the model folder of :mod:`calib.apply.model`
(trial_config.json, the stage's weights or fitted method, the upstream base weights a logit
calibrator needs; :func:`tracking.models.build_model_dir`), and its tensor signature is
``{"image": (C, X, Y, Z) float32, "mask": (X, Y, Z) bool}`` for a U-Net model,
``{"logits": (X, Y, Z) float32, "mask": ...}`` for a calibrator of another network's
predictions, both on the model's (preprocessed) grid; the output is ``{"probability": (X, Y, Z)}``
plus ``"std"`` for MC dropout. The pyfunc class is :class:`tracking.models.CalibratedSegmenter`,
loaded as MLflow "models from code" by ``tracking/pyfunc_model.py`` (no pickle); its
requirements pin torch, MONAI, nibabel.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities.logged_model_output import LoggedModelOutput
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from calib.apply import load_fitted
from calib.vocabulary import CALIBRATE, PREDICTIONS_KIND
from tracking import schema
from tracking.datasets import log_trial_datasets
from tracking.models import MODEL_ARTIFACT, build_model_dir
from tracking.runs import one_line
from tracking.store import fetch_artifacts

MODEL_NAME = "model"  # a LoggedModel's name when the trial config names nothing better
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")  # MLflow "models from code": no pickle
MODEL_ERROR = "calib.model_error"  # on a trial run whose model could not be logged: why
#: What a logged model needs to load; the versions installed when it was logged are pinned.
REQUIREMENTS = ("mlflow", "torch", "monai", "nibabel", "numpy", "scipy", "pandas")


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


def log_trial_model(client: MlflowClient, run_id: str, experiment_id: str, model_dir: Path,
                    tags: Mapping[str, str] | None = None, name: str = MODEL_NAME) -> str:
    """Log the model folder as a pyfunc LoggedModel ``name`` of ``run_id``; returns the model id."""
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
    dataset = (trial_config.get("data") or {}).get("dataset") or trial_config.get("dataset", "")
    if cache_dir is not None and splits:
        log_trial_datasets(client, run_id, dataset, Path(cache_dir), splits)
    base = None
    external = (trial_config.get("data") or {}).get("kind") == PREDICTIONS_KIND
    if external and trial_config.get("stage") != CALIBRATE:
        return None  # the "base model" of imported predictions is the other network: nothing to log
    if trial_config.get("stage") == CALIBRATE and upstream_run_id and not external:
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
        client.set_tag(run_id, MODEL_ERROR, one_line(str(exc)))
        warnings.warn(f"run {run_id}: no MLflow model logged: {exc}", stacklevel=2)
        return None
