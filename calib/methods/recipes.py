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
#: Voxels a closed-form map is fitted on at most (a seeded subsample beyond that).
MAX_VOXELS = 2_000_000
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
    base weights). ``fill(params, weights)``: fills those recipe-dependent values in the given
    parameters before they are checked.
    """

    uses: str
    defaults: Mapping[str, Any]
    has_lr: bool = False
    fill: Callable[[dict, str], dict] | None = field(default=None, compare=False)


_CLOSED_FORM = {"max_voxels": MAX_VOXELS, "seed": 0}
_MC = {**CALIBRATION_SCHEDULE, "lr": 1e-4, "batch_size": 2, "loss": None, "n_samples": 20,
       "dropout_rate": 0.5}

RECIPES: Mapping[str, Recipe] = MappingProxyType({
    "platt": Recipe("logits", dict(CALIBRATION_SCHEDULE)),
    "auxiliary": Recipe("logits", {**CALIBRATION_SCHEDULE, "k": 5, "dims": 2, "batch_size": None},
                        fill=_auxiliary_batch),
    "finetune": Recipe("images", {**CALIBRATION_SCHEDULE, "lr": None, "batch_size": 2, "loss": "ce"},
                       fill=_finetune_lr),
    "mc_decoder": Recipe("images", dict(_MC), has_lr=True),
    "mc_center": Recipe("images", dict(_MC), has_lr=True),
    "temperature": Recipe("logits", dict(CALIBRATION_SCHEDULE)),
    "lts": Recipe("logits", {**CALIBRATION_SCHEDULE, "hidden": 8}),
    "beta": Recipe("logits", dict(_CLOSED_FORM)),
    "histogram_binning": Recipe("logits", {**_CLOSED_FORM, "n_bins": 20}),
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
    method has (:data:`calib.vocabulary.METHOD_SCHEDULE_KEYS`), then ``params``.

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
            if key in defaults:
                defaults[key] = getattr(schedule, key)
    return resolve_params(name, defaults, params)
