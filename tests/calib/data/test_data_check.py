"""Every kind of bad input: `check` names the file, and preprocessing refuses it, writing nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from calib.data import DataError, check_dataset, discover, preprocess_dataset
from calib.data import errors as E
from calib.data.layouts import SMIR_PREFIX

SMALL_OUT = (24, 24, 16)


def _first(dataset: str, root: Path):
    return discover(dataset, root).subjects[0]


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine), str(path))


def _data(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path), mmap=False).dataobj)  # no memmap: files get rewritten


# Each corruption changes one thing in a copy of a clean phantom root and returns the culprit path.
def missing_modality(root):
    s = _first("brats18", root)
    s.images[2].unlink()  # t1ce
    return s.images[2]


def extra_modality(root):
    s = _first("brats18", root)
    extra = s.directory / f"{s.subject_id}_dwi.nii.gz"
    shutil.copy(s.images[0], extra)
    return extra


def unreadable(root):
    s = _first("brats18", root)
    s.images[1].write_bytes(b"this is not a NIfTI file at all")
    return s.images[1]


def truncated_gz(root):
    s = _first("brats18", root)
    data = s.images[3].read_bytes()
    s.images[3].write_bytes(data[: len(data) // 2])
    return s.images[3]


def shape_mismatch(root):
    s = _first("brats18", root)
    _rewrite(s.images[3], _data(s.images[3])[:-2])
    return s.images[3]


def affine_mismatch(root):
    s = _first("brats18", root)
    img = nib.load(str(s.images[0]))
    shifted = img.affine.copy()
    shifted[:3, 3] += [0.0, 0.0, 3.0]
    _rewrite(s.images[0], _data(s.images[0]), shifted)
    return s.images[0]


def label_values(root):
    s = _first("brats18", root)
    seg = _data(s.label).copy()
    seg[0, 0, 0] = 3  # BraTS labels are 0, 1, 2, 4
    _rewrite(s.label, seg)
    return s.label


def bad_dimensions(root):
    s = _first("brats18", root)
    _rewrite(s.images[0], np.stack([_data(s.images[0])] * 2, axis=-1))
    return s.images[0]


def prob_range(root):
    s = _first("brats18", root)
    p = _data(s.true_prob).copy()
    p[p > 0.5] = 1.5
    _rewrite(s.true_prob, p)
    return s.true_prob


def duplicate_subject(root):
    s = _first("brats18", root)
    other = "LGG" if s.group == "HGG" else "HGG"
    dst = root / other / s.subject_id
    shutil.copytree(s.directory, dst)
    return dst if other == "LGG" else s.directory  # the second one found (HGG is read first)


def isles_nonfinite(root):
    s = _first("isles18", root)
    cbf = _data(s.images[1]).astype(np.float32).copy()
    cbf[cbf.shape[0] // 2, :, 0] = np.nan
    _rewrite(s.images[1], cbf)
    return s.images[1]


def isles_truncated_nii(root):
    s = _first("isles18", root)
    data = s.images[0].read_bytes()
    s.images[0].write_bytes(data[: len(data) - 1000])
    return s.images[0]


def isles_missing_label(root):
    s = _first("isles18", root)
    shutil.rmtree(s.label.parent)
    return s.directory / f"{SMIR_PREFIX}OT.<num>"


def isles_extra_kind(root):
    s = _first("isles18", root)
    folder = s.directory / f"{SMIR_PREFIX}MR_DWI.999999"
    folder.mkdir()
    shutil.copy(s.images[0], folder / f"{folder.name}.nii")
    return folder


def isles_shape_mismatch(root):
    s = _first("isles18", root)
    _rewrite(s.images[4], _data(s.images[4])[:, :-3])  # Tmax
    return s.images[4]


CASES = [
    ("brats18", missing_modality, E.MISSING_MODALITY),
    ("brats18", extra_modality, E.EXTRA_MODALITY),
    ("brats18", unreadable, E.UNREADABLE),
    ("brats18", truncated_gz, E.TRUNCATED),
    ("brats18", shape_mismatch, E.SHAPE_MISMATCH),
    ("brats18", affine_mismatch, E.AFFINE_MISMATCH),
    ("brats18", label_values, E.LABEL_VALUES),
    ("brats18", bad_dimensions, E.BAD_DIMENSIONS),
    ("brats18", prob_range, E.PROB_RANGE),
    ("brats18", duplicate_subject, E.DUPLICATE_SUBJECT),
    ("isles18", isles_nonfinite, E.NONFINITE),
    ("isles18", isles_truncated_nii, E.TRUNCATED),
    ("isles18", isles_missing_label, E.MISSING_MODALITY),
    ("isles18", isles_extra_kind, E.EXTRA_MODALITY),
    ("isles18", isles_shape_mismatch, E.SHAPE_MISMATCH),
]


@pytest.mark.parametrize("dataset", ["brats18", "isles18"])
def test_clean_phantom_passes(phantom_roots, dataset):
    report = check_dataset(dataset, phantom_roots[dataset])
    assert report.ok, report.problems
    assert len(report.subjects) == 3
    d = report.to_dict()
    assert d["ok"] is True and d["n_subjects"] == 3 and d["problems"] == []


@pytest.mark.parametrize("dataset, corrupt, kind", CASES, ids=[c[1].__name__ for c in CASES])
def test_bad_input_is_named_and_never_cached(copy_root, tmp_path, dataset, corrupt, kind):
    root = copy_root(dataset)
    culprit = corrupt(root)

    report = check_dataset(dataset, root)
    assert not report.ok
    # Exactly one problem, of the expected kind, naming the culprit file.
    assert [(p.kind, p.path) for p in report.problems] == [(kind, str(culprit))], report.problems
    assert report.to_dict()["problems"][0]["kind"] == kind

    out = tmp_path / "cache"
    with pytest.raises(DataError) as excinfo:
        preprocess_dataset(dataset, root, out, shape=SMALL_OUT, workers=1, progress=False)
    assert kind in excinfo.value.kinds
    assert str(culprit) in str(excinfo.value)
    assert not out.exists()  # nothing written


def test_empty_dataset(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    for dataset in ("brats18", "isles18"):
        report = check_dataset(dataset, root)
        assert [(p.kind, p.path) for p in report.problems] == [(E.EMPTY_DATASET, str(root))]
        with pytest.raises(DataError, match="no .* subject found"):
            preprocess_dataset(dataset, root, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_every_problem_is_reported(copy_root):
    root = copy_root("brats18")
    culprits = {unreadable(root): E.UNREADABLE, label_values(root): E.LABEL_VALUES}
    second = discover("brats18", root).subjects[1]
    second.images[0].unlink()
    culprits[second.images[0]] = E.MISSING_MODALITY
    report = check_dataset("brats18", root)
    assert {(p.path, p.kind) for p in report.problems} == {(str(k), v) for k, v in culprits.items()}


def test_bad_input_leaves_existing_cache_untouched(copy_root, tmp_path):
    root = copy_root("isles18")
    out = tmp_path / "cache"
    good = preprocess_dataset("isles18", root, out, shape=SMALL_OUT, workers=1, progress=False)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in good.iterdir())
    isles_nonfinite(root)
    with pytest.raises(DataError, match="NaN"):
        preprocess_dataset("isles18", root, out, shape=SMALL_OUT, workers=1, progress=False)
    assert [p.name for p in out.iterdir()] == [good.name]  # no new folder, no leftover
    assert sorted((p.name, p.stat().st_mtime_ns) for p in good.iterdir()) == before


def test_root_must_be_a_directory(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        check_dataset("brats18", tmp_path / "nowhere")
    with pytest.raises(DataError, match="choose one of brats18, isles18"):
        check_dataset("brats2020", tmp_path)


def test_layout_variants_are_read(copy_root):
    """A flat BraTS root (no HGG/LGG) and ISLES files lying directly in the case folder."""
    root = copy_root("brats18")
    for group in ("HGG", "LGG"):
        if (root / group).is_dir():
            for subject_dir in (root / group).iterdir():
                subject_dir.rename(root / subject_dir.name)
            (root / group).rmdir()
    assert check_dataset("brats18", root).ok and len(discover("brats18", root).subjects) == 3

    root = copy_root("isles18")
    s = _first("isles18", root)
    folder = s.images[2].parent
    s.images[2].rename(s.directory / s.images[2].name)
    folder.rmdir()
    report = check_dataset("isles18", root)
    assert report.ok, report.problems
    assert discover("isles18", root).subjects[0].images[2] == s.directory / s.images[2].name


def test_empty_brain_mask_is_refused(copy_root, tmp_path):
    root = copy_root("brats18")
    flair = _first("brats18", root).images[0]
    _rewrite(flair, np.zeros_like(_data(flair)))
    with pytest.raises(DataError) as excinfo:
        preprocess_dataset("brats18", root, tmp_path / "out", shape=SMALL_OUT, workers=1, progress=False)
    assert excinfo.value.kinds == (E.EMPTY_MASK,) and str(flair) in str(excinfo.value)
    assert not (tmp_path / "out").exists()
