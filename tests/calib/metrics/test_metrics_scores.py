"""Dice, Brier, NLL and the boundary-band ECE: hand-worked cases on numpy and torch inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import calib.metrics.binning as binning
import calib.metrics.boundary as boundary
import calib.metrics.scores as scores
from calib.metrics import NLL_EPS, MetricInputError, boundary_band, boundary_ece, brier, dice, ece, nll

torch.set_num_threads(1)


@pytest.fixture(params=["numpy", "torch-backend"])
def backend(request, monkeypatch):
    if request.param == "numpy":
        return np.asarray
    force = lambda *a: any(isinstance(x, torch.Tensor) for x in a if x is not None)  # noqa: E731
    for mod in (binning, scores, boundary):
        monkeypatch.setattr(mod, "use_torch", force)
    return lambda a: torch.as_tensor(np.asarray(a))


def test_dice_hand_cases(backend):
    p = backend(np.array([0.9, 0.6, 0.5, 0.2, 0.51]))
    y = backend(np.array([1, 0, 1, 0, 1]))
    # prediction p > 0.5: 1,1,0,0,1 -> intersection 2, |P| 3, |Y| 3
    assert dice(p, y) == pytest.approx(4 / 6)
    m = backend(np.array([True, False, True, True, True]))
    assert dice(p, y, m) == pytest.approx(4 / 5)
    zeros = backend(np.zeros(4))
    assert dice(zeros, backend(np.zeros(4, np.uint8))) == 1.0  # empty-empty
    assert dice(zeros, backend(np.array([0, 1, 0, 0]))) == 0.0
    assert dice(p, y, backend(np.zeros(5, bool))) == 1.0  # empty mask: nothing to find


def test_brier_and_nll_hand_cases(backend):
    p = backend(np.array([0.25, 1.0, 0.5]))
    y = backend(np.array([0, 1, 1]))
    assert brier(p, y) == pytest.approx((0.0625 + 0 + 0.25) / 3)
    expected = -(math.log(0.75) + math.log(1 - NLL_EPS) + math.log(0.5)) / 3
    assert nll(p, y) == pytest.approx(expected, rel=1e-12)
    # p = 0 for a positive voxel is clipped, not infinite
    assert nll(backend(np.array([0.0])), backend(np.array([1]))) == pytest.approx(-math.log(NLL_EPS))
    none = backend(np.zeros(3, bool))
    assert math.isnan(brier(p, y, none)) and math.isnan(nll(p, y, none))


def test_band_of_a_cube(backend):
    lab = np.zeros((9, 9, 9), np.uint8)
    lab[3:6, 3:6, 3:6] = 1
    band = np.asarray(boundary_band(backend(lab), 1))
    assert band.sum() == 5 ** 3 - 1  # dilated 5^3 minus the eroded centre voxel
    assert not band[4, 4, 4] and band[2, 2, 2] and not band[1, 4, 4]
    band2 = np.asarray(boundary_band(backend(lab), 2))
    assert band2.sum() == 7 ** 3  # erosion by 2 empties the cube


def test_volume_edge_is_not_a_boundary(backend):
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[:3] = 1  # a slab touching the volume edge on five sides
    band = np.asarray(boundary_band(backend(lab), 1))
    assert band.sum() == 2 * 36 and band[2].all() and band[3].all()


def test_boundary_ece_uses_only_the_band(backend):
    rng = np.random.default_rng(0)
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[3:7, 3:7, 3:7] = 1
    p = rng.random(lab.shape)
    p[2:8, 2:8, 2:8] = np.maximum(p[2:8, 2:8, 2:8], 0.6)  # a predicted cube, larger than the label
    p[:, :, 0] = np.minimum(p[:, :, 0], 0.4)
    mask = np.ones(lab.shape, bool)
    mask[0] = False
    pred = p > 0.5
    assert not np.array_equal(np.asarray(boundary_band(pred, 1)), np.asarray(boundary_band(lab, 1)))
    # default: the band around the prediction's 0.5 surface
    band = np.asarray(boundary_band(pred, 1)) & mask
    assert boundary_ece(backend(p), backend(lab), backend(mask), band_voxels=1) == \
        pytest.approx(ece(p, lab, band), abs=1e-14)
    assert boundary_ece(backend(p), backend(lab), backend(mask), band_voxels=1, band="prediction") == \
        pytest.approx(ece(p, lab, band), abs=1e-14)
    # the label-based band, as an option
    band = np.asarray(boundary_band(lab, 1)) & mask
    assert boundary_ece(backend(p), backend(lab), backend(mask), band_voxels=1, band="label") == \
        pytest.approx(ece(p, lab, band), abs=1e-14)
    # 3 mm at 2 mm spacing -> 2 voxels
    assert boundary_ece(backend(p), backend(lab), band_mm=3.0, spacing_mm=2.0, band="label") == \
        pytest.approx(ece(p, lab, np.asarray(boundary_band(lab, 2))), abs=1e-14)
    assert boundary_ece(backend(p), backend(lab), band_mm=3.0, spacing_mm=2.0) == \
        pytest.approx(ece(p, lab, np.asarray(boundary_band(pred, 2))), abs=1e-14)
    # no lesion: no label band; nothing predicted: no prediction band
    assert math.isnan(boundary_ece(backend(p), backend(np.zeros_like(lab)), band="label"))
    assert math.isnan(boundary_ece(backend(np.minimum(p, 0.5)), backend(lab)))
    assert not math.isnan(boundary_ece(backend(p), backend(np.zeros_like(lab))))
    with pytest.raises(MetricInputError, match="3-D"):
        boundary_ece(backend(p[0]), backend(lab[0]))
    with pytest.raises(MetricInputError, match="band_voxels"):
        boundary_ece(backend(p), backend(lab), band_voxels=0)
    with pytest.raises(MetricInputError, match="unknown boundary band 'labels'.*prediction, label"):
        boundary_ece(backend(p), backend(lab), band="labels")
    with pytest.raises(MetricInputError, match="labels have shape"):
        boundary_ece(backend(p), backend(lab[:9]))


def _noise_floor(p: np.ndarray, band: np.ndarray, n_bins: int = 20) -> float:
    """sum_k (n_k / N) * SE_k, SE_k = sqrt(sum_i p_i (1 - p_i)) / n_k: the size of the ECE a
    calibrated model gets from the sampling of its labels alone, in the bins of ``band``."""
    pb = p[band]
    k = np.minimum((pb * n_bins).astype(int), n_bins - 1)
    n = np.bincount(k, minlength=n_bins)
    var = np.bincount(k, weights=pb * (1 - pb), minlength=n_bins)
    nz = n > 0
    return float(np.sum(n[nz] / n.sum() * np.sqrt(var[nz]) / n[nz]))


def test_prediction_band_scores_a_calibrated_model_near_zero_and_the_label_band_does_not():
    # A confident core (p = 0.98) in a low-probability shell (p = 0.02), labels drawn from p:
    # the model is calibrated by construction. The label band keeps a shell voxel only when one
    # of its 26 neighbours (or itself) is labelled 1 (probability 1 - 0.98^27 = 0.42), so it
    # over-counts the foreground there, and under-counts it in the core by symmetry.
    n = 48
    x, y, z = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    r = np.sqrt((x - 24) ** 2 + (y - 24) ** 2 + (z - 24) ** 2)
    p = np.where(r < 10, 0.98, np.where(r < 20, 0.02, 0.0))
    lab = (np.random.default_rng(0).random(p.shape) < p).astype(np.uint8)
    floor = _noise_floor(p, np.asarray(boundary_band(p > 0.5, 1)))
    on_prediction = boundary_ece(p, lab, band_voxels=1)
    on_label = boundary_ece(p, lab, band_voxels=1, band="label")
    assert on_prediction < 3 * floor  # sampling noise only
    assert on_label > 3 * floor and on_label > 3 * _noise_floor(p, np.asarray(boundary_band(lab, 1)))


def test_band_numpy_and_torch_agree_on_random_labels(monkeypatch):
    rng = np.random.default_rng(1)
    lab = (rng.random((12, 11, 10)) < 0.3).astype(np.uint8)
    ref = boundary_band(lab, 2)
    monkeypatch.setattr(boundary, "use_torch", lambda *a: True)
    got = boundary_band(torch.from_numpy(lab), 2).numpy()
    assert np.array_equal(ref, got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_boundary_ece_on_cuda_matches_numpy_in_both_bands():
    rng = np.random.default_rng(3)
    p = rng.random((16, 15, 14)).astype(np.float32)
    lab = (rng.random(p.shape) < p).astype(np.uint8)
    mask = rng.random(p.shape) < 0.8
    dev = torch.device("cuda")
    tp, tl, tm = (torch.from_numpy(a).to(dev) for a in (p, lab, mask))
    for band in ("prediction", "label"):
        assert boundary_ece(tp, tl, tm, band=band) == pytest.approx(boundary_ece(p, lab, mask, band=band), abs=1e-12)
