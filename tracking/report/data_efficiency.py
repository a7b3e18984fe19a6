"""The report's "How many calibration subjects?" (issue 22, point 1): test ECE (and, on phantoms,
the true ECE) of each method against the number of calib subjects it was fitted on.

The runs are the calibrate runs tagged ``calib.calib_subjects`` (a grid's ``calib_subjects`` key,
sweeps.grid.subjects): the ``all`` runs are in :attr:`TrialSet.runs` like any other, the subset
runs only in :attr:`TrialSet.subset_runs`. Per size, the runs of that size go through the same
LR selection as the tables (tracking.report.selection, on val by default) and their test subjects
are pooled over folds; the test fold is the same for every size.

* ``ece_pct_mean`` with its seeded subject bootstrap interval (tracking.report.intervals), in %;
  ``true_ece_pct_*`` the same for the label-free truth when the dataset is a phantom.
* ``n_calib``: the mean over folds of the subjects really fitted on (the run's
  ``n_calib_subjects``; for ``all`` the whole calib split).
* ``subjects_needed`` (per dataset x weights x method, on each of its rows): the smallest size
  whose mean test ECE is at most :data:`TOLERANCE` (10 %, relative) above the method's mean test
  ECE with ``all``; a size better than ``all`` qualifies. Empty without an ``all`` row.

No file and no section when no run has the tag.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from calib.vocabulary import ALL_CALIB_SUBJECTS
from tracking import schema as S
from tracking.report.analysis import method_key, weights_key
from tracking.report.errors import WarningLog
from tracking.report.fetch import TrialRecord, TrialSet
from tracking.report.figures import method_style
from tracking.report.intervals import bootstrap_ci
from tracking.report.selection import pool_subjects, select_runs
from tracking.report.tables import method_label

#: How far above the ECE with every calib subject a size may stay and still count as enough.
TOLERANCE = 0.10
COLUMNS = ("dataset", "weights", "method", "calib_subjects", "n_calib", "n_folds", "n_test",
           "lr_selected", "ece_pct_mean", "ece_pct_ci_low", "ece_pct_ci_high")
TRUE_COLUMNS = ("true_ece_pct_mean", "true_ece_pct_ci_low", "true_ece_pct_ci_high")
_WEIGHTS_LINES = ("-", "--", ":", "-.")


def size_order(label: str) -> float:
    """Sort key of a ``calib_subjects`` label: its integer, ``all`` last."""
    return math.inf if label == ALL_CALIB_SUBJECTS else float(label)


def runs_by_size(trials: TrialSet) -> dict[str, list[TrialRecord]]:
    """The tagged calibrate runs per ``calib_subjects`` label, in size order."""
    out: dict[str, list[TrialRecord]] = {}
    for r in (*trials.runs, *trials.subset_runs):
        if r.calib_subjects is not None:
            out.setdefault(r.calib_subjects, []).append(r)
    return {k: out[k] for k in sorted(out, key=size_order)}


def _pct(values: pd.Series) -> tuple[float, float, float]:
    x = values.astype(float).dropna()
    low, high = bootstrap_ci(x)
    return 100.0 * float(x.mean()), 100.0 * low, 100.0 * high


def _row(sel, size: str, pooled: pd.DataFrame) -> dict:
    fitted = [r.metrics[S.N_CALIB_SUBJECTS] for r in sel.runs if S.N_CALIB_SUBJECTS in r.metrics]
    n_calib = float(np.mean(fitted)) if fitted else (math.nan if size == ALL_CALIB_SUBJECTS else float(size))
    mean, low, high = _pct(pooled["ece"])
    row = {"dataset": sel.dataset, "weights": sel.weights, "method": sel.method, "calib_subjects": size,
           "n_calib": n_calib, "n_folds": len(sel.runs), "n_test": int(pooled["subject_id"].nunique()),
           "lr_selected": sel.lr_selected, "ece_pct_mean": mean, "ece_pct_ci_low": low, "ece_pct_ci_high": high}
    if "true_ece" in pooled and pooled["true_ece"].notna().any():
        row.update(zip(TRUE_COLUMNS, _pct(pooled["true_ece"]), strict=True))
    return row


def subjects_needed(group: pd.DataFrame) -> str:
    """The smallest size of one method's rows whose mean ECE is within :data:`TOLERANCE` of its
    ECE with ``all`` (module doc); "" without an ``all`` row or a finite ECE there."""
    full = group.loc[group["calib_subjects"] == ALL_CALIB_SUBJECTS, "ece_pct_mean"]
    if full.empty or not math.isfinite(full.iloc[0]):
        return ""
    ok = group[group["ece_pct_mean"] <= (1.0 + TOLERANCE) * full.iloc[0]]
    return min(ok["calib_subjects"], key=size_order)


def data_efficiency_tables(trials: TrialSet, select_by: str,
                           per_subject: Callable[[TrialRecord], pd.DataFrame],
                           warn: WarningLog) -> dict[str, pd.DataFrame]:
    """Per dataset with tagged runs, its ``data_efficiency_<dataset>.csv`` frame (:data:`COLUMNS`,
    the true-ECE columns on phantoms, then ``subjects_needed``); empty without tagged runs."""
    rows = []
    for size, runs in runs_by_size(trials).items():
        local = WarningLog()  # the selection's warnings, said once with the size they concern
        for sel in select_runs(runs, select_by, per_subject, local):
            pooled = pool_subjects(sel, [per_subject(r) for r in sel.runs], S.PER_SUBJECT)
            rows.append(_row(sel, size, pooled))
        for message in local.messages:
            warn.warn(f"calib_subjects={size}: {message}")
    if not rows:
        return {}
    frame = pd.DataFrame(rows)
    columns = list(COLUMNS) + [c for c in TRUE_COLUMNS if c in frame]
    frame = frame.reindex(columns=columns)
    cell = ["dataset", "weights", "method"]
    needed = {key: subjects_needed(group) for key, group in frame.groupby(cell, sort=False)}
    frame["subjects_needed"] = [needed[key] for key in frame[cell].itertuples(index=False, name=None)]
    order = frame.assign(_w=frame["weights"].map(weights_key), _m=frame["method"].map(method_key),
                         _s=frame["calib_subjects"].map(size_order))
    frame = frame.loc[order.sort_values(["dataset", "_w", "_m", "_s"]).index].reset_index(drop=True)
    return {ds: part.reset_index(drop=True) for ds, part in frame.groupby("dataset", sort=True)}


# ---- the figure ------------------------------------------------------------------------------------

def _x(part: pd.DataFrame) -> np.ndarray:
    """Where each row sits on the subjects axis: its real count (``all`` at the split's size)."""
    return part["n_calib"].astype(float).to_numpy()


def data_efficiency_figure(frame: pd.DataFrame, dataset: str) -> Figure:
    """Test ECE % (and true ECE % on phantoms) against calib subjects, log2 axis: one line with
    its bootstrap band per weights x method, colour and marker the method's (figures.METHOD_STYLES),
    line style the weights'."""
    panels = [("ece_pct", "test ECE (%)")]
    if "true_ece_pct_mean" in frame and frame["true_ece_pct_mean"].notna().any():
        panels.append(("true_ece_pct", "true ECE (%)"))
    fig = Figure(figsize=(5.0 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    methods = sorted(frame["method"].unique(), key=method_key)
    weights = sorted(frame["weights"].unique(), key=weights_key)
    for ax, (stem, title) in zip(axes, panels, strict=True):
        for (w, m), part in frame.groupby(["weights", "method"], sort=False):
            colour, marker = method_style(m, methods)
            x = _x(part)
            label = method_label(m) if len(weights) == 1 else f"{w} / {method_label(m)}"
            ax.plot(x, part[f"{stem}_mean"], color=colour, marker=marker, markeredgecolor="black",
                    markeredgewidth=0.6, linestyle=_WEIGHTS_LINES[weights.index(w) % len(_WEIGHTS_LINES)],
                    label=label)
            ax.fill_between(x, part[f"{stem}_ci_low"], part[f"{stem}_ci_high"], color=colour, alpha=0.15,
                            linewidth=0)
        ax.set_xscale("log", base=2)
        ticks = frame.drop_duplicates("calib_subjects")
        ax.set_xticks(_x(ticks), [f"all ({n:g})" if s == ALL_CALIB_SUBJECTS else s
                                  for s, n in zip(ticks["calib_subjects"], _x(ticks), strict=True)])
        ax.minorticks_off()
        ax.set_xlabel("calibration subjects (log2)")
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"How many calibration subjects? {dataset}")
    return fig


# ---- the report section ----------------------------------------------------------------------------

def _fmt(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.2f}"


def data_efficiency_markdown(frames: Mapping[str, pd.DataFrame], csv_name, png_name) -> str:
    """The report section "How many calibration subjects?"; "" without tagged runs (no section)."""
    if not frames:
        return ""
    text = ["## How many calibration subjects?", "",
            "The covered methods were fitted on nested, seeded subsets of each fold's calib split "
            "(grid key `calib_subjects`) and scored on the same test subjects. *Subjects needed*: the "
            f"smallest size whose mean test ECE is at most {TOLERANCE:.0%} above the method's ECE with "
            "all calib subjects (a size better than all counts). Only the runs on all calib subjects "
            "enter the other sections.", ""]
    header = ["weights", "method", "ECE % (all)", "all = subjects", "subjects needed", "ECE % there"]
    for ds, frame in frames.items():
        text += [f"### {ds}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (w, m), part in frame.groupby(["weights", "method"], sort=False):
            full = part[part["calib_subjects"] == ALL_CALIB_SUBJECTS]
            need = part["subjects_needed"].iloc[0]
            there = part.loc[part["calib_subjects"] == need, "ece_pct_mean"]
            text.append("| " + " | ".join([
                w, method_label(m), _fmt(full["ece_pct_mean"].iloc[0]) if len(full) else "–",
                f"{full['n_calib'].iloc[0]:g}" if len(full) else "–", need or "–",
                _fmt(there.iloc[0]) if len(there) else "–"]) + " |")
        text += ["", f"Files: [{csv_name(ds)}]({csv_name(ds)}), [{png_name(ds)}]({png_name(ds)}).", ""]
    return "\n".join(text)
