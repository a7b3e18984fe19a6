"""The grid file, read once into frozen, validated config objects.

A grid (``sweeps/grids/<name>.yaml`` or any YAML path) names every axis of the study -- datasets,
base weights, calibration methods with their learning rates, folds -- and the settings that shape
a result (preprocessing, network, training schedules, protocol, seed) or only its execution
(resources, retries). :func:`load_grid` turns it into a :class:`GridConfig`; every problem is a
:class:`GridError` whose one-line message names the file, the key and the valid choices, raised
before anything starts (the CLI prints it and exits 2).

Paths in a grid (data roots, work dir, folds file) are relative to the working directory of the
launch, not to the YAML file: ``python sweeps/launch.py --grid demo`` from the repo root keeps
everything under ``./calib_store`` and ``./demo_data``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

GRIDS_DIR = Path(__file__).resolve().parent / "grids"
STAGES = ("pretrain", "base", "calibrate")
PROTOCOLS = ("honest", "two_way", "paper")
NORMALISATIONS = ("subject", "fixed")
#: ``folds.file: paper``: the published folds of the paper's public code (calib.data).
PAPER_FOLDS = "paper"
SEARCHES = ("grid", "optuna")
NETWORK_PRESETS = ("paper", "tiny")
#: Environment variable holding the data root when neither the grid nor --data-root names one.
DATA_ROOT_ENV = "CALIB_DATA_ROOT"
#: Fields of calib.training.TrainConfig a grid may set for pretrain and base.
TRAIN_KEYS = ("lr", "max_epochs", "lr_factor", "lr_patience", "early_stop_patience",
              "min_rel_improvement", "batch_size")
#: The calibration schedule shared by every method (LR and batch size are each method's recipe).
SCHEDULE_KEYS = ("max_epochs", "lr_factor", "lr_patience", "early_stop_patience",
                 "min_rel_improvement")
#: Base weights of the study (DESIGN.md); SD trains from scratch, the others from the CE pretraining.
WEIGHTS = ("CE", "CE-SD", "SD")
#: The weights label of another network's imported predictions (``kind: predictions``); the same
#: value as calib.methods.params.EXTERNAL_WEIGHTS (not imported: that would load torch here).
EXTERNAL_WEIGHTS = "external"
#: ``images``: a BraTS/ISLES dataset the sweep trains U-Nets on; ``predictions``: another network's.
DATASET_KINDS = ("images", "predictions")


class GridError(ValueError):
    """A grid problem; the message is one line naming the file, the key and the valid choices."""


def closest(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``name``, or ``""``."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def frozen_map(d: Mapping | None = None) -> Mapping:
    """A read-only view of a copy of ``d`` (what the frozen dataclasses hold)."""
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class Resources:
    """Ray resources of one trial; ``gpu`` may be fractional (several small trials per GPU)."""

    cpu: float = 1.0
    gpu: float = 0.0

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
    seed: int = 0
    shape: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class PredictionsSpec:
    """Another network's predictions as a dataset (``kind: predictions``; calib.data.predictions):
    its folders and how to read them."""

    predictions: Path
    labels: Path
    values: str = "probability"
    masks: Path | None = None
    mask_threshold: float = 0.0
    foreground: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        return {"kind": DATASET_KINDS[1], "predictions": str(self.predictions), "labels": str(self.labels),
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
        return DATASET_KINDS[1] if self.predictions is not None else DATASET_KINDS[0]


@dataclass(frozen=True)
class Preprocessing:
    """Arguments of calib.data.preprocess_dataset that change the cached volumes."""

    spacing: float = 2.0
    shape: tuple[int, int, int] = (136, 136, 82)
    normalisation: str = "subject"  # or "fixed": the public code's shift/scale per modality


@dataclass(frozen=True)
class Folds:
    """Cross-validation folds: seeded (calib.data.make_folds) or read from ``file`` (a path, or
    :data:`PAPER_FOLDS` for the public code's published case lists)."""

    n_folds: int = 5
    seed: int = 0
    file: Path | str | None = None
    #: The folds whose trials run (default all): a smoke run or a pilot runs one fold of the
    #: same K-fold split, so its trials and their keys are those of the full study.
    only: tuple[int, ...] = ()

    def run_folds(self) -> tuple[int, ...]:
        return self.only or tuple(range(self.n_folds))

    @property
    def is_paper(self) -> bool:
        return self.file == PAPER_FOLDS


@dataclass(frozen=True)
class Network:
    """The U-Net: the paper's (``UNetConfig.paper``) or a tiny one (``UNetConfig.tiny``)."""

    preset: str = "paper"
    levels: int = 3  # tiny only
    base: int = 4  # tiny only
    #: L2 penalty on the conv kernels per dataset (Keras ``l2``; calib.training.TrainConfig);
    #: the public code: 1e-5 on the BraTS net, 0 on ISLES. Missing datasets: 0.
    weight_decay: Mapping[str, float] = field(default_factory=frozen_map)

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
    params: Mapping[str, Any] = field(default_factory=frozen_map)
    lrs: tuple[float, ...] = ()
    lr_by_weights: Mapping[str, float] = field(default_factory=frozen_map)

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

    kind: str = "grid"
    lr_low: float = 1e-5
    lr_high: float = 1e-3
    samples: int | None = None  # None: as many as the grid has LRs
    methods: tuple[str, ...] = ("mc_decoder", "mc_center")
    seed: int = 0


@dataclass(frozen=True)
class Execution:
    """How trials run; none of it changes a result (not part of any trial key)."""

    max_failures: int = 2
    max_concurrent: int | None = None
    resources: Mapping[str, Resources] = field(default_factory=frozen_map)  # per stage
    method_resources: Mapping[str, Resources] = field(default_factory=frozen_map)
    system_metrics: bool = False  # system/* metrics (CPU, memory, GPU) on every trial run

    def resources_for(self, stage: str, method: str) -> Resources:
        """Method-specific resources for calibrate trials, else the stage's."""
        if stage == "calibrate" and method in self.method_resources:
            return self.method_resources[method]
        return self.resources.get(stage, Resources())


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
    val_fraction: float = 0.2
    calib_fraction: float = 0.2

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


# ---- reading -----------------------------------------------------------------------------------

def builtin_grids() -> list[str]:
    """Names of the grids shipped in sweeps/grids/."""
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


def grid_path(grid: str) -> Path:
    """``demo`` -> sweeps/grids/demo.yaml; a path ending in .yaml/.yml is taken as is."""
    if grid.endswith((".yaml", ".yml")) or os.sep in grid:
        path = Path(grid)
        if not path.is_file():
            raise GridError(f"grid file {grid} does not exist")
        return path.resolve()
    names = builtin_grids()
    if grid not in names:
        raise GridError(f"unknown grid {grid!r}{closest(grid, names)}; valid choices: "
                        f"{', '.join(names)} or a path to a .yaml file")
    return GRIDS_DIR / f"{grid}.yaml"


def load_grid(grid: str, overrides: Overrides | None = None, *, require_data: bool = True,
              env: Mapping[str, str] | None = None, cwd: Path | None = None) -> GridConfig:
    """Read and validate a grid.

    Args:
        grid: a built-in grid name (``paper``, ``demo``) or a YAML path.
        overrides: command-line values that win over the grid's.
        require_data: when True every dataset needs a data root that exists (or a phantom spec,
            generated on first use); a dry run passes False and shows what is missing.
        env: environment to read ``CALIB_DATA_ROOT`` from (default ``os.environ``).
        cwd: directory relative paths are resolved against (default the current one).

    Raises:
        GridError: one line naming the file, key and valid choices.
    """
    from sweeps.config_parser import GridParser

    path = grid_path(grid)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise GridError(f"grid {path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    return GridParser(path, overrides or Overrides(), env if env is not None else os.environ,
                      Path(cwd or Path.cwd()), require_data).parse(raw)


def method_params(method: MethodSpec, lr: float | None) -> dict:
    """What the calibrate stage passes to the method: the grid's params plus the trial's LR."""
    params = dict(method.params)
    if lr is not None:
        params["lr"] = float(lr)
    return params


def resolved_method_params(method: MethodSpec, weights: str, lr: float | None, dataset: str,
                           schedule: Mapping[str, Any], seed: int = 0) -> dict:
    """Every parameter the method will train with (its recipe's defaults filled in).

    Built on a tiny network (the values do not depend on its size) so that planning 270
    calibrations stays instant. Raises the method's own error for a bad parameter.
    """
    from calib.methods import build_method
    from calib.nets import UNetConfig
    from calib.nets.config import PAPER_DATASETS
    from calib.training import TrainConfig

    # another network's predictions have no U-Net (only logit-based methods run on them)
    net = (UNetConfig.tiny(UNetConfig.paper(dataset).in_channels, dataset=dataset, levels=2, base=1)
           if dataset in PAPER_DATASETS else None)
    sched = TrainConfig(**{"lr": 1e-3, "max_epochs": 1, **schedule, "seed": seed})
    built = build_method(method.name, method_params(method, lr), weights=weights, net_cfg=net,
                         schedule=sched)
    return dict(built.params)
