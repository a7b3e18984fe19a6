"""``python -m calib.data {phantom,check,preprocess,folds}``: thin entry points over calib.data.

Exit status: 0 success (check: no problem), 1 problems in the data (check found some,
preprocess refused bad input), 2 bad arguments (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from ..cli_args import OneLineParser, positive_float, positive_int
from .errors import DataError
from .layouts import SUPPORTED_DATASETS as DATASETS
from .synth import LABEL_NOISES
from ..vocabulary import NORMALISATIONS

EPILOG_PREPROCESS = """\
cache: each distinct preprocessing config + set of source files (path, size, mtime) gets its own
folder OUT/<dataset>-<hash16>/ holding <subject_id>.npz and meta.json; a changed config or source
never mixes with an old folder. A repeat run finds the folder complete, says "cache hit" and does
no work. The folder appears in one rename when every file in it is written, so an interrupted run
leaves only a hidden OUT/.<dataset>-<hash16>.tmp-* folder (safe to delete). The last line printed
on stdout is the cache folder. Bad input (anything `check` reports) stops the run and writes nothing.
"""

EPILOG_PHANTOM = """\
Writes the real on-disk layout (BraTS: DIR/{HGG,LGG}/<id>/<id>_{flair,t1,t1ce,t2,seg}.nii.gz;
ISLES: DIR/TRAINING/case_<n>/SMIR.Brain.XX.O.<kind>.<num>/...nii) plus one file per subject the
real data lacks: the probability each label voxel was drawn from (<id>_trueprob.nii.gz /
SMIR.Brain.XX.O.TrueProb.<num>), which loaders and `check` recognise and never count as a
modality. Default grid, the real one: brats18 240 240 155 at 1 mm; isles18 256 256 in-plane and
up to 22 slices of 4-8 mm. A smaller grid holds a proportionally smaller brain.
"""




def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m calib.data",
        description="Datasets for the calibration study: phantoms, integrity check, preprocessing cache, folds.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{phantom,check,preprocess,folds}")

    p = sub.add_parser("phantom", help="write a phantom dataset in the real BraTS/ISLES layout",
                       description="Write a seeded phantom dataset with known label probabilities.",
                       epilog=EPILOG_PHANTOM, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=(*DATASETS, "predictions"),
                   help="predictions: another network's overconfident output with labels, masks and "
                        "the true probabilities (calib.data.predictions_phantom)")
    p.add_argument("--out", required=True, type=Path, help="new or empty folder to create the dataset in")
    p.add_argument("--format", choices=("nifti", "nnunet"), default="nifti",
                   help="predictions only: <case>.nii.gz maps or nnU-Net's <case>.npz + <case>.pkl")
    p.add_argument("--scale", type=positive_float, default=3.0,
                   help="predictions only: the network's logit = scale x the true logit (default 3: overconfident)")
    p.add_argument("--subjects", type=positive_int, default=12, help="number of subjects (default 12)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--shape", type=positive_int, nargs=3, metavar=("X", "Y", "Z"),
                   help="grid along x y z; for isles18 Z is the maximum slice count")
    p.add_argument("--orientation", metavar="AXCODES",
                   help="stored orientation, e.g. RAS or PIR (default LPS, as the real files)")
    p.add_argument("--label-noise", choices=LABEL_NOISES, default=LABEL_NOISES[0],
                   help="brats18/isles18: label = 1[U < p*] with U independent per voxel (iid, "
                        "default: speckled labels) or a smooth field, uniform at every voxel "
                        "(correlated: coherent boundaries, as annotators draw)")

    c = sub.add_parser("check", help="verify a dataset root and list every problem",
                       description="Check a BraTS 2018 / ISLES 2018 root: missing or extra files, "
                       "unreadable or truncated files, shape/affine mismatches, label values, NaN/inf. "
                       "Exit 0 clean, 1 problems found, 2 bad arguments.")
    c.add_argument("--dataset", choices=DATASETS, help="default: detected from the layout under --root")
    c.add_argument("--root", type=Path, help="dataset folder as distributed (or a phantom)")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    e = c.add_argument_group("another network's predictions (instead of --root; calib.data.predictions)")
    e.add_argument("--predictions", type=Path, metavar="DIR",
                   help="<case>.nii.gz probability/logit maps, or nnU-Net's <case>.npz + <case>.pkl")
    e.add_argument("--labels", type=Path, metavar="DIR", help="<case>.nii.gz labels on the predictions' grid")
    e.add_argument("--masks", type=Path, metavar="DIR", help="<case>.nii.gz masks (default: the whole volume)")
    e.add_argument("--mask-threshold", type=float, default=0.0, help="inside = mask value > this (default 0)")
    e.add_argument("--values", choices=("probability", "logit"), default="probability")
    e.add_argument("--foreground", type=int, nargs="+", metavar="LABEL",
                   help="classes whose union is the foreground (multi-class predictions)")

    q = sub.add_parser("preprocess", help="preprocess a dataset root into the cache",
                       description="RAS orientation, resampling to --spacing mm, brain/head mask,\n"
                       "per-channel normalisation inside the mask, centre crop/pad to --shape; cached.",
                       epilog=EPILOG_PREPROCESS, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--dataset", choices=DATASETS, help="default: detected from the layout under --root")
    q.add_argument("--root", required=True, type=Path, help="dataset folder as distributed (or a phantom)")
    q.add_argument("--out", required=True, type=Path, help="cache folder (one subfolder per config)")
    q.add_argument("--spacing", type=positive_float, default=2.0, help="isotropic voxel size in mm (default 2)")
    q.add_argument("--shape", type=positive_int, nargs=3, default=[136, 136, 82], metavar=("X", "Y", "Z"),
                   help="output grid (default 136 136 82)")
    q.add_argument("--normalisation", choices=NORMALISATIONS, default=NORMALISATIONS[0],
                   help="subject: z-score per channel inside the mask (default); fixed: the paper's "
                   "public code, one shift/scale per modality")
    q.add_argument("--workers", type=positive_int, default=None,
                   help="processes (default: one per CPU, at most 8; 1 = no subprocess)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")

    f = sub.add_parser("folds", help="write a seeded K-fold split of a preprocessed cache",
                       description="Write JSON {fold: [subject ids]} for the subjects of a cache folder.")
    f.add_argument("--cache", required=True, type=Path, help="a cache folder printed by preprocess")
    f.add_argument("--folds", type=positive_int, default=5, help="number of folds (default 5)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True, type=Path, help="folds JSON file to write")
    for subparser in (p, c, q, f):
        subparser.set_defaults(parser=subparser)
    return parser


def _require_dir(parser: argparse.ArgumentParser, path: Path, flag: str) -> None:
    if not path.is_dir():
        parser.error(f"{flag} {path}: no such directory")


def _dataset(sub: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """--dataset, or the one the layout under --root shows (said on stderr)."""
    _require_dir(sub, args.root, "--root")
    if args.dataset:
        return args.dataset
    from .layouts import detect_dataset

    try:
        dataset = detect_dataset(args.root)
    except DataError as exc:
        sub.error(str(exc))
    print(f"dataset: {dataset} (detected from the layout of {args.root})", file=sys.stderr)
    return dataset


def _check_predictions(sub: argparse.ArgumentParser, args: argparse.Namespace):
    """The check of a predictions dataset; a missing folder or bad rule is a bad argument."""
    from .predictions import PredictionsConfig, check_predictions

    if args.labels is None:
        sub.error("--predictions needs --labels DIR")
    try:
        config = PredictionsConfig.make(args.predictions, args.labels, args.values, args.masks,
                                        args.mask_threshold, args.foreground)
    except DataError as exc:
        sub.error(str(exc))
    return check_predictions(config)


def _print_report(report) -> None:
    for problem in report.problems:
        print(problem)
    verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"{report.dataset} at {report.root}: {len(report.subjects)} subject(s), {verdict}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (bad arguments exit 2 via argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # calib.data reports progress ("cache hit", ...) through logging; show it on stderr here only.
    logger = logging.getLogger("calib.data")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        return _run(args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _run(args: argparse.Namespace) -> int:
    sub = args.parser  # the subcommand's parser, for its one-line errors

    if args.command == "phantom" and args.dataset == "predictions":
        from .predictions_phantom import write_prediction_phantoms

        if args.out.exists() and any(args.out.iterdir()):
            sub.error(f"--out {args.out}: not empty; give a new or empty folder")
        ids = write_prediction_phantoms(args.out, args.subjects, args.scale, args.seed, args.format,
                                        **({"base_shape": tuple(args.shape)} if args.shape else {}))
        print(f"{len(ids)} phantom prediction cases ({args.format}) in {args.out}: predictions/, "
              "labels/, masks/, truth/")
        return 0

    if args.command == "phantom":
        from .phantom import write_phantoms

        try:
            ids = write_phantoms(args.dataset, args.out, args.subjects, args.seed,
                                 tuple(args.shape) if args.shape else None, axcodes=args.orientation,
                                 label_noise=args.label_noise)
        except DataError as exc:
            sub.error(str(exc))
        print(f"{len(ids)} {args.dataset} phantom subjects in {args.out}")
        return 0

    if args.command == "check":
        from .check import check_dataset

        if args.predictions is not None:
            report = _check_predictions(sub, args)
        elif args.root is None:
            sub.error("give --root DIR (a BraTS/ISLES dataset) or --predictions DIR --labels DIR")
        else:
            report = check_dataset(_dataset(sub, args), args.root)
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
        else:
            _print_report(report)
        return 0 if report.ok else 1

    if args.command == "preprocess":
        from .preprocess import preprocess_dataset

        dataset = _dataset(sub, args)
        try:
            cache = preprocess_dataset(dataset, args.root, args.out, spacing=args.spacing,
                                       shape=tuple(args.shape), workers=args.workers,
                                       progress=not args.no_progress,
                                       normalisation=args.normalisation)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(cache)
        return 0

    from .cache import read_meta
    from .folds import make_folds, write_folds

    try:
        subjects = read_meta(args.cache)["subjects"]
        folds = make_folds(subjects, args.folds, args.seed)
    except DataError as exc:
        sub.error(str(exc))
    write_folds(args.out, folds)
    print(f"wrote {len(folds)} folds of {len(subjects)} subjects to {args.out}")
    return 0
