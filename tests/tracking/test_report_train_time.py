"""Train-time or post hoc? (tracking.report.train_time) on synthetic per-subject records."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tracking.report import files as names
from tracking.report.fetch import TrialRecord
from tracking.report.headline import headline_table
from tracking.report.selection import Selection
from tracking.report.train_time import TRAIN_TIME_COLUMNS, train_time_markdown, train_time_tables

IDS = [f"s{i:02d}" for i in range(10)]


def _selection(dataset, weights, method, val_ece=None, folds=(0, 1)):
    stage = "base" if method == "base" else "calibrate"
    runs = tuple(TrialRecord(run_id=f"{dataset}-{weights}-{method}-{f}", parent_id="p", status="FINISHED",
                             start_time=0, stage=stage, dataset=dataset, weights=weights, method=method,
                             fold=f, lr="", trial_key=f"{dataset}{weights}{method}{f}",
                             protocol="honest",
                             metrics={} if val_ece is None else {"val_ece_mean": val_ece})
                 for f in folds)
    return Selection(dataset, weights, method, "", "single", runs, (), "val_loss")


def _table(ids, dice, ece, true_ece=None):
    frame = pd.DataFrame({"dice": dice, "ece": ece}, index=pd.Index(ids, name="subject_id"))
    if true_ece is not None:
        frame["true_ece"] = true_ece
        frame["ece_bias"] = frame["ece"] - frame["true_ece"]
    return frame


@pytest.fixture
def cells():
    rng = np.random.default_rng(3)
    base_ece = rng.uniform(0.08, 0.12, 10)
    dice = rng.uniform(0.7, 0.8, 10)
    sel, tab = [], {}

    def add(weights, method, table, val_ece=None, dataset="phantom"):
        sel.append(_selection(dataset, weights, method, val_ece))
        tab[(dataset, weights, method)] = table

    add("CE-SD", "base", _table(IDS, dice, base_ece, base_ece - 0.01))
    # platt wins on val; temperature has the lower test ECE but must not be the reference
    add("CE-SD", "platt", _table(IDS, dice - 0.001, base_ece - 0.05, base_ece - 0.06), val_ece=0.01)
    add("CE-SD", "temperature", _table(IDS, dice, base_ece - 0.07, base_ece - 0.07), val_ece=0.02)
    ref_ece = base_ece - 0.05
    # focal: lower ECE than the reference on every subject, one subject missing (n = 9)
    add("focal", "base", _table(IDS[:9], dice[:9], ref_ece[:9] - 0.01, ref_ece[:9] - 0.02))
    add("focal", "isotonic", _table(IDS[:9], dice[:9], ref_ece[:9] - 0.015, ref_ece[:9] - 0.025),
        val_ece=0.005)
    # svls: ECE differences against the reference of alternating sign: no significant difference
    signs = np.where(np.arange(10) % 2 == 0, 1.0, -1.0)
    add("svls", "base", _table(IDS, dice, ref_ece + signs * np.linspace(0.001, 0.002, 10)))
    # ace ran only calibrations (its base model left out, e.g. degenerate): no row
    add("ace", "platt", _table(IDS, dice, base_ece), val_ece=0.01)
    # a dataset without train-time weights: no frame
    add("CE-SD", "base", _table(IDS, dice, base_ece), dataset="other")
    # a dataset with a train-time model but no CE-SD calibration: a row without reference
    add("CE-SD", "base", _table(IDS, dice, base_ece), dataset="lonely")
    add("ace", "base", _table(IDS, dice, base_ece), dataset="lonely")
    return sel, tab


def test_train_time_against_the_val_chosen_ce_sd_calibration(cells):
    sel, tab = cells
    head = headline_table(sel, tab).table
    frames = train_time_tables(sel, tab, head)
    assert set(frames) == {"phantom", "lonely"}
    df = frames["phantom"].set_index("weights")
    assert list(frames["phantom"].columns) == list(TRAIN_TIME_COLUMNS)
    assert list(df.index) == ["focal", "svls"]  # vocabulary order; ace has no base model
    assert set(df["reference_method"]) == {"platt"} and set(df["reference_selected_on"]) == {"val"}

    ref = tab[("phantom", "CE-SD", "platt")]
    focal = tab[("phantom", "focal", "base")]
    f = df.loc["focal"]
    assert f["n_subjects"] == 9 and f["ece_n_vs_reference"] == 9
    expect = stats.wilcoxon(focal["ece"], ref["ece"].loc[focal.index]).pvalue
    assert f["ece_p_vs_reference"] == pytest.approx(expect) == pytest.approx(2 / 2**9)
    assert f["ece_verdict_vs_reference"] == "lower"
    assert f["train_time_ece_pct"] == pytest.approx(100 * focal["ece"].mean())
    assert f["reference_ece_pct"] == pytest.approx(100 * ref["ece"].mean())
    assert f["true_ece_verdict_vs_reference"] == "lower"
    assert f["true_ece_p_vs_reference"] == pytest.approx(
        stats.wilcoxon(focal["true_ece"], ref["true_ece"].loc[focal.index]).pvalue)
    # Dice differs by +0.001 on every common subject: the train-time model's Dice is higher
    assert f["dice_verdict_vs_reference"] == "higher"
    # post hoc on top of focal: its own headline row, copied
    h = head.set_index(["dataset", "weights"]).loc[("phantom", "focal")]
    assert f["posthoc_method"] == "isotonic" == h["chosen_method"]
    assert f["posthoc_ece_p_vs_base"] == pytest.approx(h["ece_p_vs_base"])
    assert f["posthoc_verdict"] == h["verdict"] == "lower ECE"

    s = df.loc["svls"]
    assert s["ece_p_vs_reference"] > 0.05 and s["ece_verdict_vs_reference"] == "no significant difference"
    assert s["ece_n_vs_reference"] == 10
    assert math.isnan(s["train_time_true_ece_pct"]) and s["true_ece_verdict_vs_reference"] == "untested"
    assert s["posthoc_verdict"] == "no calibration ran" and s["posthoc_method"] == ""

    lonely = frames["lonely"].iloc[0]
    assert lonely["weights"] == "ace" and lonely["reference_method"] == ""
    assert math.isnan(lonely["ece_p_vs_reference"]) and lonely["ece_verdict_vs_reference"] == "untested"
    assert "no CE-SD calibration ran" in lonely["note"]


def test_section_text(cells):
    sel, tab = cells
    frames = train_time_tables(sel, tab, headline_table(sel, tab).table)
    md = train_time_markdown(frames, names.train_time_csv)
    assert md.startswith("## Train-time or post hoc?")
    assert "### phantom" in md and "### lonely" in md and "train_time_phantom.csv" in md
    focal = next(line for line in md.splitlines() if line.startswith("| focal"))
    assert "platt" in focal and "n 9; lower" in focal and "isotonic: **lower ECE**" in focal
    assert "Note: no CE-SD calibration ran" in md
    skipped = train_time_markdown({}, names.train_time_csv)
    assert "Skipped" in skipped and "focal, svls, ace" in skipped


def test_no_train_time_weights_no_file(cells):
    sel, tab = cells
    keep = [s for s in sel if s.weights not in ("focal", "svls", "ace")]
    assert train_time_tables(keep, tab, headline_table(keep, tab).table) == {}
