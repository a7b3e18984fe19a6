"""``python -m tracking.apply``: apply a FINISHED trial run or a registered model to new cases.

    python -m tracking.apply --run RUN_ID --input PATH [PATH ...] --out DIR [--tracking-uri URI]
    python -m tracking.apply --model models:/NAME@ALIAS --input PATH [PATH ...] --out DIR
    python -m tracking.apply --model-dir DIR --input PATH ...   (a model folder, as calib.apply)

The MLflow half of ``calib.apply``, kept here because calib never imports tracking or MLflow
(docs/architecture.md, "Dependency rule"): :func:`fetch_model_dir` downloads the run's or the
model's folder (``tracking.models.download_model``: trial_config.json, its weights or fitted
method, the upstream base weights) into a temporary folder, and :func:`calib.apply.cli.run` does
the rest with the same arguments as ``python -m calib.apply`` -- cases or folders of cases, a
progress bar, one line per file written, a summary line. Messages name the model by what the
user gave (``models:/...``, ``run <id>``), never by the temporary download path.

Exit status: 0 every case written; 1 some case bad (each named; the others written); 2 bad
arguments (unknown or unfinished run, unknown model URI, unreachable store).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from calib.apply import cli
from tracking import models

PROG = cli.MLFLOW_PROG


def model_origin(run_id: str | None = None, model_uri: str | None = None) -> str:
    """How messages name the model: the URI as given, or ``run <id>``."""
    return model_uri if model_uri is not None else f"run {run_id}"


def fetch_model_dir(dest: Path, run_id: str | None = None, model_uri: str | None = None,
                    tracking_uri: str | None = None) -> Path:
    """The model folder (:mod:`calib.apply.model`) of a FINISHED trial run or a model URI,
    downloaded under ``dest``; ``tracking.models.ModelNotFound`` (a ValueError naming the run or
    URI) when there is none."""
    # MLflow's own per-file download bars would interleave with the case progress bar
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return models.download_model(Path(dest), run_id=run_id, model_uri=model_uri, tracking_uri=tracking_uri)


def main(argv: list[str] | None = None) -> int:
    parser = cli.build_parser(PROG, mlflow=True)
    args = parser.parse_args(argv)
    if args.model_dir is not None:
        return cli.run(args, args.model_dir)
    origin = model_origin(args.run, args.model)
    with tempfile.TemporaryDirectory(prefix="calib-apply-") as tmp:
        try:
            model_dir = fetch_model_dir(Path(tmp) / "model", args.run, args.model, args.tracking_uri)
        except ValueError as exc:  # ModelNotFound: names the run / URI and the store
            parser.error(str(exc))
        return cli.run(args, model_dir, origin)


if __name__ == "__main__":
    sys.exit(main())
