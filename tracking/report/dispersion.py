"""Subject-level calibration: per-subject accuracy in each reliability bin, and its spread.

A subject's accuracy in bin k is pos_sum / count (fraction of foreground voxels among its voxels
whose confidence fell in bin k) and its confidence conf_sum / count; bins where the subject has no
voxel are skipped for that subject. Spread over subjects: sample standard deviation (ddof = 1) and
interquartile range (numpy's linear quantiles). Jungo et al. (MICCAI 2019) and the paper's
Figures 2–3 look at these to see whether calibration helps every subject or only the average.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from tracking.report.analysis import BASE_METHOD, method_key, weights_key

DISPERSION_COLUMNS = ("dataset", "weights", "method", "bin", "n_subjects", "conf_mean",
                      "acc_mean", "acc_std", "acc_q1", "acc_median", "acc_q3", "acc_iqr",
                      "acc_std_base", "acc_iqr_base")


def subject_accuracy(bins: pd.DataFrame) -> pd.DataFrame:
    """Per subject and non-empty bin: ``subject_id, bin, count, conf, acc``.

    Rows of one subject and bin are summed first, so a file that splits a bin is still right.
    """
    agg = bins.groupby(["subject_id", "bin"], as_index=False)[["count", "conf_sum", "pos_sum"]].sum()
    agg = agg[agg["count"] > 0].copy()
    agg["conf"] = agg["conf_sum"] / agg["count"]
    agg["acc"] = agg["pos_sum"] / agg["count"]
    return agg[["subject_id", "bin", "count", "conf", "acc"]].reset_index(drop=True)


def bin_summary(acc: pd.DataFrame) -> pd.DataFrame:
    """Per bin over subjects: n_subjects, conf_mean, acc_mean, acc_std, acc_q1/median/q3, acc_iqr."""
    rows = []
    for b, grp in acc.groupby("bin"):
        a = grp["acc"].to_numpy(float)
        q1, med, q3 = np.quantile(a, [0.25, 0.5, 0.75])
        rows.append({"bin": int(b), "n_subjects": len(a), "conf_mean": float(grp["conf"].mean()),
                     "acc_mean": float(a.mean()),
                     "acc_std": float(a.std(ddof=1)) if len(a) > 1 else np.nan,
                     "acc_q1": float(q1), "acc_median": float(med), "acc_q3": float(q3),
                     "acc_iqr": float(q3 - q1)})
    return pd.DataFrame(rows, columns=["bin", "n_subjects", "conf_mean", "acc_mean", "acc_std",
                                       "acc_q1", "acc_median", "acc_q3", "acc_iqr"])


def dispersion_table(bins: Mapping[tuple[str, str, str], pd.DataFrame]) -> pd.DataFrame:
    """``subject_dispersion.csv``: per dataset × weights × method × bin the spread of subject
    accuracy, with the base model's std and IQR of the same bin beside it (before vs after)."""
    parts = []
    for (dataset, weights, method), df in bins.items():
        summ = bin_summary(subject_accuracy(df))
        summ.insert(0, "method", method)
        summ.insert(0, "weights", weights)
        summ.insert(0, "dataset", dataset)
        parts.append(summ)
    if not parts:
        return pd.DataFrame(columns=list(DISPERSION_COLUMNS))
    out = pd.concat(parts, ignore_index=True)
    base = out[out["method"] == BASE_METHOD][["dataset", "weights", "bin", "acc_std", "acc_iqr"]]
    base = base.rename(columns={"acc_std": "acc_std_base", "acc_iqr": "acc_iqr_base"})
    out = out.merge(base, on=["dataset", "weights", "bin"], how="left")
    out = out.sort_values(["dataset", "weights", "method", "bin"],
                          key=lambda col: col.map(weights_key) if col.name == "weights"
                          else col.map(method_key) if col.name == "method" else col)
    return out[list(DISPERSION_COLUMNS)].reset_index(drop=True)
