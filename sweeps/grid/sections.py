"""The sections of a grid file: frozen, typed models of its YAML that validate themselves, with
every default -- and the typed objects the rest of the sweep reads (sweeps.grid.model.GridConfig
holds them, the loader filling in what depends on where the launch runs).

Each section forbids unknown keys; a bad value is a :class:`~sweeps.grid.checks.GridProblem`
about its key, which the schema (sweeps.grid.schema) reports as one line. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, model_validator

from calib.vocabulary import (BASE_WEIGHTS, CALIBRATE, DATASET_KINDS, DATASETS, LABEL_NOISES, METHODS,
                              NORMALISATIONS, PREDICTIONS_KIND)
from sweeps.grid.checks import GridProblem, choice, listed, mapping_keys, number, three_ints
from sweeps.grid.shifts import ShiftMap

#: ``folds.file: paper``: the published folds of the paper's public code (calib.data).
PAPER_FOLDS = "paper"
SEARCHES = ("grid", "optuna")
NETWORK_PRESETS = ("paper", "tiny")
#: The methods an LR search covers by default (those of them with an LR list in the grid).
SEARCHED_METHODS = ("mc_decoder", "mc_center")
#: How another network's predictions are stored.
PREDICTION_VALUES = ("probability", "logit")


def _num(**rule) -> BeforeValidator:
    return BeforeValidator(lambda v: number(v, **rule))


def one_of(choices: Sequence[str], what: str) -> BeforeValidator:
    return BeforeValidator(lambda v: choice(v, choices, what))


Positive = Annotated[float, _num(positive=True)]
NonNegative = Annotated[float, _num(minimum=0)]
Number = Annotated[float, _num()]
Count = Annotated[int, _num(integer=True, minimum=1)]
Index = Annotated[int, _num(integer=True, minimum=0)]
Shape = Annotated[tuple[int, int, int], BeforeValidator(three_ints)]


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


# ---- datasets and data ---------------------------------------------------------------------------

class PhantomSpec(Section):
    """``datasets.<name>.phantom``: phantoms written on first use (calib.data.write_phantoms)
    when the dataset root is empty."""

    subjects: Annotated[int, _num(integer=True, minimum=2)] = 12
    seed: Index = 0
    shape: Annotated[tuple[int, int, int] | None,
                     BeforeValidator(lambda v: three_ints(v) if v else None)] = None
    #: how the labels are drawn from p*: iid per voxel or a correlated field (calib.data.synth)
    label_noise: Annotated[str, BeforeValidator(lambda v: choice(v, LABEL_NOISES, "label noise"))] = "iid"


class ImagesDataset(Section):
    """``datasets.<name>`` of a BraTS/ISLES dataset the sweep trains U-Nets on."""

    phantom: PhantomSpec | None = None
    kind: Annotated[str | None, BeforeValidator(
        lambda v: None if v is None else choice(v, DATASET_KINDS, "dataset kind"))] = None
    #: test-time shifts of the test subjects (sweeps.grid.shifts); the loader checks them
    shift: ShiftMap = Field(default_factory=dict)


def _foreground(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    fg = tuple(number(c, integer=True, minimum=1) for c in listed(value))
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


class PredictionsSpec(Section):
    """``datasets.<name>`` with ``kind: predictions``: another network's predictions
    (calib.data.predictions) and how to read them. The folders are as written in the file; the
    loader makes them paths relative to the launch directory."""

    kind: str = PREDICTIONS_KIND
    predictions: Annotated[Any, _required_folder("predictions")] = Field(None, validate_default=True)
    values: Annotated[str, one_of(PREDICTION_VALUES, "values")] = PREDICTION_VALUES[0]
    labels: Annotated[Any, _required_folder("labels")] = Field(None, validate_default=True)
    masks: Any = None
    mask_threshold: Number = 0.0
    foreground: Annotated[tuple[int, ...] | None, BeforeValidator(_foreground)] = None

    def to_dict(self) -> dict:
        return {"kind": PREDICTIONS_KIND, "predictions": str(self.predictions), "labels": str(self.labels),
                "values": self.values, "masks": None if self.masks is None else str(self.masks),
                "mask_threshold": self.mask_threshold,
                "foreground": None if self.foreground is None else list(self.foreground)}


class DataSection(Section):
    """``data``: where the raw data and the preprocessed cache live (paths as written)."""

    root: Any = None
    roots: Annotated[dict[str, Any], BeforeValidator(lambda v: mapping_keys(v, None))] = {}
    cache: Any = None


class Preprocessing(Section):
    """``preprocessing``: the arguments of calib.data.preprocess_dataset that change the cache."""

    spacing: Positive = 2.0
    shape: Shape = (136, 136, 82)
    normalisation: Annotated[str, one_of(NORMALISATIONS, "normalisation")] = NORMALISATIONS[0]


class Folds(Section):
    """``folds``: seeded K-fold (calib.data.make_folds), or read from ``file`` (a JSON path, or
    :data:`PAPER_FOLDS` for the public code's published case lists). ``only``: the folds whose
    trials run -- a smoke run or a pilot runs some folds of the same K-fold split, so its trials
    and their keys are those of the full study (the loader: a sorted tuple, empty for all)."""

    n_folds: Annotated[int, _num(integer=True, minimum=2)] = 5
    seed: Index = 0
    file: Any = None
    only: Annotated[tuple[int, ...] | None, BeforeValidator(
        lambda v: None if v is None else tuple(number(f, integer=True, minimum=0) for f in listed(v)))] = None

    @model_validator(mode="after")
    def _consistent(self) -> "Folds":
        only = self.only
        if only is not None and (not only or len(set(only)) != len(only)
                                 or any(f >= self.n_folds for f in only)):
            raise GridProblem(f"must list distinct folds of 0..{self.n_folds - 1}, got {list(only)}", "only")
        if self.file == PAPER_FOLDS and self.n_folds != 5:
            raise GridProblem(f"the paper's folds are 5, got {self.n_folds}", "n_folds")
        return self

    def run_folds(self) -> tuple[int, ...]:
        return tuple(self.only or ()) or tuple(range(self.n_folds))

    @property
    def is_paper(self) -> bool:
        return self.file == PAPER_FOLDS


# ---- the network ---------------------------------------------------------------------------------

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


class Network(Section):
    """``network``: the U-Net -- the paper's (``UNetConfig.paper``) or a tiny one
    (``UNetConfig.tiny``) -- as a preset name, or the preset with its settings."""

    preset: Annotated[str, one_of(NETWORK_PRESETS, "network preset")] = NETWORK_PRESETS[0]
    levels: Annotated[int, _num(integer=True, minimum=2)] = 3  # tiny only
    base: Count = 4  # tiny only
    #: L2 penalty on the conv kernels (Keras ``l2``; calib.schedule.TrainConfig), one value or one
    #: per dataset (others: 0); the public code: 1e-5 on the BraTS net, 0 on ISLES.
    weight_decay: Annotated[float | dict[str, float], BeforeValidator(_weight_decay)] = 0.0

    @classmethod
    def shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):  # ``network: tiny``; a bad name is reported against ``network``
            return {"preset": choice(value, NETWORK_PRESETS, "network preset")}
        return value

    def weight_decay_for(self, dataset: str) -> float:
        decay = self.weight_decay
        return float(decay.get(dataset, 0.0) if isinstance(decay, Mapping) else decay)


# ---- methods and the LR search -------------------------------------------------------------------

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
    lrs = tuple(number(v, positive=True) for v in listed(value))
    if not lrs or len(set(lrs)) != len(lrs):
        raise GridProblem(f"must list distinct learning rates, got {list(lrs)}")
    return lrs


def _method_params(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise GridProblem("must be a mapping")
    return dict(value)


class MethodSpec(Section):
    """``methods.<name>``: one calibration method -- its parameters, which go to the method as
    given (it checks them), and its LR setting: a list (an axis, only for methods with an LR
    axis), one fixed LR per base weights (fine-tuning), or none (the recipe decides). ``name``
    is its key in ``methods`` (set by the grid file that holds it)."""

    params: Annotated[dict[Any, Any], BeforeValidator(_method_params)] = {}
    lr: Annotated[tuple[float, ...] | dict[str, float] | None, BeforeValidator(_method_lr)] = None
    _name: str = PrivateAttr(default="")

    @property
    def name(self) -> str:
        return self._name

    @property
    def lrs(self) -> tuple[float, ...]:
        """The swept learning rates; empty without an axis."""
        return self.lr if isinstance(self.lr, tuple) else ()

    @property
    def lr_by_weights(self) -> Mapping[str, float]:
        """One fixed LR per base weights; empty without."""
        return self.lr if isinstance(self.lr, dict) else {}

    def learning_rates(self, weights: str) -> tuple[float | None, ...]:
        """The LR values this method takes for ``weights``; ``(None,)`` when it has no LR axis."""
        if self.lrs:
            return self.lrs
        if self.lr_by_weights:
            return (self.lr_by_weights[weights],)
        return (None,)


def methods_of(value: Any) -> dict:
    """``methods``: a non-empty mapping of method names."""
    if not isinstance(value, Mapping) or not value:
        raise GridProblem(f"must map method names to settings; valid choices: {', '.join(METHODS)}")
    for name in value:
        choice(name, METHODS, "method")
    return dict(value)


class Search(Section):
    """``search``: how MC learning rates are chosen -- the grid's list, or Optuna TPE with the
    same budget (``samples``, None: as many as the grid has LRs). ``methods``: None for those of
    :data:`SEARCHED_METHODS` with an LR list (the loader: the tuple searched)."""

    kind: Annotated[str, one_of(SEARCHES, "search")] = SEARCHES[0]
    lr_low: Positive = 1e-5
    lr_high: Positive = 1e-3
    samples: Count | None = None
    methods: Any = None
    seed: Index = 0

    @model_validator(mode="after")
    def _range(self) -> "Search":
        if self.lr_low >= self.lr_high:
            raise GridProblem(f"lr_low ({self.lr_low:g}) must be below lr_high ({self.lr_high:g})")
        return self


# ---- how trials run (in no trial key) ------------------------------------------------------------

class Resources(Section):
    """Ray resources of one trial; ``gpu`` may be a fraction below 1 (several trials per GPU)."""

    cpu: Positive = 1.0
    gpu: NonNegative = 0.0

    @model_validator(mode="after")
    def _fraction(self) -> "Resources":
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise GridProblem(f"a fraction is only allowed below 1, got {self.gpu}", "gpu")
        return self

    def as_ray(self) -> dict[str, float]:
        """The bundle for ``tune.PlacementGroupFactory``: ``{"CPU": .., "GPU": ..}``."""
        bundle = {"CPU": float(self.cpu)}
        if self.gpu:
            bundle["GPU"] = float(self.gpu)
        return bundle

    def __str__(self) -> str:
        gpu = f", gpu {self.gpu:g}" if self.gpu else ""
        return f"cpu {self.cpu:g}{gpu}"


class ResourcesSection(Section):
    """``resources``: per stage, and per method for calibrate trials."""

    pretrain: Resources = Resources()
    base: Resources = Resources()
    calibrate: Resources = Resources()
    methods: Annotated[dict[str, Resources], BeforeValidator(lambda v: mapping_keys(v, None))] = {}


def _strict_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise GridProblem(f"must be true or false, got {value!r}")
    return value


class Execution(Section):
    """``execution``: how trials run -- retries, concurrency, system metrics -- with the grid's
    ``resources`` (set by the grid file that holds it); none of it is in a trial key."""

    max_failures: Index = 2
    max_concurrent: Count | None = None
    system_metrics: Annotated[bool, BeforeValidator(_strict_bool)] = False
    _resources: ResourcesSection = PrivateAttr(default_factory=ResourcesSection)

    @property
    def resources(self) -> ResourcesSection:
        return self._resources

    def resources_for(self, stage: str, method: str) -> Resources:
        """Method-specific resources for calibrate trials, else the stage's."""
        if stage == CALIBRATE and method in self._resources.methods:
            return self._resources.methods[method]
        return getattr(self._resources, stage)

