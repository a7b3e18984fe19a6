"""The command line of ``python sweeps/launch.py``: arguments -> LaunchOptions -> launch()."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from calib.cli_args import OneLineParser, positive_float, positive_int
from sweeps.cost.devices import DEFAULT_DEVICE, DEVICES
from sweeps.grid import DATA_ROOT_ENV, SEARCHES, builtin_grids
from sweeps.launch_sweep import LaunchOptions, launch
from tracking.lease import DEFAULT_TIMEOUT_S




def _seconds(text: str) -> float:
    return positive_float(text, "a number of seconds > 0")


class _LaunchParser(OneLineParser):
    """The launch's argument errors read as its other errors do: ``error: ...`` on one line."""

    line = "error: {message} (see --help)\n"


def build_parser() -> argparse.ArgumentParser:
    p = _LaunchParser(
        prog="python sweeps/launch.py",
        description="Run the calibration study's grid on Ray Tune, one MLflow run per trial.",
        epilog=("Examples:\n"
                "  python sweeps/launch.py --grid demo\n"
                "  python sweeps/launch.py --grid paper --data-root /data --dry-run\n"
                "  python sweeps/launch.py --grid paper --data-root /data --address ray://head:10001 \\\n"
                "      --tracking-uri http://mlflow:5000 --resume"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True,
                   help=f"a built-in grid ({', '.join(builtin_grids())}) or a path to a grid .yaml")
    p.add_argument("--dry-run", action="store_true",
                   help="print trials per stage and method, resources and what MLflow already "
                        "holds; start nothing")
    p.add_argument("--estimate", action="store_true",
                   help="with --dry-run: expected GPU-hours and wall time per stage, with their "
                        "assumptions (sweeps/cost/)")
    p.add_argument("--gpus", type=positive_int, default=1,
                   help="devices the --estimate packs trials on (default 1)")
    p.add_argument("--device", choices=tuple(DEVICES), default=DEFAULT_DEVICE,
                   help="the device roofline --estimate converts counted FLOPs with (peak x assumed "
                        f"utilisation, printed; default {DEFAULT_DEVICE})")
    p.add_argument("--throughput", type=Path, default=None, metavar="FILE",
                   help="--estimate from the JSON line of `bench/unet.py --json` run on the target "
                        "device (overrides --device)")
    p.add_argument("--resume", action="store_true",
                   help="run only the trials not FINISHED in the experiment (matched by trial "
                        "key); close runs of a dead launch (ended, or its heartbeat older than "
                        "its --lease-timeout) as KILLED, never those of a live one")
    p.add_argument("--address", help="Ray cluster to connect to (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, "
                                          "else sqlite:///./mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default calib-<grid name>)")
    p.add_argument("--data-root", action="append", default=[], metavar="[DATASET=]DIR",
                   help=f"folder holding <dataset>/ folders, or one dataset's folder as "
                        f"DATASET=DIR; repeatable (default: the grid's, then ${DATA_ROOT_ENV})")
    p.add_argument("--search", choices=SEARCHES,
                   help="optuna: pick the MC learning rates by TPE over log-uniform "
                        "[1e-5, 1e-3] with the grid's budget")
    p.add_argument("--max-concurrent", type=positive_int, help="at most N trials at once")
    p.add_argument("--work-dir", help="cache, trial checkpoints, Ray results and report folder; shared "
                                      "by all nodes (default: the grid's, calib_store)")
    p.add_argument("--storage-path", help="Ray Tune's results storage; shared by all nodes "
                                          "(default <work-dir>/ray_results)")
    p.add_argument("--num-cpus", type=positive_int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--force-concurrent", action="store_true",
                   help="start although another launch is live on the experiment; run only the "
                        "trials it has not claimed (each trial runs in one launch only)")
    p.add_argument("--lease-timeout", type=_seconds, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="this launch counts as dead (another --resume may take over) once its "
                        "heartbeat, refreshed every min(30, SECONDS/6) s, is older than this "
                        f"(default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--system-metrics", action=argparse.BooleanOptionalAction, default=None,
                   help="log system/* metrics (CPU, memory, disk, network, GPU) on every trial run "
                        "(default: the grid's execution.system_metrics; on in the paper grid)")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")
    return p


def parse_data_roots(values: list[str]) -> dict[str, str]:
    """``["/data"]`` -> ``{"*": "/data"}``; ``["brats18=/d/b"]`` -> ``{"brats18": "/d/b"}``."""
    roots: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if sep and name and "/" not in name:
            roots[name] = path
        else:
            roots["*"] = v
    return roots


def options_from_args(args: argparse.Namespace) -> LaunchOptions:
    if args.estimate and not args.dry_run:
        parser_error = "--estimate needs --dry-run (an estimate starts nothing)"
        print(f"error: {parser_error}", file=sys.stderr)
        raise SystemExit(2)
    return LaunchOptions(grid=args.grid, dry_run=args.dry_run, resume=args.resume,
                         estimate=args.estimate, gpus=args.gpus, device=args.device,
                         throughput=args.throughput,
                         address=args.address, tracking_uri=args.tracking_uri,
                         experiment=args.experiment, data_roots=parse_data_roots(args.data_root),
                         search=args.search, max_concurrent=args.max_concurrent,
                         work_dir=args.work_dir, storage_path=args.storage_path,
                         num_cpus=args.num_cpus, report=not args.no_report, verbose=args.verbose,
                         force_concurrent=args.force_concurrent, lease_timeout=args.lease_timeout,
                         system_metrics=args.system_metrics)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and launch; the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return launch(options_from_args(args))
    except KeyboardInterrupt:
        print("interrupted: this launch's runs were closed as KILLED; continue with --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
