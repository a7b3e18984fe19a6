"""The grid file's schema: typed models of its YAML that validate themselves, with every default.

:func:`read_grid_file` turns the YAML tree into a :class:`GridFile` or raises a :class:`GridError`
whose one-line message names the file, the dotted key, the valid keys or choices and the closest
one to a typo. Unknown keys are forbidden in every section. What depends on more than the file --
the working directory, the environment, command-line overrides, whether a folder exists, the
methods' own parameter checks -- is the loader's (:mod:`sweeps.config_parser`).

Torch-free: it imports only the study's vocabulary, the method recipes and calib.schedule.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError,
                      field_validator, model_validator)

from calib.methods.recipes import RECIPES
from calib.schedule import TrainConfig
from calib.vocabulary import (BASE_WEIGHTS, PAPER_WEIGHTS, CALIBRATION_SCHEDULE_KEYS, DATASET_KINDS, DATASETS,
                              LABEL_NOISES,
                              METHODS, NORMALISATIONS, PREDICTIONS_KIND, PROTOCOLS, STAGES,
                              TRAIN_SCHEDULE_KEYS)

#: ``folds.file: paper``: the published folds of the paper's public code (calib.data).
PAPER_FOLDS = "paper"
SEARCHES = ("grid", "optuna")
NETWORK_PRESETS = ("paper", "tiny")
#: The methods an LR search covers by default (those of them with an LR list in the grid).
SEARCHED_METHODS = ("mc_decoder", "mc_center")
#: How another network's predictions are stored.
PREDICTION_VALUES = ("probability", "logit")


class GridError(ValueError):
    """A grid problem; the message is one line naming the file, the key and the valid choices."""


class GridProblem(ValueError):
    """Raised inside the schema: ``message`` about ``key``, relative to where it was found."""

    def __init__(self, message: str, key: Any = ""):
        super().__init__(message)
        self.message, self.key = message, key


def closest(name: Any, choices: Sequence[Any]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``name``, or ``""``."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


# ---- value checks (each raises a GridProblem with today's one-line wording) ----------------------

def number(value: Any, *, positive: bool = False, integer: bool = False,
           minimum: float | None = None) -> float | int:
    """``value`` as a float (or int), checked; numeric strings are accepted."""
    # YAML 1.1 reads 1e-4 (no dot) as a string: accept numeric strings rather than surprise.
    if isinstance(value, str):
        try:
            value = float(value) if not integer else int(value)
        except ValueError:
            raise GridProblem(f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GridProblem(f"must be a number, got {value!r}")
    if integer and int(value) != value:
        raise GridProblem(f"must be an integer, got {value!r}")
    if positive and value <= 0:
        raise GridProblem(f"must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise GridProblem(f"must be >= {minimum:g}, got {value!r}")
    return int(value) if integer else float(value)


def choice(value: Any, choices: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise GridProblem(f"unknown {what} {value!r}{closest(str(value), choices)}; "
                          f"valid choices: {', '.join(choices)}")
    return value


def names(value: Any, choices: Sequence[str], what: str) -> tuple[str, ...]:
    """A non-empty list (or one name) of distinct ``choices``."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not value:
        raise GridProblem(f"must be a non-empty list of {what}s; valid choices: {', '.join(choices)}")
    out = tuple(choice(v, choices, what) for v in value)
    if len(set(out)) != len(out):
        raise GridProblem(f"lists a {what} twice: {list(out)}")
    return out


def mapping_keys(value: Any, allowed: Sequence[str] | None) -> dict:
    """``value`` as a dict whose keys are all ``allowed`` (None: any key); None reads as empty."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise GridProblem(f"must be a mapping, got {type(value).__name__}")
    for k in value if allowed is not None else ():
        if k not in allowed:
            raise GridProblem(f"unknown key{closest(k, allowed)}; valid keys: {', '.join(allowed)}", key=k)
    return dict(value)


def _listed(value: Any) -> list:
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]


def _shape(value: Any) -> tuple[int, int, int]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
        raise GridProblem(f"must be three integers [X, Y, Z], got {value!r}")
    return tuple(number(v, integer=True, positive=True) for v in value)


def _num(**rule) -> BeforeValidator:
    return BeforeValidator(lambda v: number(v, **rule))


def _one_of(choices: Sequence[str], what: str) -> BeforeValidator:
    return BeforeValidator(lambda v: choice(v, choices, what))


Positive = Annotated[float, _num(positive=True)]
NonNegative = Annotated[float, _num(minimum=0)]
Number = Annotated[float, _num()]
Count = Annotated[int, _num(integer=True, minimum=1)]
Index = Annotated[int, _num(integer=True, minimum=0)]
Shape = Annotated[tuple[int, int, int], BeforeValidator(_shape)]


class Section(BaseModel):
    """A mapping of the grid file: None reads as empty, unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def allowed_keys(cls) -> tuple[str, ...]:
        """The keys this section may have, in the order messages list them."""
        return tuple(cls.model_fields)

    @classmethod
    def shorthand(cls, value: Any) -> Any:
        """A short form of the section (e.g. ``network: tiny``) as its mapping; default: none."""
        return value

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, value: Any) -> dict:
        return mapping_keys(cls.shorthand(value), cls.allowed_keys())


# ---- sections ------------------------------------------------------------------------------------

class PhantomSection(Section):
    """``datasets.<name>.phantom``: phantoms written on first use when the root is empty."""

    subjects: Annotated[int, _num(integer=True, minimum=2)] = 12
    seed: Index = 0
    shape: Annotated[tuple[int, int, int] | None,
                     BeforeValidator(lambda v: _shape(v) if v else None)] = None
    #: how the labels are drawn from p*: iid per voxel or a correlated field (calib.data.synth)
    label_noise: Annotated[str, BeforeValidator(lambda v: choice(v, LABEL_NOISES, "label noise"))] = "iid"


class ImagesDataset(Section):
    """``datasets.<name>`` of a BraTS/ISLES dataset the sweep trains U-Nets on."""

    phantom: PhantomSection | None = None
    kind: Annotated[str | None, BeforeValidator(
        lambda v: None if v is None else choice(v, DATASET_KINDS, "dataset kind"))] = None


def _foreground(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    fg = tuple(number(c, integer=True, minimum=1) for c in _listed(value))
    if not fg:
        raise GridProblem("must list the foreground class labels (>= 1)")
    return fg


def _required_folder(what: str):
    def check(value: Any) -> Any:
        if not value:
            raise GridProblem("is required (a folder of <case>.nii.gz" + (
                " maps, or nnU-Net's <case>.npz + <case>.pkl)" if what == "predictions" else " labels)"))
        return value
    return BeforeValidator(check)


class PredictionsDataset(Section):
    """``datasets.<name>`` with ``kind: predictions``: another network's predictions (folders are
    checked with the data, relative to the launch directory)."""

    kind: str = PREDICTIONS_KIND
    predictions: Annotated[Any, _required_folder("predictions")] = Field(None, validate_default=True)
    values: Annotated[str, _one_of(PREDICTION_VALUES, "values")] = PREDICTION_VALUES[0]
    labels: Annotated[Any, _required_folder("labels")] = Field(None, validate_default=True)
    masks: Any = None
    mask_threshold: Number = 0.0
    foreground: Annotated[tuple[int, ...] | None, BeforeValidator(_foreground)] = None


class DataSection(Section):
    """``data``: where the raw data and the preprocessed cache live (paths as written)."""

    root: Any = None
    roots: Annotated[dict[str, Any], BeforeValidator(lambda v: mapping_keys(v, None))] = {}
    cache: Any = None


class PreprocessingSection(Section):
    """``preprocessing``: the arguments of calib.data.preprocess_dataset."""

    spacing: Positive = 2.0
    shape: Shape = (136, 136, 82)
    normalisation: Annotated[str, _one_of(NORMALISATIONS, "normalisation")] = NORMALISATIONS[0]


class FoldsSection(Section):
    """``folds``: seeded K-fold, or read from ``file`` (a JSON path or ``paper``)."""

    n_folds: Annotated[int, _num(integer=True, minimum=2)] = 5
    seed: Index = 0
    file: Any = None
    only: Annotated[tuple[int, ...] | None, BeforeValidator(
        lambda v: None if v is None else tuple(number(f, integer=True, minimum=0) for f in _listed(v)))] = None

    @model_validator(mode="after")
    def _consistent(self) -> "FoldsSection":
        only = self.only
        if only is not None and (not only or len(set(only)) != len(only)
                                 or any(f >= self.n_folds for f in only)):
            raise GridProblem(f"must list distinct folds of 0..{self.n_folds - 1}, got {list(only)}", "only")
        if self.file == PAPER_FOLDS and self.n_folds != 5:
            raise GridProblem(f"the paper's folds are 5, got {self.n_folds}", "n_folds")
        return self


def _weight_decay(value: Any) -> float | dict[str, float]:
    """One L2 penalty for every dataset, or one per dataset."""
    if isinstance(value, Mapping):
        decay = mapping_keys(value, DATASETS)
        out = {}
        for d, v in decay.items():
            try:
                out[d] = number(v, minimum=0)
            except GridProblem as exc:
                raise GridProblem(exc.message, d) from None
        return out
    return number(value, minimum=0)


class NetworkSection(Section):
    """``network``: a preset name, or the preset with its settings."""

    preset: Annotated[str, _one_of(NETWORK_PRESETS, "network preset")] = NETWORK_PRESETS[0]
    levels: Annotated[int, _num(integer=True, minimum=2)] = 3  # tiny only
    base: Count = 4  # tiny only
    #: L2 penalty on the conv kernels: one value, or one per dataset (others: 0).
    weight_decay: Annotated[float | dict[str, float], BeforeValidator(_weight_decay)] = 0.0

    @classmethod
    def shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):  # ``network: tiny``; a bad name is reported against ``network``
            return {"preset": choice(value, NETWORK_PRESETS, "network preset")}
        return value


class Schedule(Section):
    """A stage's schedule: only the keys the grid sets (TrainConfig's defaults fill the rest)."""

    _order: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _remember_order(cls, value: Any, handler) -> "Schedule":
        model = handler(value)
        model._order = tuple(value) if isinstance(value, Mapping) else ()
        return model

    @model_validator(mode="after")
    def _train_config(self) -> "Schedule":
        try:  # the science's own checks (e.g. lr_factor < 1), reported against the stage's key
            TrainConfig(**{"lr": 1e-3, "max_epochs": 1, **self.given()})
        except (TypeError, ValueError) as exc:
            raise GridProblem(str(exc)) from None
        return self

    def given(self) -> dict[str, Any]:
        """The keys the grid set, in its order."""
        return {k: getattr(self, k) for k in self._order}


class CalibrationSchedule(Schedule):
    """``training.calibrate``: :data:`calib.vocabulary.CALIBRATION_SCHEDULE_KEYS`."""

    @classmethod
    def allowed_keys(cls) -> tuple[str, ...]:
        return CALIBRATION_SCHEDULE_KEYS

    max_epochs: Count | None = None
    lr_factor: Positive | None = None
    lr_patience: Index | None = None
    early_stop_patience: Count | None = None
    min_rel_improvement: NonNegative | None = None


class TrainSchedule(CalibrationSchedule):
    """``training.pretrain`` / ``training.base``: :data:`calib.vocabulary.TRAIN_SCHEDULE_KEYS`."""

    lr: Positive | None = None
    batch_size: Count | None = None

    @classmethod
    def allowed_keys(cls) -> tuple[str, ...]:
        return TRAIN_SCHEDULE_KEYS


class TrainingSection(Section):
    """``training``: one schedule per stage."""

    pretrain: TrainSchedule = TrainSchedule()
    base: TrainSchedule = TrainSchedule()
    calibrate: CalibrationSchedule = CalibrationSchedule()


def _method_lr(value: Any) -> tuple[float, ...] | dict[str, float] | None:
    """``lr``: an LR axis (a list, or one value), or one fixed LR per base weights."""
    if value is None:
        return None
    if isinstance(value, Mapping):  # one fixed LR per base weights (fine-tuning's recipe)
        out = {}
        for w, v in value.items():
            choice(w, BASE_WEIGHTS, "weights")
            try:
                out[w] = number(v, positive=True)
            except GridProblem as exc:
                raise GridProblem(exc.message, w) from None
        return out
    lrs = tuple(number(v, positive=True) for v in _listed(value))
    if not lrs or len(set(lrs)) != len(lrs):
        raise GridProblem(f"must list distinct learning rates, got {list(lrs)}")
    return lrs


def _method_params(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise GridProblem("must be a mapping")
    return dict(value)


class MethodSection(Section):
    """``methods.<name>``: the method's parameters (it checks them) and its LR setting."""

    params: Annotated[dict[Any, Any], BeforeValidator(_method_params)] = {}
    lr: Annotated[tuple[float, ...] | dict[str, float] | None, BeforeValidator(_method_lr)] = None


def _methods(value: Any) -> dict:
    if not isinstance(value, Mapping) or not value:
        raise GridProblem(f"must map method names to settings; valid choices: {', '.join(METHODS)}")
    for name in value:
        choice(name, METHODS, "method")
    return dict(value)


class SearchSection(Section):
    """``search``: how LR axes are sampled (the grid's list, or Optuna TPE with the same budget)."""

    kind: Annotated[str, _one_of(SEARCHES, "search")] = SEARCHES[0]
    lr_low: Positive = 1e-5
    lr_high: Positive = 1e-3
    samples: Count | None = None  # None: as many as the grid has LRs
    #: None: those of :data:`SEARCHED_METHODS` with an LR list.
    methods: Any = None
    seed: Index = 0

    @model_validator(mode="after")
    def _range(self) -> "SearchSection":
        if self.lr_low >= self.lr_high:
            raise GridProblem(f"lr_low ({self.lr_low:g}) must be below lr_high ({self.lr_high:g})")
        return self


class ResourcesSpec(Section):
    """Ray resources of one trial; ``gpu`` may be a fraction below 1."""

    cpu: Positive = 1.0
    gpu: NonNegative = 0.0

    @model_validator(mode="after")
    def _fraction(self) -> "ResourcesSpec":
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise GridProblem(f"a fraction is only allowed below 1, got {self.gpu}", "gpu")
        return self


class ResourcesSection(Section):
    """``resources``: per stage, and per method for calibrate trials."""

    pretrain: ResourcesSpec = ResourcesSpec()
    base: ResourcesSpec = ResourcesSpec()
    calibrate: ResourcesSpec = ResourcesSpec()
    methods: Annotated[dict[str, ResourcesSpec], BeforeValidator(lambda v: mapping_keys(v, None))] = {}


def _strict_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise GridProblem(f"must be true or false, got {value!r}")
    return value


class ExecutionSection(Section):
    """``execution``: how trials run (no part of any trial key)."""

    max_failures: Index = 2
    max_concurrent: Count | None = None
    system_metrics: Annotated[bool, BeforeValidator(_strict_bool)] = False


def _name_is_text(value: Any) -> str:
    return str(value)


class GridFile(Section):
    """A whole grid file, validated; the loader adds what depends on where it runs."""

    name: Annotated[str | None, BeforeValidator(_name_is_text)] = None  # None: the file's stem
    seed: Index = 0
    protocol: Annotated[str, _one_of(PROTOCOLS, "protocol")] = PROTOCOLS[0]
    val_fraction: Positive = 0.2
    calib_fraction: Positive = 0.2
    work_dir: Any = "calib_store"
    datasets: Annotated[dict[str, ImagesDataset | PredictionsDataset],
                        BeforeValidator(lambda v: _datasets(v))] = Field(None, validate_default=True)
    data: DataSection = DataSection()
    preprocessing: PreprocessingSection = PreprocessingSection()
    folds: FoldsSection = FoldsSection()
    network: NetworkSection = NetworkSection()
    weights: Annotated[tuple[str, ...], BeforeValidator(lambda v: names(v, BASE_WEIGHTS, "weights"))] = PAPER_WEIGHTS
    training: TrainingSection = TrainingSection()
    methods: Annotated[dict[str, MethodSection], BeforeValidator(_methods)] = Field(None, validate_default=True)
    search: SearchSection = SearchSection()
    resources: ResourcesSection = ResourcesSection()
    execution: ExecutionSection = ExecutionSection()

    @field_validator("val_fraction")
    @classmethod
    def _below_one(cls, value: float) -> float:
        if value >= 1:
            raise GridProblem(f"must be < 1, got {value}")
        return value

    # -- what depends on several sections --
    @property
    def external(self) -> dict[str, PredictionsDataset]:
        """The ``kind: predictions`` datasets."""
        return {n: d for n, d in self.datasets.items() if isinstance(d, PredictionsDataset)}

    @property
    def images(self) -> list[str]:
        """The datasets the sweep trains U-Nets on."""
        return [n for n in self.datasets if n not in self.external]

    @model_validator(mode="after")
    def _consistent(self) -> "GridFile":
        if self.protocol == PROTOCOLS[0] and self.val_fraction + self.calib_fraction >= 1:
            raise GridProblem(f"val_fraction + calib_fraction must be < 1 (the rest trains the base "
                              f"model), got {self.val_fraction} + {self.calib_fraction}", "calib_fraction")
        mapping_keys_at("data.roots", self.data.roots, self.images)
        self._check_training()
        self._check_methods()
        return self

    def _check_training(self) -> None:
        """calibrate needs max_epochs; pretrain/base need lr and max_epochs when a U-Net trains
        (a grid of another network's predictions has no such stage)."""
        for stage in STAGES:
            given = getattr(self.training, stage).given()
            needs = ("max_epochs",) if stage == STAGES[2] else (("lr", "max_epochs") if self.images else ())
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

    def method_resources(self) -> dict[str, "ResourcesSpec"]:
        """``resources.methods``, checked against the grid's methods."""
        mapping_keys_at("resources.methods", self.resources.methods, tuple(self.methods))
        return self.resources.methods


def mapping_keys_at(key: str, value: Mapping, allowed: Sequence[str]) -> None:
    """:func:`mapping_keys` for a section whose valid keys depend on the rest of the grid."""
    try:
        mapping_keys(value, tuple(allowed))
    except GridProblem as exc:
        raise GridProblem(exc.message, ".".join(str(k) for k in (key, exc.key) if k != "")) from None


_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _datasets(value: Any) -> dict[str, ImagesDataset | PredictionsDataset]:
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
        out[n] = section(PredictionsDataset if n in external else ImagesDataset, spec, n)
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
