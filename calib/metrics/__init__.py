"""Segmentation and calibration metrics: pure functions of one volume.

Every function takes numpy arrays or torch tensors (any device; a GPU tensor is processed on its
GPU) of probabilities ``probs`` in [0, 1], binary ``labels`` and an optional bool ``mask`` of the
same shape, and returns a Python float (or numpy arrays for the bins). No Python loop runs over
voxels. Bad input raises :class:`MetricInputError` naming the argument.

Conventions (the paper's public code, AxelJanRousseau/PostTrainCalibration ``my_utils/metrics.py``):

* ``ece``: positive-class ECE, 20 equal bins, left-closed ``[k/20, (k+1)/20)`` with p = 1 in the
  last bin, empty bins skipped, voxels inside the mask only, one value per volume
  (``sum_k (n_k/N) |acc_k - conf_k|``). Bin membership is exact for float32 input (see
  :mod:`calib.metrics.binning`). A fraction; the paper's tables show %.
* ``dice``: prediction ``p > 0.5``; empty prediction and empty label -> 1.0.
* Empty mask: ``ece``, ``mce``, ``top_label_ece``, ``classwise_ece``, ``adaptive_ece``, ``brier``,
  ``nll``, ``boundary_ece``, ``true_ece``, ``p_star_distance``, ``error_detection_auroc`` -> NaN; ``dice`` and
  ``uncertainty_error_overlap`` -> 1.0 (nothing predicted, nothing to find).

Beyond the paper:

* ``adaptive_ece``: equal-mass bins (:mod:`calib.metrics.adaptive`); ``classwise_ece``: mean of the
  foreground and background ECE (Kull et al. 2019).
* ``uncertainty_error_overlap`` (Jungo et al. 2020): Dice between the normalised entropy
  ``H(p)/ln 2 > 0.5`` and the error map ``(p > 0.5) != label``; ``error_detection_auroc``: AUROC of
  the error voxels scored by ``min(p, 1 - p)`` (:mod:`calib.metrics.uncertainty`). Both take
  another uncertainty map (e.g. a standard deviation over MC or flip samples) as ``uncertainty``.
* Against the known probability ``p*`` of a phantom (:mod:`calib.metrics.truth`):
  ``true_ece(probs, true_probs, mask)``, the label-free true ECE over the same bins as ``ece``
  (``sum_k (n_k/N) |mean_k p - mean_k p*|``: what ECE estimates), and
  ``p_star_distance(probs, true_probs, mask)``, ``mean |p - p*|`` (>= the true ECE by Jensen; it
  counts sharpness too, so it is not a calibration error).
* Estimators of the calibration error to set against that truth (:mod:`calib.metrics.estimators`):
  ``ece_estimates`` (ECE at 10, 20, 40 equal-width bins, adaptive, the monotonic sweep of Roelofs
  et al. 2022, the debiased L1 and L2 errors of Kumar et al. 2019, the plug-in L2), ``true_l2_ce``.

How other libraries differ (read from torchmetrics 1.9.0 and MONAI 1.6.1 sources):

* torchmetrics ``binary_calibration_error(n_bins, norm="l1")``: also positive-class and
  left-closed (``torch.bucketize(p, linspace(0, 1, n+1), right=True) - 1``), but p = 1 gets a
  bin of its own (index n) instead of joining the last bin; the edges are a ``linspace`` in the
  input's dtype, so float32 input is binned against float32-rounded edges (``np.float32(0.95)``
  lands in bin 19, not 18); sums are in the input dtype (float32 accumulation over millions of
  voxels); inputs outside [0, 1] are taken as logits and passed through a sigmoid; no mask (pass
  the masked voxels). With float64 probabilities < 1 it agrees with ``ece`` to ~1e-12.
* MONAI ``CalibrationErrorMetric(num_bins, calibration_reduction="expected")``: edges are
  ``linspace(0, 1 + eps_float32, n+1)`` in float32 and ``bucketize(right=False)``, so a value
  equal to an edge goes to the bin *below* it (right-closed in effect: 0.25 -> bin 4, 0.05 -> bin
  0), despite the ``[left, right)`` wording of its docs; p = 1 joins the last bin; everything is
  float32; per (batch, channel) item, empty items give NaN and ``metric_reduction="mean"`` averages
  the non-NaN items; no mask. Away from the edges it agrees with ``ece`` to float32 precision.
"""

from calib.metrics._inputs import MetricInputError
from calib.metrics.adaptive import adaptive_bins, adaptive_ece
from calib.metrics.binning import (
    classwise_ece,
    ece,
    ece_from_bins,
    mce,
    mce_from_bins,
    reliability_bins,
    top_label_ece,
)
from calib.metrics.boundary import boundary_band, boundary_ece
from calib.metrics.estimators import (
    ESTIMATORS,
    debiased_ece_from_bins,
    debiased_l2_ce_from_bins,
    ece_estimates,
    l2_ce_from_bins,
    sweep_ece,
    true_l2_ce,
)
from calib.metrics.scores import NLL_EPS, brier, dice, nll
from calib.metrics.truth import p_star_distance, true_ece, true_reliability_bins
from calib.metrics.uncertainty import (
    UEO_THRESHOLD,
    error_detection_auroc,
    normalised_entropy,
    uncertainty_error_overlap,
)

__all__ = [
    "ESTIMATORS",
    "MetricInputError",
    "NLL_EPS",
    "UEO_THRESHOLD",
    "adaptive_bins",
    "adaptive_ece",
    "boundary_band",
    "boundary_ece",
    "brier",
    "classwise_ece",
    "debiased_ece_from_bins",
    "debiased_l2_ce_from_bins",
    "dice",
    "ece",
    "ece_estimates",
    "ece_from_bins",
    "error_detection_auroc",
    "l2_ce_from_bins",
    "mce",
    "mce_from_bins",
    "nll",
    "normalised_entropy",
    "p_star_distance",
    "reliability_bins",
    "sweep_ece",
    "top_label_ece",
    "true_ece",
    "true_l2_ce",
    "true_reliability_bins",
    "uncertainty_error_overlap",
]
