"""The plan's side of ``calib_subjects`` (sweeps.grid.subjects; issue 22, point 1): which sizes
a calibrate trial is expanded into, and the sizes checked against the calib splits the launch
will have wherever the subject count is known before any data is read.

Known at plan time: an image dataset with a phantom spec (its subject count) dealt into the
grid's folds (no folds file), split by calib.stages.make_split's rule (calib.subsets.calib_count).
Otherwise (real data, a folds file, another network's predictions) the trial checks its own split
when it builds it (calib.subsets.calib_subset, a StageError naming the key).
"""

from __future__ import annotations

from sweeps.grid import GridConfig, GridError

#: The sizes of a method the key does not cover: one trial, on the whole calib split, keyed as
#: without the key.
UNCOVERED = (None,)


def subject_sizes(grid: GridConfig, method: str) -> tuple[int | str | None, ...]:
    """The ``calib_subjects`` values ``method``'s calibrate trials are expanded into."""
    cs = grid.calib_subjects
    return cs.sizes if cs is not None and cs.covers(method) else UNCOVERED


def check_sizes(grid: GridConfig) -> None:
    """Raise a GridError naming ``calib_subjects`` when its largest size exceeds the smallest
    calib split (dataset and fold named with its count) among the datasets whose subject count
    the plan knows (module doc)."""
    cs = grid.calib_subjects
    ints = [s for s in (cs.sizes if cs is not None else ()) if isinstance(s, int)]
    if not ints or grid.folds.file is not None:
        return
    # calib.stages draws the split (torch comes with it): only for a grid that sets the key
    from calib.subsets import calib_count

    s = grid.split
    counts = [(calib_count(d.phantom.subjects, fold, s.n_folds, s.protocol, s.seed, s.val_fraction,
                           s.calib_fraction), d.name, fold)
              for d in grid.datasets if d.phantom is not None and d.predictions is None
              for fold in grid.folds.run_folds()]
    if not counts:
        return
    have, dataset, fold = min(counts)
    if max(ints) > have:
        raise GridError(f"grid {grid.source.name}: calib_subjects: size {max(ints)} is larger than "
                        f"the calib split of {dataset} fold {fold} ({have} subjects)")
