"""Each calibration method's recipe: what it reads, whether its LR is an axis, every parameter it
accepts with its default (the paper's), and how its parameters resolve. No torch.

The method classes take their ``uses``, ``has_lr`` and ``DEFAULTS`` from here
(:meth:`calib.methods.base.CalibrationMethod.__init_subclass__`) and resolve their parameters
with :func:`resolve`; the sweep resolves a grid's methods with the same function, without
building a network (``sweeps.config.resolved_method_params``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from calib.methods.params import check_weights, resolve_params, unknown_method
from calib.vocabulary import METHOD_SCHEDULE_KEYS

#: The paper's calibration recipe: CE on batches of 64 z-slices, Adam 5e-3, LR x0.1 on a plateau
#: of 3 epochs, <= 50 epochs, early stop after 6 epochs without improvement.
CALIBRATION_SCHEDULE = MappingProxyType({
    "lr": 5e-3, "max_epochs": 50, "lr_factor": 0.1, "lr_patience": 3, "early_stop_patience": 6,
    "min_rel_improvement": 1e-4, "seed": 0, "batch_size": 64,
})
#: Voxels a closed-form map, or a full-batch Platt / temperature fit, is fitted on at most (a
#: seeded subsample beyond that, calib.methods.closed_form.calibration_voxels).
MAX_VOXELS = 2_000_000
#: Local temperature scaling stops on a plateau of its validation loss: no relative improvement of
#: ``min_rel_improvement`` on its best through this many LR cuts (x ``lr_factor`` after
#: ``lr_patience + 1`` such epochs each), i.e. ``early_stop_patience = (LTS_PLATEAU_CUTS + 1) *
#: (lr_patience + 1)`` epochs: 12 with the paper's ``lr_patience = 3`` (calib.methods.lts).
LTS_PLATEAU_CUTS = 2
#: Local temperature scaling's cap on epochs: a guard, not its stop rule; the calibrate stage's
#: ``max_epochs`` does not replace it (a grid sets ``methods.lts.params.max_epochs`` to cap it).
LTS_MAX_EPOCHS = 200
#: Histogram binning merges a bin holding fewer calibration voxels than this with a neighbour
#: (the label fraction of 100 voxels has a standard error of at most 0.05).
MIN_BIN_COUNT = 100
#: Fine-tuning's LR by base weights (the public code: 1e-4 after CE, 1e-3 after soft Dice). The
#: train-time calibration losses (focal, SVLS, CE + ACE) are cross-entropy variants whose logits stay
#: at CE's scale, so they take CE's rate; the paper gives no value for them.
FINETUNE_LR = MappingProxyType({"CE": 1e-4, "CE-SD": 1e-3, "SD": 1e-3,
                                "focal": 1e-4, "svls": 1e-4, "ace": 1e-4})
#: The auxiliary conv's batch size by its dims: 64 z-slices (2-D), or 2 volumes (3-D).
AUXILIARY_BATCH = MappingProxyType({2: 64, 3: 2})


def _finetune_lr(params: dict, weights: str) -> dict:
    if params.get("lr") is None:
        params["lr"] = FINETUNE_LR.get(weights, FINETUNE_LR["CE"])  # bad weights caught after
    return params


def _lts_plateau(params: dict) -> dict:
    if params.get("early_stop_patience") is None:
        params["early_stop_patience"] = (LTS_PLATEAU_CUTS + 1) * (params["lr_patience"] + 1)
    return params


def _auxiliary_batch(params: dict, weights: str) -> dict:
    if params.get("batch_size") is None:
        dims = params.get("dims", RECIPES["auxiliary"].defaults["dims"])
        params["batch_size"] = AUXILIARY_BATCH[2] if dims == 2 else AUXILIARY_BATCH[3]
    return params


@dataclass(frozen=True)
class Recipe:
    """One method's recipe.

    ``uses``: ``"logits"`` (the base stage's logit cache) or ``"images"`` (the preprocessed images
    and the base network). ``has_lr``: the LR is a swept axis of the grid. ``defaults``: every
    accepted parameter with its default; ``None`` means "decided by ``fill``" (e.g. an LR by
    base weights) or by ``finish``. ``fill(params, weights)``: fills those recipe-dependent values
    in the given parameters before they are checked. ``own_schedule``: schedule keys whose
    default is the recipe's own, not the calibrate stage's (:func:`resolve`). ``finish(resolved)``:
    fills the values that depend on other resolved parameters (LTS's plateau patience).
    """

    uses: str
    defaults: Mapping[str, Any]
    has_lr: bool = False
    fill: Callable[[dict, str], dict] | None = field(default=None, compare=False)
    own_schedule: tuple[str, ...] = ()
    finish: Callable[[dict], dict] | None = field(default=None, compare=False)


_CLOSED_FORM = {"max_voxels": MAX_VOXELS, "seed": 0}
#: Platt and temperature scaling: full-batch L-BFGS on the (subsampled) calibration voxels by
#: default; ``optimizer: adam`` is the paper's schedule above (lr, batch_size, epochs, patience).
_SCALING = {**CALIBRATION_SCHEDULE, "optimizer": "lbfgs", "max_voxels": MAX_VOXELS}
_MC = {**CALIBRATION_SCHEDULE, "lr": 1e-4, "batch_size": 2, "loss": None, "n_samples": 20,
       "dropout_rate": 0.5}

RECIPES: Mapping[str, Recipe] = MappingProxyType({
    "platt": Recipe("logits", dict(_SCALING)),
    "auxiliary": Recipe("logits", {**CALIBRATION_SCHEDULE, "k": 5, "dims": 2, "batch_size": None},
                        fill=_auxiliary_batch),
    "finetune": Recipe("images", {**CALIBRATION_SCHEDULE, "lr": None, "batch_size": 2, "loss": "ce"},
                       fill=_finetune_lr),
    "mc_decoder": Recipe("images", dict(_MC), has_lr=True),
    "mc_center": Recipe("images", dict(_MC), has_lr=True),
    "temperature": Recipe("logits", dict(_SCALING)),
    "lts": Recipe("logits", {**CALIBRATION_SCHEDULE, "hidden": 8, "max_epochs": LTS_MAX_EPOCHS,
                             "early_stop_patience": None},
                  own_schedule=("max_epochs", "early_stop_patience"), finish=_lts_plateau),
    "beta": Recipe("logits", dict(_CLOSED_FORM)),
    "histogram_binning": Recipe("logits", {**_CLOSED_FORM, "n_bins": 20, "binning": "equal_width",
                                           "min_bin_count": MIN_BIN_COUNT, "monotone": True}),
    "isotonic": Recipe("logits", dict(_CLOSED_FORM)),
    "tta": Recipe("images", {"flips": "all"}),
})


def get_recipe(name: str) -> Recipe:
    """The recipe of method ``name``; an unknown name is the registry's MethodError."""
    try:
        return RECIPES[name]
    except (KeyError, TypeError):
        raise unknown_method(name) from None


def resolve(name: str, params: Mapping[str, Any] | None, weights: str, schedule=None) -> dict:
    """Every parameter method ``name`` trains with for base ``weights``: its defaults, then the
    schedule fields of ``schedule`` (a calib.schedule.TrainConfig, the calibrate stage's) that the
    method has (:data:`calib.vocabulary.METHOD_SCHEDULE_KEYS`) and that are not the recipe's own
    (``Recipe.own_schedule``), then ``params``, then the recipe's ``finish``.

    Raises MethodError naming the method, the key and the valid values.
    """
    recipe = get_recipe(name)
    params = dict(params or {})
    if recipe.fill is not None:
        params = recipe.fill(params, weights)
    check_weights(name, weights)
    defaults = dict(recipe.defaults)
    if schedule is not None:
        for key in METHOD_SCHEDULE_KEYS:
            if key in defaults and key not in recipe.own_schedule:
                defaults[key] = getattr(schedule, key)
    resolved = resolve_params(name, defaults, params)
    return recipe.finish(resolved) if recipe.finish is not None else resolved
