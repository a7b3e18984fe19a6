"""Post hoc calibration methods behind one interface (:class:`CalibrationMethod`) and a registry.

``platt``, ``auxiliary`` and ``temperature`` learn a small map on cached base logits;
``finetune`` retrains the base net's last layer; ``mc_decoder`` / ``mc_center`` switch dropout on
and retrain the layers after it, predicting the mean of 20 samples.

Beyond the paper: ``lts`` (a conv net predicting a per-voxel temperature; keeps the segmentation),
``beta`` (beta calibration, three parameters), ``histogram_binning`` and ``isotonic``
(non-parametric maps of the base probability, fitted in closed form), all on cached logits; and
``tta`` (the base U-Net's mean over flipped inputs, with a standard-deviation map; training-free).
"""

from calib.methods.base import CalibrationMethod, SubjectRef, SubjectSet
from calib.methods.params import AUX_KERNELS, BASE_WEIGHTS, MethodError
from calib.methods.registry import (
    BEYOND_PAPER_METHODS,
    METHOD_NAMES,
    METHODS,
    PAPER_METHODS,
    build_method,
    default_lr,
    get_method,
    load_method,
    method_has_lr,
)

__all__ = [
    "AUX_KERNELS",
    "BASE_WEIGHTS",
    "BEYOND_PAPER_METHODS",
    "CalibrationMethod",
    "METHODS",
    "METHOD_NAMES",
    "MethodError",
    "PAPER_METHODS",
    "SubjectRef",
    "SubjectSet",
    "build_method",
    "default_lr",
    "get_method",
    "load_method",
    "method_has_lr",
]
