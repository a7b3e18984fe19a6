"""How many calibration subjects (issue 22, point 1): a fold's ``calib`` split cut to its first
``n`` subjects in one seeded order, so the post hoc calibrators can be fitted on fewer subjects.

* One permutation per (grid seed, fold) of the fold's sorted calib ids, drawn from its own
  stream (``[seed, fold, SUBSET_STREAM]``; calib.stages.make_split draws the split itself from
  ``[seed, fold]``), so the subsets are nested -- the first 2 contain the first 1 -- and the same
  seed gives the same subsets on every node.
* Only ``calib`` changes: train, val and test stay the fold's, so every size is scored on the same
  test subjects and early-stops on the same val subjects.
* Only under the ``honest`` protocol, where calib is a split of its own (docs/architecture.md,
  "Protocols").
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from calib.stages import FoldSplit, StageError, make_split
from calib.vocabulary import ALL_CALIB_SUBJECTS, PROTOCOLS

#: Third entropy word of the subset order's generator: a stream apart from make_split's draw.
SUBSET_STREAM = 1
#: The grid key the sizes come from, named in every error.
GRID_KEY = "calib_subjects"
HONEST = PROTOCOLS[0]


def subset_order(calib_ids, seed: int, fold: int) -> tuple[str, ...]:
    """The fold's calib ids in the seeded order whose first ``n`` are the size-``n`` subset."""
    ids = sorted(calib_ids)
    rng = np.random.default_rng([seed, fold, SUBSET_STREAM])
    return tuple(ids[i] for i in rng.permutation(len(ids)))


def calib_subset(split: FoldSplit, size: int | str, seed: int, dataset: str = "") -> FoldSplit:
    """``split`` with ``calib_ids`` cut to the first ``size`` of :func:`subset_order` (the whole
    split for ``"all"``); train, val and test unchanged.

    Raises StageError naming ``calib_subjects`` for a protocol other than honest, a size below 1
    or a size above the fold's calib count.
    """
    where = f"{dataset + ' ' if dataset else ''}fold {split.fold}"
    if split.protocol != HONEST:
        raise StageError(f"{GRID_KEY}: needs protocol {HONEST!r} (a calib split of its own), "
                         f"{where} runs {split.protocol!r}")
    if size == ALL_CALIB_SUBJECTS:
        return split
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise StageError(f"{GRID_KEY}: a size is a positive integer or {ALL_CALIB_SUBJECTS!r}, got {size!r}")
    have = len(split.calib_ids)
    if size > have:
        raise StageError(f"{GRID_KEY}: size {size} is larger than the calib split of {where} "
                         f"({have} subjects)")
    return replace(split, calib_ids=subset_order(split.calib_ids, seed, split.fold)[:size])


def calib_count(n_subjects: int, fold: int, n_folds: int, protocol: str = HONEST, seed: int = 0,
                val_fraction: float = 0.2, calib_fraction: float = 0.2) -> int:
    """Subjects in the calib split of ``fold`` when ``n_subjects`` are dealt into ``n_folds``
    folds as calib.data.make_folds deals them (sizes differing by at most one): the split rule
    of calib.stages.make_split on stand-in ids, known before any data is read."""
    ids = [f"s{i:05d}" for i in range(n_subjects)]
    folds = {k: ids[k::n_folds] for k in range(n_folds)}
    split = make_split(Path("."), folds, fold, protocol, seed, val_fraction, calib_fraction)
    return len(split.calib_ids)
