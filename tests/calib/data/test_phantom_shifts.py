"""Phantom shifts (calib.data.shifts): the same subjects, p* and labels bit-identical, the images
changed in the documented way."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from calib.data import DataError, write_phantoms
from calib.data.phantom import RECIPE_NAME
from calib.data.shifts import ImageShift

SHAPES = {"brats18": (40, 40, 32), "isles18": (32, 32, 4)}
BRATS_KINDS = ("flair", "t1", "t1ce", "t2")


def _brats(root: Path, kind: str) -> np.ndarray:
    files = sorted(root.glob(f"*/*/*_{kind}.nii.gz"))
    assert files
    return np.concatenate([np.asarray(nib.load(f).dataobj, dtype=np.float64).ravel() for f in files])


def _isles(root: Path, kind: str) -> np.ndarray:
    files = sorted(root.glob(f"TRAINING/*/SMIR.Brain.XX.O.{kind}.*/*.nii"))
    assert files
    return np.concatenate([np.asarray(nib.load(f).dataobj, dtype=np.float64).ravel() for f in files])


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    base = tmp_path_factory.mktemp("shifts")
    shifts = {"none": None, "c05": {"contrast": 0.5}, "c0": {"contrast": 0.0}, "n2": {"noise": 2.0},
              "n0": {"noise": 0.0}, "b0": {"bias_field": 0.0, "noise": 0.0},
              "b1": {"noise": 0.0}, "b2": {"bias_field": 2.0, "noise": 0.0}}
    for name, shift in shifts.items():
        write_phantoms("brats18", base / name, 2, seed=4, shape=SHAPES["brats18"], shift=shift)
    return base


def test_brats_shifts_keep_p_star_and_labels_bit_identical(brats):
    for name in ("c05", "c0", "n2", "n0", "b0", "b2"):
        for kind in ("seg", "trueprob"):
            assert np.array_equal(_brats(brats / name, kind), _brats(brats / "none", kind)), (name, kind)
        assert not np.array_equal(_brats(brats / name, "flair"), _brats(brats / "none", "flair")), name


def test_contrast_scales_the_signal_about_the_brain_mean(brats):
    for kind in BRATS_KINDS:
        base, half, flat = (_brats(brats / n, kind) for n in ("none", "c05", "c0"))
        inside = base > 0
        # image - (contrast 0 image) = c (s - m): the noise and the brain mean cancel
        ratio = np.std(half[inside] - flat[inside]) / np.std(base[inside] - flat[inside])
        assert ratio == pytest.approx(0.5, abs=0.02), kind
        assert half[inside].mean() == pytest.approx(base[inside].mean(), rel=0.01)


def test_noise_multiplies_the_residual_sd(brats):
    for kind in BRATS_KINDS:
        base, double, clean = (_brats(brats / n, kind) for n in ("none", "n2", "n0"))
        inside = base > 0
        ratio = np.std(double[inside] - clean[inside]) / np.std(base[inside] - clean[inside])
        assert ratio == pytest.approx(2.0, rel=0.05), kind
        assert np.std(base[inside] - clean[inside]) > 1.0  # there is noise to scale


def test_bias_field_multiplies_the_log_field(brats):
    for kind in BRATS_KINDS:
        flat, one, two = (_brats(brats / n, kind) for n in ("b0", "b1", "b2"))
        inside = (flat > 50) & (one > 50) & (two > 50)  # clear of int16 rounding
        log1, log2 = np.log(one[inside] / flat[inside]), np.log(two[inside] / flat[inside])
        assert np.std(log1) > 0.01
        assert np.corrcoef(log1, log2)[0, 1] > 0.95
        assert np.std(log2) / np.std(log1) == pytest.approx(2.0, rel=0.1), kind


def test_isles_contrast_and_noise_keep_labels(tmp_path):
    for name, shift in {"none": None, "c05": {"contrast": 0.5}, "n3": {"noise": 3.0}}.items():
        write_phantoms("isles18", tmp_path / name, 2, seed=2, shape=SHAPES["isles18"], shift=shift)
    for name in ("c05", "n3"):
        for kind in ("OT", "TrueProb"):
            assert np.array_equal(_isles(tmp_path / name, kind), _isles(tmp_path / "none", kind))
        assert not np.array_equal(_isles(tmp_path / name, "CT"), _isles(tmp_path / "none", "CT"))


def test_shift_is_in_the_recipe_and_a_cache_is_never_reused(tmp_path):
    write_phantoms("brats18", tmp_path / "a", 2, seed=0, shape=(24, 24, 24), shift={"noise": 2.0})
    recipe = json.loads((tmp_path / "a" / RECIPE_NAME).read_text())
    assert recipe["shift"] == {"noise": 2.0}
    with pytest.raises(DataError, match="another recipe"):
        write_phantoms("brats18", tmp_path / "a", 2, seed=0, shape=(24, 24, 24))
    # the identity shift is today's phantom: no shift in the recipe
    write_phantoms("brats18", tmp_path / "b", 2, seed=0, shape=(24, 24, 24), shift={"contrast": 1.0})
    assert "shift" not in json.loads((tmp_path / "b" / RECIPE_NAME).read_text())


@pytest.mark.parametrize("dataset, shift, match", [
    ("brats18", {"contrst": 0.5}, "valid choices: contrast, noise, bias_field"),
    ("isles18", {"bias_field": 2.0}, "for isles18; valid choices: contrast, noise"),
    ("brats18", {"noise": -1}, "must be a number >= 0"),
])
def test_bad_shift_is_one_clear_error(tmp_path, dataset, shift, match):
    with pytest.raises(DataError, match=match):
        write_phantoms(dataset, tmp_path / "x", 2, seed=0, shape=SHAPES[dataset], shift=shift)


def test_identity_shift_changes_no_number():
    x = np.arange(10, dtype=np.float32)
    s = ImageShift()
    assert s.identity and s.contrast_about_mean(x) is x and s.noise_sd(3.5) == 3.5
    assert s.bias_strength(0.07) == 0.07 and s.recipe() == {}


def _isles_one(root: Path, kind: str):
    (f,) = sorted(root.glob(f"TRAINING/case_1/SMIR.Brain.XX.O.{kind}.*/*.nii"))
    img = nib.load(f)
    return np.asarray(img.dataobj, dtype=np.float64), img.affine


def test_isles_slab_mm_resamples_the_same_lesion_on_thicker_slices(tmp_path):
    write_phantoms("isles18", tmp_path / "none", 1, seed=3, shape=(128, 128, 16))
    p0, a0 = _isles_one(tmp_path / "none", "TrueProb")
    t0 = np.linalg.norm(a0[:3, :3], axis=0)
    slab = int(np.argmax(t0))
    n0 = p0.shape[slab]
    assert n0 >= 4  # so that half as many slices is a thicker slab
    n1 = n0 // 2
    slab_mm = round(float(n0 * t0[slab] / n1), 3)  # thicker slices over the same height
    write_phantoms("isles18", tmp_path / "slab", 1, seed=3, shape=(128, 128, 16), shift={"slab_mm": slab_mm})
    p1, a1 = _isles_one(tmp_path / "slab", "TrueProb")
    t1 = np.linalg.norm(a1[:3, :3], axis=0)
    assert t1[slab] == pytest.approx(slab_mm) and np.allclose(np.delete(t0, slab), np.delete(t1, slab))
    assert p1.shape[slab] == max(2, round(n0 * t0[slab] / slab_mm))  # the documented rule
    # the same lesion: its p*-weighted volume and centre (world mm) agree up to the coarser sampling
    vol0, vol1 = p0.sum() * np.prod(t0), p1.sum() * np.prod(t1)
    assert vol0 > 0 and vol1 == pytest.approx(vol0, rel=0.35)

    def centre(p, a):
        idx = np.argwhere(p > 0).T
        return (a[:3, :3] @ (idx * p[p > 0]).sum(1) / p.sum()) + a[:3, 3]

    assert np.linalg.norm(centre(p0, a0) - centre(p1, a1)) < 0.5 * slab_mm
    labels, _ = _isles_one(tmp_path / "slab", "OT")
    assert labels.shape == p1.shape and not labels[p1 == 0].any() and labels.any()
    assert json.loads((tmp_path / "slab" / RECIPE_NAME).read_text())["shift"] == {"slab_mm": slab_mm}


def test_only_writes_those_subjects_as_the_whole_dataset_draws_them(tmp_path):
    whole = write_phantoms("brats18", tmp_path / "all", 3, seed=4, shape=SHAPES["brats18"],
                           shift={"noise": 2.0})
    some = write_phantoms("brats18", tmp_path / "some", 3, seed=4, shape=SHAPES["brats18"],
                          shift={"noise": 2.0}, only=[whole[2], whole[0]])
    assert some == [whole[0], whole[2]]
    assert sorted(p.name for p in (tmp_path / "some").glob("*/*") if p.is_dir()) == sorted(some)
    for sid in some:
        for kind in ("seg", "trueprob", "flair"):
            a, b = (next((tmp_path / r).glob(f"*/{sid}/*_{kind}.nii.gz")) for r in ("all", "some"))
            assert np.array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj)), (sid, kind)
    assert json.loads((tmp_path / "some" / RECIPE_NAME).read_text())["subjects"] == some
    assert "subjects" not in json.loads((tmp_path / "all" / RECIPE_NAME).read_text())


def test_only_names_a_subject_the_recipe_does_not_have(tmp_path):
    with pytest.raises(DataError, match="'nope'.*not among the 2 subjects"):
        write_phantoms("brats18", tmp_path / "x", 2, seed=4, shape=SHAPES["brats18"], only=["nope"])
    assert not (tmp_path / "x").exists()
