"""Integrity check of a dataset root: every problem, each with the file it is about.

``check_dataset`` runs discovery (missing / extra / duplicate files, empty dataset) and then reads
every file of every subject: unreadable or truncated files, wrong dimensionality, shape or affine
mismatch between a subject's images and its label, label values outside the dataset's label set,
NaN/inf voxels, and true-probability maps outside [0, 1]. Preprocessing runs the same per-subject
check (``check_subject``) on the files it loads, so bad input never reaches the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import LABEL_VALUES, NONFINITE, PROB_RANGE, CheckReport, Problem
from .layouts import SubjectFiles, discover, get_layout
from .nifti import VoxelGrid, compare_grids, read_volume


def _inspect(
    path: Path,
    subject: str,
    problems: list[Problem],
    *,
    ndims: tuple[int, ...] = (3,),
    label_values: frozenset[int] | None = None,
    probability: bool = False,
) -> tuple[Path, VoxelGrid] | None:
    """Open and fully read one file (``nifti.read_volume``), appending its problems; its path
    and grid, or None when it cannot be read."""
    volume = read_volume(path, subject, problems, ndims)
    if volume is None:
        return None
    data = volume.data
    if np.issubdtype(data.dtype, np.floating):
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if n_bad:
            problems.append(Problem(subject, str(path), NONFINITE, f"{n_bad} NaN/inf voxel(s)"))
            data = np.where(np.isfinite(data), data, 0)
    if label_values is not None:
        values = np.unique(data)
        bad = [v for v in values.tolist() if v not in label_values]
        if bad:
            shown = ", ".join(f"{v:g}" for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
            allowed = ", ".join(str(v) for v in sorted(label_values))
            problems.append(
                Problem(subject, str(path), LABEL_VALUES, f"label values {{{shown}}} outside {{{allowed}}}")
            )
    if probability and data.size:
        lo, hi = float(data.min()), float(data.max())
        if lo < 0.0 or hi > 1.0:
            problems.append(Problem(subject, str(path), PROB_RANGE, f"values span [{lo:g}, {hi:g}], not in [0, 1]"))
    return Path(path), volume.grid


def check_subject(files: SubjectFiles, dataset: str, include_ignored: bool = True) -> list[Problem]:
    """Read every file of one subject and return its problems (empty when clean).

    Images, the true-probability map and (with ``include_ignored``) the ISLES 4D series are
    compared with the label's grid; when the label cannot be read, with the first readable image.
    """
    layout = get_layout(dataset)
    sid = files.subject_id
    problems: list[Problem] = []
    label = (
        _inspect(files.label, sid, problems, label_values=layout.label_values) if files.label else None
    )
    others = [_inspect(p, sid, problems) for p in files.images if p is not None]
    if files.true_prob is not None:
        others.append(_inspect(files.true_prob, sid, problems, probability=True))
    if include_ignored:
        # ISLES 4D perfusion: (X, Y, Z, T), some exports (X, Y, Z, 1, T); only its grid matters.
        others.extend(_inspect(p, sid, problems, ndims=(4, 5)) for p in files.ignored)
    readable = [v for v in others if v is not None]
    ref = label if label is not None else (readable[0] if readable else None)
    for info in readable:
        if ref is not None and info is not ref:  # voxel for voxel: preprocessing stacks them
            compare_grids(ref[1], ref[0], info[1], info[0], sid, problems)
    return problems


def check_dataset(dataset: str, root: Path) -> CheckReport:
    """Check the dataset under ``root``; see the module docstring for what is checked.

    Raises DataError for an unknown dataset name or a root that is not a directory (bad
    arguments); everything wrong with the data itself is a ``Problem`` in the report.
    """
    disc = discover(dataset, Path(root))
    report = CheckReport(dataset=dataset, root=str(root), subjects=disc.found, problems=list(disc.problems))
    for files in disc.all:
        report.problems.extend(check_subject(files, dataset))
    return report
