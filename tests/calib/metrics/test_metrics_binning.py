"""ECE, MCE, top-label ECE and reliability bins: hand-worked cases, bin edges, additivity."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import calib.metrics.binning as binning
import calib.metrics.boundary as boundary
import calib.metrics.scores as scores
from calib.metrics import (
    MetricInputError,
    ece,
    ece_from_bins,
    mce,
    reliability_bins,
    top_label_ece,
)

torch.set_num_threads(1)


@pytest.fixture(params=["numpy", "torch-cpu", "torch-backend"])
def backend(request, monkeypatch):
    """numpy arrays; CPU tensors (numpy path); CPU tensors forced through the torch (GPU) code."""
    if request.param == "torch-backend":
        force = lambda *a: any(isinstance(x, torch.Tensor) for x in a if x is not None)  # noqa: E731
        for mod in (binning, scores, boundary):
            monkeypatch.setattr(mod, "use_torch", force)
    if request.param == "numpy":
        return np.asarray
    return lambda a: torch.as_tensor(np.asarray(a))


def _exact_bin(p: float, n: int) -> int:
    """Oracle: the real-number rule p in [k/n, (k+1)/n), p = 1 in the last bin (exact rationals)."""
    return min(math.floor(Fraction(float(p)) * n), n - 1)


def test_hand_worked_ece(backend):
    p = [0.0, 0.05, 0.05, 1.0, 0.97]
    y = [0, 0, 1, 1, 0]
    # bin 0: {0.0 | y 0}; bin 1: {0.05, 0.05 | 0, 1}; bin 19: {1.0, 0.97 | 1, 0}
    expected = 2 / 5 * abs(0.5 - 0.05) + 2 / 5 * abs(0.5 - 0.985)
    assert ece(backend(np.array(p)), backend(np.array(y))) == pytest.approx(expected, abs=1e-15)
    count, conf_sum, pos_sum = reliability_bins(backend(np.array(p)), backend(np.array(y)))
    assert count.dtype == np.int64 and pos_sum.dtype == np.int64 and conf_sum.dtype == np.float64
    assert np.flatnonzero(count).tolist() == [0, 1, 19]
    assert count[[0, 1, 19]].tolist() == [1, 2, 2] and pos_sum[[0, 1, 19]].tolist() == [0, 1, 1]
    assert conf_sum[19] == pytest.approx(1.97, abs=1e-15)
    assert mce(backend(np.array(p)), backend(np.array(y))) == pytest.approx(0.485, abs=1e-15)


def test_mask_selects_voxels(backend):
    p = np.array([[0.9, 0.1], [0.3, 0.7]], np.float32)
    y = np.array([[1, 1], [0, 0]], np.uint8)
    m = np.array([[True, False], [True, False]])
    # inside: 0.9 | 1 (bin 18) and 0.3 | 0 (bin 6)
    expected = 0.5 * abs(1 - float(np.float32(0.9))) + 0.5 * abs(0 - float(np.float32(0.3)))
    assert ece(backend(p), backend(y), backend(m)) == pytest.approx(expected, abs=1e-12)


def test_empty_mask_and_empty_input_give_nan(backend):
    p = np.random.default_rng(0).random((3, 4))
    y = np.zeros((3, 4), np.uint8)
    none = np.zeros((3, 4), bool)
    assert math.isnan(ece(backend(p), backend(y), backend(none)))
    assert math.isnan(mce(backend(p), backend(y), backend(none)))
    assert math.isnan(top_label_ece(backend(p), backend(y), backend(none)))
    assert math.isnan(ece(backend(np.zeros(0)), backend(np.zeros(0, np.uint8))))
    assert reliability_bins(backend(p), backend(y), backend(none))[0].sum() == 0


def test_float32_values_at_and_around_every_edge(backend):
    n = 20
    vals = []
    for k in range(n + 1):
        v = np.float32(k / n)
        vals += [v, np.nextafter(v, np.float32(0)), np.nextafter(v, np.float32(2))]
    vals = np.array([v for v in vals if 0 <= v <= 1], np.float32)
    count, _, _ = reliability_bins(backend(vals), backend(np.zeros(vals.size, np.uint8)), n_bins=n)
    expected = np.bincount([_exact_bin(v, n) for v in vals], minlength=n)
    assert count.tolist() == expected.tolist()
    # the cases float32 arithmetic gets wrong: 0.15f is above 0.15, 0.95f below 0.95
    assert _exact_bin(np.float32(0.15), n) == 3 and _exact_bin(np.float32(0.95), n) == 18
    for v, k in [(np.float32(0.15), 3), (np.float32(0.95), 18), (np.float32(0.25), 5), (np.float32(1), 19)]:
        c, _, _ = reliability_bins(backend(np.array([v])), backend(np.array([1])))
        assert np.flatnonzero(c).tolist() == [k], v


def test_decimal_float64_edges_open_their_bin(backend):
    p = np.array([k / 20 for k in range(21)])
    count, _, _ = reliability_bins(backend(p), backend(np.zeros(21, np.uint8)))
    assert count.tolist() == [1] * 19 + [2]  # p = 1 joins the last bin


def test_other_bin_counts_follow_the_exact_rule(backend):
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.random(500).astype(np.float32), np.float32(np.arange(8) / 7), [1.0]]).astype(np.float32)
    y = (rng.random(p.size) < 0.5).astype(np.uint8)
    for n in (1, 3, 7, 10):
        count, conf_sum, pos_sum = reliability_bins(backend(p), backend(y), n_bins=n)
        k = np.array([_exact_bin(v, n) for v in p])
        assert count.tolist() == np.bincount(k, minlength=n).tolist()
        assert pos_sum.tolist() == np.bincount(k, weights=y, minlength=n).astype(int).tolist()
        assert np.allclose(conf_sum, np.bincount(k, weights=p.astype(np.float64), minlength=n), rtol=1e-12)


def test_large_volume_crosses_chunks_and_matches_a_plain_reference():
    rng = np.random.default_rng(2)
    size = binning.CHUNK * 3 + 17
    p = rng.random(size).astype(np.float32)
    y = (rng.random(size) < p).astype(np.uint8)
    m = rng.random(size) < 0.6
    pp, yy = p[m].astype(np.float64), y[m]
    k = np.minimum(np.floor(pp * 20).astype(int), 19)
    cnt = np.bincount(k, minlength=20)
    acc = np.bincount(k, weights=yy, minlength=20) / cnt
    conf = np.bincount(k, weights=pp, minlength=20) / cnt
    ref = float(np.sum(cnt / cnt.sum() * np.abs(acc - conf)))
    assert ece(p, y, m) == pytest.approx(ref, abs=1e-13)


def test_bins_add_across_subjects(backend):
    rng = np.random.default_rng(3)
    a, b = rng.random((5, 6, 7)), rng.random((4, 6, 7))
    ya, yb = rng.random(a.shape) < a, rng.random(b.shape) < 0.3
    ma, mb = rng.random(a.shape) < 0.8, rng.random(b.shape) < 0.8
    bins_a = reliability_bins(backend(a), backend(ya), backend(ma))
    bins_b = reliability_bins(backend(b), backend(yb), backend(mb))
    pooled = [x + y for x, y in zip(bins_a, bins_b)]
    both = reliability_bins(np.concatenate([a, b]), np.concatenate([ya, yb]), np.concatenate([ma, mb]))
    assert pooled[0].tolist() == both[0].tolist() and pooled[2].tolist() == both[2].tolist()
    assert np.allclose(pooled[1], both[1], rtol=1e-13)
    assert ece_from_bins(*pooled) == pytest.approx(
        ece(np.concatenate([a, b]), np.concatenate([ya, yb]), np.concatenate([ma, mb])), abs=1e-14)
    assert ece_from_bins(*bins_a) == pytest.approx(ece(a, ya, ma), abs=1e-14)


def test_top_label_ece_hand_case(backend):
    p = np.array([0.9, 0.2, 0.5, 0.6])
    y = np.array([1, 1, 0, 0])
    # predictions 1,0,0,1; confidences 0.9, 0.8, 0.5, 0.6; correct 1,0,1,0
    # bins: 18 {0.9|1}, 16 {0.8|0}, 10 {0.5|1}, 12 {0.6|0}
    expected = (0.1 + 0.8 + 0.5 + 0.6) / 4
    assert top_label_ece(backend(p), backend(y)) == pytest.approx(expected, abs=1e-12)


def test_input_errors_name_the_culprit(backend):
    p = np.array([0.2, 0.4])
    with pytest.raises(MetricInputError, match="probs"):
        ece(backend(np.array([0.2, 1.5])), backend(np.array([0, 1])))
    with pytest.raises(MetricInputError, match="probs"):
        ece(backend(np.array([0.2, np.nan])), backend(np.array([0, 1])))
    with pytest.raises(MetricInputError, match="labels must be binary"):
        ece(backend(p), backend(np.array([0, 4], np.uint8)))
    with pytest.raises(MetricInputError, match="mask has shape"):
        ece(backend(p), backend(np.array([0, 1])), backend(np.array([True, False, True])))
    with pytest.raises(MetricInputError, match="n_bins"):
        ece(backend(p), backend(np.array([0, 1])), n_bins=0)


def test_half_precision_and_singleton_axes():
    p = torch.tensor([[0.15, 0.95, 0.5]], dtype=torch.bfloat16)
    y = torch.tensor([1, 0, 1])
    c, _, _ = reliability_bins(p, y)
    assert c.sum() == 3
    p16 = np.array([0.25, 0.75], np.float16)
    assert ece(p16, np.array([0, 1])) == pytest.approx(0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_agree_with_numpy():
    rng = np.random.default_rng(4)
    p = rng.random((20, 21, 22)).astype(np.float32)
    y = rng.random(p.shape) < p
    m = rng.random(p.shape) < 0.7
    dev = torch.device("cuda")
    t = [torch.from_numpy(a).to(dev) for a in (p, y, m)]
    assert ece(*t) == pytest.approx(ece(p, y, m), abs=1e-12)
    assert [a.tolist() for a in reliability_bins(*t)][0] == reliability_bins(p, y, m)[0].tolist()
