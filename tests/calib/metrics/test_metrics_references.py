"""Agreement with torchmetrics and MONAI where the conventions coincide, and the documented
places where they differ (see the calib.metrics module docstring)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import CalibrationErrorMetric
from torchmetrics.functional.classification import binary_calibration_error

from calib.metrics import ece, mce, reliability_bins

torch.set_num_threads(1)


def _random(seed, shape, dtype=np.float64):
    rng = np.random.default_rng(seed)
    p = rng.random(shape).astype(dtype)
    p[p >= 1] = 0.5
    y = (rng.random(shape) < p ** 1.5).astype(np.uint8)  # miscalibrated on purpose
    m = rng.random(shape) < 0.7
    return p, y, m


def _away_from_edges(p, n=20, tol=1e-4):
    return np.abs(p * n - np.round(p * n)) > tol


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_bins", [10, 20])
def test_agrees_with_torchmetrics_on_float64(seed, n_bins):
    p, y, m = _random(seed, (30, 31, 12))
    ours = ece(p, y, m, n_bins=n_bins)
    theirs = binary_calibration_error(torch.from_numpy(p[m]), torch.from_numpy(y[m]), n_bins=n_bins, norm="l1")
    assert ours == pytest.approx(float(theirs), abs=1e-12)
    theirs_max = binary_calibration_error(torch.from_numpy(p[m]), torch.from_numpy(y[m]), n_bins=n_bins, norm="max")
    assert mce(p, y, m, n_bins=n_bins) == pytest.approx(float(theirs_max), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_monai_away_from_bin_edges(seed):
    p, y, m = _random(seed, (2, 1, 20, 21, 11), np.float32)
    m &= _away_from_edges(p)  # MONAI's edges sit at k/20 * (1 + eps32)
    ours = [ece(p[i], y[i], m[i]) for i in range(2)]
    # MONAI has no mask: give it the masked voxels of each volume as one (1, 1, n) item
    metric = CalibrationErrorMetric(num_bins=20, calibration_reduction="expected", metric_reduction="none")
    for i in range(2):
        pi = torch.from_numpy(p[i][m[i]]).view(1, 1, -1)
        yi = torch.from_numpy(y[i][m[i]].astype(np.float32)).view(1, 1, -1)
        got = float(metric(y_pred=pi, y=yi).view(-1)[0])
        assert ours[i] == pytest.approx(got, abs=2e-6)


def test_documented_difference_torchmetrics_puts_p1_in_its_own_bin():
    p, y = np.array([0.97, 1.0]), np.array([1, 0])
    # ours: one bin {0.97, 1.0}: acc 0.5, conf 0.985
    assert ece(p, y) == pytest.approx(abs(0.5 - 0.985))
    # torchmetrics: 0.97 in bin 19 (error 0.03), 1.0 in an extra bin (error 1.0), weights 1/2
    theirs = float(binary_calibration_error(torch.from_numpy(p), torch.from_numpy(y), n_bins=20))
    assert theirs == pytest.approx((0.03 + 1.0) / 2)


def test_documented_difference_float32_edges():
    v = np.array([np.float32(0.95)])  # 0.949999988 < 0.95
    assert np.flatnonzero(reliability_bins(v, np.array([1]))[0]).tolist() == [18]
    # torchmetrics bins float32 input against float32 edges: 0.95f equals its edge -> bin 19
    edges = torch.linspace(0, 1, 21)
    assert int(torch.bucketize(torch.from_numpy(v), edges, right=True)[0]) - 1 == 19


def test_documented_difference_monai_edge_values_go_to_the_lower_bin():
    from monai.metrics.calibration import calibration_binning

    v = torch.tensor([[[0.25]]])
    _, _, counts = calibration_binning(v, torch.zeros_like(v), num_bins=20)
    assert int(counts.view(-1).nonzero()[0]) == 4  # ours: bin 5 = [0.25, 0.30)
    assert np.flatnonzero(reliability_bins(v.numpy(), np.array([[[0]]]))[0]).tolist() == [5]
