"""The label contract survives preprocessing, and correlated label noise keeps its marginals.

Issue 20, points 1 and 5: the cached ``true_prob`` is the probability of the cached ``label`` voxel
by voxel (each cached voxel copies one source voxel's draw and that voxel's p*), checked exactly and
in 10 bins of p* against the binomial 99.9 % interval; correlated draws ``1[U < p*]`` have P = p* at
every voxel over many seeds of ``U`` and far fewer connected components than iid ones.
"""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, special, stats

from calib.data import DataError, discover, load_subject, preprocess_dataset, read_meta, write_phantoms
from calib.data.cli import main
from calib.data.phantom import RECIPE_NAME, synth_isles
from calib.data.synth import (
    LABEL_CORRELATION_MM,
    LabelNoise,
    correlated_uniform,
    draw_labels,
    label_frequency_bins,
)
from calib.data.transforms import source_voxels

N_SUBJECTS = 3


def _data(path):
    return np.asanyarray(nib.load(str(path), mmap=False).dataobj)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """BraTS-like on the real 1 mm grid (the 4 mm cache needs it: its p* band is one voxel wide)
    and ISLES-like on the real slab grid (4-8 mm slices); 3 subjects each, seed 0, iid labels."""
    base = tmp_path_factory.mktemp("truth")
    out = {}
    for dataset in ("brats18", "isles18"):
        out[dataset] = base / dataset
        write_phantoms(dataset, out[dataset], N_SUBJECTS, seed=0)
    return out


def _cached_voxels(dataset, root, cache, spacing, shape):
    """p*, label and the draw (subject, source voxel) of every cached voxel inside the mask; the
    cached label and p* are asserted to be the source voxel's, exactly."""
    p_all, y_all, draws = [], [], []
    for k, files in enumerate(discover(dataset, root).subjects):
        s = load_subject(cache, files.subject_id)
        src = nib.load(str(files.label))
        index = source_voxels(src.affine, src.shape, spacing, shape)
        inside = index >= 0
        label_src = (_data(files.label) > 0).ravel()
        p_src = _data(files.true_prob).ravel()
        np.testing.assert_array_equal(s.label[inside], label_src[index[inside]])
        np.testing.assert_array_equal(s.true_prob[inside], p_src[index[inside]])
        assert not s.label[~inside].any() and not s.true_prob[~inside].any()  # the zero padding
        m = s.mask
        p_all.append(s.true_prob[m])
        y_all.append(s.label[m])
        draws.append(np.stack([np.full(int(m.sum()), k), index[m]], axis=1))
    return np.concatenate(p_all), np.concatenate(y_all), np.concatenate(draws)


@pytest.mark.parametrize(
    "dataset, spacing, shape",
    [("brats18", 4.0, (60, 60, 40)), ("brats18", 2.0, (120, 120, 78)), ("isles18", 2.0, (136, 136, 82))],
)
def test_cached_true_prob_is_the_probability_of_the_cached_label(roots, tmp_path, dataset, spacing, shape):
    root = roots[dataset]
    cache = preprocess_dataset(dataset, root, tmp_path / "cache", spacing=spacing, shape=shape,
                               workers=1, progress=False)
    assert read_meta(cache)["config"]["true_prob_interp"] == "nearest"  # in the cache key
    p, y, draws = _cached_voxels(dataset, root, cache, spacing, shape)
    rows = label_frequency_bins(p, y, draws)  # bins of >= 200 voxels, each draw counted once
    assert any(0 < r["bin"] < 9 for r in rows) and {0, 9} <= {r["bin"] for r in rows}
    for r in rows:
        assert r["inside"], r
    slabs = dataset == "isles18"  # 4-8 mm slices onto 2 mm: one draw on 2-4 voxels
    assert all((r["n"] < r["voxels"]) == slabs for r in rows)


def test_real_data_cache_key_has_no_true_prob_entry(roots, tmp_path):
    """A root without p* files (as the real data) keeps the cache key it had before."""
    import shutil

    root = tmp_path / "isles"
    shutil.copytree(roots["isles18"], root)
    for files in discover("isles18", root).subjects:
        shutil.rmtree(files.true_prob.parent)
    cache = preprocess_dataset("isles18", root, tmp_path / "cache", spacing=4.0, shape=(32, 32, 24),
                               workers=1, progress=False)
    assert "true_prob_interp" not in read_meta(cache)["config"]
    assert load_subject(cache, "case_1").true_prob is None


def test_bins_count_copies_of_one_draw_once():
    p = np.array([0.5] * 300)
    y = np.array([1] * 300)
    assert label_frequency_bins(p, y)[0]["n"] == 300
    row = label_frequency_bins(p, y, np.repeat(np.arange(100), 3))[0]
    assert (row["voxels"], row["n"], row["fraction"]) == (300, 100, 1.0) and not row["inside"]
    assert label_frequency_bins(p[:199], y[:199]) == []  # fewer than 200 voxels: not checked


# ------------------------------------------------------------------------ correlated label noise
@pytest.fixture(scope="module")
def slab():
    """One ISLES-like subject's p* on a thick-slab grid: (p*, affine)."""
    rng = np.random.default_rng([0, 1, 0])
    subject = synth_isles(rng, "case_1", (96, 96, 6), "LPS", None)
    return subject.true_prob, subject.affine


def test_correlated_labels_have_p_star_at_every_voxel(slab):
    """200 seeds of U for one subject: each voxel's label frequency inside its binomial interval
    (99.9 % for the whole family of voxels, Bonferroni)."""
    p, affine = slab
    n_draws = 200
    counts = np.zeros(p.shape, dtype=np.int64)
    for k in range(n_draws):
        subject_stream = np.random.default_rng(k)
        counts += draw_labels(subject_stream, p, affine, LabelNoise("correlated", np.random.default_rng([k, 1])))
    soft = (p > 0.01) & (p < 0.99)
    assert soft.sum() > 500
    low, high = stats.binom.interval(1 - 0.001 / soft.sum(), n_draws, p[soft].astype(np.float64))
    assert np.all((counts[soft] >= low) & (counts[soft] <= high))
    assert not counts[p == 0].any()


def test_correlated_field_is_standard_normal_with_the_stated_length():
    """G = Phi^-1(U) on a 1 mm grid: mean 0, variance 1, correlation exp(-d^2 / (2 l^2)) at d mm."""
    g = np.stack([special.ndtri(correlated_uniform(np.random.default_rng(k), (48, 48, 48), np.ones(3),
                                                   LABEL_CORRELATION_MM)) for k in range(6)])
    assert abs(g.mean()) < 0.1 and abs(g.var() - 1) < 0.1
    for d in (4, 8, 12):
        r = float(np.mean(g[:, :-d] * g[:, d:]) / g.var())
        assert abs(r - math.exp(-d**2 / (2 * LABEL_CORRELATION_MM**2))) < 0.1, (d, r)


@pytest.mark.parametrize("dataset, shape", [("brats18", (96, 96, 64)), ("isles18", (128, 128, 8))])
def test_correlated_labels_are_coherent_on_the_same_p_star(tmp_path, dataset, shape):
    subjects = {}
    for mode in ("iid", "correlated"):
        write_phantoms(dataset, tmp_path / mode, 2, seed=0, shape=shape, label_noise=mode)
        subjects[mode] = discover(dataset, tmp_path / mode).subjects
    for iid, corr in zip(subjects["iid"], subjects["correlated"]):
        for a, b in zip(iid.images, corr.images):  # only the labels differ
            np.testing.assert_array_equal(_data(a), _data(b))
        np.testing.assert_array_equal(_data(iid.true_prob), _data(corr.true_prob))
        n_iid = ndimage.label(_data(iid.label) > 0)[1]
        n_corr = ndimage.label(_data(corr.label) > 0)[1]
        assert n_corr * 10 < n_iid, (iid.subject_id, n_iid, n_corr)


def test_label_noise_is_part_of_the_recipe(tmp_path):
    root = tmp_path / "i"
    args = ("isles18", root, 1, 0, (24, 24, 3))
    write_phantoms(*args)
    recipe = json.loads((root / RECIPE_NAME).read_text())
    assert recipe["label_noise"] == "iid"
    with pytest.raises(DataError, match="nor the same phantoms"):
        write_phantoms(*args, label_noise="correlated")
    # A folder written before the option (version 2, no key) holds iid phantoms: still reused.
    del recipe["label_noise"]
    (root / RECIPE_NAME).write_text(json.dumps(recipe))
    write_phantoms(*args)
    with pytest.raises(DataError, match="label_noise must be one of iid, correlated"):
        write_phantoms("isles18", tmp_path / "x", 1, 0, (24, 24, 3), label_noise="smooth")


def test_cli_label_noise(tmp_path, capsys):
    root = tmp_path / "b"
    assert main(["phantom", "--dataset", "isles18", "--out", str(root), "--subjects", "1",
                 "--shape", "24", "24", "3", "--label-noise", "correlated"]) == 0
    recipe = json.loads((root / RECIPE_NAME).read_text())
    assert recipe["label_noise"] == "correlated" and recipe["label_correlation_mm"] == LABEL_CORRELATION_MM
