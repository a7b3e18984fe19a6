"""The calibration methods by name: lookup with typo suggestions, building and loading."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from calib import vocabulary
from calib.methods.auxiliary import AuxiliaryConv
from calib.methods.base import CalibrationMethod, read_saved
from calib.methods.beta import BetaCalibration
from calib.methods.finetune import FineTuneLastLayer
from calib.methods.lts import LocalTemperatureScaling
from calib.methods.mc_dropout import MCCenter, MCDecoder
from calib.methods.nonparametric import HistogramBinning, IsotonicCalibration
from calib.methods.params import MethodError, check_weights, unknown_method
from calib.methods.platt import PlattScaling
from calib.methods.recipes import FINETUNE_LR
from calib.methods.temperature import TemperatureScaling
from calib.methods.tta import TestTimeFlips

#: The paper's five methods first, then those beyond the paper (calib.vocabulary's order).
PAPER_METHODS: tuple[type[CalibrationMethod], ...] = (
    PlattScaling, AuxiliaryConv, FineTuneLastLayer, MCDecoder, MCCenter)
BEYOND_PAPER_METHODS: tuple[type[CalibrationMethod], ...] = (
    TemperatureScaling, LocalTemperatureScaling, BetaCalibration, HistogramBinning,
    IsotonicCalibration, TestTimeFlips)
METHODS: dict[str, type[CalibrationMethod]] = {
    cls.name: cls for cls in (*PAPER_METHODS, *BEYOND_PAPER_METHODS)
}
#: Every method name, :data:`calib.vocabulary.METHODS` (a test checks they are the classes' names).
METHOD_NAMES: tuple[str, ...] = vocabulary.METHODS


def get_method(name: str) -> type[CalibrationMethod]:
    """The method class called ``name``; an unknown name suggests the closest valid one."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise unknown_method(name) from None


def method_has_lr(name: str) -> bool:
    """True where the learning rate is a swept axis of the grid (the MC methods).

    Platt, auxiliary and temperature use the calibration recipe's fixed 5e-3; fine-tuning's LR is
    fixed by the base weights (:func:`default_lr`).
    """
    return get_method(name).has_lr


def default_lr(name: str, weights: str = "CE") -> float:
    """The initial learning rate ``name`` uses for base ``weights`` when none is given.

    Raises MethodError for the methods that do not train by gradient steps (histogram binning,
    isotonic regression, test-time flips).
    """
    cls = get_method(name)
    check_weights(name, weights)
    if cls is FineTuneLastLayer:
        return FINETUNE_LR[weights]
    if "lr" not in cls.DEFAULTS:
        raise MethodError(f"method {name!r} has no learning rate (it is not trained by gradient steps)")
    return float(cls.DEFAULTS["lr"])


def build_method(name: str, params: Mapping[str, Any] | None = None, **context) -> CalibrationMethod:
    """``get_method(name)(params, **context)`` (context: weights, net_cfg, base_weights, schedule)."""
    return get_method(name)(params, **context)


def load_method(path: Path) -> CalibrationMethod:
    """Rebuild a method saved with :meth:`CalibrationMethod.save` (no base weights needed)."""
    payload = read_saved(path)
    method = get_method(payload["method"])(payload["params"], weights=payload["weights"],
                                           net_cfg=payload["net_cfg"])
    try:
        method.load_state_dict(payload["state"])
    except RuntimeError as exc:
        raise MethodError(f"{path}: saved state does not fit method {payload['method']!r} ({exc})") from exc
    return method
