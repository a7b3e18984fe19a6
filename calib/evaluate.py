"""Per-subject evaluation of foreground probabilities: the rows of per_subject.csv and
reliability_bins.csv (docs/architecture.md, "Trial CSVs")."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd

from calib import metrics
from calib.metrics.estimators import ESTIMATOR_COLUMNS, estimator_row

#: Columns of per_subject.csv (and val_per_subject.csv), in order; from ``true_ece`` on only when
#: the subject has a true probability (phantoms): the truth, then the ECE estimators
#: (``ece_est_<name>``, calib.metrics.estimators) and their L2 truth ``true_ece_l2``.
PER_SUBJECT_COLUMNS = ("subject_id", "fold", "dice", "ece", "brier", "nll", "mce", "boundary_ece",
                       "adaptive_ece", "classwise_ece", "ueo", "error_auroc", "true_ece",
                       "p_star_distance", *ESTIMATOR_COLUMNS)
#: The per-subject metric columns (every column but the keys), for summaries such as ``<col>_mean``.
METRIC_COLUMNS = PER_SUBJECT_COLUMNS[2:]
BIN_COLUMNS = ("subject_id", "bin", "count", "conf_sum", "pos_sum")


def evaluate_subject(prob: np.ndarray, label: np.ndarray, mask: np.ndarray,
                     true_prob: np.ndarray | None = None, n_bins: int = 20
                     ) -> tuple[dict[str, float], pd.DataFrame]:
    """Metrics of one volume's foreground probabilities inside its mask.

    Args:
        prob: float (X, Y, Z) in [0, 1]; label: {0, 1} (X, Y, Z); mask: bool (X, Y, Z).
        true_prob: the phantom's true foreground probability (X, Y, Z), or None.
        n_bins: ECE / reliability bins (20 in the paper).

    Returns:
        ``row``: ``dice`` (threshold 0.5), ``ece``, ``brier``, ``nll``, ``mce``, ``boundary_ece``
        (in the band around the prediction's 0.5 surface), ``adaptive_ece`` (equal-mass bins),
        ``classwise_ece`` (both classes), ``ueo`` (uncertainty-error overlap: Dice of normalised
        entropy > 0.5 against the errors), ``error_auroc`` (errors detected by min(p, 1 - p); NaN
        without errors) -- fractions, not % -- and, when ``true_prob`` is given, ``true_ece``
        (the label-free ECE against it, same bins as ``ece``) and ``p_star_distance`` (mean
        |prob - true_prob| in the mask) (:mod:`calib.metrics` documents each), and every ECE
        estimator of :mod:`calib.metrics.estimators` (``ece_est_width20``, ..., with the L2
        truth ``true_ece_l2``) to be set against the truth; ``bins``:
        DataFrame ``bin, count, conf_sum, pos_sum`` (n_bins rows; these add across subjects, see
        :func:`calib.metrics.ece_from_bins`).
    """
    prob = np.asarray(prob, dtype=np.float32)
    label = np.asarray(label)
    mask = np.asarray(mask, dtype=bool)
    if prob.shape != label.shape or prob.shape != mask.shape:
        raise ValueError(f"prob {prob.shape}, label {label.shape} and mask {mask.shape} must have "
                         "one shape")
    # one binning pass serves ECE, MCE and the reliability bins (what metrics.ece / mce do inside)
    count, conf_sum, pos_sum = metrics.reliability_bins(prob, label, mask, n_bins=n_bins)
    row = {
        "dice": float(metrics.dice(prob, label, mask)),
        "ece": metrics.ece_from_bins(count, conf_sum, pos_sum),
        "brier": float(metrics.brier(prob, label, mask)),
        "nll": float(metrics.nll(prob, label, mask)),
        "mce": metrics.mce_from_bins(count, conf_sum, pos_sum),
        "boundary_ece": float(metrics.boundary_ece(prob, label, mask, n_bins=n_bins)),
        "adaptive_ece": metrics.adaptive_ece(prob, label, mask, n_bins=n_bins),
        "classwise_ece": metrics.classwise_ece(prob, label, mask, n_bins=n_bins),
        "ueo": metrics.uncertainty_error_overlap(prob, label, mask),
        "error_auroc": metrics.error_detection_auroc(prob, label, mask),
    }
    if true_prob is not None:
        true_prob = np.asarray(true_prob, dtype=np.float32)
        if true_prob.shape != prob.shape:
            raise ValueError(f"true_prob {true_prob.shape} does not match prob {prob.shape}")
        row["true_ece"] = metrics.true_ece(prob, true_prob, mask, n_bins=n_bins)
        row["p_star_distance"] = metrics.p_star_distance(prob, true_prob, mask)
        row |= estimator_row(prob, label, mask, true_prob)
    bins = pd.DataFrame({"bin": np.arange(n_bins), "count": np.asarray(count),
                         "conf_sum": np.asarray(conf_sum, dtype=np.float64),
                         "pos_sum": np.asarray(pos_sum, dtype=np.float64)})
    return row, bins


def evaluate_subjects(predict: Callable[[object], np.ndarray], subjects: Iterable, fold: int,
                      n_bins: int = 20) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate ``predict(subject) -> prob (X, Y, Z)`` on each subject of a SubjectSet.

    Each subject needs ``subject_id``, ``label``, ``mask`` and ``true_prob`` (None allowed), as
    :class:`calib.methods.SubjectRef` has. Returns ``(per_subject, reliability_bins)`` with the
    columns :data:`PER_SUBJECT_COLUMNS` (``true_ece``, ``p_star_distance`` and the estimator
    columns when any subject has a true probability; NaN for those without) and :data:`BIN_COLUMNS`.
    """
    rows, bins = [], []
    for subject in subjects:
        prob = predict(subject)
        row, sbins = evaluate_subject(prob, subject.label, subject.mask, subject.true_prob, n_bins)
        rows.append({"subject_id": subject.subject_id, "fold": int(fold), **row})
        bins.append(sbins.assign(subject_id=subject.subject_id))
    per_subject = pd.DataFrame(rows)
    columns = [c for c in PER_SUBJECT_COLUMNS if c in per_subject.columns]
    per_subject = per_subject[columns]
    reliability = pd.concat(bins, ignore_index=True)[list(BIN_COLUMNS)] if bins else \
        pd.DataFrame(columns=list(BIN_COLUMNS))
    return per_subject, reliability
