"""The degenerate base models of a sweep, as the launch summary lists them (tag calib.degenerate)."""

from __future__ import annotations

from collections.abc import Iterable

from mlflow.tracking import MlflowClient

from tracking import schema as S
from tracking.runs import FINISHED, search_runs


def degenerate_models(client: MlflowClient, experiment_id: str, trial_keys: Iterable[str]) -> list[dict]:
    """FINISHED base runs of ``trial_keys`` that the guard flagged, newest run per key.

    Each item: ``dataset``, ``weights``, ``fold``, ``run_id``, ``reason``; sorted by dataset,
    weights and fold.
    """
    keys = set(trial_keys)
    found: dict[str, dict] = {}
    filt = (f"tags.`{S.ROLE}` = '{S.ROLE_TRIAL}' and tags.`{S.STAGE}` = 'base' "
            f"and attributes.status = '{FINISHED}'")
    for run in search_runs(client, experiment_id, filt):  # newest first
        tags = run.data.tags
        key = tags.get(S.TRIAL_KEY)
        if key not in keys or key in found:
            continue
        found[key] = {"dataset": tags.get(S.DATASET, ""), "weights": tags.get(S.WEIGHTS, ""),
                      "fold": tags.get(S.FOLD, ""), "run_id": run.info.run_id,
                      "reason": tags.get(S.DEGENERATE)}
    rows = [r for r in found.values() if r["reason"]]
    return sorted(rows, key=lambda r: (r["dataset"], r["weights"], r["fold"]))
