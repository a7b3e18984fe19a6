"""tracking.report.shift: the "Under shift" tables from per_subject_shift.csv rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tracking.report.fetch import TrialRecord
from tracking.report.selection import Selection
from tracking.report.shift import SHIFT_TABLE_COLUMNS, shift_markdown, shift_tables
from tracking.report.stats import wilcoxon_paired

IDS = [f"s{i}" for i in range(10)]


def _selection(method, folds=(0, 1), shifted=True):
    runs = tuple(TrialRecord(run_id=f"{method}-{f}", parent_id="p", status="FINISHED", start_time=0,
                             stage="calibrate", dataset="brats18", weights="CE", method=method, fold=f,
                             lr="", trial_key=f"{method}{f}",
                             metrics={"shift_dim_ece_mean": 0.1} if shifted else {})
                 for f in folds)
    return Selection("brats18", "CE", method, "", "single", runs, (), "val_loss")


def _rows(run: TrialRecord, ece_in: float, ece_dim: float) -> pd.DataFrame:
    rng = np.random.default_rng([run.fold, len(run.method)])
    ids = IDS[:5] if run.fold == 0 else IDS[5:]
    frames = []
    for shift, ece in (("none", ece_in), ("dim", ece_dim)):
        frames.append(pd.DataFrame({"shift": shift, "subject_id": ids, "fold": run.fold,
                                    "dice": rng.uniform(0.6, 0.8, 5), "ece": ece + rng.uniform(0, 0.01, 5),
                                    "true_ece": ece / 2 + rng.uniform(0, 0.01, 5)}))
    return pd.concat(frames, ignore_index=True)


def test_each_method_under_each_shift_beside_in_distribution():
    frames = {}
    eces = {"base": (0.05, 0.20), "temperature": (0.02, 0.08)}

    def read(run):
        if run.run_id not in frames:
            frames[run.run_id] = _rows(run, *eces[run.method])
        return frames[run.run_id]

    out = shift_tables([_selection("base"), _selection("temperature")], read)
    table = out["brats18"]
    assert list(table.columns) == list(SHIFT_TABLE_COLUMNS)
    assert list(table["method"]) == ["base", "temperature"] and set(table["shift"]) == {"dim"}
    temp = table[table["method"] == "temperature"].iloc[0]
    pooled = pd.concat([frames["temperature-0"], frames["temperature-1"]])
    assert temp["n"] == 10
    assert temp["ece_mean"] == pytest.approx(pooled.loc[pooled["shift"] == "dim", "ece"].mean())
    assert temp["ece_mean_in"] == pytest.approx(pooled.loc[pooled["shift"] == "none", "ece"].mean())
    base = pd.concat([frames["base-0"], frames["base-1"]])
    key = ["fold", "subject_id"]
    expected = wilcoxon_paired(pooled[pooled["shift"] == "dim"].set_index(key)["ece"],
                               base[base["shift"] == "dim"].set_index(key)["ece"]).p
    assert temp["ece_p_vs_base"] == pytest.approx(expected) and temp["ece_p_vs_base"] < 0.05
    assert np.isnan(table[table["method"] == "base"].iloc[0]["ece_p_vs_base"])
    assert "## Under shift" in shift_markdown(out, lambda ds: f"shift_{ds}.csv")


def test_no_shift_metrics_no_table():
    def read(run):
        raise AssertionError("nothing to read without shift metrics")

    assert shift_tables([_selection("base", shifted=False)], read) == {}
    assert shift_markdown({}, lambda ds: ds) == ""
