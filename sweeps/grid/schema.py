"""The grid file's schema: :class:`GridFile`, the whole file as typed sections
(sweeps.grid.sections, sweeps.grid.schedules) with the checks that span several of them.

:func:`read_grid_file` turns the YAML tree into a :class:`GridFile` or raises a :class:`GridError`
whose one-line message names the file, the dotted key, the valid keys or choices and the closest
one to a typo. Unknown keys are forbidden in every section. What depends on more than the file --
the working directory, the environment, command-line overrides, whether a folder exists, the
methods' own parameter checks -- is the loader's (:mod:`sweeps.grid.loader`).

Torch-free: it imports only the study's vocabulary, the method recipes and calib.schedule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator, model_validator

from calib.loss_recipes import loss_params
from calib.methods.recipes import RECIPES
from calib.vocabulary import (BASE_WEIGHTS, CALIBRATE, DATASETS, METHODS, PAPER_WEIGHTS, PREDICTIONS_KIND,
                              PROTOCOLS, STAGES, TRAIN_TIME_WEIGHTS)
from sweeps.grid.checks import GridError, GridProblem, mapping_keys_at, names
from sweeps.grid.schedules import CalibrationSchedule, Schedule, TrainingSection, TrainSchedule
from sweeps.grid.sections import (SEARCHED_METHODS, DataSection, Execution, Folds, ImagesDataset, Index,
                                  MethodSpec, Network, PhantomSpec, Positive, PredictionsSpec,
                                  Preprocessing, Resources, ResourcesSection, Search, Section,
                                  one_of, methods_of)
from sweeps.grid.subjects import parse_calib_subjects, resolve_methods

#: Every section of a grid file (the schema's models; tests walk this module for them).
SECTIONS = (Section, PhantomSpec, ImagesDataset, PredictionsSpec, DataSection, Preprocessing, Folds,
            Network, Schedule, CalibrationSchedule, TrainSchedule, TrainingSection, MethodSpec, Search,
            Resources, ResourcesSection, Execution)


def _name_is_text(value: Any) -> str:
    return str(value)


def _losses(value: Any) -> dict[str, dict[str, Any]]:
    """``losses``: per train-time weights value, its loss parameters, checked (not yet merged
    with the defaults: the grid keeps what it set)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise GridProblem(f"must map train-time weights ({', '.join(TRAIN_TIME_WEIGHTS)}) to their "
                          f"loss parameters, got {value!r}")
    out = {}
    for weights, params in value.items():
        if weights not in TRAIN_TIME_WEIGHTS:
            raise GridProblem(f"{weights!r} has no loss parameters; valid: {', '.join(TRAIN_TIME_WEIGHTS)}",
                              weights)
        if params is not None and not isinstance(params, Mapping):
            raise GridProblem(f"must be a mapping of parameters, got {params!r}", weights)
        try:
            loss_params(weights, params)
        except ValueError as exc:
            raise GridProblem(str(exc), weights) from None
        out[weights] = dict(params or {})
    return out


class GridFile(Section):
    """A whole grid file, validated; the loader adds what depends on where it runs."""

    name: Annotated[str | None, BeforeValidator(_name_is_text)] = None  # None: the file's stem
    seed: Index = 0
    protocol: Annotated[str, one_of(PROTOCOLS, "protocol")] = PROTOCOLS[0]
    val_fraction: Positive = 0.2
    calib_fraction: Positive = 0.2
    work_dir: Any = "calib_store"
    datasets: Annotated[dict[str, ImagesDataset | PredictionsSpec],
                        BeforeValidator(lambda v: _datasets(v))] = Field(None, validate_default=True)
    data: DataSection = DataSection()
    preprocessing: Preprocessing = Preprocessing()
    folds: Folds = Folds()
    network: Network = Network()
    weights: Annotated[tuple[str, ...], BeforeValidator(lambda v: names(v, BASE_WEIGHTS, "weights"))] = PAPER_WEIGHTS
    #: ``losses.<weights>``: parameters of a train-time calibration loss (calib.loss_recipes)
    losses: Annotated[dict[str, dict[str, Any]], BeforeValidator(lambda v: _losses(v))] = {}
    training: TrainingSection = TrainingSection()
    methods: Annotated[dict[str, MethodSpec], BeforeValidator(methods_of)] = Field(None, validate_default=True)
    search: Search = Search()
    resources: ResourcesSection = ResourcesSection()
    execution: Execution = Field(default_factory=Execution)  # its own: it is linked to resources
    #: ``calib_subjects``: fit the covered methods on nested subsets of calib (sweeps.grid.subjects)
    calib_subjects: Annotated[Any, BeforeValidator(parse_calib_subjects)] = None

    @field_validator("val_fraction")
    @classmethod
    def _below_one(cls, value: float) -> float:
        if value >= 1:
            raise GridProblem(f"must be < 1, got {value}")
        return value

    # -- what depends on several sections --
    @property
    def external(self) -> dict[str, PredictionsSpec]:
        """The ``kind: predictions`` datasets."""
        return {n: d for n, d in self.datasets.items() if isinstance(d, PredictionsSpec)}

    @property
    def images(self) -> list[str]:
        """The datasets the sweep trains U-Nets on."""
        return [n for n in self.datasets if n not in self.external]

    @model_validator(mode="after")
    def _link(self) -> "GridFile":
        """Each method section knows its name, the execution section the grid's resources."""
        for name, spec in self.methods.items():
            spec._name = name
        self.execution._resources = self.resources
        return self

    @model_validator(mode="after")
    def _consistent(self) -> "GridFile":
        if self.protocol == PROTOCOLS[0] and self.val_fraction + self.calib_fraction >= 1:
            raise GridProblem(f"val_fraction + calib_fraction must be < 1 (the rest trains the base "
                              f"model), got {self.val_fraction} + {self.calib_fraction}", "calib_fraction")
        mapping_keys_at("data.roots", self.data.roots, self.images)
        for weights in self.losses:
            if weights not in self.weights:
                raise GridProblem(f"sets parameters of weights {weights!r}, which the grid does not "
                                  f"train (weights: {', '.join(self.weights)})", f"losses.{weights}")
        self._check_training()
        self._check_methods()
        if self.calib_subjects is not None:
            resolve_methods(self.calib_subjects, self.protocol, tuple(self.methods))
        return self

    def _check_training(self) -> None:
        """calibrate needs max_epochs; pretrain/base need lr and max_epochs when a U-Net trains
        (a grid of another network's predictions has no such stage)."""
        for stage in STAGES:
            given = self.training[stage].given()
            needs = ("max_epochs",) if stage == CALIBRATE else (("lr", "max_epochs") if self.images else ())
            for need in needs:
                if need not in given:
                    raise GridProblem("is required", f"training.{stage}.{need}")

    def _check_methods(self) -> None:
        for name, spec in self.methods.items():
            key = f"methods.{name}"
            if "lr" in spec.params:
                raise GridProblem(f"set the learning rate with {key}.lr", f"{key}.params.lr")
            if isinstance(spec.lr, dict):
                missing = [w for w in self.weights if w not in spec.lr]
                if missing:
                    raise GridProblem(f"has no learning rate for weights {', '.join(missing)}", f"{key}.lr")
            elif spec.lr is not None and not RECIPES[name].has_lr:
                axis = [m for m in METHODS if RECIPES[m].has_lr]
                raise GridProblem(f"method {name!r} has no learning-rate axis (its recipe fixes the LR; "
                                  f"give {{CE: .., CE-SD: .., SD: ..}} to set it per weights); "
                                  f"methods with an LR axis: {', '.join(axis)}", f"{key}.lr")
        if self.external and not any(RECIPES[m].uses == "logits" for m in self.methods):
            logit = [n for n in METHODS if RECIPES[n].uses == "logits"]
            raise GridProblem(f"kind predictions runs only the logit-based methods ({', '.join(logit)}); "
                              "the grid's methods list none", f"datasets.{next(iter(self.external))}")

    def axis_methods(self) -> list[str]:
        """The grid's methods with an LR list (an axis)."""
        return [n for n, m in self.methods.items() if isinstance(m.lr, tuple)]

    def searched_methods(self) -> tuple[str, ...]:
        """``search.methods``, checked against the methods with an LR list (the loader asks after
        the methods have checked their parameters)."""
        with_lrs = self.axis_methods()
        searched = self.search.methods
        if "methods" not in self.search.model_fields_set:
            searched = [n for n in SEARCHED_METHODS if n in with_lrs]
        if not searched:
            return ()
        try:
            return names(searched, with_lrs, "method with an LR list")
        except GridProblem as exc:
            raise GridProblem(exc.message, "search.methods") from None

    def method_resources(self) -> dict[str, Resources]:
        """``resources.methods``, checked against the grid's methods."""
        mapping_keys_at("resources.methods", self.resources.methods, tuple(self.methods))
        return self.resources.methods


_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _datasets(value: Any) -> dict[str, ImagesDataset | PredictionsSpec]:
    """``datasets: [brats18]`` or ``{brats18: {phantom: {...}}, mynet: {kind: predictions, ...}}``."""
    hint = f"valid choices: {', '.join(DATASETS)}"
    if value is None:
        raise GridProblem(f"is required; {hint} (or any name with kind: predictions)")
    if not isinstance(value, Mapping):
        return {n: ImagesDataset() for n in names(value, DATASETS, "dataset")}
    external = [n for n, spec in value.items()
                if isinstance(spec, Mapping) and spec.get("kind") == PREDICTIONS_KIND]
    images = [n for n in value if n not in external]
    if images:  # every other dataset must be one the sweep knows the layout of
        names(images, DATASETS, "dataset")
    out = {}
    for n, spec in value.items():  # the grid's order
        if n in external and not (isinstance(n, str) and _DATASET_NAME.fullmatch(n)):
            raise GridProblem("a predictions dataset needs a name of letters, digits, '_', '.', '-'", n)
        out[n] = section(PredictionsSpec if n in external else ImagesDataset, spec, n)
    return out


def section(model: type[BaseModel], value: Any, key: Any) -> BaseModel:
    """``model`` validated from ``value``; a problem is re-raised against ``key`` (a sub-key)."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        where, message = locate(exc)
        raise GridProblem(message, ".".join(str(k) for k in (key, *where))) from None


def locate(exc: ValidationError) -> tuple[list[str], str]:
    """The dotted key path and the message of the first problem pydantic found."""
    err = exc.errors()[0]
    where = [str(p) for p in err["loc"] if not isinstance(p, int)]  # list positions: the list's key
    problem = (err.get("ctx") or {}).get("error")
    if isinstance(problem, GridProblem):
        if problem.key != "":
            where.append(str(problem.key))
        return where, problem.message
    return where, err["msg"]


def read_grid_file(file: str, raw: Any) -> GridFile:
    """The YAML tree of grid ``file`` (its name, for messages) as a GridFile, or a GridError."""
    try:
        return GridFile.model_validate(raw)
    except ValidationError as exc:
        where, message = locate(exc)
        raise GridError(f"grid {file}: {'.'.join(where)}: {message}") from None
