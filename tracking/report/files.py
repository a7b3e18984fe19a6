"""The report's file names, in one place (build writes them, report.md links them)."""

from __future__ import annotations

import re

RESULTS = "results_long.csv"
HEADLINE = "headline.csv"
DISPERSION = "subject_dispersion.csv"
REPORT = "report.md"
FILE_DESCRIPTIONS = {
    RESULTS: "one row per dataset × weights × method: selected LR, subjects, mean Dice, mean ECE %, "
             "p vs best, bold, Pareto (docs/architecture.md, Report), then p vs base, protocol, "
             "selection rule, p adjustment, intervals, and Brier, NLL, true ECE %, p*-distance %, "
             "ECE bias when some run has them",
    HEADLINE: "per dataset × weights: the base model against the calibrator chosen on val (lowest "
              "mean val ECE or NLL), each metric's mean with its bootstrap interval and Wilcoxon p, "
              "and the verdicts",
    "slices_<dataset>.png": "one test subject's slice: image, label, p*, base and best calibrated "
                            "probability, and their errors |p - p*|",
    "table_<dataset>.md": "Table 1/2: methods × weights × {Dice, ECE %}, bold cells (Markdown)",
    "table_<dataset>.tex": "the same table as a LaTeX float (booktabs)",
    "pareto_<dataset>.csv": "every point of the dataset with `pareto` (front over all weights) and "
                            "`pareto_within_weights`",
    "fig1_scatter_<dataset>.png": "Figure 1: ECE % vs Dice per method and weights, Pareto fronts",
    "fig2_reliability_<dataset>_<weights>.png": "Figure 2: reliability diagram, mean ± std over "
                                               "subjects, base vs each calibrated method",
    "fig3_violins_<dataset>_<weights>.png": "Figure 3: violins of per-subject accuracy per bin, one "
                                           "row per method",
    DISPERSION: "per dataset × weights × method × bin: spread (std, IQR) of subject accuracy, with "
                "the base model's beside it",
    "train_time_<dataset>.csv": "per train-time weights (focal, svls, ace): its base model against "
                                "the best post hoc calibration of CE-SD chosen on val (Dice, ECE %, "
                                "true ECE % with Wilcoxon p and n), and its own headline row",
    "estimators_<dataset>.csv": "phantoms: per ECE estimator its bias and RMSE against the true ECE "
                                "over subjects x methods, and Kendall's tau between the method "
                                "rankings by the estimator and by the truth",
    "data_efficiency_<dataset>.csv": "with calib_subjects: per weights x method x number of calib "
                                     "subjects its test ECE % (true ECE % on phantoms) with bootstrap "
                                     "intervals, and the subjects needed to come within 10 % of all",
    "data_efficiency_<dataset>.png": "test ECE % (and true ECE %) against calib subjects (log2), one "
                                     "line and band per method",
    "shift_<dataset>.csv": "test-time shifts: per weights × method × shift, mean Dice, ECE and true "
                           "ECE (fractions) under the shift beside in-distribution, Wilcoxon p vs "
                           "the base model under the same shift",
    REPORT: "this report",
}


def _safe(name: str) -> str:
    # dataset and weights names come from run tags: keep them from making paths
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def table_md(dataset: str) -> str:
    return f"table_{_safe(dataset)}.md"


def table_tex(dataset: str) -> str:
    return f"table_{_safe(dataset)}.tex"


def pareto_csv(dataset: str) -> str:
    return f"pareto_{_safe(dataset)}.csv"


def train_time_csv(dataset: str) -> str:
    return f"train_time_{_safe(dataset)}.csv"


def estimators_csv(dataset: str) -> str:
    return f"estimators_{_safe(dataset)}.csv"


def data_efficiency_csv(dataset: str) -> str:
    return f"data_efficiency_{_safe(dataset)}.csv"


def data_efficiency_png(dataset: str) -> str:
    return f"data_efficiency_{_safe(dataset)}.png"


def shift_csv(dataset: str) -> str:
    return f"shift_{_safe(dataset)}.csv"


def slices(dataset: str) -> str:
    return f"slices_{_safe(dataset)}.png"


def fig1(dataset: str) -> str:
    return f"fig1_scatter_{_safe(dataset)}.png"


def fig2(dataset: str, weights: str) -> str:
    return f"fig2_reliability_{_safe(dataset)}_{_safe(weights)}.png"


def fig3(dataset: str, weights: str) -> str:
    return f"fig3_violins_{_safe(dataset)}_{_safe(weights)}.png"
