"""Register the best calibrated model of each dataset x weights in the MLflow Model Registry.

The rule is the headline's (tracking.report.headline): the calibration method (not ``base``, not
one whose output is constant over the mask) with the lowest mean validation ECE over folds
(``--headline-by``), chosen without the test subjects; runs without val metrics fall back to the
test ECE, which the registered model's description then says. Its selected
learning rate's fold runs each logged a model (``tracking.models``); each becomes a version of
the registered model ``<experiment>-<dataset>-<weights>`` (one per fold: each was fitted
without its own test fold, so any of them applies to new cases), with aliases ``fold<k>`` and
``best`` -- the fold model with the lowest validation loss (a choice that never looks at test
subjects). Versions are reused when the report runs again; the aliases move when the best
method changes.

Use it with ``python -m calib.apply --model models:/<experiment>-<dataset>-<weights>@best ...``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tracking.models import process_tracking_uri, run_model_id
from tracking.report.errors import WarningLog
from tracking.report.selection import VAL_LOSS_METRIC, Selection

BEST_ALIAS = "best"
BASE_METHOD = "base"


@dataclass(frozen=True)
class Registration:
    """One registered model: its name, what it holds, and version per fold."""

    name: str
    dataset: str
    weights: str
    method: str
    lr_selected: str
    versions: dict[int, str]  # fold -> version
    best_version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{BEST_ALIAS}"


def registered_name(experiment: str, dataset: str, weights: str) -> str:
    """``<experiment>-<dataset>-<weights>``, with characters the registry refuses made ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{experiment}-{dataset}-{weights}")


def best_calibrated(headline: pd.DataFrame) -> dict[tuple[str, str], pd.Series]:
    """The headline's chosen method per (dataset, weights) (module doc): a row with ``method``,
    ``lr_selected``, ``ece_pct_mean``, ``dice_mean``, ``n_subjects``, ``selected_on``, ``verdict``."""
    out = {}
    for h in headline.to_dict("records"):
        if not isinstance(h.get("chosen_method"), str) or not h["chosen_method"]:
            continue
        lr = h.get("chosen_lr")
        out[(h["dataset"], h["weights"])] = pd.Series({
            "method": h["chosen_method"], "lr_selected": lr if isinstance(lr, str) else "",
            "ece_pct_mean": h.get("chosen_ece_pct", math.nan), "dice_mean": h.get("chosen_dice", math.nan),
            "n_subjects": h.get("n_subjects", 0), "selected_on": h.get("selected_on", ""),
            "headline_by": h.get("headline_by", ""), "verdict": h.get("verdict", "")})
    return out


def _version_of(client: MlflowClient, tracking_uri: str, name: str, run_id: str, model_id: str,
                tags: dict) -> str:
    """The version of ``name`` holding ``model_id`` (created when missing)."""
    for v in client.search_model_versions(f"name = '{name}'"):
        if v.run_id == run_id and (v.tags or {}).get("calib.model_id") == model_id:
            return str(v.version)
    # MLflow's SQL registry resolves a models:/ source through the process-wide tracking URI
    with process_tracking_uri(tracking_uri):
        v = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id,
                                        tags={**tags, "calib.model_id": model_id}, model_id=model_id)
    return str(v.version)


def register_best(client: MlflowClient, tracking_uri: str, experiment: str, headline: pd.DataFrame,
                  selections: Sequence[Selection], warn: WarningLog | None = None) -> list[Registration]:
    """Register the headline's chosen calibrated model of every dataset x weights (module doc);
    ``headline`` is tracking.report.headline's table."""
    warn = warn or WarningLog()
    by_key = {s.key: s for s in selections}
    done = []
    for (dataset, weights), row in best_calibrated(headline).items():
        sel = by_key.get((dataset, weights, row["method"]))
        if sel is None:
            continue
        name = registered_name(experiment, dataset, weights)
        models = {}
        for run in sel.runs:
            model_id = run_model_id(client, run.run_id)
            if model_id is None:
                warn.warn(f"{dataset}/{weights}/{row['method']}: {run.describe()} logged no model; "
                          "it is not registered")
            else:
                models[run.fold] = (run, model_id)
        if not models:
            continue
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name)
        description = (f"Best calibrated model of {dataset} / {weights} weights in experiment {experiment}: "
                       f"{row['method']} (lr {row['lr_selected'] or '-'}), ECE {row['ece_pct_mean']:.2f} %, "
                       f"Dice {row['dice_mean']:.3f} over {int(row['n_subjects'])} test subjects "
                       f"(lowest mean {row['headline_by'] or 'val_ece'} over folds, selected on "
                       f"{row['selected_on'] or 'val'}; against the base model: {row['verdict'] or '-'}). "
                       f"One version per fold; "
                       f"@{BEST_ALIAS} is the fold model with the lowest validation loss.")
        client.update_registered_model(name, description=description)
        for key, value in (("calib.dataset", dataset), ("calib.weights", weights),
                           ("calib.method", row["method"]), ("calib.experiment", experiment)):
            client.set_registered_model_tag(name, key, str(value))
        versions = {}
        for fold, (run, model_id) in sorted(models.items()):
            versions[fold] = _version_of(client, tracking_uri, name, run.run_id, model_id,
                                         {"calib.method": row["method"], "calib.fold": str(fold),
                                          "calib.lr": run.lr})
            client.set_registered_model_alias(name, f"fold{fold}", versions[fold])
        val = {f: run.metrics.get(VAL_LOSS_METRIC, math.inf) for f, (run, _) in models.items()}
        best_fold = min(sorted(val), key=lambda f: val[f])
        client.set_registered_model_alias(name, BEST_ALIAS, versions[best_fold])
        done.append(Registration(name, dataset, weights, row["method"], row["lr_selected"], versions,
                                 versions[best_fold]))
    return done
