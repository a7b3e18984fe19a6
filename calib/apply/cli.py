"""The command line of ``python -m calib.apply`` (a model folder), shared by ``python -m tracking.apply``.

    python -m calib.apply --model-dir DIR --input PATH [PATH ...] --out DIR [--mask NIFTI|DIR]
                          [--device cpu] [--no-progress]

``--input`` takes cases or folders of them (:mod:`calib.apply.cases`). Each case is applied in
turn, with a progress bar on stderr (tqdm, else one counted line per case); stdout gets one line
per file written and a summary line. A bad case is named on stderr and the others are still
done. A trial run or a registered model (``--run``, ``--model``) is MLflow's, which calib never
imports: ``python -m tracking.apply`` takes the same arguments plus those two, downloads the
model folder and runs :func:`run` on it; here they are one error naming that command.

Exit status: 0 every case written; 1 some case bad (each named; the others written) or the model
folder unreadable; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..cli_args import OneLineParser
from .cases import CaseOutcome, apply_cases, find_cases
from .model import load_fitted

PROG = "python -m calib.apply"
MLFLOW_PROG = "python -m tracking.apply"



def build_parser(prog: str = PROG, mlflow: bool = False) -> argparse.ArgumentParser:
    """The arguments of ``calib.apply``; ``mlflow`` True adds the model sources only
    ``tracking.apply`` resolves (``--run``, ``--model``, ``--tracking-uri``). Without it they are
    still parsed, so that :func:`main` can name the command that takes them."""
    p = OneLineParser(prog=prog, description=(
        "Apply a finished trial's fitted method (base U-Net + calibrator, or a calibrator of another "
        "network's predictions) to new cases; write the calibrated foreground probability (and the MC "
        "std) as NIfTI on each input's own grid."),
        epilog=None if mlflow else f"A FINISHED trial run or a registered model: {MLFLOW_PROG} --run RUN_ID | "
                                   "--model URI, with the same other arguments.")
    src = p.add_mutually_exclusive_group(required=True)
    hidden = None if mlflow else argparse.SUPPRESS
    src.add_argument("--run", metavar="RUN_ID", help=hidden or "a FINISHED trial run of the sweep")
    src.add_argument("--model", metavar="URI",
                     help=hidden or "an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-...)")
    src.add_argument("--model-dir", type=Path, help="a model folder (trial_config.json + weights), no MLflow")
    p.add_argument("--input", required=True, nargs="+", type=Path,
                   help="cases or folders of cases: subject folder(s) in the BraTS/ISLES layout or a "
                        "dataset folder of them, for a U-Net model; prediction map(s) (<case>.nii.gz, "
                        "nnU-Net <case>.npz) or a folder of them (nnU-Net's predict output), for a "
                        "calibrator of external predictions")
    p.add_argument("--out", required=True, type=Path, help="folder for <case>_prob.nii.gz (and <case>_std.nii.gz)")
    p.add_argument("--tracking-uri", help=hidden or "MLflow tracking URI (default $MLFLOW_TRACKING_URI, "
                                                    "else sqlite:///./mlflow.db)")
    p.add_argument("--mask", type=Path, help="external predictions: a mask NIfTI for every case, or a folder "
                                             "of <case>.nii.gz masks (default: the whole volume)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _progress(outcomes: Iterator[CaseOutcome], total: int, show: bool) -> Iterable[CaseOutcome]:
    """``outcomes`` with a progress display on stderr: tqdm's bar where tqdm is installed, else
    one ``[i/n] <case>`` line per case; none for a single case or with ``show`` False."""
    if not show or total < 2:
        return outcomes
    try:
        from tqdm import tqdm  # optional: a plain counted line without it
    except ImportError:
        def counted():
            for i, outcome in enumerate(outcomes, 1):
                print(f"[{i}/{total}] {outcome.case.case_id}: {'ok' if outcome.ok else 'FAILED'}",
                      file=sys.stderr, flush=True)
                yield outcome
        return counted()
    return tqdm(outcomes, total=total, desc="cases", unit="case", file=sys.stderr)


def _say(message: str) -> None:
    """A line on stderr that does not tear tqdm's bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(message, file=sys.stderr, flush=True)
    else:
        tqdm.write(message, file=sys.stderr)


def run(args: argparse.Namespace, model_dir: Path, origin: str | None = None) -> int:
    """Apply the model folder ``model_dir`` to every case ``args.input`` names (module doc);
    ``origin``: what the user named the model by, for the messages (default: the folder)."""
    try:
        model = load_fitted(model_dir, origin)
    except ValueError as exc:  # ApplyError: the file at fault named
        print(f"error: {exc}", file=sys.stderr)
        return 1
    cases = find_cases(model, args.input, args.mask)
    print(f"model: {model.describe()}; {len(cases)} case(s)", flush=True)
    failed: list[str] = []
    written = 0
    for outcome in _progress(apply_cases(model, cases, args.out, device=args.device), len(cases),
                             not args.no_progress):
        if outcome.ok:
            written += 1
            for name, path in outcome.result.files.items():
                print(f"{outcome.case.case_id}: {name} -> {path}", flush=True)
        else:
            failed.append(outcome.case.case_id)
            _say(f"error: {outcome.case.case_id}: {outcome.error}")
    summary = f"applied {written} of {len(cases)} case(s) -> {args.out}"
    if failed:
        summary += f"; {len(failed)} failed: {', '.join(failed)}"
    print(summary, flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m calib.apply``: a model folder only (``--run`` / ``--model`` name ``tracking.apply``)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.model_dir is None:
        flag = "--run" if args.run is not None else "--model"
        parser.error(f"{flag} is resolved through MLflow, which calib does not import; run "
                     f"`{MLFLOW_PROG} {shlex.join(argv)}` (the same arguments), or give --model-dir")
    return run(args, args.model_dir)
