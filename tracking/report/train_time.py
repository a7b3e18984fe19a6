"""The report's section "Train-time or post hoc?" (issue 25): is a network trained to be
calibrated better than the paper's CE-SD network calibrated after training?

Per dataset, for each train-time weights value that ran (calib.vocabulary.TRAIN_TIME_WEIGHTS:
``focal``, ``svls``, ``ace``; base models trained like CE-SD, the CE pretraining then the loss):

1. The **reference** is the CE-SD base model's best post hoc calibration: the headline's chosen
   candidate of (dataset, CE-SD) (tracking.report.headline: the lowest mean val ECE / NLL over
   folds, never the test subjects). It is chosen once per dataset, before any train-time model is
   looked at.
2. The train-time **base** model (its ``base`` runs, no calibrator) is set against the reference on
   the test subjects: Dice, ECE and, on phantoms, the true ECE, each with a two-sided Wilcoxon
   signed-rank p paired over subjects (tracking.report.stats) and the number of pairs it used.
   ``<metric>_verdict_vs_reference`` reads the train-time model's side: ``lower`` / ``higher`` at
   p < 0.05, ``no significant difference``, ``untested`` (no common subject or no such metric).
3. **Does post hoc calibration help the train-time model further?** Its own headline row (the same
   held-out rule applied to that weights' calibrators): the chosen method and its verdict against
   the train-time base model, copied here as ``posthoc_*``.

A train-time weights value without a base model has no row. Without a CE-SD headline row (no
CE-SD base model, or no calibration of it) the reference cells are NaN and ``note`` says why.
These are one test per metric and row, each chosen without the test subjects: no correction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from calib.vocabulary import TRAIN_TIME_WEIGHTS
from tracking.report.analysis import BASE_METHOD, STEMS
from tracking.report.headline import verdict
from tracking.report.selection import Selection
from tracking.report.stats import wilcoxon_paired

#: The paper's weights whose best post hoc calibration each train-time model is set against.
REFERENCE_WEIGHTS = "CE-SD"
#: Per-subject metrics compared, in display order (true_ece only on phantoms).
TRAIN_TIME_METRICS = ("dice", "ece", "true_ece")


def _metric_columns(metric: str) -> list[str]:
    st = STEMS[metric][0]
    return [f"train_time_{st}", f"reference_{st}", f"{metric}_p_vs_reference",
            f"{metric}_n_vs_reference", f"{metric}_verdict_vs_reference"]


TRAIN_TIME_COLUMNS = (("dataset", "weights", "reference_weights", "reference_method", "reference_lr",
                       "reference_selected_on", "n_subjects")
                      + tuple(c for m in TRAIN_TIME_METRICS for c in _metric_columns(m))
                      + ("posthoc_method", "posthoc_lr", "posthoc_selected_on", "posthoc_dice",
                         "posthoc_ece_pct", "posthoc_true_ece_pct", "posthoc_dice_p_vs_base",
                         "posthoc_ece_p_vs_base", "posthoc_true_ece_p_vs_base",
                         "posthoc_ece_verdict", "posthoc_true_ece_verdict", "posthoc_verdict", "note"))


def _mean(table: pd.DataFrame, metric: str) -> float:
    if metric not in table or not table[metric].notna().any():
        return math.nan
    return STEMS[metric][1] * float(table[metric].mean())


def _compare(metric: str, train: pd.DataFrame, reference: pd.DataFrame | None) -> dict:
    cols = _metric_columns(metric)
    out = {cols[0]: _mean(train, metric), cols[1]: math.nan, cols[2]: math.nan, cols[3]: 0,
           cols[4]: "untested"}
    if reference is None:
        return out
    out[cols[1]] = _mean(reference, metric)
    if metric in train and metric in reference:
        test = wilcoxon_paired(train[metric], reference[metric])
        out[cols[2]], out[cols[3]] = test.p, test.n
        if test.n and math.isfinite(out[cols[0]]) and math.isfinite(out[cols[1]]):
            out[cols[4]] = verdict(out[cols[0]], out[cols[1]], test.p)
    return out


def _headline_row(headline: pd.DataFrame | None, dataset: str, weights: str):
    if headline is None or headline.empty:
        return None
    hit = headline[(headline["dataset"] == dataset) & (headline["weights"] == weights)]
    return None if hit.empty else hit.iloc[0]


def _posthoc(row) -> dict:
    keys = ("posthoc_method", "posthoc_lr", "posthoc_selected_on", "posthoc_dice", "posthoc_ece_pct",
            "posthoc_true_ece_pct", "posthoc_dice_p_vs_base", "posthoc_ece_p_vs_base",
            "posthoc_true_ece_p_vs_base", "posthoc_ece_verdict", "posthoc_true_ece_verdict",
            "posthoc_verdict")
    if row is None:
        return dict.fromkeys(keys, math.nan) | {"posthoc_method": "", "posthoc_lr": "",
                                                "posthoc_selected_on": "",
                                                "posthoc_ece_verdict": "no calibration ran",
                                                "posthoc_true_ece_verdict": "no calibration ran",
                                                "posthoc_verdict": "no calibration ran"}
    return {"posthoc_method": row["chosen_method"], "posthoc_lr": row["chosen_lr"],
            "posthoc_selected_on": row["selected_on"], "posthoc_dice": row["chosen_dice"],
            "posthoc_ece_pct": row["chosen_ece_pct"], "posthoc_true_ece_pct": row["chosen_true_ece_pct"],
            "posthoc_dice_p_vs_base": row["dice_p_vs_base"], "posthoc_ece_p_vs_base": row["ece_p_vs_base"],
            "posthoc_true_ece_p_vs_base": row["true_ece_p_vs_base"],
            "posthoc_ece_verdict": row["ece_verdict"], "posthoc_true_ece_verdict": row["true_ece_verdict"],
            "posthoc_verdict": row["verdict"]}


def train_time_tables(selections: Sequence[Selection], tables: Mapping[tuple[str, str, str], pd.DataFrame],
                      headline: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    """Per dataset with some train-time base model, its ``train_time_<dataset>.csv`` frame
    (:data:`TRAIN_TIME_COLUMNS`, one row per train-time weights in vocabulary order; module doc).

    ``tables`` maps (dataset, weights, method) to the pooled per-subject frame indexed by subject
    id (fractions, as per_subject.csv); ``headline`` is tracking.report.headline's table.
    """
    by_key = {s.key: s for s in selections}
    out: dict[str, pd.DataFrame] = {}
    for dataset in sorted({s.dataset for s in selections}):
        present = [w for w in TRAIN_TIME_WEIGHTS if (dataset, w, BASE_METHOD) in by_key]
        if not present:
            continue
        ref_row = _headline_row(headline, dataset, REFERENCE_WEIGHTS)
        reference = None if ref_row is None else tables[(dataset, REFERENCE_WEIGHTS, ref_row["chosen_method"])]
        if ref_row is not None:
            note = ""
        elif (dataset, REFERENCE_WEIGHTS, BASE_METHOD) in by_key:
            note = f"no {REFERENCE_WEIGHTS} calibration ran (or every one had constant output): no reference"
        else:
            note = f"no {REFERENCE_WEIGHTS} base model ran: no reference"
        rows = []
        for w in present:
            train = tables[(dataset, w, BASE_METHOD)]
            common = train.index if reference is None else train.index.intersection(reference.index)
            row = {"dataset": dataset, "weights": w, "reference_weights": REFERENCE_WEIGHTS,
                   "reference_method": "" if ref_row is None else ref_row["chosen_method"],
                   "reference_lr": "" if ref_row is None else ref_row["chosen_lr"],
                   "reference_selected_on": "" if ref_row is None else ref_row["selected_on"],
                   "n_subjects": int(len(common))}
            for metric in TRAIN_TIME_METRICS:
                row |= _compare(metric, train, reference)
            row |= _posthoc(_headline_row(headline, dataset, w))
            row["note"] = note
            rows.append(row)
        out[dataset] = pd.DataFrame(rows, columns=list(TRAIN_TIME_COLUMNS))
    return out


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None or not isinstance(x, (int, float, np.floating)) or not math.isfinite(x) \
        else f"{x:.{digits}f}"


def _p(x) -> str:
    if x is None or not isinstance(x, (int, float, np.floating)) or not math.isfinite(x):
        return "–"
    return f"{x:.2e}" if x < 1e-3 else f"{x:.3f}"


def train_time_markdown(frames: Mapping[str, pd.DataFrame], csv_name) -> str:
    """The report section; ``csv_name(dataset)`` is the file name to link. Without any train-time
    weights it says so (the section is skipped with its reason)."""
    text = ["## Train-time or post hoc?", ""]
    if not frames:
        return "\n".join(text + [
            f"Skipped: no train-time calibration weights ({', '.join(TRAIN_TIME_WEIGHTS)}) have a "
            "base model in these runs, so there is nothing to set against the post hoc "
            "calibration of CE-SD.", ""])
    text += [f"Each train-time base model (trained like {REFERENCE_WEIGHTS}: the CE pretraining, then "
             "a calibration loss) against the best post hoc calibration of the "
             f"{REFERENCE_WEIGHTS} base model, that calibrator chosen on held-out val subjects as in "
             "the headline. Two-sided Wilcoxon signed-rank p, paired over test subjects (n pairs). "
             "*lower*/*higher* read the train-time model's side at p < 0.05. The last column is "
             "the train-time model's own headline row: whether post hoc calibration chosen on val "
             "helps it further.", ""]
    for ds, frame in frames.items():
        rows = []
        for r in frame.itertuples(index=False):
            cells = []
            for metric, digits in (("dice", 3), ("ece", 3), ("true_ece", 3)):
                st = STEMS[metric][0]
                train, ref = getattr(r, f"train_time_{st}"), getattr(r, f"reference_{st}")
                if metric == "true_ece" and not (math.isfinite(train) or math.isfinite(ref)):
                    cells.append("–")
                    continue
                cells.append(f"{_fmt(train, digits)} vs {_fmt(ref, digits)} "
                             f"(p {_p(getattr(r, f'{metric}_p_vs_reference'))}, "
                             f"n {getattr(r, f'{metric}_n_vs_reference')}; "
                             f"{getattr(r, f'{metric}_verdict_vs_reference')})")
            post = (f"{r.posthoc_method}: **{r.posthoc_verdict}** (ECE p {_p(r.posthoc_ece_p_vs_base)})"
                    if r.posthoc_method else r.posthoc_verdict)
            ref = f"{r.reference_method}" + (f" (lr {r.reference_lr})" if r.reference_lr else "")
            rows.append([r.weights, ref or "–", *cells, post])
        header = ["weights", f"{REFERENCE_WEIGHTS} reference", "Dice", "ECE %", "true ECE %",
                  "post hoc on top (headline)"]
        text += [f"### {ds}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        text += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
        notes = sorted({n for n in frame["note"] if n})
        text += [""] + [f"Note: {n}." for n in notes] + ([""] if notes else [])
        text += [f"File: [{csv_name(ds)}]({csv_name(ds)}).", ""]
    return "\n".join(text)
