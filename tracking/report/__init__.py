"""The study's report from MLflow alone: LR selection, Wilcoxon tests, Pareto fronts, Tables 1–2,
Figures 1–3, subject-level calibration.

    python -m tracking.report --experiment NAME [--tracking-uri URI] [--sweep-run ID] --out DIR

or, from Python, ``build_report(experiment, out, ...)``. See build.py for the files written,
fetch.py for which runs are used and selection.py for the learning-rate rule.
"""

from tracking.report.build import ReportData, ReportOutcome, build_report, compute_report, write_report
from tracking.report.errors import ReportArgumentError, ReportError, ReportWarning
from tracking.report.fetch import DEFAULT_TRACKING_URI, SCOPES
from tracking.report.files import FILE_DESCRIPTIONS
from tracking.report.selection import SELECT_BY

__all__ = ["DEFAULT_TRACKING_URI", "FILE_DESCRIPTIONS", "SCOPES", "SELECT_BY", "ReportArgumentError",
           "ReportData", "ReportError", "ReportOutcome", "ReportWarning", "build_report", "compute_report",
           "write_report"]
