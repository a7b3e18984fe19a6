"""``python -m calib.apply``: apply a FINISHED trial to new cases, NIfTI out on each input's grid.

    python -m calib.apply --run RUN_ID --input PATH [PATH ...] --out DIR [--tracking-uri URI]
    python -m calib.apply --model models:/NAME@ALIAS --input PATH --out DIR
    python -m calib.apply --model-dir DIR --input PATH --out DIR      (a model folder, no MLflow)

This entry point is the one place where ``calib`` reaches ``tracking`` (and so MLflow): the
contract names ``python -m calib.apply``, and resolving ``--run`` / ``--model`` means downloading
the run's trial_config.json, its weights and its upstream base weights. The import is lazy and
stays in this file; everything under ``calib.apply`` works on a local folder.

Exit status: 0 written; 1 bad input (the message names the file; nothing is written); 2 bad
arguments (unknown or unfinished run, unknown model URI, unreachable store).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m calib.apply",
                description="Apply a finished trial's fitted method (base U-Net + calibrator, or a "
                            "calibrator of another network's predictions) to new cases; write the "
                            "calibrated foreground probability (and the MC std) as NIfTI on each "
                            "input's own grid.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_ID", help="a FINISHED trial run of the sweep")
    src.add_argument("--model", metavar="URI", help="an MLflow model URI (models:/NAME@ALIAS, models:/m-...)")
    src.add_argument("--model-dir", type=Path, help="a model folder (trial_config.json + weights), no MLflow")
    p.add_argument("--input", required=True, nargs="+", type=Path,
                   help="subject folder(s) in the BraTS/ISLES layout, or prediction map(s) "
                        "(<case>.nii.gz, nnU-Net <case>.npz) for a calibrator of external predictions")
    p.add_argument("--out", required=True, type=Path, help="folder for <case>_prob.nii.gz (and <case>_std.nii.gz)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--mask", type=Path, help="external predictions: a mask NIfTI (default: the whole volume)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from calib.apply import apply_many, load_fitted

    with tempfile.TemporaryDirectory(prefix="calib-apply-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            from tracking.models import ModelNotFound, download_model  # the one calib -> tracking import

            try:
                model_dir = download_model(Path(tmp) / "model", run_id=args.run, model_uri=args.model,
                                           tracking_uri=args.tracking_uri)
            except ModelNotFound as exc:
                parser.error(str(exc))
        try:
            model = load_fitted(model_dir)
            results = apply_many(model, args.input, args.out, device=args.device, mask=args.mask)
        except ValueError as exc:  # DataError / ApplyError / MethodError: bad input, named
            print(f"error: {exc}", file=sys.stderr)
            return 1
    where = args.model_dir or args.model or f"run {args.run}"
    print(f"model: {model.dataset}/{model.config.get('weights', '')}/{model.method} ({model.stage}) from {where}")
    for r in results:
        for name, path in r.files.items():
            print(f"{r.case_id}: {name} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
