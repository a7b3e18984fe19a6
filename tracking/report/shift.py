"""The report's "Under shift" (issue 22, point 2): does calibration survive a test-time shift?

Per dataset whose runs scored test-time shifts (metrics ``shift_<name>_*``, the artifact
``per_subject_shift.csv`` of calib.shift_eval), per selected dataset × weights × method (the base
model included, at the LR the report selected) and per shift: the mean Dice, ECE and true ECE
(fractions, phantoms only for the true ECE) of the test subjects under the shift, each beside its
in-distribution mean (the ``none`` rows: the same runs' test subjects), and the two-sided Wilcoxon
signed-rank p (tracking.report.stats.wilcoxon_paired) of the method against the base model of the
same weights under the same shift, paired by (fold, subject): an unpaired shift (another data
root) is scored by every fold's model, so its subjects recur once per fold.

Nothing is selected on the shifted subjects: models, calibrators and LRs are the in-distribution
ones. A dataset gets ``shift_<dataset>.csv`` and a section only when some run has shift metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import pandas as pd

from calib.shift_rows import SHIFT_COLUMN
from calib.vocabulary import NO_SHIFT
from tracking.report.analysis import BASE_METHOD, method_key, weights_key
from tracking.report.errors import ReportError
from tracking.report.selection import Selection
from tracking.report.stats import wilcoxon_paired

SHIFT_METRIC_PREFIX = "shift_"
METRICS = ("dice", "ece", "true_ece")
SHIFT_TABLE_COLUMNS = ("dataset", "weights", "method", "shift", "n",
                       *[c for m in METRICS for c in (f"{m}_mean", f"{m}_mean_in")],
                       *[f"{m}_p_vs_base" for m in METRICS])


def has_shift(selection: Selection) -> bool:
    """Whether some run of ``selection`` scored a test-time shift."""
    return any(k.startswith(SHIFT_METRIC_PREFIX) for r in selection.runs for k in r.metrics)


def _pooled(selection: Selection, read: Callable) -> pd.DataFrame:
    frames = []
    for run in selection.runs:
        if not any(k.startswith(SHIFT_METRIC_PREFIX) for k in run.metrics):
            continue
        df = read(run)
        if SHIFT_COLUMN not in df.columns:
            raise ReportError(f"per_subject_shift.csv of {run.describe()} lacks column {SHIFT_COLUMN}")
        frames.append(df)
    return pd.concat(frames, ignore_index=True).set_index(["fold", "subject_id"])


def _mean(rows: pd.DataFrame, metric: str) -> float:
    if metric not in rows.columns:
        return math.nan
    values = pd.to_numeric(rows[metric], errors="coerce")
    return float(values.mean()) if values.notna().any() else math.nan


def shift_tables(selections: Sequence[Selection], read: Callable) -> dict[str, pd.DataFrame]:
    """Per dataset with shift metrics, its ``shift_<dataset>.csv`` frame (:data:`SHIFT_TABLE_COLUMNS`,
    one row per weights × method × shift; module doc). ``read(run)`` returns the run's
    per_subject_shift.csv (tracking.report.fetch.ArtifactReader.per_subject_shift)."""
    pooled = {s.key: _pooled(s, read) for s in selections if has_shift(s)}
    rows = []
    for (ds, weights, method), table in pooled.items():
        base = pooled.get((ds, weights, BASE_METHOD))
        inside = table[table[SHIFT_COLUMN] == NO_SHIFT]
        for shift in sorted(set(table[SHIFT_COLUMN]) - {NO_SHIFT}):
            under = table[table[SHIFT_COLUMN] == shift]
            row = {"dataset": ds, "weights": weights, "method": method, "shift": shift, "n": len(under)}
            for m in METRICS:
                row[f"{m}_mean"], row[f"{m}_mean_in"] = _mean(under, m), _mean(inside, m)
                p = math.nan
                if method != BASE_METHOD and base is not None and m in under.columns and m in base.columns:
                    ref = base[base[SHIFT_COLUMN] == shift]
                    p = wilcoxon_paired(pd.to_numeric(under[m], errors="coerce"),
                                        pd.to_numeric(ref[m], errors="coerce")).p
                row[f"{m}_p_vs_base"] = p
            rows.append(row)
    rows.sort(key=lambda r: (weights_key(r["weights"]), method_key(r["method"]), r["shift"]))
    return {ds: pd.DataFrame([r for r in rows if r["dataset"] == ds], columns=list(SHIFT_TABLE_COLUMNS))
            for ds in sorted({r["dataset"] for r in rows})}


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _p(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def shift_markdown(frames: Mapping[str, pd.DataFrame], csv_name) -> str:
    """The "Under shift" section (empty text without shift tables: the section is then left out);
    ``csv_name(dataset)`` is the file to link."""
    if not frames:
        return ""
    text = ["## Under shift", "",
            "The models and calibrators fitted in-distribution, unchanged, scored on shifted test "
            "subjects (phantoms: the same subjects, p* and labels with other images; real data: "
            "another data root). Each cell: in-distribution → under the shift (Dice, ECE % and true "
            "ECE %); p: two-sided Wilcoxon against the base model under the same shift, paired by "
            "fold and subject.", ""]
    header = ["weights", "method", "shift", "n", "Dice", "ECE %", "true ECE %", "p Dice", "p ECE", "p true ECE"]
    for ds, frame in frames.items():
        text += [f"### {ds}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in frame.itertuples(index=False):
            cells = [r.weights, r.method, f"`{r.shift}`", str(r.n),
                     f"{r.dice_mean_in:.3f} → {r.dice_mean:.3f}",
                     f"{_pct(r.ece_mean_in)} → {_pct(r.ece_mean)}",
                     f"{_pct(r.true_ece_mean_in)} → {_pct(r.true_ece_mean)}",
                     _p(r.dice_p_vs_base), _p(r.ece_p_vs_base), _p(r.true_ece_p_vs_base)]
            text.append("| " + " | ".join(cells) + " |")
        text += ["", f"File: [{csv_name(ds)}]({csv_name(ds)}).", ""]
    return "\n".join(text)
