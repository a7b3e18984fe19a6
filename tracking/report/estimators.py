"""The report's "Which ECE estimate tracks the truth?" (issue 22, point 3): on phantoms, each ECE
estimator of calib.metrics.estimators against the label-free truth.

Per dataset, over every selected dataset × weights × method (the base model included: each is a
"method" here) and its pooled test subjects, for each estimator (per-subject column
``ece_est_<name>``) against its truth (``true_ece`` for the L1 estimators, ``true_ece_l2`` for the
L2 ones; calib.metrics.estimators.TRUTH_COLUMN):

* ``bias_pp``: mean over the (subject, method) pairs of estimate − truth, in percentage points;
  ``rmse_pp``: the root mean square of the same differences; ``n_pairs`` pairs with both finite.
* ``kendall_tau``, ``kendall_p``: Kendall's tau-b (``scipy.stats.kendalltau``) between the
  methods' mean estimate and their mean truth (each over that method's pairs), i.e. how well the
  ranking of methods by the estimator agrees with the ranking by the truth; ``n_methods``. NaN
  with fewer than two methods or a constant side.

Nothing is chosen here: every estimator with pairs gets its row, in calib.metrics.estimators'
order. A dataset has a file only when some run has the estimator columns (phantom runs from after
they were added).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from calib.metrics.estimators import ESTIMATOR_NORM, ESTIMATORS, TRUTH_COLUMN, estimator_column
from tracking.report.analysis import method_key, weights_key
from tracking.report.selection import Selection

ESTIMATOR_TABLE_COLUMNS = ("dataset", "estimator", "column", "truth", "n_pairs", "n_methods",
                           "mean_estimate_pct", "mean_truth_pct", "bias_pp", "rmse_pp",
                           "kendall_tau", "kendall_p")


def _pairs(table: pd.DataFrame, column: str, truth: str) -> pd.DataFrame | None:
    if column not in table or truth not in table:
        return None
    both = table[[column, truth]].astype(float).dropna()
    return both if len(both) else None


def _kendall(est: Sequence[float], truth: Sequence[float]) -> tuple[float, float]:
    if len(est) < 2:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant side: scipy warns and returns NaN
        res = stats.kendalltau(est, truth)
    return float(res.statistic), float(res.pvalue)


def estimator_tables(selections: Sequence[Selection],
                     tables: Mapping[tuple[str, str, str], pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Per dataset with estimator columns, its ``estimators_<dataset>.csv`` frame
    (:data:`ESTIMATOR_TABLE_COLUMNS`, one row per estimator; module doc). ``tables`` maps
    (dataset, weights, method) to the pooled per-subject frame indexed by subject id."""
    out: dict[str, pd.DataFrame] = {}
    for dataset in sorted({s.dataset for s in selections}):
        keys = sorted((s.key for s in selections if s.dataset == dataset),
                      key=lambda k: (weights_key(k[1]), method_key(k[2])))
        rows = []
        for name in ESTIMATORS:
            column, truth = estimator_column(name), TRUTH_COLUMN[ESTIMATOR_NORM[name]]
            per_method = [p for p in (_pairs(tables[k], column, truth) for k in keys) if p is not None]
            if not per_method:
                continue
            pooled = pd.concat(per_method, ignore_index=True)
            diff = pooled[column].to_numpy() - pooled[truth].to_numpy()
            tau, p = _kendall([float(m[column].mean()) for m in per_method],
                              [float(m[truth].mean()) for m in per_method])
            rows.append({"dataset": dataset, "estimator": name, "column": column, "truth": truth,
                         "n_pairs": int(len(pooled)), "n_methods": len(per_method),
                         "mean_estimate_pct": 100.0 * float(pooled[column].mean()),
                         "mean_truth_pct": 100.0 * float(pooled[truth].mean()),
                         "bias_pp": 100.0 * float(diff.mean()),
                         "rmse_pp": 100.0 * float(np.sqrt(np.mean(diff ** 2))),
                         "kendall_tau": tau, "kendall_p": p})
        if rows:
            out[dataset] = pd.DataFrame(rows, columns=list(ESTIMATOR_TABLE_COLUMNS))
    return out


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _best(frame: pd.DataFrame, column: str, lowest: bool) -> str:
    values = frame[column].abs() if column == "bias_pp" else frame[column]
    values = values.dropna()
    if values.empty:
        return "–"
    target = values.min() if lowest else values.max()
    return ", ".join(f"`{e}`" for e in frame.loc[values.index[values == target], "estimator"])


def estimators_markdown(frames: Mapping[str, pd.DataFrame], csv_name) -> str:
    """The report section; ``csv_name(dataset)`` is the file to link. Without estimator columns
    (no phantom, or runs from before them) it says why it is empty."""
    text = ["## Which ECE estimate tracks the truth?", ""]
    if not frames:
        return "\n".join(text + [
            "Skipped: no run has the per-subject estimator columns (`ece_est_<name>`): they are "
            "written only for phantoms, whose true probability p* is known, by runs from after "
            "they were added.", ""])
    text += ["On phantoms the label-free truth is known, so each estimator of the calibration "
             "error from sampled labels can be scored against it, over every test subject of every "
             "method (base models included) of the dataset: bias (mean estimate − truth) and RMSE "
             "in percentage points, and Kendall's tau between the methods ranked by the "
             "estimator's mean and by the truth's. L1 estimators are scored against the true ECE "
             "(20 equal-width bins), L2 ones (`l2_*`, `debiased_l2_*`) against the true L2 error "
             "on the same bins. `width20` is the paper's ECE; `mass20` equal-mass bins; `sweep` "
             "Roelofs et al. (2022); `debiased_*` Kumar, Liang & Ma (2019) (calib.metrics."
             "estimators states each rule). Whether labels were drawn independently or with "
             "spatially correlated noise is the phantom's recipe (`label_noise`): compare datasets "
             "that differ only in it.", ""]
    for ds, frame in frames.items():
        header = ["estimator", "truth", "bias (pp)", "RMSE (pp)", "Kendall τ", "τ p", "methods", "pairs"]
        rows = [[f"`{r.estimator}`", f"`{r.truth}`", _fmt(r.bias_pp), _fmt(r.rmse_pp),
                 _fmt(r.kendall_tau, 2), _fmt(r.kendall_p, 3), r.n_methods, r.n_pairs]
                for r in frame.itertuples(index=False)]
        text += [f"### {ds}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        text += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
        text += ["", f"Lowest RMSE: {_best(frame, 'rmse_pp', True)}; smallest |bias|: "
                 f"{_best(frame, 'bias_pp', True)}; highest Kendall τ: {_best(frame, 'kendall_tau', False)}. "
                 f"File: [{csv_name(ds)}]({csv_name(ds)}).", ""]
    return "\n".join(text)
