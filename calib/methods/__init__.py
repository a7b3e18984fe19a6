"""Post hoc calibration methods behind one interface (:class:`CalibrationMethod`) and a registry.

``platt``, ``auxiliary`` and ``temperature`` learn a small map on cached base logits;
``finetune`` retrains the base net's last layer; ``mc_decoder`` / ``mc_center`` switch dropout on
and retrain the layers after it, predicting the mean of 20 samples.

Beyond the paper: ``lts`` (a conv net predicting a per-voxel temperature; keeps the segmentation),
``beta`` (beta calibration, three parameters), ``histogram_binning`` and ``isotonic``
(non-parametric maps of the base probability, fitted in closed form), all on cached logits; and
``tta`` (the base U-Net's mean over flipped inputs, with a standard-deviation map; training-free).

The names below are loaded on first use (the registry imports torch): ``calib.methods.params``
and ``calib.methods.recipes``, which the sweep reads when it checks a grid, stay torch-free.
"""

from __future__ import annotations

import importlib

from calib.methods.params import AUX_KERNELS, BASE_WEIGHTS, MethodError

#: Name -> the module that defines it (imported when the name is first asked for).
_LAZY = {
    **dict.fromkeys(("CalibrationMethod", "SubjectRef", "SubjectSet"), "calib.methods.base"),
    **dict.fromkeys(("BEYOND_PAPER_METHODS", "METHOD_NAMES", "METHODS", "PAPER_METHODS",
                     "build_method", "default_lr", "get_method", "load_method", "method_has_lr"),
                    "calib.methods.registry"),
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
