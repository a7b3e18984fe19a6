"""Post hoc calibration methods behind one interface (:class:`CalibrationMethod`) and a registry.

``platt``, ``auxiliary`` and ``temperature`` learn a small map on cached base logits;
``finetune`` retrains the base net's last layer; ``mc_decoder`` / ``mc_center`` switch dropout on
and retrain the layers after it, predicting the mean of 20 samples.
"""

from calib.methods.base import CalibrationMethod, SubjectRef, SubjectSet
from calib.methods.params import AUX_KERNELS, BASE_WEIGHTS, MethodError
from calib.methods.registry import (
    METHOD_NAMES,
    METHODS,
    build_method,
    default_lr,
    get_method,
    load_method,
    method_has_lr,
)

__all__ = [
    "AUX_KERNELS",
    "BASE_WEIGHTS",
    "CalibrationMethod",
    "METHODS",
    "METHOD_NAMES",
    "MethodError",
    "SubjectRef",
    "SubjectSet",
    "build_method",
    "default_lr",
    "get_method",
    "load_method",
    "method_has_lr",
]
