"""Beta calibration (Kull, Silva Filho & Flach, "Beta calibration: a well-founded and easily
implemented improvement on logistic calibration for binary classifiers", AISTATS 2017).

What it fits: three scalars ``a, b, c`` of the map ``logit(q) = a ln p - b ln(1 - p) + c`` from the
base probability ``p = sigmoid(z)`` to the calibrated ``q``. It is logistic regression of the label
on the two features ``ln p`` and ``-ln(1 - p)`` -- Platt scaling is the special case ``a = b``
(``a z + c``) -- so it can bend the map differently near 0 and near 1; ``a = b = 1, c = 0`` is the
identity. The features are computed from the cached logit as ``log_expit(z)`` and
``log_expit(-z)``, finite for any ``z``.

How it is fitted: by maximum likelihood on the calibration voxels, as Kull et al.'s own
implementation does -- ``sklearn.linear_model.LogisticRegression`` without penalty (``C = inf``,
L-BFGS) -- and with their rule for monotonicity: when ``a`` comes out negative the fit is redone
without the ``ln p`` feature (``a = 0``), when ``b`` does, without ``-ln(1 - p)`` (``b = 0``; if
both do, the map is the constant base rate), so the map is non-decreasing. The problem is convex with three unknowns, so one full-batch fit finds
the optimum; the minibatch Adam schedule the other logit methods use stops short of it (on a
phantom with true ``(a, b, c) = (0.5, 2, 0.3)`` it ended at ``(0.59, 1.74, 0.55)`` where the
likelihood optimum is ``(0.49, 1.96, 0.31)``). No epochs: see :mod:`calib.methods.closed_form` for
the ``FitResult`` and the deterministic subsampling to ``max_voxels``.

Can it change the 0.5-threshold segmentation? Yes: ``q = 0.5`` moves to wherever
``a ln p - b ln(1 - p) + c = 0``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.special import expit, log_expit

from calib.methods.closed_form import ClosedFormMap
from calib.methods.params import MethodError


def beta_features(z: np.ndarray) -> np.ndarray:
    """``(ln p, -ln(1 - p))`` of ``p = sigmoid(z)``, shape ``z.shape + (2,)``, float64."""
    z = np.asarray(z, dtype=np.float64)
    return np.stack([log_expit(z), -log_expit(-z)], axis=-1)


def _logistic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Unpenalised logistic regression of ``y`` on the columns of ``x``: (coefficients, intercept)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=np.inf, max_iter=1000, tol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a fit that stopped early is an error
        model.fit(x, y)
    return np.asarray(model.coef_[0], dtype=np.float64), float(model.intercept_[0])


class BetaCalibration(ClosedFormMap):
    """``logit(q) = a ln p - b ln(1 - p) + c`` fitted by maximum likelihood; parameters
    ``max_voxels`` (2,000,000) and ``seed`` (subsampling)."""

    name = "beta"
    STATE_KEYS = ("abc",)

    def fit_map(self, z: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
        if y.min() == y.max():
            raise MethodError(f"method {self.name!r}: the calibration voxels hold only label "
                              f"{int(y[0])}; beta calibration needs both classes")
        x = beta_features(z)
        coef, active = np.zeros(2), [0, 1]
        while active:
            fitted, c = _logistic(x[:, active], y)
            negative = [k for k, v in zip(active, fitted) if v < 0]
            if not negative:
                coef[active] = fitted
                break
            # Kull et al.: refit without the feature whose coefficient breaks monotonicity (a
            # first); labels that fall with p on both ends leave only the constant base rate
            active.remove(negative[0])
        else:
            rate = float(y.mean())
            c = float(np.log(rate) - np.log1p(-rate))
        return {"abc": torch.tensor([coef[0], coef[1], c], dtype=torch.float64)}

    def map_logits(self, z: np.ndarray) -> np.ndarray:
        a, b, c = self.state()["abc"]
        x = beta_features(z)
        return expit(a * x[..., 0] + b * x[..., 1] + c)

    @property
    def abc(self) -> tuple[float, float, float]:
        """The fitted ``(a, b, c)``."""
        a, b, c = self.state()["abc"]
        return float(a), float(b), float(c)

    def describe(self) -> dict[str, float]:
        if not self.fitted:
            return {}
        a, b, c = self.abc
        return {"beta_a": a, "beta_b": b, "beta_c": c}
