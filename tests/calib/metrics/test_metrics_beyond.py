"""Metrics beyond the paper: adaptive and class-wise ECE, uncertainty-error overlap, error-detection
AUROC, the true ECE and the p*-distance -- hand-worked cases, NaN rules, and independent references
(torchmetrics, scikit-learn, MONAI) with the definitional differences pinned."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import expit

import calib.metrics.binning as binning
import calib.metrics.scores as scores
import calib.metrics.truth as truth
import calib.metrics.uncertainty as uncertainty
from calib.metrics import (
    MetricInputError,
    adaptive_bins,
    adaptive_ece,
    classwise_ece,
    ece,
    error_detection_auroc,
    normalised_entropy,
    p_star_distance,
    reliability_bins,
    true_ece,
    true_reliability_bins,
    uncertainty_error_overlap,
)

torch.set_num_threads(1)


@pytest.fixture(params=["numpy", "torch-cpu", "torch-backend"])
def backend(request, monkeypatch):
    """numpy arrays; CPU tensors (numpy path); CPU tensors forced through the torch (GPU) code."""
    if request.param == "torch-backend":
        force = lambda *a: any(isinstance(x, torch.Tensor) for x in a if x is not None)  # noqa: E731
        for mod in (binning, scores, uncertainty, truth):  # adaptive uses scores' choice
            monkeypatch.setattr(mod, "use_torch", force)
    if request.param == "numpy":
        return np.asarray
    return lambda a: torch.as_tensor(np.asarray(a))


def _random(seed, n, dtype=np.float64):
    rng = np.random.default_rng(seed)
    p = rng.random(n).astype(dtype)
    y = (rng.random(n) < p ** 1.5).astype(np.uint8)  # miscalibrated on purpose
    m = rng.random(n) < 0.7
    return p, y, m


# ---- adaptive (equal-mass) ECE -------------------------------------------------------------------

def test_adaptive_ece_hand_worked(backend):
    p, y = np.array([0.3, 0.1, 0.4, 0.2]), np.array([1, 0, 1, 0])
    # 2 equal-mass bins: {0.1, 0.2 | 0, 0}: |0 - 0.15|; {0.3, 0.4 | 1, 1}: |1 - 0.35|
    assert adaptive_ece(backend(p), backend(y), n_bins=2) == pytest.approx(0.5 * 0.15 + 0.5 * 0.65, abs=1e-15)
    count, conf, pos = adaptive_bins(backend(p), backend(y), n_bins=2)
    assert count.tolist() == [2, 2] and pos.tolist() == [0, 2]
    np.testing.assert_allclose(conf, [0.3, 0.7], atol=1e-15)


def test_adaptive_ece_keeps_ties_in_one_bin(backend):
    p, y = np.array([0.2, 0.6, 0.2, 0.2]), np.array([1, 1, 0, 0])
    # the rank edge (index 2 of the sorted values) falls inside the tie group of 0.2: the group
    # goes whole into the upper bin, the lower bin is empty and skipped
    count, _, _ = adaptive_bins(backend(p), backend(y), n_bins=2)
    assert count.tolist() == [0, 4]
    assert adaptive_ece(backend(p), backend(y), n_bins=2) == pytest.approx(abs(0.5 - 0.3), abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_ece_matches_a_rank_split_reference(backend, seed):
    # without ties and with N divisible by n_bins, the bins are consecutive runs of N / n_bins
    # sorted voxels: the reference splits the sorted arrays directly
    p, y, m = _random(seed, 4000)
    m[:] = True
    m[: 4000 - 3000] = False  # 3000 voxels inside, divisible by 20 and by 6
    for n_bins in (20, 6):
        order = np.argsort(p[m])
        ps, ys = p[m][order], y[m][order]
        expected = sum(len(a) / ps.size * abs(b.mean() - a.mean())
                       for a, b in zip(np.array_split(ps, n_bins), np.array_split(ys, n_bins)))
        got = adaptive_ece(backend(p), backend(y), backend(m), n_bins=n_bins)
        assert got == pytest.approx(expected, abs=1e-12)
        count, _, _ = adaptive_bins(backend(p), backend(y), backend(m), n_bins=n_bins)
        assert set(count.tolist()) == {3000 // n_bins}


def test_adaptive_ece_one_bin_is_the_global_gap_and_empty_mask_is_nan(backend):
    p, y, m = _random(3, 500)
    expected = abs(y[m].mean() - p[m].mean())
    assert adaptive_ece(backend(p), backend(y), backend(m), n_bins=1) == pytest.approx(expected, abs=1e-12)
    assert ece(p, y, m, n_bins=1) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(adaptive_ece(backend(p), backend(y), backend(np.zeros(500, bool))))
    # fewer voxels than bins: every voxel is its own bin
    assert adaptive_ece(backend(np.array([0.2, 0.7])), backend(np.array([0, 0]))) == pytest.approx(0.45)


def test_adaptive_ece_sees_what_equal_width_bins_hide():
    # segmentation-like: 95 % of the voxels below 0.04, where the true probability runs the other
    # way (0.04 - p): the first equal-width bin averages the over- and under-confidence away,
    # the equal-mass bins split that range into 19 bins and see it
    rng = np.random.default_rng(4)
    p = np.concatenate([rng.uniform(0, 0.04, 38000), rng.uniform(0.5, 1, 2000)])
    truth = np.where(p < 0.04, 0.04 - p, p)
    y = (rng.random(p.size) < truth).astype(np.uint8)
    count, _, _ = adaptive_bins(p, y)
    assert (count[:19] == 2000).all()
    # mean |truth - p| = E|0.04 - 2p| = 0.02 below 0.04, so an ECE that resolves them is ~0.019
    assert adaptive_ece(p, y) > 0.015
    assert ece(p, y) < 0.005


# ---- class-wise ECE -----------------------------------------------------------------------------

def test_classwise_ece_hand_worked_on_a_bin_edge(backend):
    p, y = np.array([0.5, 0.52]), np.array([1, 0])
    # foreground: both in bin 10 [0.50, 0.55): |0.5 - 0.51| = 0.01
    # background: 1 - p = 0.5 in bin 10, 0.48 in bin 9; labels (bg) 0 and 1:
    #   1/2 |0 - 0.5| + 1/2 |1 - 0.48| = 0.51
    assert classwise_ece(backend(p), backend(y)) == pytest.approx((0.01 + 0.51) / 2, abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classwise_ece_equals_ece_off_the_bin_edges(backend, seed):
    p, y, m = _random(seed, 5000)
    assert classwise_ece(backend(p), backend(y), backend(m)) == pytest.approx(ece(p, y, m), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_classwise_background_term_agrees_with_torchmetrics(seed):
    from torchmetrics.functional.classification import binary_calibration_error

    p, y, m = _random(seed, 6000)
    p = np.clip(p, 1e-6, 1 - 1e-6)  # torchmetrics gives p = 1 a bin of its own (calib.metrics doc)
    fg = binary_calibration_error(torch.from_numpy(p[m]), torch.from_numpy(y[m]), n_bins=20, norm="l1")
    bg = binary_calibration_error(torch.from_numpy(1 - p[m]), torch.from_numpy(1 - y[m]), n_bins=20, norm="l1")
    assert classwise_ece(p, y, m) == pytest.approx((float(fg) + float(bg)) / 2, abs=1e-12)


def test_classwise_ece_float32_edges_follow_the_exact_rule():
    # 1 - p is formed in float64 (exact for float32 p): p = 0.25f -> 1 - p = 0.75 opens bin 15
    p = np.array([0.25, 0.0], np.float32)
    y = np.array([0, 0], np.uint8)
    # fg: 0.25 in bin 5 (|0 - 0.25|), 0 in bin 0 (|0 - 0|) -> 0.125
    # bg: 0.75 in bin 15 with bg label 1 (|1 - 0.75|), 1.0 in bin 19 (|1 - 1|) -> 0.125
    assert classwise_ece(p, y) == pytest.approx(0.125, abs=1e-15)
    assert math.isnan(classwise_ece(p, y, np.zeros(2, bool)))


# ---- uncertainty-error overlap ------------------------------------------------------------------

# p, label; prediction p > 0.5; u = H(p) / ln 2 (0.9 -> 0.469, 0.6 -> 0.971, 0.45 -> 0.993,
# 0.05 -> 0.286, 0.3 -> 0.881)
HAND_P = np.array([0.9, 0.6, 0.45, 0.05, 0.3])
HAND_Y = np.array([1, 0, 1, 1, 0])


def test_normalised_entropy_values():
    h = normalised_entropy(np.array([0.0, 0.5, 1.0, 0.11, 0.9]))
    np.testing.assert_allclose(h[:3], [0.0, 1.0, 0.0], atol=1e-15)
    assert h[3] == pytest.approx(0.4999, abs=1e-3) and h[4] == pytest.approx(0.469, abs=1e-3)


def test_ueo_hand_worked(backend):
    # errors {0.6, 0.45, 0.05}; uncertain (u > 0.5) {0.6, 0.45, 0.3}; overlap 2 -> 2*2 / (3 + 3)
    assert uncertainty_error_overlap(backend(HAND_P), backend(HAND_Y)) == pytest.approx(4 / 6, abs=1e-15)
    # a higher threshold keeps only 0.45 (u = 0.993) and 0.6 (0.971): 2*2 / (3 + 2)
    assert uncertainty_error_overlap(backend(HAND_P), backend(HAND_Y), threshold=0.95) == pytest.approx(0.8)
    # the mask leaves out the confident error 0.05: 2*2 / (2 + 3)
    m = np.array([1, 1, 1, 0, 1], bool)
    assert uncertainty_error_overlap(backend(HAND_P), backend(HAND_Y), backend(m)) == pytest.approx(0.8)


def test_ueo_with_a_given_uncertainty_map(backend):
    std = np.array([0.0, 0.3, 0.0, 0.2, 0.0])  # e.g. a standard deviation over samples
    # uncertain {0.6, 0.05}: both errors -> 2*2 / (3 + 2)
    got = uncertainty_error_overlap(backend(HAND_P), backend(HAND_Y), uncertainty=backend(std), threshold=0.1)
    assert got == pytest.approx(0.8)
    with pytest.raises(MetricInputError, match="uncertainty has shape"):
        uncertainty_error_overlap(HAND_P, HAND_Y, uncertainty=std[:3])
    with pytest.raises(MetricInputError, match="uncertainty must be finite"):
        uncertainty_error_overlap(HAND_P, HAND_Y, uncertainty=np.full(5, np.nan))


def test_ueo_empty_cases(backend):
    p, y = np.array([0.99, 0.01]), np.array([1, 0])  # no error, nothing uncertain
    assert uncertainty_error_overlap(backend(p), backend(y)) == 1.0
    assert uncertainty_error_overlap(backend(p), backend(y), backend(np.zeros(2, bool))) == 1.0
    # uncertain but no error: 0
    assert uncertainty_error_overlap(backend(np.array([0.6])), backend(np.array([1]))) == 0.0


def test_ueo_agrees_with_monai_dice_of_the_two_maps():
    from monai.metrics import compute_dice

    rng = np.random.default_rng(5)
    p = expit(rng.normal(0, 3, 20000))
    y = (rng.random(p.size) < expit(rng.normal(0, 3, p.size) * 0.2 + (p - 0.5) * 6)).astype(np.uint8)
    m = rng.random(p.size) < 0.8
    err = ((p > 0.5) != y)[m]
    unc = (normalised_entropy(p) > 0.5)[m]
    theirs = compute_dice(torch.from_numpy(unc.astype(np.float32)).view(1, 1, -1),
                          torch.from_numpy(err.astype(np.float32)).view(1, 1, -1))
    assert uncertainty_error_overlap(p, y, m) == pytest.approx(float(theirs), abs=1e-6)


# ---- error-detection AUROC ----------------------------------------------------------------------

def test_auroc_hand_worked(backend):
    # u = min(p, 1-p): errors {0.4, 0.45, 0.05}, correct {0.1, 0.3}; error > correct in 4 of 6 pairs
    assert error_detection_auroc(backend(HAND_P), backend(HAND_Y)) == pytest.approx(4 / 6, abs=1e-15)
    # a tie counts one half: error u = 0.25 (p = 0.75, y = 0) against correct u = 0.25 (p = 0.25,
    # y = 0) and u = 0.125 (p = 0.875, y = 1); dyadic values, so 1 - p is exact
    p, y = np.array([0.75, 0.25, 0.875]), np.array([0, 0, 1])
    assert error_detection_auroc(backend(p), backend(y)) == pytest.approx((0.5 + 1) / 2, abs=1e-15)


def test_auroc_nan_without_errors_or_without_correct_voxels(backend):
    assert math.isnan(error_detection_auroc(backend(np.array([0.9, 0.1])), backend(np.array([1, 0]))))
    assert math.isnan(error_detection_auroc(backend(np.array([0.9, 0.1])), backend(np.array([0, 1]))))
    assert math.isnan(error_detection_auroc(backend(np.array([0.9])), backend(np.array([1])),
                                            backend(np.array([False]))))


@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_agrees_with_sklearn_and_torchmetrics_with_ties(seed):
    from sklearn.metrics import roc_auc_score
    from torchmetrics.functional.classification import binary_auroc

    rng = np.random.default_rng(seed)
    p = np.round(rng.random(30000), 2)  # quantised: many ties in the uncertainty
    y = (rng.random(p.size) < p).astype(np.uint8)
    m = rng.random(p.size) < 0.7
    err = ((p > 0.5) != y)[m]
    u = np.minimum(p, 1 - p)[m]
    ours = error_detection_auroc(p, y, m)
    assert ours == pytest.approx(roc_auc_score(err, u), abs=1e-12)
    theirs = binary_auroc(torch.from_numpy(u), torch.from_numpy(err.astype(np.int64)), thresholds=None)
    assert ours == pytest.approx(float(theirs), abs=1e-6)  # torchmetrics accumulates in float32
    std = rng.random(p.size)
    assert error_detection_auroc(p, y, m, uncertainty=std) == pytest.approx(roc_auc_score(err, std[m]), abs=1e-12)


# ---- true ECE and p*-distance -------------------------------------------------------------------

def test_p_star_distance_hand_worked(backend):
    p = np.array([0.9, 0.2, 0.5, 0.0])
    t = np.array([0.7, 0.2, 0.6, 1.0])
    assert p_star_distance(backend(p), backend(t)) == pytest.approx((0.2 + 0 + 0.1 + 1.0) / 4, abs=1e-15)
    m = np.array([1, 1, 1, 0], bool)
    assert p_star_distance(backend(p), backend(t), backend(m)) == pytest.approx(0.1, abs=1e-15)
    assert math.isnan(p_star_distance(backend(p), backend(t), backend(np.zeros(4, bool))))


def test_true_ece_hand_worked(backend):
    # 4 bins of width 0.25: {0.1, 0.2} -> bin 0, {0.3} -> bin 1, {0.9, 1.0} -> bin 3 (p = 1 folds in)
    p = np.array([0.1, 0.2, 0.3, 0.9, 1.0, 0.6])
    t = np.array([0.3, 0.2, 0.0, 0.5, 0.9, 0.6])
    m = np.array([1, 1, 1, 1, 1, 0], bool)
    # bin 0: |0.15 - 0.25| = 0.10 (2 voxels); bin 1: |0.3 - 0| (1); bin 3: |0.95 - 0.7| (2)
    expected = (2 * 0.10 + 1 * 0.3 + 2 * 0.25) / 5
    assert true_ece(backend(p), backend(t), backend(m), n_bins=4) == pytest.approx(expected, abs=1e-15)
    count, conf, true = true_reliability_bins(backend(p), backend(t), backend(m), n_bins=4)
    assert count.tolist() == [2, 1, 0, 2]
    np.testing.assert_allclose(conf, [0.3, 0.3, 0.0, 1.9], atol=1e-15)
    np.testing.assert_allclose(true, [0.5, 0.0, 0.0, 1.4], atol=1e-15)
    # the mean |p - p*| is larger: within bins the errors of opposite sign do not cancel
    assert p_star_distance(backend(p), backend(t), backend(m)) == pytest.approx(
        (0.2 + 0 + 0.3 + 0.4 + 0.1) / 5, abs=1e-15)
    assert math.isnan(true_ece(backend(p), backend(t), backend(np.zeros(6, bool))))


def test_true_ece_is_zero_for_the_truth_and_the_mean_gap_for_a_constant(backend):
    p, _, m = _random(3, 20000)
    t = np.clip(p + np.random.default_rng(4).normal(0, 0.1, p.size), 0, 1)
    assert true_ece(backend(t), backend(t), backend(m)) == pytest.approx(0.0, abs=1e-15)
    assert p_star_distance(backend(t), backend(t), backend(m)) == 0.0
    c = np.full(p.size, 0.37)  # one bin: |0.37 - mean p*|
    assert true_ece(backend(c), backend(t), backend(m)) == pytest.approx(abs(0.37 - t[m].mean()), abs=1e-12)
    assert true_ece(backend(np.ones(p.size)), backend(t), backend(m)) == pytest.approx(1 - t[m].mean(), abs=1e-12)


def test_true_ece_uses_the_bins_of_ece(backend):
    """Same membership as ece (float32 edges exact), and the sampled-label ECE's bins but for p*."""
    p = np.array([0.05, 0.15, 0.95, 0.5, 0.25], np.float32)
    t = np.full(5, 0.5, np.float32)
    y = np.array([0, 1, 0, 1, 1], np.uint8)
    count, conf, _ = true_reliability_bins(backend(p), backend(t))
    ref_count, ref_conf, _ = reliability_bins(p, y)
    assert count.tolist() == ref_count.tolist()
    np.testing.assert_allclose(conf, ref_conf, rtol=0, atol=1e-15)


def test_true_ece_of_a_calibrated_but_blurry_model_is_zero_and_its_p_star_distance_is_not(backend):
    rng = np.random.default_rng(5)
    t = rng.random(30000)
    # p = the mean of p* over its bin: calibrated in the binned sense, but it cannot resolve p*
    k = np.minimum((t * 20).astype(int), 19)
    p = (np.bincount(k, weights=t, minlength=20) / np.bincount(k, minlength=20))[k]
    assert true_ece(backend(p), backend(t)) == pytest.approx(0.0, abs=1e-12)
    assert p_star_distance(backend(p), backend(t)) == pytest.approx(np.abs(p - t).mean(), abs=1e-12)
    assert p_star_distance(backend(p), backend(t)) > 0.01  # ~ 1/80: the spread inside a bin
    # Jensen: the voxel distance bounds the true ECE of any p
    q = np.clip(t + rng.normal(0, 0.2, t.size), 0, 1)
    assert p_star_distance(backend(q), backend(t)) >= true_ece(backend(q), backend(t)) > 0


def test_ece_estimates_the_true_ece_when_labels_are_drawn_from_p_star():
    rng = np.random.default_rng(6)
    t = rng.random(400000)
    p = np.clip(t ** 0.7, 0, 1)  # overconfident map of the truth
    y = (rng.random(t.size) < t).astype(np.uint8)
    truth_ece = true_ece(p, t)
    # |ECE - true ECE| <= sum_k (n_k/N) |e_k|, e_k the label fraction's sampling error in bin k
    # (SE <= sqrt(0.25 / n_k) ~ 0.0035 for ~20000 voxels a bin); where |acc - conf| >> SE the
    # errors add with their signs, so the gap is ~ 0.001
    assert ece(p, y) == pytest.approx(truth_ece, abs=0.004) and truth_ece > 0.05


def test_truth_metrics_reject_bad_input():
    for fn in (p_star_distance, true_ece):
        with pytest.raises(MetricInputError, match="true_probs has shape"):
            fn(np.zeros(4), np.zeros(3))
        with pytest.raises(MetricInputError, match=r"\[0, 1\]"):
            fn(np.zeros(4), np.full(4, 1.5))
        with pytest.raises(MetricInputError, match=r"\[0, 1\]"):
            fn(np.full(4, np.nan), np.zeros(4))
    with pytest.raises(MetricInputError, match="n_bins"):
        true_ece(np.zeros(4), np.zeros(4), n_bins=0)


# ---- CUDA ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_new_metrics_on_cuda_match_numpy():
    p, y, m = _random(7, 50000, np.float32)
    t = np.clip(p + 0.05, 0, 1)
    dev = torch.device("cuda")
    tp, ty, tm, tt = (torch.from_numpy(a).to(dev) for a in (p, y, m, t))
    assert adaptive_ece(tp, ty, tm) == pytest.approx(adaptive_ece(p, y, m), abs=1e-12)
    assert classwise_ece(tp, ty, tm) == pytest.approx(classwise_ece(p, y, m), abs=1e-12)
    assert uncertainty_error_overlap(tp, ty, tm) == uncertainty_error_overlap(p, y, m)
    assert error_detection_auroc(tp, ty, tm) == pytest.approx(error_detection_auroc(p, y, m), abs=1e-12)
    assert p_star_distance(tp, tt, tm) == pytest.approx(p_star_distance(p, t, m), abs=1e-12)
    assert true_ece(tp, tt, tm) == pytest.approx(true_ece(p, t, m), abs=1e-12)
