"""Preprocessing: round trip, orientation, spacing, the cache (hit, miss, atomicity), workers."""

from __future__ import annotations

import logging
import os
import time

import nibabel as nib
import numpy as np
import pytest

import calib.data.preprocess as pp
from calib.data import (
    DataError,
    check_dataset,
    discover,
    load_subject,
    preprocess_dataset,
    read_meta,
    write_phantoms,
)
from calib.data.transforms import extent_grid

SMALL_OUT = (24, 24, 16)


def _run(dataset, root, out, **kw):
    kw.setdefault("shape", SMALL_OUT)
    kw.setdefault("workers", 1)
    return preprocess_dataset(dataset, root, out, progress=False, **kw)


@pytest.mark.parametrize("dataset, channels", [("brats18", 4), ("isles18", 5)])
def test_round_trip(phantom_roots, tmp_path, dataset, channels):
    root = phantom_roots[dataset]
    assert check_dataset(dataset, root).ok
    # A grid that holds the whole head, so that the in-mask statistics are those of the output.
    cache = _run(dataset, root, tmp_path / "out", shape=(32, 32, 24))
    assert cache.parent == tmp_path / "out" and cache.name.startswith(dataset + "-")
    meta = read_meta(cache)
    ids = [s.subject_id for s in discover(dataset, root).subjects]
    assert meta["subjects"] == ids and len(meta["channels"]) == channels
    assert meta["config"]["spacing"] == 2.0 and meta["config"]["shape"] == [32, 32, 24]
    assert sorted(p.name for p in cache.iterdir()) == sorted([*(f"{i}.npz" for i in ids), "meta.json"])
    for sid in ids:
        with np.load(cache / f"{sid}.npz") as npz:
            assert sorted(npz.files) == ["image", "label", "mask", "true_prob"]
        s = load_subject(cache, sid)
        assert s.image.shape == (channels, 32, 32, 24) and s.image.dtype == np.float32
        assert s.label.dtype == np.uint8 and set(np.unique(s.label)) <= {0, 1} and s.label.sum() > 0
        assert s.mask.dtype == bool and s.mask.shape == (32, 32, 24)
        assert s.true_prob.dtype == np.float32 and 0 <= s.true_prob.min() and s.true_prob.max() <= 1
        inside = s.image[:, s.mask]
        np.testing.assert_allclose(inside.mean(axis=1), 0.0, atol=1e-4)  # z-scored in the mask
        np.testing.assert_allclose(inside.std(axis=1), 1.0, atol=1e-3)
        assert not s.image[:, ~s.mask].any()  # zero outside
        assert s.label[~s.mask].sum() <= 0.02 * s.label.sum()  # lesions lie in the brain
        # Labels were drawn from true_prob: the two lesion volumes agree.
        assert abs(s.true_prob.sum() - s.label.sum()) < 0.15 * s.label.sum() + 10
        # The cache grid is RAS at 2 mm.
        np.testing.assert_allclose(np.diag(meta["subject_info"][sid]["affine"])[:3], [2.0, 2.0, 2.0])


def _lesion_side(cache, sid):
    """Lesion centroid minus brain-mask centroid along x, and minus the array centre (voxels)."""
    s = load_subject(cache, sid)
    lx = np.argwhere(s.label > 0)[:, 0].mean()
    return lx - np.argwhere(s.mask)[:, 0].mean(), lx - (s.label.shape[0] - 1) / 2


@pytest.mark.parametrize(
    "dataset, axcodes",
    [("brats18", "LPS"), ("brats18", "RAS"), ("brats18", "PIR"), ("isles18", "LPS"), ("isles18", "ILA")],
)
def test_left_hemisphere_lands_in_left_half(tmp_path, dataset, axcodes):
    """RAS+: +x points to the patient's Right, so the patient's left is the low-x half."""
    shape = (48, 48, 32) if dataset == "brats18" else (56, 56, 6)
    for hemisphere, sign in (("left", -1), ("right", 1)):
        root = tmp_path / f"{hemisphere}-raw"
        write_phantoms(dataset, root, 2, seed=4, shape=shape, axcodes=axcodes, hemisphere=hemisphere)
        subject = discover(dataset, root).subjects[0]
        stored = nib.load(str(subject.label))
        assert "".join(nib.aff2axcodes(stored.affine)) == axcodes
        if axcodes == "LPS":
            # Stored LPS, the left lesion sits at high index along axis 0: the test needs the flip.
            raw = np.asanyarray(stored.dataobj) > 0
            assert sign * (np.argwhere(raw)[:, 0].mean() - (raw.shape[0] - 1) / 2) < 0
        cache = _run(dataset, root, tmp_path / f"{hemisphere}-out", shape=(32, 32, 24))
        for sid in read_meta(cache)["subjects"]:
            from_mask, from_centre = _lesion_side(cache, sid)
            assert sign * from_mask > 0.5 and sign * from_centre > 0, (hemisphere, sid, from_mask, from_centre)


@pytest.mark.parametrize(
    "dataset, shape, out_shape",
    [("brats18", (96, 96, 64), (64, 64, 48)), ("isles18", (128, 128, 8), (72, 72, 40))],
)
def test_spacing_keeps_lesion_volume(tmp_path, dataset, shape, out_shape):
    root = tmp_path / "raw"
    write_phantoms(dataset, root, 2 if dataset == "brats18" else 3, seed=0, shape=shape)
    cache = _run(dataset, root, tmp_path / "out", shape=out_shape)
    for subject in discover(dataset, root).subjects:
        src = nib.load(str(subject.label))
        voxel_mm3 = float(np.prod(src.header.get_zooms()[:3]))
        source_mm3 = np.count_nonzero(np.asanyarray(src.dataobj)) * voxel_mm3
        out_mm3 = load_subject(cache, subject.subject_id).label.sum() * 2.0**3
        assert abs(out_mm3 / source_mm3 - 1) < 0.10, (subject.subject_id, source_mm3, out_mm3)


def test_extent_grid_hand_worked():
    # 3 slices of 5 mm (centres z = 10, 15, 20; slab 7.5 .. 22.5) and 4 pixels of 1 mm.
    affine = np.diag([1.0, 1.0, 5.0, 1.0])
    affine[:3, 3] = [0.0, 0.0, 10.0]
    out, shape = extent_grid(affine, (4, 4, 3), 2.0)
    assert shape == (2, 2, 8)  # 4 mm / 2 and 15 mm / 2 rounded
    np.testing.assert_allclose(np.diag(out)[:3], [2.0, 2.0, 2.0])
    # Centred on the input: x centres 0.5, 2.5 (input 0..3); z centres 8 .. 22 around 15.
    np.testing.assert_allclose(out[:3, 3], [0.5, 0.5, 8.0])
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # axis directions are kept
    out, _ = extent_grid(flipped, (4, 4, 4), 2.0)
    assert out[0, 0] == -2.0


def test_cache_hit_does_no_work(phantom_roots, tmp_path, monkeypatch, caplog):
    root = phantom_roots["isles18"]
    first = _run("isles18", root, tmp_path / "out")
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    def no_work(*args, **kwargs):
        raise AssertionError("a cache hit must not preprocess any subject")

    monkeypatch.setattr(pp, "process_subject", no_work)
    with caplog.at_level(logging.INFO, logger="calib.data"):
        second = _run("isles18", root, tmp_path / "out")
    assert second == first
    assert "cache hit" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in second.iterdir()} == stamps


def test_cache_miss_on_changed_config_or_source(copy_root, tmp_path):
    root = copy_root("brats18")
    out = tmp_path / "out"
    base = _run("brats18", root, out)
    other_spacing = _run("brats18", root, out, spacing=3.0)
    other_shape = _run("brats18", root, out, shape=(20, 20, 16))
    assert len({base, other_spacing, other_shape}) == 3
    assert read_meta(other_spacing)["config"]["spacing"] == 3.0
    assert load_subject(other_shape, read_meta(base)["subjects"][0]).image.shape[1:] == (20, 20, 16)
    # A changed source file (new mtime) gets its own folder too; the old ones stay whole.
    flair = discover("brats18", root).subjects[0].images[0]
    os.utime(flair, ns=(time.time_ns(), time.time_ns() + 10**9))
    after_touch = _run("brats18", root, out)
    assert after_touch not in (base, other_spacing, other_shape)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in (base, other_spacing, other_shape, after_touch)
    )
    for cache in (base, other_spacing, other_shape, after_touch):
        assert read_meta(cache)["hash"].startswith(cache.name.split("-")[1])


def test_crash_leaves_nothing_readable(phantom_roots, tmp_path, monkeypatch):
    root = phantom_roots["brats18"]
    real = pp.process_subject
    calls = []

    def crash_on_second(files, config, out_dir):
        calls.append(files.subject_id)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(files, config, out_dir)

    monkeypatch.setattr(pp, "process_subject", crash_on_second)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run("brats18", root, out)
    assert not out.exists() or not any(out.iterdir())
    monkeypatch.setattr(pp, "process_subject", real)
    cache = _run("brats18", root, out)
    assert len(read_meta(cache)["subjects"]) == 3


def test_parallel_workers_match_serial(phantom_roots, tmp_path):
    root = phantom_roots["isles18"]
    serial = _run("isles18", root, tmp_path / "serial")
    parallel = _run("isles18", root, tmp_path / "parallel", workers=2)
    assert serial.name == parallel.name  # same config and sources, same key
    for sid in read_meta(serial)["subjects"]:
        a, b = load_subject(serial, sid), load_subject(parallel, sid)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_allclose(a.image, b.image, atol=1e-5)


def test_parallel_bad_subject_writes_nothing(copy_root, tmp_path):
    root = copy_root("brats18")
    seg = discover("brats18", root).subjects[2].label
    seg.write_bytes(seg.read_bytes()[:200])
    out = tmp_path / "out"
    with pytest.raises(DataError, match="truncated") as excinfo:
        _run("brats18", root, out, workers=2)
    assert str(seg) in str(excinfo.value)
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset": "isles17"}, "choose one of brats18, isles18"),
        ({"spacing": 0.0}, "spacing"),
        ({"shape": (24, 24)}, "three positive"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_arguments(phantom_roots, tmp_path, kwargs, match):
    args = {"dataset": "brats18", "root": phantom_roots["brats18"], "out": tmp_path / "out"}
    args.update(kwargs)
    with pytest.raises(DataError, match=match):
        preprocess_dataset(progress=False, **args)
    assert not (tmp_path / "out").exists()


def test_load_subject_and_meta_errors(tmp_path):
    with pytest.raises(DataError, match="meta.json not found"):
        read_meta(tmp_path)
    with pytest.raises(DataError, match="subject 'nobody' not in cache"):
        load_subject(tmp_path, "nobody")


def test_load_subject_truncated_file_names_it(tmp_path):
    """A cached subject cut short (a copy interrupted outside our atomic writer) is a DataError
    naming the file, not a bare zipfile error that a sweep would retry as transient."""
    path = tmp_path / "s1.npz"
    np.savez_compressed(path, image=np.zeros((1, 4, 4, 4), np.float32),
                        label=np.zeros((4, 4, 4), np.uint8), mask=np.ones((4, 4, 4), bool))
    assert load_subject(tmp_path, "s1").image.shape == (1, 4, 4, 4)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"s1\.npz: unreadable cached subject 's1'"):
        load_subject(tmp_path, "s1")


@pytest.mark.parametrize("dataset", ["brats18", "isles18"])
def test_fixed_normalisation_is_the_public_codes_shift_and_scale(phantom_roots, tmp_path, dataset):
    root = phantom_roots[dataset]
    shape = (32, 32, 24)  # the whole head: no padding, every voxel was resampled
    subject = _run(dataset, root, tmp_path / "out", shape=shape)
    fixed = _run(dataset, root, tmp_path / "out", shape=shape, normalisation="fixed")
    assert fixed != subject  # its own cache entry
    assert read_meta(fixed)["config"]["normalization"].startswith("fixed")
    shifts, scales = (np.array(v)[:, None] for v in zip(*(
        pp.FIXED_NORMALISATION[dataset][c] for c in read_meta(fixed)["channels"])))
    for sid in read_meta(fixed)["subjects"]:
        a, b = load_subject(subject, sid), load_subject(fixed, sid)
        np.testing.assert_array_equal(a.mask, b.mask)
        # undoing the fixed shift/scale gives the raw resampled intensities, whose z-score in
        # the mask is what the per-subject normalisation wrote
        raw = b.image[:, b.mask] * scales + shifts
        z = (raw - raw.mean(axis=1, keepdims=True)) / raw.std(axis=1, keepdims=True)
        np.testing.assert_allclose(z, a.image[:, a.mask], atol=2e-3)
        assert b.image[:, ~b.mask].any()  # not zeroed outside the mask, as the public code
    with pytest.raises(DataError, match="unknown normalisation 'zscore'; valid choices: subject, fixed"):
        _run(dataset, root, tmp_path / "bad", normalisation="zscore")
