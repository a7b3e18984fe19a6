"""The report's first answer: per dataset × weights, does post hoc calibration help the base model?

Chosen on held-out subjects, tested once (issue 21):

1. Candidates are the calibration methods of a dataset × weights (not ``base``), each at its
   selected learning rate (tracking.report.selection). A method with a fold run tagged
   ``calib.constant_output`` (its output is one value over the whole mask) is left out of the
   candidates and listed (:attr:`Headline.constant_output`).
2. The candidate is the one with the lowest mean over folds of its runs' ``val_ece_mean``
   (``--headline-by val_ece``, default) or ``val_nll_mean`` (``val_nll``): the fold's ``val``
   subjects, never its test subjects. Ties go to the method listed first (calib.vocabulary).
   ``selected_on`` says what the choice saw: ``val``; ``val = test fold (protocol paper)`` when a
   run ran under ``protocol: paper``, whose validation subjects are the test fold; or, when some
   candidate's run has no val metric (runs from before the metric existed), ``test (no val
   metrics)``: the choice then falls back to the mean test ECE (NLL) and the verdict is optimistic.
3. That one candidate is tested once against the base model on the test subjects: per metric the
   two-sided Wilcoxon signed-rank test, paired over subjects (tracking.report.stats), with a
   seeded bootstrap interval for each mean (tracking.report.intervals). One test per row, chosen
   without the test subjects: no multiple-comparison correction is needed.
4. ``verdict``: ``lower ECE`` / ``higher ECE`` / ``no significant ECE difference`` at p < 0.05, and
   ``, lower Dice`` appended when the candidate's Dice is significantly lower than the base model's
   ("lower ECE, lower Dice" is not a win).

Nothing here chooses what to show: every dataset × weights with a base model and a candidate gets
its row, whatever the outcome.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tracking import schema as S
from tracking.report.analysis import BASE_METHOD, STEMS, TRUTH_METRICS, method_key, weights_key
from tracking.report.intervals import bootstrap_ci
from tracking.report.selection import Selection
from tracking.report.stats import ALPHA, wilcoxon_paired

HEADLINE_BY = {"val_ece": S.VAL_ECE_MEAN, "val_nll": S.VAL_NLL_MEAN}
_TEST_FALLBACK = {"val_ece": "ece", "val_nll": "nll"}  # the per-subject column used without val
SELECTED_ON_VAL = "val"
SELECTED_ON_PAPER = "val = test fold (protocol paper)"
SELECTED_ON_TEST = "test (no val metrics)"
#: Metrics of the headline, per subject (per_subject.csv), in display order.
HEADLINE_METRICS = ("dice", "brier", "nll", "ece", "true_ece", "p_star_distance", "ece_bias")


def _stem(metric: str) -> str:
    return STEMS[metric][0]


def metric_columns(metric: str) -> list[str]:
    """The headline's columns of one metric: base and chosen mean with intervals, then the p."""
    st = _stem(metric)
    return [f"base_{st}", f"base_{st}_ci_low", f"base_{st}_ci_high", f"chosen_{st}",
            f"chosen_{st}_ci_low", f"chosen_{st}_ci_high", f"{metric}_p_vs_base"]


HEADLINE_COLUMNS = (("dataset", "weights", "headline_by", "selected_on", "chosen_method",
                     "chosen_lr", "chosen_criterion", "n_candidates", "n_subjects")
                    + tuple(c for m in HEADLINE_METRICS for c in metric_columns(m))
                    + ("ece_verdict", "dice_verdict", "true_ece_verdict", "verdict"))


@dataclass(frozen=True)
class ConstantOutput:
    """A calibrator left out of the headline's candidates: a fold run whose output is constant."""

    dataset: str
    weights: str
    method: str
    fold: int
    run_id: str
    reason: str

    def describe(self) -> str:
        return f"{self.dataset}/{self.weights}/{self.method} fold {self.fold} (run {self.run_id}: {self.reason})"


@dataclass(frozen=True)
class Headline:
    """The headline table and what was left out of it."""

    table: pd.DataFrame
    headline_by: str
    constant_output: tuple[ConstantOutput, ...] = ()


def verdict(chosen: float, base: float, p: float) -> str:
    """``lower`` / ``higher`` (significant at :data:`ALPHA`), ``no significant difference``, or
    ``untested`` when there is no p-value."""
    if p is None or not math.isfinite(p):
        return "untested"
    if p >= ALPHA:
        return "no significant difference"
    return "lower" if chosen < base else "higher"


def overall_verdict(ece: str, dice: str) -> str:
    """The row's verdict: ECE's, and ``, lower Dice`` when the segmentation got significantly worse."""
    text = {"lower": "lower ECE", "higher": "higher ECE",
            "no significant difference": "no significant ECE difference"}.get(ece, "untested")
    return text + (", lower Dice" if dice == "lower" else "")


def _constant(selection: Selection) -> list[ConstantOutput]:
    return [ConstantOutput(selection.dataset, selection.weights, selection.method, r.fold,
                           r.run_id, r.constant_output)
            for r in selection.runs if r.constant_output]


def _criterion(selection: Selection, metric: str) -> float:
    values = [r.metrics.get(metric, math.nan) for r in selection.runs]
    return float(np.mean(values)) if values else math.nan


def choose(candidates: Sequence[Selection], tables: Mapping, headline_by: str) -> tuple[Selection | None, str, float]:
    """(chosen selection, selected_on, its criterion) among ``candidates`` (module doc, step 2)."""
    metric = HEADLINE_BY[headline_by]
    runs = [r for c in candidates for r in c.runs]
    if runs and all(metric in r.metrics for r in runs):
        scores = {c.method: _criterion(c, metric) for c in candidates}
        paper = any(r.protocol == "paper" for r in runs)
        on = SELECTED_ON_PAPER if paper else SELECTED_ON_VAL
    else:  # old runs: on test, and said so
        col = _TEST_FALLBACK[headline_by]
        scores = {c.method: float(tables[c.key][col].mean()) if col in tables[c.key] else math.nan
                  for c in candidates}
        on = SELECTED_ON_TEST
    finite = [c for c in sorted(candidates, key=lambda c: method_key(c.method))
              if math.isfinite(scores[c.method])]
    if not finite:
        return None, on, math.nan
    best = min(finite, key=lambda c: scores[c.method])  # min is stable: first in method order on ties
    return best, on, scores[best.method]


def _metric_cells(metric: str, base: pd.DataFrame, chosen: pd.DataFrame) -> dict:
    cols = metric_columns(metric)
    if metric not in base or metric not in chosen:
        return dict.fromkeys(cols, math.nan)
    scale = STEMS[metric][1]
    out = {}
    for side, table in (("base", base), ("chosen", chosen)):
        values = table[metric]
        low, high = bootstrap_ci(values.to_numpy(float))
        mean = float(values.mean()) if values.notna().any() else math.nan
        out |= {f"{side}_{_stem(metric)}": scale * mean, f"{side}_{_stem(metric)}_ci_low": scale * low,
                f"{side}_{_stem(metric)}_ci_high": scale * high}
    out[cols[-1]] = wilcoxon_paired(chosen[metric], base[metric]).p
    return out


def headline_table(selections: Sequence[Selection], tables: Mapping[tuple[str, str, str], pd.DataFrame],
                   headline_by: str = "val_ece") -> Headline:
    """One row per dataset × weights that has a base model and a candidate (module doc)."""
    if headline_by not in HEADLINE_BY:
        raise ValueError(f"headline_by {headline_by!r} unknown; valid: {', '.join(HEADLINE_BY)}")
    cells: dict[tuple[str, str], list[Selection]] = {}
    for s in selections:
        cells.setdefault((s.dataset, s.weights), []).append(s)
    rows, constant = [], []
    for (dataset, weights), group in cells.items():
        by_method = {s.method: s for s in group}
        base = by_method.get(BASE_METHOD)
        calibrators = [s for s in group if s.method != BASE_METHOD]
        left_out = [c for s in calibrators for c in _constant(s)]
        constant += left_out
        candidates = [s for s in calibrators if not _constant(s)]
        if base is None or not candidates:
            continue
        chosen, on, crit = choose(candidates, tables, headline_by)
        if chosen is None:
            continue
        bt, ct = tables[base.key], tables[chosen.key]
        row = {"dataset": dataset, "weights": weights, "headline_by": headline_by, "selected_on": on,
               "chosen_method": chosen.method, "chosen_lr": chosen.lr_selected,
               "chosen_criterion": crit, "n_candidates": len(candidates),
               "n_subjects": int(len(ct.index.intersection(bt.index)))}
        for metric in HEADLINE_METRICS:
            row |= _metric_cells(metric, bt, ct)
        row["ece_verdict"] = verdict(row["chosen_ece_pct"], row["base_ece_pct"], row["ece_p_vs_base"])
        row["dice_verdict"] = verdict(row["chosen_dice"], row["base_dice"], row["dice_p_vs_base"])
        truth = math.isfinite(row["base_true_ece_pct"]) and math.isfinite(row["chosen_true_ece_pct"])
        row["true_ece_verdict"] = (verdict(row["chosen_true_ece_pct"], row["base_true_ece_pct"],
                                           row["true_ece_p_vs_base"]) if truth else "no truth known")
        row["verdict"] = overall_verdict(row["ece_verdict"], row["dice_verdict"])
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(HEADLINE_COLUMNS))
    if len(df):
        df = df.sort_values(["dataset", "weights"], key=lambda c: c.map(weights_key)
                            if c.name == "weights" else c).reset_index(drop=True)
    constant.sort(key=lambda c: (c.dataset, weights_key(c.weights), method_key(c.method), c.fold))
    return Headline(df, headline_by, tuple(constant))


def has_truth(table: pd.DataFrame) -> bool:
    """Whether some headline row has a p*-based metric (phantoms)."""
    cols = [f"base_{_stem(m)}" for m in TRUTH_METRICS]
    return any(c in table and table[c].notna().any() for c in cols)
