"""Phantoms: real anatomy, real layout and headers, contrast, label noise drawn from the written
probability."""

from __future__ import annotations

import json
import socket

import nibabel as nib
import numpy as np
import pytest

from calib.data import DataError, check_dataset, discover, write_phantoms
from calib.data import anatomy, phantom
from calib.data.cli import main
from calib.data.layouts import ISLES_CHANNELS, SMIR_PREFIX
from calib.data.synth import grid_affine


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


# ------------------------------------------------------------------------------ real anatomy
@pytest.fixture(scope="module")
def full_brats(tmp_path_factory):
    """Two BraTS-like subjects on the real 240x240x155 grid (the default)."""
    root = tmp_path_factory.mktemp("full") / "brats18"
    write_phantoms("brats18", root, 2, seed=0)
    return root


def test_template_is_the_one_nilearn_ships():
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    t = anatomy.load_template()
    below = anatomy.PAD_BELOW  # our copy has room for a skull under the cerebellum
    t1 = load_mni152_template(resolution=1)
    assert np.allclose(t1.affine[:3, :3], np.eye(3)) and t.affine[2, 3] == t1.affine[2, 3] - below
    brain = np.asanyarray(t1.dataobj) > 0
    np.testing.assert_array_equal(t.sdist[:, :, below:] < 0, brain)
    assert not (t.sdist[:, :, :below] < 0).any()
    gm = np.asanyarray(load_mni152_gm_template(resolution=1).dataobj)
    wm = np.asanyarray(load_mni152_wm_template(resolution=1).dataobj)
    kept = brain & (gm + wm <= 1.0)  # elsewhere the maps are cut to the mask and to gm + wm = 1
    np.testing.assert_allclose(t.gm[:, :, below:][kept], gm[kept], atol=1e-6)
    np.testing.assert_allclose(t.wm[:, :, below:][kept], wm[kept], atol=1e-6)
    assert 1800 < t.brain_ml < 2000  # mL: the MNI152 brain is larger than an individual's


def test_no_network_needed(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access during phantom generation")

    anatomy.load_template.cache_clear()
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    write_phantoms("isles18", tmp_path / "i", 1, seed=0, shape=(32, 32, 3))
    assert check_dataset("isles18", tmp_path / "i").ok


def test_brain_volume_is_an_adults_and_the_grid_holds_it(full_brats):
    report = check_dataset("brats18", full_brats)
    assert report.ok, report.problems
    volumes = []
    for s in discover("brats18", full_brats).subjects:
        brain = _data(s.images[0]) > 0  # FLAIR > 0, the BraTS brain mask; 1 mm voxels
        volumes.append(brain.sum() / 1e6)
        # The whole brain is inside the grid: nothing on its left/right, front/back or top faces
        # (the template itself ends under the cerebellum).
        for face in (brain[0], brain[-1], brain[:, 0], brain[:, -1], brain[:, :, -1]):
            assert not face.any()
    assert all(1.0 <= v <= 1.8 for v in volumes), volumes
    assert abs(volumes[0] - volumes[1]) > 0.005  # subjects differ in size


def test_tissue_volumes_are_realistic():
    """GM, WM and CSF of one subject at 1 mm, against adult norms (GM ~0.6-0.8 L, WM ~0.45-0.55 L)."""
    t = anatomy.load_template()
    affine, shape = grid_affine("RAS", np.ones(3), (176, 208, 176), np.zeros(3))
    warp = anatomy.random_warp(np.random.default_rng(0), np.zeros(3), t.centre, 1.0, (3.0, 3.0, 3.0))
    a = anatomy.sample_anatomy(warp, affine, shape)
    gm, wm, csf = a.gm.sum() / 1e6, a.wm.sum() / 1e6, a.csf.sum() / 1e6
    assert 0.55 < gm < 0.95 and 0.35 < wm < 0.7 and 0.08 < csf < 0.4, (gm, wm, csf)
    np.testing.assert_allclose(a.gm + a.wm + a.csf, a.brain, atol=1e-5)
    assert a.gm.min() >= 0 and a.wm.min() >= 0 and a.csf.min() >= 0


def test_warp_is_smooth_and_never_folds():
    t = anatomy.load_template()
    affine, shape = grid_affine("LPS", np.ones(3), (96, 112, 96), np.zeros(3))
    for seed in range(3):
        warp = anatomy.random_warp(np.random.default_rng(seed), np.zeros(3), t.centre, 0.6, (3.0, 3.0, 3.0))
        m = anatomy.sample_anatomy(warp, affine, shape).template_mm.astype(np.float64)
        # Jacobian of world -> template: each world step of 1 mm moves 1/scale template mm.
        jac = np.stack([np.stack(np.gradient(m[c]), 0) for c in range(3)], 0)  # (3 comps, 3 axes, ...)
        det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
        # No folding: the orientation of grid -> template is the grid's own everywhere (LPS: +1).
        assert np.all(np.sign(det) == np.sign(np.linalg.det(affine[:3, :3])))
        volume_change = np.abs(det) * warp.scale**3  # template mm^3 per voxel, back in world mm^3
        assert 0.5 < volume_change.min() and volume_change.max() < 2.0


def test_subjects_differ_in_anatomy_and_intensity(phantom_roots):
    subjects = discover("brats18", phantom_roots["brats18"]).subjects
    brains = [_data(s.images[0]) > 0 for s in subjects]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        overlap = 2 * (brains[a] & brains[b]).sum() / (brains[a].sum() + brains[b].sum())
        assert 0.75 < overlap < 0.99, overlap  # the same kind of brain, not the same brain
    t1_means = [_data(s.images[1])[m].mean() for s, m in zip(subjects, brains)]
    assert max(t1_means) > 1.05 * min(t1_means)  # scanner gain and contrast differ


@pytest.mark.parametrize("dataset, edge_mm", [("brats18", phantom.BRATS_EDGE_MM), ("isles18", phantom.ISLES_EDGE_MM)])
def test_true_prob_has_a_soft_boundary_around_the_lesion(phantom_roots, dataset, edge_mm):
    from scipy import ndimage

    for s in discover(dataset, phantom_roots[dataset]).subjects:
        img = nib.load(str(s.true_prob), mmap=False)
        p = np.asanyarray(img.dataobj).astype(float)
        assert 0.0 <= p.min() and p.max() <= 1.0
        core = p >= 0.5 * p.max()
        soft = (p > 0.05) & (p < 0.5 * p.max())  # strictly between "no" and "lesion"
        assert core.any() and soft.sum() > 0.2 * core.sum()
        # The soft voxels are a band around the lesion, not scattered: p* falls from half its
        # maximum to 0.05 over about 3 logistic scales (x1.5 on an elongated lesion's long axis).
        zooms = img.header.get_zooms()
        mm_from_core = ndimage.distance_transform_edt(~core, sampling=zooms)[soft]
        assert np.percentile(mm_from_core, 95) <= 6 * edge_mm + max(zooms)


def test_brats_cli_writes_a_layout_check_accepts(tmp_path, capsys):
    root = tmp_path / "brats"
    assert main(["phantom", "--dataset", "brats18", "--out", str(root), "--subjects", "2", "--seed", "3",
                 "--shape", "64", "64", "48"]) == 0
    assert "2 brats18 phantom subjects in" in capsys.readouterr().out
    assert main(["check", "--dataset", "brats18", "--root", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["subjects"] == ["Brats18_PHM_001_1", "Brats18_PHM_002_1"]
