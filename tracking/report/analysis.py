"""From the selected runs' pooled per-subject values to ``results_long.csv`` (see
docs/architecture.md, "Report").

Within one dataset × weights and for Dice and ECE: the best method by mean (Dice highest, ECE lowest),
every other method tested against it (two-sided Wilcoxon signed-rank, paired over subjects pooled
over folds), bold = best or p ≥ 0.05; optionally Holm-corrected within that family. Each method is
also tested against the base model (``*_p_vs_base``, what the paper's code computed). ``pareto``
is taken per dataset over all weights. Every mean has a seeded subject-level bootstrap interval
(``*_ci_low``, ``*_ci_high``); Brier, NLL and, on phantoms, the true ECE, the p*-distance and ECE's
bias (ECE - true ECE) get their mean, interval and p against the base model when some run has them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from calib.vocabulary import BASE, BASE_WEIGHTS, METHODS
from tracking.report.errors import ReportError, WarningLog
from tracking.report.intervals import bootstrap_ci
from tracking.report.selection import Selection
from tracking.report.stats import compare_to_best, compare_to_reference, pareto_front

CONTRACT_COLUMNS = ("dataset", "weights", "method", "lr_selected", "n_subjects", "dice_mean",
                    "ece_pct_mean", "dice_p_vs_best", "ece_p_vs_best", "dice_bold", "ece_bold",
                    "pareto")
# Extra columns, after the contract ones, then the intervals of Dice and ECE, then one group per
# further metric that some run has (OPTIONAL_METRICS).
EXTRA_COLUMNS = ("dice_p_vs_base", "ece_p_vs_base", "protocol", "select_by", "p_adjust")
#: The method label of the base model's rows: the stage's name (its runs are the base stage's).
BASE_METHOD = BASE
#: The base model, then the paper's methods in its order, then those beyond the paper.
METHOD_ORDER = (BASE_METHOD, *METHODS)
WEIGHTS_ORDER = BASE_WEIGHTS
#: The metrics with a best method and bold cells (the paper's Tables 1-2).
METRICS = ("dice", "ece")
#: per_subject.csv column -> stem of its results_long columns (``<stem>_mean``, ``<stem>_ci_low``,
#: ``<stem>_ci_high``), and the factor from the CSV's fraction to the column's unit.
STEMS = {"dice": ("dice", 1.0), "ece": ("ece_pct", 100.0), "brier": ("brier", 1.0),
         "nll": ("nll", 1.0), "true_ece": ("true_ece_pct", 100.0),
         "p_star_distance": ("p_star_distance_pct", 100.0), "ece_bias": ("ece_bias_pct", 100.0)}
#: Metrics reported (mean, interval, p vs base) when some selected run has them. ``true_ece`` and
#: ``p_star_distance`` need the phantom's p*; ``ece_bias`` = ece - true_ece per subject.
OPTIONAL_METRICS = ("brier", "nll", "true_ece", "p_star_distance", "ece_bias")
TRUTH_METRICS = ("true_ece", "p_star_distance", "ece_bias")


def mean_column(metric: str) -> str:
    """``dice_mean``, ``ece_pct_mean``, ``true_ece_pct_mean``, ... of a per-subject metric."""
    return f"{STEMS[metric][0]}_mean"


def ci_columns(metric: str) -> tuple[str, str]:
    stem = STEMS[metric][0]
    return f"{stem}_ci_low", f"{stem}_ci_high"


def p_column(metric: str) -> str:
    return f"{metric}_p_vs_base"


def _order_key(order: Sequence[str]):
    return lambda name: (order.index(name) if name in order else len(order), name)


method_key = _order_key(METHOD_ORDER)
weights_key = _order_key(WEIGHTS_ORDER)


def subject_table(selection: Selection, pooled: pd.DataFrame, warn: WarningLog) -> pd.DataFrame:
    """The pooled per-subject rows of a selection indexed by subject id; NaN values warned about."""
    name = "/".join(selection.key)
    dup = pooled["subject_id"][pooled["subject_id"].duplicated()]
    if len(dup):
        raise ReportError(f"{name}: subject(s) {', '.join(map(str, pd.unique(dup)[:5]))} appear "
                          "twice in the selected per_subject.csv rows; each subject must be tested once")
    table = pooled.set_index("subject_id")
    if "true_ece" in table and "ece_bias" not in table:
        table["ece_bias"] = table["ece"] - table["true_ece"]  # what ECE over-states, per subject
    for metric in METRICS + tuple(m for m in ("true_ece", "p_star_distance") if m in table):
        nan = table.index[table[metric].isna()]
        if metric in ("true_ece", "p_star_distance") and len(nan) == len(table):
            continue  # not known for this run at all (no p*, or a run from before true_ece)
        if len(nan):
            warn.warn(f"{name}: {metric} is NaN for subject(s) {', '.join(map(str, nan))}; they are "
                      f"left out of its {metric} mean and tests")
    return table


def analyse(selections: Sequence[Selection], tables: Mapping[tuple[str, str, str], pd.DataFrame],
            use_holm: bool = False, warn: WarningLog | None = None) -> pd.DataFrame:
    """``results_long`` rows (contract columns, then extras) for every selection.

    ``tables`` maps (dataset, weights, method) → per-subject frame indexed by subject id with at
    least ``dice`` and ``ece`` (fractions) and optionally the :data:`OPTIONAL_METRICS`. Every mean
    gets a seeded subject-level bootstrap interval (tracking.report.intervals).
    """
    warn = warn or WarningLog()
    sel = {s.key: s for s in selections}
    optional = [m for m in OPTIONAL_METRICS
                if any(m in t and t[m].notna().any() for t in tables.values())]
    rows = []
    cells = sorted({(d, w) for d, w, _ in sel}, key=lambda dw: (dw[0], weights_key(dw[1])))
    for dataset, weights in cells:
        methods = sorted((m for d, w, m in sel if (d, w) == (dataset, weights)), key=method_key)
        data = {m: tables[(dataset, weights, m)] for m in methods}
        _warn_missing_subjects(f"{dataset}/{weights}", data, warn)
        comp = {metric: compare_to_best({m: data[m][metric] for m in methods},
                                        higher_is_better=(metric == "dice"), use_holm=use_holm,
                                        order=methods)
                for metric in METRICS}
        vs_base = {}
        for metric in METRICS + tuple(optional):
            have = [m for m in methods if metric in data[m]]
            if BASE_METHOD in have:
                p = compare_to_reference({m: data[m][metric] for m in have}, BASE_METHOD, use_holm)
            else:
                p = {}
            vs_base[metric] = {m: p.get(m, np.nan) for m in methods}
        if BASE_METHOD not in methods:
            warn.warn(f"{dataset}/{weights} has no {BASE_METHOD} runs: no tests against the base model")
        for m in methods:
            s = sel[(dataset, weights, m)]
            protocols = sorted({r.protocol for r in s.runs if r.protocol})
            row = {
                "dataset": dataset, "weights": weights, "method": m, "lr_selected": s.lr_selected,
                "n_subjects": int(len(data[m])),
                "dice_mean": comp["dice"].mean[m], "ece_pct_mean": 100.0 * comp["ece"].mean[m],
                "dice_p_vs_best": comp["dice"].p_vs_best[m], "ece_p_vs_best": comp["ece"].p_vs_best[m],
                "dice_bold": comp["dice"].bold[m], "ece_bold": comp["ece"].bold[m],
                "pareto": False,
                "dice_p_vs_base": vs_base["dice"][m], "ece_p_vs_base": vs_base["ece"][m],
                "protocol": ";".join(protocols), "select_by": s.select_by,
                "p_adjust": "holm" if use_holm else "none",
            }
            for metric in METRICS:
                row.update(zip(ci_columns(metric), _interval(data[m], metric)))
            for metric in optional:
                scale = STEMS[metric][1]
                values = data[m][metric] if metric in data[m] else pd.Series(dtype=float)
                row[mean_column(metric)] = scale * float(values.mean()) if values.notna().any() else np.nan
                row.update(zip(ci_columns(metric), _interval(data[m], metric)))
                row[p_column(metric)] = vs_base[metric][m]
            rows.append(row)
    columns = list(CONTRACT_COLUMNS) + list(EXTRA_COLUMNS)
    columns += [c for metric in METRICS for c in ci_columns(metric)]
    columns += [c for metric in optional for c in (mean_column(metric), *ci_columns(metric),
                                                    p_column(metric))]
    df = pd.DataFrame(rows, columns=columns)
    for idx in df.groupby("dataset").groups.values():
        part = df.loc[idx]
        df.loc[idx, "pareto"] = pareto_front(part["dice_mean"], part["ece_pct_mean"])
    df["pareto"] = df["pareto"].astype(bool)
    return df


def _interval(table: pd.DataFrame, metric: str) -> tuple[float, float]:
    """The bootstrap interval of ``metric``'s mean over the table's subjects, in its column unit."""
    if metric not in table:
        return np.nan, np.nan
    low, high = bootstrap_ci(table[metric].to_numpy(float))
    scale = STEMS[metric][1]
    return scale * low, scale * high


def _warn_missing_subjects(cell: str, data: Mapping[str, pd.DataFrame], warn: WarningLog) -> None:
    everyone = set().union(*(set(t.index) for t in data.values()))
    for method, table in data.items():
        lacking = sorted(everyone - set(table.index))
        if lacking:
            warn.warn(f"{cell}: method {method} lacks {len(lacking)} subject(s) that other methods "
                      f"have: {', '.join(map(str, lacking))}; its tests use the common subjects only")


def pareto_by_weights(results: pd.DataFrame) -> pd.Series:
    """Pareto membership computed within each dataset × weights (for Figure 1 and pareto_*.csv)."""
    out = pd.Series(False, index=results.index)
    for _, idx in results.groupby(["dataset", "weights"]).groups.items():
        part = results.loc[idx]
        out.loc[idx] = pareto_front(part["dice_mean"], part["ece_pct_mean"])
    return out.astype(bool)
