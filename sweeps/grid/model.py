"""The grid the rest of the sweep reads: :class:`GridConfig`, frozen, made of the schema's typed
sections (sweeps.grid.sections, sweeps.grid.schedules) with what the loader resolved -- paths
relative to the launch, data roots, command-line overrides.

:func:`sweeps.grid.load_grid` builds it; the file's schema and every default are the sections',
so nothing here declares them again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from calib.loss_recipes import loss_params
from calib.methods.recipes import resolve
from calib.schedule import TrainConfig
from calib.vocabulary import (EXTERNAL_WEIGHTS, IMAGES_KIND, PREDICTIONS_KIND, PROTOCOLS, STAGES,
                              TRAIN_TIME_WEIGHTS)
from sweeps.grid.schedules import TrainingSection, train_config
from sweeps.grid.sections import (Execution, Folds, MethodSpec, Network, PhantomSpec, PredictionsSpec,
                                  Preprocessing, Resources, Search)
from sweeps.grid.subjects import CalibSubjects
from sweeps.grid.shifts import DatasetShift


#: The protocols by name (calib.vocabulary.PROTOCOLS, calib.stages): under ``paper`` the val split
#: is the test fold.
HONEST, TWO_WAY, PAPER_PROTOCOL = PROTOCOLS


def frozen_map(d: Mapping | None = None) -> Mapping:
    """A read-only view of a copy of ``d`` (what the frozen grid holds)."""
    return MappingProxyType(dict(d or {}))


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
    shifts: tuple[DatasetShift, ...] = ()  # test-time shifts (sweeps.grid.shifts); () without the key

    @property
    def kind(self) -> str:
        return PREDICTIONS_KIND if self.predictions is not None else IMAGES_KIND


@dataclass(frozen=True)
class SplitSettings:
    """How a fold's subjects are split into train / val / calib / test (calib.stages.make_split):
    the grid's protocol, seed and fractions, and its number of folds."""

    protocol: str = HONEST
    seed: int = 0
    val_fraction: float = 0.2
    calib_fraction: float = 0.2
    n_folds: int = 5


@dataclass(frozen=True)
class GridConfig:
    """A whole grid, validated and resolved for one launch (module doc)."""

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
    training: TrainingSection  # ``training[stage]``: the stage's schedule (keys the grid set)
    methods: tuple[MethodSpec, ...]
    search: Search
    execution: Execution
    work_dir: Path
    val_fraction: float
    calib_fraction: float
    #: the train-time calibration losses' parameters by weights, as the grid set them
    losses: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: ``calib_subjects`` with its methods resolved (sweeps.grid.subjects); None: every calibrate
    #: trial fits on the whole calib split
    calib_subjects: CalibSubjects | None = None

    def dataset(self, name: str) -> DatasetSpec:
        return next(d for d in self.datasets if d.name == name)

    def method(self, name: str) -> MethodSpec:
        return next(m for m in self.methods if m.name == name)

    def weights_for(self, dataset: str) -> tuple[str, ...]:
        """The base weights a dataset's trials run with: the grid's, or ``external`` for predictions."""
        return (EXTERNAL_WEIGHTS,) if self.dataset(dataset).predictions is not None else self.weights

    @property
    def split(self) -> SplitSettings:
        """How every fold of this grid is split."""
        return SplitSettings(self.protocol, self.seed, self.val_fraction, self.calib_fraction,
                             self.folds.n_folds)

    def loss_params(self, weights: str) -> dict[str, Any]:
        """The resolved parameters of the loss base ``weights`` train with: the train-time
        calibration losses' defaults (calib.loss_recipes) updated by ``losses.<weights>``; none
        for the paper's weights (their losses have no parameters)."""
        if weights not in TRAIN_TIME_WEIGHTS:
            return {}
        return loss_params(weights, self.losses.get(weights))

    def stage_settings(self, stage: str, dataset: str) -> dict[str, Any]:
        """The training settings of ``stage``'s trials on ``dataset`` as their keys record them:
        the keys the grid set, its seed, the network's L2 penalty for the dataset."""
        return self.training[stage].settings(self.seed, self.network.weight_decay_for(dataset))

    def to_dict(self) -> dict:
        """The resolved grid (defaults filled in, paths absolute) in the grid-file schema: the
        YAML of it loads back into an equal GridConfig."""
        def res(r: Resources) -> dict:
            return {"cpu": r.cpu, "gpu": r.gpu}

        def dataset(d: DatasetSpec) -> dict:
            if d.predictions is not None:
                return d.predictions.to_dict()
            shift = {"shift": {s.name: s.fields() for s in d.shifts}} if d.shifts else {}
            if d.phantom is None:
                return shift
            ph = d.phantom
            return {"phantom": {"subjects": ph.subjects, "seed": ph.seed,
                                "shape": None if ph.shape is None else list(ph.shape),
                                "label_noise": ph.label_noise}, **shift}

        resources = self.execution.resources
        return {
            "name": self.name,
            "seed": self.seed,
            "protocol": self.protocol,
            "val_fraction": self.val_fraction,
            "calib_fraction": self.calib_fraction,
            "work_dir": str(self.work_dir),
            "datasets": {d.name: dataset(d) for d in self.datasets},
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
            "losses": {w: dict(p) for w, p in self.losses.items()},
            "training": {s: self.training[s].given() for s in STAGES},
            "methods": {m.name: {"params": dict(m.params),
                                 "lr": list(m.lrs) or dict(m.lr_by_weights) or None} for m in self.methods},
            "search": {"kind": self.search.kind, "lr_low": self.search.lr_low,
                       "lr_high": self.search.lr_high, "samples": self.search.samples,
                       "methods": list(self.search.methods), "seed": self.search.seed},
            "resources": {**{s: res(getattr(resources, s)) for s in STAGES},
                          "methods": {m: res(r) for m, r in resources.methods.items()}},
            "execution": {"max_failures": self.execution.max_failures,
                          "max_concurrent": self.execution.max_concurrent,
                          "system_metrics": self.execution.system_metrics},
        }

    def to_yaml(self) -> str:
        d = self.to_dict()
        if self.calib_subjects is not None:  # only when set: grids without it dump as before
            d["calib_subjects"] = self.calib_subjects.to_dict()
        return yaml.safe_dump(d, sort_keys=False)


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


def calibrate_train_config(settings: Mapping[str, Any]) -> TrainConfig:
    """The calibrate stage's TrainConfig from its settings (:meth:`GridConfig.stage_settings`):
    the schedule every method shares; its LR is a stand-in no method reads (sweeps.grid.schedules)."""
    return train_config(settings)


def resolved_method_params(method: MethodSpec, weights: str, lr: float | None,
                           settings: Mapping[str, Any]) -> dict:
    """Every parameter the method will train with: its recipe's defaults, the calibrate stage's
    ``settings`` (its schedule and seed), then the grid's params and the trial's LR
    (calib.methods.recipes; the same resolution the method does when it is built, without
    building a network).

    Raises the method's own error for a bad parameter.
    """
    return resolve(method.name, method_params(method, lr), weights, calibrate_train_config(settings))

