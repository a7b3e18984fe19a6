"""From the selected runs' pooled per-subject values to ``results_long.csv`` (see
docs/architecture.md, "Report").

Within one dataset × weights and per metric: the best method by mean (Dice highest, ECE lowest),
every other method tested against it (two-sided Wilcoxon signed-rank, paired over subjects pooled
over folds), bold = best or p ≥ 0.05; optionally Holm-corrected within that family. Each method is
also tested against the base model (``*_p_vs_base``, what the paper's code computed). ``pareto``
is taken per dataset over all weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from calib.vocabulary import BASE, BASE_WEIGHTS, METHODS
from tracking.report.errors import ReportError, WarningLog
from tracking.report.selection import Selection
from tracking.report.stats import compare_to_best, compare_to_reference, pareto_front

CONTRACT_COLUMNS = ("dataset", "weights", "method", "lr_selected", "n_subjects", "dice_mean",
                    "ece_pct_mean", "dice_p_vs_best", "ece_p_vs_best", "dice_bold", "ece_bold",
                    "pareto")
# Extra columns, after the contract ones; true_ce_pct_mean and true_ce_p_vs_base (Wilcoxon of the
# per-subject true calibration error against the base model) only when some run has true_ce.
EXTRA_COLUMNS = ("dice_p_vs_base", "ece_p_vs_base", "protocol", "select_by", "p_adjust")
#: The method label of the base model's rows: the stage's name (its runs are the base stage's).
BASE_METHOD = BASE
#: The base model, then the paper's methods in its order, then those beyond the paper.
METHOD_ORDER = (BASE_METHOD, *METHODS)
WEIGHTS_ORDER = BASE_WEIGHTS
METRICS = ("dice", "ece")


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
    for metric in METRICS + (("true_ce",) if "true_ce" in table else ()):
        nan = table.index[table[metric].isna()]
        if len(nan):
            warn.warn(f"{name}: {metric} is NaN for subject(s) {', '.join(map(str, nan))}; they are "
                      f"left out of its {metric} mean and tests")
    return table


def analyse(selections: Sequence[Selection], tables: Mapping[tuple[str, str, str], pd.DataFrame],
            use_holm: bool = False, warn: WarningLog | None = None) -> pd.DataFrame:
    """``results_long`` rows (contract columns, then extras) for every selection.

    ``tables`` maps (dataset, weights, method) → per-subject frame indexed by subject id with at
    least ``dice`` and ``ece`` (fractions) and optionally ``true_ce``.
    """
    warn = warn or WarningLog()
    sel = {s.key: s for s in selections}
    with_true_ce = any("true_ce" in t for t in tables.values())
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
        if BASE_METHOD in methods:
            vs_base = {metric: compare_to_reference({m: data[m][metric] for m in methods},
                                                    BASE_METHOD, use_holm)
                       for metric in METRICS}
        else:
            warn.warn(f"{dataset}/{weights} has no {BASE_METHOD} runs: no tests against the base model")
            vs_base = {metric: {m: np.nan for m in methods} for metric in METRICS}
        true_ce_vs_base = {m: np.nan for m in methods}
        if with_true_ce and BASE_METHOD in methods and all("true_ce" in data[m] for m in methods):
            true_ce_vs_base = compare_to_reference({m: data[m]["true_ce"] for m in methods},
                                                   BASE_METHOD, use_holm)
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
            if with_true_ce:
                tc = data[m]["true_ce"] if "true_ce" in data[m] else pd.Series(dtype=float)
                row["true_ce_pct_mean"] = 100.0 * float(tc.mean()) if len(tc) else np.nan
                row["true_ce_p_vs_base"] = true_ce_vs_base[m]
            rows.append(row)
    columns = list(CONTRACT_COLUMNS) + list(EXTRA_COLUMNS) + (
        ["true_ce_pct_mean", "true_ce_p_vs_base"] if with_true_ce else [])
    df = pd.DataFrame(rows, columns=columns)
    for idx in df.groupby("dataset").groups.values():
        part = df.loc[idx]
        df.loc[idx, "pareto"] = pareto_front(part["dice_mean"], part["ece_pct_mean"])
    df["pareto"] = df["pareto"].astype(bool)
    return df


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
