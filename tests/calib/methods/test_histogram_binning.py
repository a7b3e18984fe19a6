"""Histogram binning keeps the ranking: equal-width bins by default, sparse bins merged, ties at the
float floor of a real network's output kept in a bin of their own, equal-mass bins on request."""

import numpy as np
import pytest
import torch
from scipy.special import expit, logit

from calib.logits import write_index, write_subject_logits
from calib.methods import SubjectSet, build_method
from calib.methods.nonparametric import equal_mass_edges, merge_bins

CPU = torch.device("cpu")
SHAPE = (40, 40, 25)  # 40,000 voxels a subject, all inside the mask
FLOOR = 2.0 ** -24     # float32's smallest step below 1: a saturated background's probability


def _write(out, logits_of, label_of, n_subjects=5, seed=0):
    """Subjects whose flat base logits are ``logits_of(rng, n)`` and labels ``label_of(rng, z)``."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(SHAPE))
    ids = []
    for i in range(n_subjects):
        z = logits_of(rng, n)
        y = label_of(rng, z).astype(np.uint8)
        sid = f"h{i}"
        write_subject_logits(out, sid, z.reshape(SHAPE), y.reshape(SHAPE), np.ones(SHAPE, bool))
        ids.append(sid)
    write_index(out, ids, SHAPE)
    return SubjectSet(ids, logits_dir=out)


def _fitted(subjects, **params):
    method = build_method("histogram_binning", params)
    method.fit(subjects, subjects, CPU)
    return method


def _calibrated(method, subjects):
    z = np.concatenate([s.logits[s.mask] for s in subjects]).astype(np.float64)
    return expit(z), method.map_logits(z)


def test_foreground_over_half_keeps_at_least_five_values(tmp_path):
    # 95 % background (logits N(-8, 2^2)), 5 % foreground with base p uniform on (0.5, 1);
    # a calibrated base: labels drawn from the base probability
    def logits_of(rng, n):
        fg = rng.random(n) < 0.05
        return np.where(fg, logit(rng.uniform(0.5, 1.0, n)), rng.normal(-8.0, 2.0, n))

    subjects = _write(tmp_path, logits_of, lambda rng, z: rng.random(z.size) < expit(z))
    method = _fitted(subjects)
    assert method.params["binning"] == "equal_width"
    p, q = _calibrated(method, subjects)
    assert np.unique(q[p > 0.5]).size >= 5, np.unique(q[p > 0.5])
    order = np.argsort(p, kind="stable")
    assert (np.diff(q[order]) >= 0).all()  # the map keeps the ranking


@pytest.mark.parametrize("binning", ["equal_width", "equal_mass"])
def test_a_realistic_output_keeps_its_foreground_ranked(tmp_path, binning):
    # a 3x overconfident network: 97 % of voxels at the float floor (label 1 at a 0.1 % miss
    # rate), 3 % foreground with true p* uniform on (0.5, 0.99) and logits 3 logit(p*) (base p
    # from 0.5 to 1 - 1e-6, half of it above 0.95)
    def logits_of(rng, n):
        fg = rng.random(n) < 0.03
        return np.where(fg, 3.0 * logit(rng.uniform(0.5, 0.99, n)), logit(FLOOR))

    def label_of(rng, z):
        p_true = np.where(z > 0, expit(z / 3.0), 1e-3)
        return rng.random(z.size) < p_true

    subjects = _write(tmp_path, logits_of, label_of)
    method = _fitted(subjects, binning=binning)
    p, q = _calibrated(method, subjects)
    fg = p > 0.5
    assert 0.02 < fg.mean() < 0.04 and (p[~fg] == p[~fg][0]).all()  # the floor really is one value
    assert np.unique(q[fg]).size >= (5 if binning == "equal_mass" else 2), np.unique(q[fg])
    order = np.argsort(p[fg], kind="stable")
    assert (np.diff(q[fg][order]) >= 0).all()  # ordered like the input
    assert q[~fg].max() < q[fg].min()  # the background stays below the foreground
    assert q[~fg][0] == pytest.approx(1e-3, abs=1e-3)  # the floor's own label rate


def test_equal_mass_edges_give_a_heavy_tie_its_own_bin():
    p = np.concatenate([np.full(970, FLOOR), np.linspace(0.6, 1 - 1e-6, 30)])
    edges = equal_mass_edges(p, 10)
    counts = np.bincount(np.searchsorted(edges, p, side="right"))
    assert counts[0] == 970 and counts.size == 10 and counts[1:].sum() == 30
    assert (counts[1:] >= 3).all()  # the 9 bins left share the 30 values above the floor
    # without ties, equal counts, and no run of equal values is ever split
    q = np.repeat(np.arange(10) / 10, 10)
    edges = equal_mass_edges(q, 5)
    np.testing.assert_array_equal(np.bincount(np.searchsorted(edges, q, side="right")), [20] * 5)


def test_sparse_and_decreasing_bins_are_merged_with_a_neighbour():
    inner = np.array([0.25, 0.5, 0.75])
    # bin 1 holds 3 voxels (< 5): it joins the neighbour with fewer voxels, here on a tie the left
    edges, count, pos = merge_bins(inner, np.array([10, 3, 10, 10]), np.array([1.0, 2, 5, 6]), 5, False)
    np.testing.assert_array_equal(edges, [0.5, 0.75])
    np.testing.assert_array_equal(count, [13, 10, 10])
    np.testing.assert_array_equal(pos, [3, 5, 6])
    # monotone: fraction 0.5 then 0.4 pool into one bin of 9 / 20
    edges, count, pos = merge_bins(inner, np.array([10, 3, 10, 10]), np.array([1.0, 2, 5, 4]), 5, True)
    np.testing.assert_array_equal(edges, [0.5])
    np.testing.assert_array_equal(count, [13, 20])
    # too few voxels for two bins: one bin of everything
    edges, count, _ = merge_bins(inner, np.array([1, 2, 1, 1]), np.array([0.0, 1, 1, 0]), 10, True)
    assert edges.size == 0 and count.tolist() == [5]


def test_plain_binning_and_equal_mass_stay_available(phantom_logits):
    logits_dir, ids, _ = phantom_logits(4, scale=3.0)
    train = SubjectSet(ids, logits_dir=logits_dir)
    width = _fitted(train, min_bin_count=1, monotone=False)
    np.testing.assert_allclose(width.state()["inner_edges"], np.arange(1, 20) / 20)
    mass = _fitted(train, binning="equal_mass", n_bins=8)
    edges = mass.state()["inner_edges"]
    assert edges.size == 7 and not np.allclose(edges, np.arange(1, 8) / 8)
