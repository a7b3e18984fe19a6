"""The grid as frozen, validated config objects (what the rest of the sweep reads).

:func:`sweeps.config.load_grid` builds a :class:`GridConfig` from a grid file; the file's schema
and every default are in :mod:`sweeps.grid_schema`, so these classes declare none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from calib.methods.recipes import resolve
from calib.schedule import TrainConfig
from calib.vocabulary import CALIBRATE, EXTERNAL_WEIGHTS, IMAGES_KIND, PREDICTIONS_KIND
from sweeps.grid_schema import PAPER_FOLDS


def frozen_map(d: Mapping | None = None) -> Mapping:
    """A read-only view of a copy of ``d`` (what the frozen dataclasses hold)."""
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class Resources:
    """Ray resources of one trial; ``gpu`` may be fractional (several small trials per GPU)."""

    cpu: float
    gpu: float

    def as_ray(self) -> dict[str, float]:
        """The bundle for ``tune.PlacementGroupFactory``: ``{"CPU": .., "GPU": ..}``."""
        bundle = {"CPU": float(self.cpu)}
        if self.gpu:
            bundle["GPU"] = float(self.gpu)
        return bundle

    def __str__(self) -> str:
        gpu = f", gpu {self.gpu:g}" if self.gpu else ""
        return f"cpu {self.cpu:g}{gpu}"


@dataclass(frozen=True)
class PhantomSpec:
    """Phantoms written on first use (calib.data.write_phantoms) when the dataset root is empty."""

    subjects: int
    seed: int
    shape: tuple[int, int, int] | None
    label_noise: str = "iid"


@dataclass(frozen=True)
class PredictionsSpec:
    """Another network's predictions as a dataset (``kind: predictions``; calib.data.predictions):
    its folders and how to read them."""

    predictions: Path
    labels: Path
    values: str
    masks: Path | None
    mask_threshold: float
    foreground: tuple[int, ...] | None

    def to_dict(self) -> dict:
        return {"kind": PREDICTIONS_KIND, "predictions": str(self.predictions), "labels": str(self.labels),
                "values": self.values, "masks": None if self.masks is None else str(self.masks),
                "mask_threshold": self.mask_threshold,
                "foreground": None if self.foreground is None else list(self.foreground)}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the grid and where its raw data lives (None: not resolved, dry-run only).

    ``predictions``: set for another network's predictions (``root`` is then their folder); such
    a dataset has no pretrain/base training, only the logit-based methods, weights ``external``.
    """

    name: str
    root: Path | None
    phantom: PhantomSpec | None = None
    predictions: PredictionsSpec | None = None

    @property
    def kind(self) -> str:
        return PREDICTIONS_KIND if self.predictions is not None else IMAGES_KIND


@dataclass(frozen=True)
class Preprocessing:
    """Arguments of calib.data.preprocess_dataset that change the cached volumes."""

    spacing: float
    shape: tuple[int, int, int]
    normalisation: str  # calib.vocabulary.NORMALISATIONS


@dataclass(frozen=True)
class Folds:
    """Cross-validation folds: seeded (calib.data.make_folds) or read from ``file`` (a path, or
    :data:`PAPER_FOLDS` for the public code's published case lists)."""

    n_folds: int
    seed: int
    file: Path | str | None
    #: The folds whose trials run (empty: all): a smoke run or a pilot runs one fold of the
    #: same K-fold split, so its trials and their keys are those of the full study.
    only: tuple[int, ...]

    def run_folds(self) -> tuple[int, ...]:
        return self.only or tuple(range(self.n_folds))

    @property
    def is_paper(self) -> bool:
        return self.file == PAPER_FOLDS


@dataclass(frozen=True)
class Network:
    """The U-Net: the paper's (``UNetConfig.paper``) or a tiny one (``UNetConfig.tiny``)."""

    preset: str
    levels: int  # tiny only
    base: int  # tiny only
    #: L2 penalty on the conv kernels per dataset (Keras ``l2``; calib.schedule.TrainConfig);
    #: the public code: 1e-5 on the BraTS net, 0 on ISLES. Missing datasets: 0.
    weight_decay: Mapping[str, float]

    def weight_decay_for(self, dataset: str) -> float:
        return float(self.weight_decay.get(dataset, 0.0))


@dataclass(frozen=True)
class MethodSpec:
    """One calibration method of the grid.

    ``lrs``: the swept learning rates (an axis, only for methods with ``method_has_lr``);
    ``lr_by_weights``: one fixed LR per base weights (fine-tuning); neither: the method's recipe
    decides. ``params`` go to the method as given (it validates them).
    """

    name: str
    params: Mapping[str, Any]
    lrs: tuple[float, ...]
    lr_by_weights: Mapping[str, float]

    def learning_rates(self, weights: str) -> tuple[float | None, ...]:
        """The LR values this method takes for ``weights``; ``(None,)`` when it has no LR axis."""
        if self.lrs:
            return self.lrs
        if self.lr_by_weights:
            return (self.lr_by_weights[weights],)
        return (None,)


@dataclass(frozen=True)
class Search:
    """How MC learning rates are chosen: the grid's list, or Optuna TPE with the same budget."""

    kind: str
    lr_low: float
    lr_high: float
    samples: int | None  # None: as many as the grid has LRs
    methods: tuple[str, ...]
    seed: int


@dataclass(frozen=True)
class Execution:
    """How trials run; none of it changes a result (not part of any trial key)."""

    max_failures: int
    max_concurrent: int | None
    resources: Mapping[str, Resources]  # per stage
    method_resources: Mapping[str, Resources]
    system_metrics: bool  # system/* metrics (CPU, memory, GPU) on every trial run

    def resources_for(self, stage: str, method: str) -> Resources:
        """Method-specific resources for calibrate trials, else the stage's."""
        if stage == CALIBRATE and method in self.method_resources:
            return self.method_resources[method]
        return self.resources[stage]


@dataclass(frozen=True)
class GridConfig:
    """A whole grid, validated. ``training`` maps each stage to its TrainConfig fields."""

    name: str
    source: Path
    seed: int
    protocol: str
    datasets: tuple[DatasetSpec, ...]
    cache_dir: Path
    preprocessing: Preprocessing
    folds: Folds
    network: Network
    weights: tuple[str, ...]
    training: Mapping[str, Mapping[str, Any]]
    methods: tuple[MethodSpec, ...]
    search: Search
    execution: Execution
    work_dir: Path
    val_fraction: float
    calib_fraction: float

    def dataset(self, name: str) -> DatasetSpec:
        return next(d for d in self.datasets if d.name == name)

    def method(self, name: str) -> MethodSpec:
        return next(m for m in self.methods if m.name == name)

    def weights_for(self, dataset: str) -> tuple[str, ...]:
        """The base weights a dataset's trials run with: the grid's, or ``external`` for predictions."""
        return (EXTERNAL_WEIGHTS,) if self.dataset(dataset).predictions is not None else self.weights

    def to_dict(self) -> dict:
        """The resolved grid (defaults filled in, paths absolute) in the grid-file schema: the
        YAML of it loads back into an equal GridConfig."""
        def res(r: Resources) -> dict:
            return {"cpu": r.cpu, "gpu": r.gpu}

        def phantom(d: DatasetSpec) -> dict:
            if d.predictions is not None:
                return d.predictions.to_dict()
            if d.phantom is None:
                return {}
            ph = d.phantom
            return {"phantom": {"subjects": ph.subjects, "seed": ph.seed,
                                "shape": None if ph.shape is None else list(ph.shape)}}

        def lr(m: MethodSpec):
            return list(m.lrs) if m.lrs else (dict(m.lr_by_weights) if m.lr_by_weights else None)

        return {
            "name": self.name,
            "seed": self.seed,
            "protocol": self.protocol,
            "val_fraction": self.val_fraction,
            "calib_fraction": self.calib_fraction,
            "work_dir": str(self.work_dir),
            "datasets": {d.name: phantom(d) for d in self.datasets},
            "data": {"roots": {d.name: None if d.root is None else str(d.root) for d in self.datasets
                               if d.predictions is None},
                     "cache": str(self.cache_dir)},
            "preprocessing": {"spacing": self.preprocessing.spacing,
                              "shape": list(self.preprocessing.shape),
                              "normalisation": self.preprocessing.normalisation},
            "folds": {"n_folds": self.folds.n_folds, "seed": self.folds.seed,
                      "file": None if self.folds.file is None else str(self.folds.file),
                      "only": list(self.folds.only) or None},
            "network": {"preset": self.network.preset, "levels": self.network.levels,
                        "base": self.network.base,
                        "weight_decay": dict(self.network.weight_decay)},
            "weights": list(self.weights),
            "training": {s: dict(v) for s, v in self.training.items()},
            "methods": {m.name: {"params": dict(m.params), "lr": lr(m)} for m in self.methods},
            "search": {"kind": self.search.kind, "lr_low": self.search.lr_low,
                       "lr_high": self.search.lr_high, "samples": self.search.samples,
                       "methods": list(self.search.methods), "seed": self.search.seed},
            "resources": {**{s: res(r) for s, r in self.execution.resources.items()},
                          "methods": {m: res(r) for m, r in self.execution.method_resources.items()}},
            "execution": {"max_failures": self.execution.max_failures,
                          "max_concurrent": self.execution.max_concurrent,
                          "system_metrics": self.execution.system_metrics},
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass(frozen=True)
class Overrides:
    """Command-line values that replace the grid's.

    ``data_roots``: ``{"*": DIR}`` for a root holding ``<dataset>/`` folders, or per dataset.
    """

    data_roots: Mapping[str, str] = field(default_factory=frozen_map)
    search: str | None = None
    work_dir: str | None = None
    max_concurrent: int | None = None


# ---- method parameters ---------------------------------------------------------------------------

def method_params(method: MethodSpec, lr: float | None) -> dict:
    """What the calibrate stage passes to the method: the grid's params plus the trial's LR."""
    params = dict(method.params)
    if lr is not None:
        params["lr"] = float(lr)
    return params


def resolved_method_params(method: MethodSpec, weights: str, lr: float | None,
                           schedule: Mapping[str, Any], seed: int = 0) -> dict:
    """Every parameter the method will train with: its recipe's defaults, the calibrate stage's
    ``schedule`` and seed, then the grid's params and the trial's LR (calib.methods.recipes; the
    same resolution the method does when it is built, without building a network).

    Raises the method's own error for a bad parameter.
    """
    sched = TrainConfig(**{"lr": 1e-3, "max_epochs": 1, **schedule, "seed": seed})
    return resolve(method.name, method_params(method, lr), weights, sched)
