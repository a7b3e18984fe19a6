"""Validation of calibration-method parameters: one place, errors that name the key and choices.

No torch: the sweep checks a grid's method parameters with it before anything is built.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any

from calib.vocabulary import BASE_WEIGHTS, EXTERNAL_WEIGHTS, METHODS

#: Kernel sizes of the auxiliary conv the paper tried (k = 1 is Platt scaling).
AUX_KERNELS = (1, 5, 7, 9, 11)
#: Flip sets of test-time augmentation: the identity and one flip per spatial axis (4 passes), or
#: every subset of the three axes (8 passes).
FLIP_SETS = ("single", "all")
#: How Platt and temperature scaling are fitted: full-batch L-BFGS to the likelihood optimum
#: (the default), or the paper's mini-batch Adam schedule (calib.methods.logit_based).
OPTIMIZERS = ("lbfgs", "adam")
#: Histogram binning's bins: equal width in p (Zadrozny & Elkan 2001), or equal mass (quantiles).
BINNINGS = ("equal_width", "equal_mass")


class MethodError(ValueError):
    """A bad method name, parameter or input; the message names the culprit and valid choices."""


def closest(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to ``name``, or an empty string."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _positive_float(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _int_at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= n


def _one_of(choices) -> Callable[[Any], bool]:
    return lambda v: v in choices


#: key -> (check, description of the valid values). Methods pick the keys they accept.
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (_positive_float, "a finite number > 0"),
    "max_epochs": (_int_at_least(1), "an integer >= 1"),
    "lr_factor": (lambda v: _positive_float(v) and v < 1, "a number in (0, 1)"),
    "lr_patience": (_int_at_least(0), "an integer >= 0"),
    "early_stop_patience": (_int_at_least(1), "an integer >= 1"),
    "min_rel_improvement": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                            and math.isfinite(v) and v >= 0, "a number >= 0"),
    "seed": (_int_at_least(0), "an integer >= 0"),
    "batch_size": (_int_at_least(1), "an integer >= 1"),
    "k": (_one_of(AUX_KERNELS), f"one of {AUX_KERNELS}"),
    "dims": (_one_of((2, 3)), "2 (conv on z-slices, as the paper) or 3 (3-D conv)"),
    "n_samples": (_int_at_least(1), "an integer >= 1"),
    "dropout_rate": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                     and 0 < v < 1, "a number in (0, 1)"),
    "loss": (_one_of(("ce", "sd")), "'ce' (cross-entropy) or 'sd' (soft Dice)"),
    "hidden": (_int_at_least(1), "an integer >= 1"),
    "n_bins": (_int_at_least(2), "an integer >= 2"),
    "max_voxels": (_int_at_least(1000), "an integer >= 1000"),
    "flips": (_one_of(FLIP_SETS), f"one of {FLIP_SETS}"),
    "optimizer": (_one_of(OPTIMIZERS), f"one of {OPTIMIZERS}"),
    "binning": (_one_of(BINNINGS), f"one of {BINNINGS}"),
    "min_bin_count": (_int_at_least(1), "an integer >= 1"),
    "monotone": (lambda v: isinstance(v, bool), "true or false"),
}

def unknown_method(name: Any) -> MethodError:
    """The error for a calibration method name that is none of the study's, with a suggestion."""
    return MethodError(f"unknown calibration method {name!r}{closest(name, METHODS)}; "
                       f"valid choices: {', '.join(METHODS)}")


def resolve_params(method: str, defaults: Mapping[str, Any], params: Mapping[str, Any] | None) -> dict:
    """``defaults`` updated with ``params``, every value checked.

    Raises MethodError naming the method, the key (with the closest valid key on a typo) and the
    valid values. A default of ``None`` means "decided by the method" (e.g. an LR by base weights)
    and is not checked.
    """
    params = dict(params or {})
    unknown = [k for k in params if k not in defaults]
    if unknown:
        key = unknown[0]
        raise MethodError(f"method {method!r}: unknown parameter {key!r}{closest(key, defaults)}; "
                          f"valid parameters: {', '.join(sorted(defaults))}")
    resolved = {**defaults, **params}
    for key, value in resolved.items():
        if value is None and defaults.get(key) is None:
            continue
        check, valid = CHECKS[key]
        if not check(value):
            raise MethodError(f"method {method!r}: parameter {key}={value!r} is invalid; it must be {valid}")
    return resolved


def check_weights(method: str, weights: str) -> str:
    """``weights`` if it is one of :data:`BASE_WEIGHTS` or :data:`EXTERNAL_WEIGHTS`, else a
    MethodError listing them."""
    if weights not in BASE_WEIGHTS and weights != EXTERNAL_WEIGHTS:
        raise MethodError(f"method {method!r}: unknown base weights {weights!r}"
                          f"{closest(weights, BASE_WEIGHTS)}; valid choices: {', '.join(BASE_WEIGHTS)}")
    return weights
