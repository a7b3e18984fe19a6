"""Phantoms: real layout and headers, contrast, label noise drawn from the written probability."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from calib.data import DataError, discover, write_phantoms
from calib.data.layouts import ISLES_CHANNELS, SMIR_PREFIX


def _data(path):
    return np.asanyarray(nib.load(str(path), mmap=False).dataobj)  # no memmap: files get rewritten


def test_brats_layout_and_header(phantom_roots):
    root = phantom_roots["brats18"]
    disc = discover("brats18", root)
    assert disc.problems == [] and len(disc.subjects) == 3
    for s in disc.subjects:
        assert s.directory.parent.name in ("HGG", "LGG") and s.directory.name == s.subject_id
        names = sorted(p.name for p in s.directory.iterdir())
        assert names == sorted(f"{s.subject_id}_{k}.nii.gz" for k in ("flair", "t1", "t1ce", "t2", "seg", "trueprob"))
        img = nib.load(str(s.images[0]))
        # The orientation of the released BraTS files: diag(-1, -1, 1), origin (0, Y-1, 0).
        expected = np.diag([-1.0, -1.0, 1.0, 1.0])
        expected[1, 3] = img.shape[1] - 1
        np.testing.assert_allclose(img.affine, expected)
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        assert img.shape == (48, 48, 32) and img.header.get_zooms() == (1.0, 1.0, 1.0)
        assert set(np.unique(_data(s.label)).tolist()) <= {0, 1, 2, 4}


def test_brats_brain_mask_and_contrast(phantom_roots):
    for s in discover("brats18", phantom_roots["brats18"]).subjects:
        flair, t1, t1ce, t2 = (_data(p).astype(float) for p in s.images)
        seg = _data(s.label)
        brain = flair > 0
        # Skull-stripped: every modality is 0 exactly outside the FLAIR > 0 brain, and so is seg.
        for img in (t1, t1ce, t2):
            assert np.all(img[~brain] == 0) and np.all(img[brain] > 0)
        assert not seg[~brain].any()
        tumour, normal = seg > 0, brain & (seg == 0)
        assert tumour.sum() > 100
        assert flair[tumour].mean() > 1.3 * flair[normal].mean()  # oedema bright on FLAIR
        assert t2[tumour].mean() > 1.3 * t2[normal].mean()
        if (seg == 4).sum() > 20:  # enhancing ring bright on T1ce
            assert t1ce[seg == 4].mean() > 1.3 * t1ce[normal].mean()


def test_isles_layout_and_slabs(phantom_roots):
    disc = discover("isles18", phantom_roots["isles18"])
    assert disc.problems == [] and [s.subject_id for s in disc.subjects] == ["case_1", "case_2", "case_3"]
    for s in disc.subjects:
        assert s.directory.parent.name == "TRAINING"
        kinds = sorted(p.name.split(".")[4] for p in s.directory.iterdir())
        assert kinds == sorted([*ISLES_CHANNELS, "CT_4DPWI", "OT", "TrueProb"])
        for path in (*s.images, s.label):
            assert path.name.startswith(SMIR_PREFIX) and path.name.endswith(".nii")
            assert path.parent.name + ".nii" == path.name
        ct = nib.load(str(s.images[0]))
        sx, sy, sz = ct.header.get_zooms()
        assert 0.8 <= sx == sy <= 1.0 and 4.0 <= sz <= 8.0
        assert 2 <= ct.shape[2] <= 6
        pwi = nib.load(str(s.ignored[0]))
        assert pwi.ndim == 4 and pwi.shape[:3] == ct.shape
        ct_data = _data(s.images[0])
        assert ct_data.min() < -900 and ct_data.max() > 800  # air and bone
        assert set(np.unique(_data(s.label)).tolist()) <= {0, 1}


def _difficulty(dataset, root):
    """(label noise, contrast): mean min(p*, 1-p*) where p* > 0.5 (the chance a label voxel of the
    lesion flips), and the best channel's lesion-vs-normal contrast-to-noise ratio."""
    noise, cnr = [], []
    for s in discover(dataset, root).subjects:
        p = _data(s.true_prob).astype(float)
        noise.append(np.minimum(p, 1 - p)[p > 0.5].mean())
        brain = _data(s.images[0 if dataset == "brats18" else 1]) > 0  # FLAIR / CBF nonzero
        normal, lesion = brain & (p < 0.01), p > 0.5
        channels = [_data(f).astype(float) for f in s.images]
        cnr.append(max(abs(x[lesion].mean() - x[normal].mean()) / x[normal].std() for x in channels))
    return float(np.mean(noise)), float(np.mean(cnr))


def test_labels_are_drawn_from_true_prob(tmp_path):
    root = tmp_path / "b"
    write_phantoms("brats18", root, 2, seed=3, shape=(96, 96, 64))
    p_all, y_all = [], []
    for s in discover("brats18", root).subjects:
        p, y = _data(s.true_prob), _data(s.label) > 0
        assert p.dtype == np.float32 and 0.0 <= p.min() and p.max() <= 1.0
        p_all.append(p.ravel())
        y_all.append(y.ravel())
    p, y = np.concatenate(p_all), np.concatenate(y_all)
    assert not y[p == 0].any()  # no label where the probability is 0
    for lo, hi in [(0.05, 0.35), (0.35, 0.65), (0.65, 0.95), (0.95, 1.0)]:
        sel = (p >= lo) & (p < hi)
        assert sel.sum() > 100
        # Bernoulli(p*): the frequency of labels matches the mean probability in every band.
        assert abs(y[sel].mean() - p[sel].mean()) < 4 * np.sqrt(0.25 / sel.sum()) + 0.01


def test_isles_is_harder_than_brats(phantom_roots):
    noise_brats, cnr_brats = _difficulty("brats18", phantom_roots["brats18"])
    noise_isles, cnr_isles = _difficulty("isles18", phantom_roots["isles18"])
    assert noise_isles > 1.3 * noise_brats  # more label noise
    assert cnr_isles < 0.6 * cnr_brats  # lower contrast


def test_deterministic_and_seeded(tmp_path):
    a = write_phantoms("isles18", tmp_path / "a", 2, seed=5, shape=(32, 32, 4))
    b = write_phantoms("isles18", tmp_path / "b", 3, seed=5, shape=(32, 32, 4))
    c = write_phantoms("isles18", tmp_path / "c", 2, seed=6, shape=(32, 32, 4))
    assert b[:2] == a
    for sa, sb, sc in zip(*(discover("isles18", tmp_path / n).subjects for n in "abc")):
        for pa, pb in zip(sa.loaded_files(), sb.loaded_files()):
            assert pa.name == pb.name
            np.testing.assert_array_equal(_data(pa), _data(pb))  # subject k does not depend on N
        assert not np.array_equal(_data(sa.true_prob), _data(sc.true_prob))  # another seed differs


def test_lesions_vary_in_size_and_position(tmp_path):
    write_phantoms("brats18", tmp_path / "b", 6, seed=1, shape=(40, 40, 32))
    volumes, centres = [], []
    for s in discover("brats18", tmp_path / "b").subjects:
        p = _data(s.true_prob)
        volumes.append(p.sum())
        centres.append(np.argwhere(p > 0.5).mean(0))
    assert max(volumes) > 1.5 * min(volumes)
    assert np.ptp(np.array(centres), axis=0).max() > 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset": "brats19"}, "unknown dataset 'brats19'; choose one of brats18, isles18"),
        ({"n_subjects": 0}, "at least 1"),
        ({"shape": (8, 48, 32)}, "phantom shape"),
        ({"axcodes": "LLS"}, "axcodes"),
        ({"hemisphere": "middle"}, "hemisphere"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"dataset": "brats18", "out": tmp_path / "x", "n_subjects": 1, "seed": 0, "shape": (24, 24, 24)}
    args.update(kwargs)
    with pytest.raises(DataError, match=match):
        write_phantoms(**args)
    assert not (tmp_path / "x").exists()


def test_refuses_non_empty_out(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not an empty folder"):
        write_phantoms("brats18", tmp_path / "x", 1, 0, (24, 24, 24))
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temporary folder left behind


def test_same_call_again_is_a_no_op(tmp_path):
    ids = write_phantoms("isles18", tmp_path / "i", 2, seed=0, shape=(24, 24, 3))
    stamps = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "i").rglob("*"))
    assert write_phantoms("isles18", tmp_path / "i", 2, seed=0, shape=(24, 24, 3)) == ids
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "i").rglob("*")) == stamps
    with pytest.raises(DataError, match="nor the same phantoms"):
        write_phantoms("isles18", tmp_path / "i", 2, seed=1, shape=(24, 24, 3))
