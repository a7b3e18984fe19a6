"""ECE estimators (calib.metrics.estimators) against a known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from calib import metrics
from calib.evaluate import evaluate_subject
from calib.metrics.estimators import (
    ESTIMATOR_COLUMNS,
    ESTIMATOR_NORM,
    ESTIMATORS,
    debiased_ece_from_bins,
    debiased_l2_ce_from_bins,
    ece_estimates,
    estimator_column,
    l2_ce_from_bins,
    sweep_bins,
    true_l2_ce,
)

#: An estimator error this small is far below any miscalibration the study reports (the
#: overconfidence case below is 10 points); "small" in the tests means below it.
SMALL = 0.01


def _draw(rng, p_star):
    return (rng.random(p_star.shape) < p_star).astype(np.uint8)


def test_calibrated_case_every_estimator_small_and_debiasing_helps_at_40_bins():
    # p = p* exactly, labels drawn from p*: the truth is 0, so an estimator's mean is its bias
    rng = np.random.default_rng(0)
    p_star = rng.beta(0.5, 2.0, 200_000).astype(np.float32)
    assert metrics.true_ece(p_star, p_star) == 0.0 and true_l2_ce(p_star, p_star) == 0.0
    draws = [ece_estimates(p_star, _draw(rng, p_star)) for _ in range(6)]
    bias = {k: float(np.mean([d[k] for d in draws])) for k in ESTIMATORS}
    for k, b in bias.items():
        assert abs(b) < SMALL, (k, b)
    assert bias["width40"] > 0 and bias["l2_width40"] > 0  # the plug-ins' upward bias
    assert abs(bias["debiased_width40"]) < bias["width40"]
    assert bias["debiased_l2_width40"] < bias["l2_width40"]
    # more bins, fewer voxels per bin: the plug-in's bias grows
    assert bias["width10"] < bias["width20"] < bias["width40"]


def test_constant_overconfidence_hand_known_truth():
    # p = p* + 0.1 everywhere: in every bin mean p - mean p* = 0.1, so the true ECE (L1 and L2,
    # any binning) is 0.1 by hand
    rng = np.random.default_rng(1)
    p_star = rng.uniform(0.05, 0.85, 200_000)
    p = (p_star + 0.1).astype(np.float32)
    p_star = p_star.astype(np.float32)
    assert metrics.true_ece(p, p_star) == pytest.approx(0.1, abs=1e-6)
    assert true_l2_ce(p, p_star) == pytest.approx(0.1, abs=1e-6)
    est = ece_estimates(p, _draw(rng, p_star))
    for k, v in est.items():
        assert v == pytest.approx(0.1, abs=SMALL), k


def test_estimators_are_the_library_metrics_and_respect_the_mask():
    rng = np.random.default_rng(2)
    shape = (30, 20, 10)
    p = rng.random(shape).astype(np.float32)
    y = _draw(rng, p)
    mask = rng.random(shape) < 0.7
    est = ece_estimates(p, y, mask)
    for k in (10, 20, 40):
        assert est[f"width{k}"] == pytest.approx(metrics.ece(p, y, mask, n_bins=k), abs=1e-12)
    assert est["mass20"] == pytest.approx(metrics.adaptive_ece(p, y, mask), abs=1e-12)
    count, conf, pos = metrics.reliability_bins(p, y, mask, n_bins=40)
    assert est["l2_width40"] == pytest.approx(l2_ce_from_bins(count, conf, pos))
    p_out = p.copy()
    p_out[~mask] = 1.0 - p_out[~mask]  # outside the mask: must not matter
    assert ece_estimates(p_out, y, mask) == est
    assert ece_estimates(torch.from_numpy(p), torch.from_numpy(y), torch.from_numpy(mask)) == \
        pytest.approx(est, abs=1e-12)
    assert all(math.isnan(v) for v in ece_estimates(p, y, np.zeros(shape, bool)).values())
    assert set(ESTIMATOR_NORM.values()) == {1, 2}


def test_debiased_l2_by_hand():
    # bin 1: 4 voxels, conf 0.05, acc 0.5; bin 2: 2 voxels, conf 0.9, acc 1; bin 3 empty
    count, conf, pos = [4, 2, 0], [0.2, 1.8, 0.0], [2, 2, 0]
    square = 4 / 6 * ((0.05 - 0.5) ** 2 - 0.5 * 0.5 / 3) + 2 / 6 * ((0.9 - 1.0) ** 2 - 0.0)
    assert debiased_l2_ce_from_bins(count, conf, pos) == pytest.approx(math.sqrt(square))
    plugin = math.sqrt(4 / 6 * 0.45 ** 2 + 2 / 6 * 0.1 ** 2)
    assert l2_ce_from_bins(count, conf, pos) == pytest.approx(plugin)
    # the variance term larger than the squared gap: clipped at 0
    assert debiased_l2_ce_from_bins([4], [2.0], [2]) == 0.0
    assert math.isnan(debiased_l2_ce_from_bins([0, 0], [0, 0], [0, 0]))


def test_debiased_l1_corrects_only_noise():
    # label frequencies 0 or 1 have no binomial variance: nothing to correct
    count, conf, pos = np.array([10, 10]), np.array([1.0, 9.0]), np.array([0, 10])
    assert debiased_ece_from_bins(count, conf, pos) == pytest.approx(metrics.ece_from_bins(count, conf, pos))
    # conf equal to the bin's label frequency: the plug-in is 0, the correction pushes below it
    count, conf, pos = np.array([100]), np.array([30.0]), np.array([30])
    assert debiased_ece_from_bins(count, conf, pos) < metrics.ece_from_bins(count, conf, pos) == 0.0
    # a gap far beyond the noise: the correction vanishes
    count, conf, pos = np.array([10_000]), np.array([6000.0]), np.array([3000])
    assert debiased_ece_from_bins(count, conf, pos) == pytest.approx(0.3, abs=1e-12)
    # seeded: the same bins give the same value
    count, conf, pos = np.array([50, 50]), np.array([10.0, 40.0]), np.array([12, 37])
    assert debiased_ece_from_bins(count, conf, pos) == debiased_ece_from_bins(count, conf, pos)


def test_monotonic_sweep_by_hand():
    p = np.array([0.1, 0.1, 0.3, 0.3, 0.5, 0.7, 0.7, 0.9])
    y = np.array([0, 0, 1, 0, 1, 1, 1, 1])
    # b = 2..5 keep the bins' label frequencies non-decreasing; b = 6 (ranks -> bins 0,0,1,2,3,3,
    # 4,5: frequencies 0, 1, 0, ...) breaks it, so 5 bins: {0,1} {2,3} {4} {5,6} {7}
    ece, bins = sweep_bins(p, y)
    assert bins == 5
    assert ece == pytest.approx((2 * 0.1 + 2 * 0.2 + 0.5 + 2 * 0.3 + 0.1) / 8)
    # a perfectly separating p never breaks monotonicity: the sweep stops at its cap
    q = np.linspace(0, 1, 100)
    assert sweep_bins(q, (q > 0.5).astype(int), max_bins=10)[1] == 10
    assert sweep_bins(np.array([0.4]), np.array([1])) == (pytest.approx(0.6), 1)


def test_evaluate_writes_the_estimators_only_with_p_star():
    rng = np.random.default_rng(4)
    shape = (16, 16, 8)
    p_star = rng.random(shape).astype(np.float32)
    label = _draw(rng, p_star)
    mask = np.ones(shape, bool)
    prob = np.clip(p_star * 1.2, 0, 1).astype(np.float32)
    row, _ = evaluate_subject(prob, label, mask, p_star)
    est = ece_estimates(prob, label, mask)
    for k in ESTIMATORS:
        assert row[estimator_column(k)] == pytest.approx(est[k])
    assert row["ece_est_width20"] == pytest.approx(row["ece"])
    assert row["true_ece_l2"] == pytest.approx(true_l2_ce(prob, p_star, mask))
    no_truth, _ = evaluate_subject(prob, label, mask)
    assert not set(ESTIMATOR_COLUMNS) & set(no_truth)
