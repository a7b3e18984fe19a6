"""The splits a trial used, as the run's MLflow input datasets (``mlflow.log_input``-style):
one dataset per fold and split (``<dataset>-fold<k>-<split>``), the preprocessed cache's hash as
digest, contexts ``train`` / ``val`` / ``calib`` / ``test``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

DATA_CONTEXT = "mlflow.data.context"  # the tag MLflow's UI shows as a dataset's context
SPLITS = ("train", "val", "calib", "test")


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
