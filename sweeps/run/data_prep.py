"""Getting a dataset ready for its trials: phantoms on first use, the preprocessed cache, folds.

:func:`prepare_dataset` runs once per dataset and launch, as a Ray task (so on a cluster it runs
where the data volume is mounted, not on the laptop that launched the sweep). It is idempotent:
phantoms are written only when their folder is missing, and calib.data keys its cache by the
preprocessing config and the source files, so a relaunch finds the cache and returns at once.
The cache folder must be visible at the same path on every node (a shared volume) -- the trials
read it directly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from calib.data import make_folds, paper_folds_file, preprocess_dataset, read_folds, read_meta, write_phantoms
from calib.data.predictions import PredictionsConfig, import_predictions
from sweeps.grid import DatasetSpec, GridConfig


@dataclass(frozen=True)
class PreparedData:
    """A dataset ready for trials: its cache folder and its folds (fold -> subject ids)."""

    dataset: str
    cache_dir: str
    folds: dict[int, list[str]]
    #: test-time shifts: name -> {"cache_dir", "paired"} (calib.shift_eval); {} without the grid key
    shifts: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "cache_dir": self.cache_dir,
                "folds": {int(k): list(v) for k, v in self.folds.items()},
                **({"shifts": {k: dict(v) for k, v in self.shifts.items()}} if self.shifts else {})}


def ensure_phantoms(spec: DatasetSpec) -> None:
    """Write the dataset's phantoms into its root unless they are already there.

    calib.data's writer keeps the recipe (dataset, subjects, seed, shape, generator version)
    inside the folder and is the one check: the same phantoms are used as they are (also when a
    concurrent launch writes them at the same time), a root holding anything else is one
    DataError naming what it holds and what the grid asks for.
    """
    assert spec.phantom is not None and spec.root is not None
    ph = spec.phantom
    write_phantoms(spec.name, spec.root, ph.subjects, ph.seed, ph.shape, label_noise=ph.label_noise)


def prepare_dataset(grid: GridConfig, dataset: str, workers: int | None = None) -> PreparedData:
    """Phantoms (if the grid asks for them), the preprocessed cache -- or, for a predictions
    dataset, the imported one -- and the folds.

    Raises calib.data.DataError (a message naming the file or subject) when the data are unusable.
    """
    spec = grid.dataset(dataset)
    if spec.predictions is not None:
        cache = import_external(grid, dataset)
    else:
        if spec.root is None:
            raise ValueError(f"dataset {dataset!r} has no data root")
        if spec.phantom is not None:
            ensure_phantoms(spec)
        cache = preprocess_dataset(dataset, spec.root, grid.cache_dir, spacing=grid.preprocessing.spacing,
                                   shape=grid.preprocessing.shape, workers=workers, progress=False,
                                   normalisation=grid.preprocessing.normalisation)
    subjects = list(read_meta(cache)["subjects"])
    if grid.folds.is_paper:  # the public code's published case lists; other ids: one clear error
        if spec.predictions is not None:
            raise ValueError(f"folds of {dataset}: the paper's folds list BraTS/ISLES cases; give a "
                             "folds file of these cases, or seeded folds")
        folds = read_folds(paper_folds_file(dataset), subjects)
    elif grid.folds.file is not None:
        folds = read_folds(grid.folds.file, subjects)
    else:
        folds = make_folds(subjects, grid.folds.n_folds, grid.folds.seed)
    missing = [f for f in range(grid.folds.n_folds) if f not in folds]
    if missing:
        raise ValueError(f"folds of {dataset}: the grid expects folds 0..{grid.folds.n_folds - 1}, "
                         f"missing {missing}")
    return PreparedData(dataset=dataset, cache_dir=str(cache),
                        folds={int(k): list(v) for k, v in folds.items()},
                        shifts=prepare_shifts(grid, spec, folds, workers))


def prepare_shifts(grid: GridConfig, spec: DatasetSpec, folds: dict[int, list[str]],
                   workers: int | None = None) -> dict[str, dict]:
    """Each test-time shift of ``spec`` (sweeps.grid.shifts) written and preprocessed like the
    dataset into its own cache; name -> ``{"cache_dir", "paired"}`` (paired: the same subject ids).

    A phantom shift renders the same subjects, seed and recipe with the shift's rendering, but only
    the test subjects of the folds that run (``folds``: fold -> test ids; a shift is scored on test
    subjects only, and rendering a subject costs seconds): all of them when every fold runs, else
    into ``<dataset>-test-<hash of the ids>`` beside ``<dataset>``, so another ``folds.only`` finds
    its own folder instead of a conflicting recipe.
    """
    tested = shift_subjects(grid, folds)
    suffix = "" if tested is None else f"-test-{_ids_hash(tested)}"
    out = {}
    for s in spec.shifts:
        root = s.root
        if s.phantom:
            ph = spec.phantom
            root = root.with_name(root.name + suffix)
            write_phantoms(spec.name, root, ph.subjects, ph.seed, ph.shape, label_noise=ph.label_noise,
                           shift=dict(s.render), only=tested)
        cache = preprocess_dataset(spec.name, root, grid.cache_dir, spacing=grid.preprocessing.spacing,
                                   shape=grid.preprocessing.shape, workers=workers, progress=False,
                                   normalisation=grid.preprocessing.normalisation)
        out[s.name] = {"cache_dir": str(cache), "paired": s.paired}
    return out


def shift_subjects(grid: GridConfig, folds: dict[int, list[str]]) -> list[str] | None:
    """The subjects a phantom shift must hold: the test ids of the folds that run, sorted; None
    (all of them) when every fold runs."""
    runs = grid.folds.run_folds()
    if set(runs) >= set(folds):
        return None
    return sorted({sid for f in runs for sid in folds[f]})


def _ids_hash(ids: list[str]) -> str:
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:8]


def import_external(grid: GridConfig, dataset: str) -> Path:
    """Another network's predictions imported into the caches (calib.data.predictions: checked,
    put in RAS order, written as a preprocessed + logit cache, keyed by rule and files)."""
    p = grid.dataset(dataset).predictions
    config = PredictionsConfig.make(p.predictions, p.labels, p.values, p.masks, p.mask_threshold, p.foreground)
    return import_predictions(config, grid.cache_dir, dataset)
