"""Each training loss's parameters with their defaults, and how given parameters resolve. No torch,
so a grid file is checked without loading it (calib.losses holds the loss functions).

The defaults are the ones the papers use: focal gamma 2 (Lin et al. 2017), SVLS sigma 1 on a
3-voxel kernel (Islam & Glocker 2021), CE + ACE with weight 1 on 20 bins (Barfoot et al.).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

#: Each loss's parameters with their defaults (a grid's ``losses.<weights>`` overrides them).
LOSS_PARAMS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "ce": {}, "sd": {}, "focal": {"gamma": 2.0},
    "svls": {"sigma": 1.0, "size": 3, "centre": "gaussian"},
    "ace": {"weight": 1.0, "n_bins": 20},
})
#: Values a string parameter may take.
LOSS_CHOICES: Mapping[tuple[str, str], tuple[str, ...]] = MappingProxyType({
    ("svls", "centre"): ("gaussian", "neighbours"),
})


def _value(name: str, key: str, default: Any, value: Any) -> Any:
    """``value`` in the type of ``default``: floats >= 0, integers >= 1, one of the choices."""
    where = f"loss {name!r}: parameter {key!r}"
    if isinstance(default, str):
        choices = LOSS_CHOICES[(name, key)]
        if value not in choices:
            raise ValueError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if isinstance(default, int):
        if int(value) != value or value < 1:
            raise ValueError(f"{where} must be an integer >= 1, got {value!r}")
        return int(value)
    if value < 0:
        raise ValueError(f"{where} must be >= 0, got {value!r}")
    return float(value)


def loss_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The defaults of loss ``name`` updated by ``params``; an unknown loss or key, or a value of
    the wrong kind, is a ValueError naming it and the valid choices."""
    if name not in LOSS_PARAMS:
        raise ValueError(f"unknown loss {name!r}; valid choices: {sorted(LOSS_PARAMS)}")
    resolved = dict(LOSS_PARAMS[name])
    for key, value in (params or {}).items():
        if key not in resolved:
            valid = ", ".join(sorted(resolved)) or "none"
            raise ValueError(f"loss {name!r}: unknown parameter {key!r}; valid: {valid}")
        resolved[key] = _value(name, key, LOSS_PARAMS[name][key], value)
    return resolved
