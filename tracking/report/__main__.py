"""CLI: ``python -m tracking.report --experiment NAME [--tracking-uri URI] [--sweep-run ID] --out DIR``.

Exit status: 0 done; 2 bad arguments (unknown experiment or sweep run, missing store); 1 bad data
in the store (the message names the run, artifact or subject).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from tracking.report.fetch import DEFAULT_TRACKING_URI, SCOPES
    from tracking.report.headline import HEADLINE_BY
    from tracking.report.selection import SELECT_BY

    p = argparse.ArgumentParser(
        prog="python -m tracking.report",
        description="Tables 1-2, Figures 1-3, Wilcoxon tests and Pareto fronts of a calibration "
                    "sweep, from MLflow alone.")
    p.add_argument("--experiment", required=True, help="MLflow experiment name (e.g. calib-demo)")
    p.add_argument("--tracking-uri", default=None,
                   help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})")
    p.add_argument("--sweep-run", default=None,
                   help="parent run id of one launch (default: the experiment's newest sweep run)")
    p.add_argument("--out", required=True, type=Path, help="folder for the report files")
    p.add_argument("--select-by", choices=SELECT_BY, default="val_loss",
                   help="learning-rate selection criterion (default: val_loss)")
    p.add_argument("--headline-by", choices=HEADLINE_BY, default="val_ece",
                   help="the headline's held-out rule: the calibrator with the lowest mean val ECE "
                        "(val_ece, default) or val NLL (val_nll) over folds, tested once on test")
    p.add_argument("--holm", action="store_true",
                   help="Holm-correct the p-values within each dataset x weights x metric family")
    p.add_argument("--scope", choices=SCOPES, default=None,
                   help="runs used: 'sweep' = children of --sweep-run (default with --sweep-run), "
                        "'experiment' = every launch of the experiment, newest run per trial key "
                        "(default without)")
    p.add_argument("--no-log", action="store_true",
                   help="do not log the files as artifacts of the sweep run")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.scope == "sweep" and not args.sweep_run:
        parser.error("--scope sweep needs --sweep-run")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.simplefilter("ignore")  # report warnings are printed below and listed in report.md

    from tracking.report import ReportError, build_report

    try:
        outcome = build_report(args.experiment, args.out, args.tracking_uri, args.sweep_run,
                               args.select_by, args.holm, args.scope, not args.no_log,
                               args.headline_by)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for message in outcome.warnings:
        print(f"warning: {message}", file=sys.stderr)
    print(f"report: {len(outcome.files)} files in {outcome.out_dir}"
          + (f", logged to run {outcome.logged_to}" if outcome.logged_to else ""))
    print(f"  {outcome.out_dir / 'report.md'}")
    for r in outcome.registered:
        print(f"  registered {r.uri}: {r.dataset}/{r.weights}/{r.method}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
