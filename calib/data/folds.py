"""K-fold splits over subjects: seeded and deterministic, or read from a folds file.

A folds file is JSON ``{"0": [subject ids], "1": [...], ...}`` (folds numbered 0..K-1, as JSON
object keys are text). Every subject is in exactly one fold; the fold is its held-out
(validation / test) fold in cross-validation.

The paper's public code (AxelJanRousseau/PostTrainCalibration, ``my_utils/my_dataloader.py``)
publishes its folds as case lists -- BraTS 2018: 5 x 57 cases, ISLES 2018: 19, 19, 19, 19, 18 --
shipped here verbatim in ``paper_folds/<dataset>.json`` (:func:`paper_folds_file`). Its cases are
named ``case_<n>`` by the preprocessing of JeroenBertels/optimizingdice, whose mapping from the
datasets' own subject ids is not published; a dataset whose ids differ gets a DataError naming
the ids that are missing (see docs/fidelity.md).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from calib import atomic_io
from .errors import DataError


def _check_ids(subject_ids: Sequence[str]) -> list[str]:
    ids = [str(s) for s in subject_ids]
    dupes = sorted(s for s, n in Counter(ids).items() if n > 1)
    if dupes:
        raise DataError(f"duplicated subject id(s): {', '.join(dupes)}")
    return ids


def make_folds(subject_ids: Sequence[str], n_folds: int, seed: int) -> dict[int, list[str]]:
    """Split subjects into ``n_folds`` folds of sizes differing by at most one.

    Deterministic: the same set of ids (in any order) and seed give the same folds. Folds are
    numbered 0..K-1 and each lists its ids sorted.
    """
    ids = sorted(_check_ids(subject_ids))
    if not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise DataError(f"n_folds must be an integer of at least 2, got {n_folds!r}")
    if n_folds > len(ids):
        raise DataError(f"n_folds={n_folds} exceeds the number of subjects ({len(ids)})")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds: dict[int, list[str]] = {k: [] for k in range(n_folds)}
    for rank, index in enumerate(order):
        folds[rank % n_folds].append(ids[index])
    return {k: sorted(v) for k, v in folds.items()}


def read_folds(path: Path, subject_ids: Sequence[str]) -> dict[int, list[str]]:
    """Read a folds file and validate it against ``subject_ids``.

    Errors (DataError, naming the file and the ids): not a JSON object of lists, fold keys other
    than 0..K-1, a subject in no fold, in two folds (or twice in one), or unknown to the dataset.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"folds file {path} not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"folds file {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise DataError(f"folds file {path} must be a JSON object {{fold: [subject ids]}}")
    try:
        folds = {int(k): [str(s) for s in v] for k, v in raw.items()}
    except ValueError:
        raise DataError(f"folds file {path}: fold keys must be integers, got {sorted(raw)}") from None
    if sorted(folds) != list(range(len(folds))) or len(folds) < 2:
        raise DataError(f"folds file {path}: folds must be numbered 0..K-1 with K >= 2, got {sorted(folds)}")
    known = set(_check_ids(subject_ids))
    listed = Counter(s for v in folds.values() for s in v)
    problems = []
    dupes = sorted(s for s, n in listed.items() if n > 1)
    if dupes:
        problems.append(f"in more than one fold (or twice): {', '.join(dupes)}")
    unknown = sorted(s for s in listed if s not in known)
    if unknown:
        problems.append(f"not in the dataset: {', '.join(unknown)}")
    missing = sorted(known - set(listed))
    if missing:
        problems.append(f"in no fold: {', '.join(missing)}")
    if problems:
        raise DataError(f"folds file {path}: subject(s) " + "; subject(s) ".join(problems))
    return {k: sorted(folds[k]) for k in sorted(folds)}


#: The folds files of the paper's public code, by dataset.
PAPER_FOLDS_DIR = Path(__file__).resolve().parent / "paper_folds"


def paper_folds_file(dataset: str) -> Path:
    """The published folds of the paper's public code for ``dataset`` (``brats18``, ``isles18``)."""
    path = PAPER_FOLDS_DIR / f"{dataset}.json"
    if not path.is_file():
        have = sorted(p.stem for p in PAPER_FOLDS_DIR.glob("*.json"))
        raise DataError(f"the paper's public code publishes no folds for dataset {dataset!r}; "
                        f"it has: {', '.join(have)}")
    return path


def write_folds(path: Path, folds: dict[int, list[str]]) -> None:
    """Write folds as the JSON that ``read_folds`` reads, atomically."""
    atomic_io.write_json(Path(path), {str(k): list(v) for k, v in sorted(folds.items())})
