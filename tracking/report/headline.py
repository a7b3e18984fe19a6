"""The report's first answer: per dataset × weights, does the best post hoc method calibrate the
base model better, measured by ECE and, on phantoms, by the true calibration error?

"Best" is the calibrated method with the lowest mean ECE (the base model excluded); the verdict is
the two-sided Wilcoxon signed-rank test of that method against the base model over the pooled
subjects (``*_p_vs_base`` of results_long), at p < 0.05. Nothing here chooses what to show: every
dataset × weights gets its row, whatever the outcome.
"""

from __future__ import annotations

import math

import pandas as pd

from tracking.report.analysis import BASE_METHOD, weights_key
from tracking.report.stats import ALPHA

HEADLINE_COLUMNS = ("dataset", "weights", "base_ece_pct", "base_true_ce_pct", "best_method",
                    "best_lr", "best_ece_pct", "best_true_ce_pct", "ece_p_vs_base",
                    "true_ce_p_vs_base", "ece_verdict", "true_ce_verdict", "n_subjects")


def verdict(best: float, base: float, p: float) -> str:
    """``lower`` / ``higher`` (significant at :data:`ALPHA`), ``no significant difference``, or
    ``untested`` when there is no p-value."""
    if p is None or not math.isfinite(p):
        return "untested"
    if p >= ALPHA:
        return "no significant difference"
    return "lower" if best < base else "higher"


def headline_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset × weights that has a base model and at least one calibration."""
    rows = []
    true_ce = "true_ce_pct_mean" in results.columns
    for (dataset, weights), part in results.groupby(["dataset", "weights"], sort=False):
        base = part[part["method"] == BASE_METHOD]
        calibrated = part[part["method"] != BASE_METHOD]
        if base.empty or calibrated.empty:
            continue
        b = base.iloc[0]
        best = calibrated.sort_values(["ece_pct_mean", "method"]).iloc[0]
        base_tce = float(b["true_ce_pct_mean"]) if true_ce else math.nan
        best_tce = float(best["true_ce_pct_mean"]) if true_ce else math.nan
        tce_p = float(best.get("true_ce_p_vs_base", math.nan)) if true_ce else math.nan
        rows.append({
            "dataset": dataset, "weights": weights,
            "base_ece_pct": float(b["ece_pct_mean"]), "base_true_ce_pct": base_tce,
            "best_method": best["method"], "best_lr": best["lr_selected"],
            "best_ece_pct": float(best["ece_pct_mean"]), "best_true_ce_pct": best_tce,
            "ece_p_vs_base": float(best["ece_p_vs_base"]), "true_ce_p_vs_base": tce_p,
            "ece_verdict": verdict(best["ece_pct_mean"], b["ece_pct_mean"], best["ece_p_vs_base"]),
            "true_ce_verdict": verdict(best_tce, base_tce, tce_p) if true_ce else "no truth known",
            "n_subjects": int(best["n_subjects"]),
        })
    df = pd.DataFrame(rows, columns=list(HEADLINE_COLUMNS))
    if len(df):
        df = df.sort_values(["dataset", "weights"], key=lambda c: c.map(weights_key)
                            if c.name == "weights" else c).reset_index(drop=True)
    return df
