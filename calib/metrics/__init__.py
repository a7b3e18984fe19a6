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
* Empty mask: ``ece``, ``mce``, ``top_label_ece``, ``brier``, ``nll``, ``boundary_ece`` -> NaN;
  ``dice`` -> 1.0 (nothing predicted, nothing to find).

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
from calib.metrics.binning import (
    ece,
    ece_from_bins,
    mce,
    mce_from_bins,
    reliability_bins,
    top_label_ece,
)
from calib.metrics.boundary import boundary_band, boundary_ece
from calib.metrics.scores import NLL_EPS, brier, dice, nll

__all__ = [
    "MetricInputError",
    "NLL_EPS",
    "boundary_band",
    "boundary_ece",
    "brier",
    "dice",
    "ece",
    "ece_from_bins",
    "mce",
    "mce_from_bins",
    "nll",
    "reliability_bins",
    "top_label_ece",
]
