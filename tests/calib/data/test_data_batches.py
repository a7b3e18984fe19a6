"""The uncompressed cache format (format 2) and the volume loader: content, order, workers, errors."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from calib.data import DataError, load_subject, preprocess_dataset, read_meta
from calib.data.batches import WORKERS_ENV, VolumeBatches, default_workers
from calib.data.cache import stored_arrays, write_subject

SHAPE = (2, 6, 5, 4)


def _subject(rng, shape=SHAPE):
    mask = rng.random(shape[1:]) < 0.7
    return {"image": (rng.standard_normal(shape) * mask).astype(np.float32),
            "label": ((rng.random(shape[1:]) < 0.3) & mask).astype(np.uint8), "mask": mask}


@pytest.fixture
def cache(tmp_path):
    """Seven subjects written by the cache writer (an odd count: the last batch is short)."""
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(7)]
    for sid in ids:
        write_subject(tmp_path / f"{sid}.npz", **_subject(rng))
    return tmp_path, ids


def _epoch(loader, epoch):
    return [{k: v.clone() for k, v in b.items()} for b in loader(epoch)]


def _which(batch_image, cache_dir, ids):
    """Subject ids of a batch, found by content."""
    images = {sid: load_subject(cache_dir, sid).image for sid in ids}
    return [next(s for s, im in images.items() if np.array_equal(im, x.numpy())) for x in batch_image]


def test_batches_hold_every_subject_once_with_the_cached_content(cache):
    cache_dir, ids = cache
    loader = VolumeBatches(cache_dir, ids, batch_size=3, shuffle=True, seed=5, workers=0)
    batches = _epoch(loader, 0)
    assert len(batches) == len(loader) == 3 and [b["image"].shape[0] for b in batches] == [3, 3, 1]
    seen = []
    for b in batches:
        assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == SHAPE
        assert b["label"].dtype == torch.float32 and b["label"].shape[1:] == (1, *SHAPE[1:])
        assert b["mask"].dtype == torch.bool and b["mask"].shape == b["label"].shape
        names = _which(b["image"], cache_dir, ids)
        for i, sid in enumerate(names):
            s = load_subject(cache_dir, sid)
            np.testing.assert_array_equal(b["label"][i, 0].numpy(), (s.label > 0).astype(np.float32))
            np.testing.assert_array_equal(b["mask"][i, 0].numpy(), s.mask)
        seen += names
    assert sorted(seen) == sorted(ids)


def test_order_depends_only_on_seed_and_epoch(cache):
    """The resume contract of calib.training: a fresh loader gives the same batches for an epoch."""
    cache_dir, ids = cache

    def order(seed, epoch, shuffle=True):
        loader = VolumeBatches(cache_dir, ids, batch_size=2, shuffle=shuffle, seed=seed, workers=0)
        return [sid for b in loader(epoch) for sid in _which(b["image"], cache_dir, ids)]

    first = VolumeBatches(cache_dir, ids, batch_size=2, shuffle=True, seed=1, workers=0)
    for e in range(3):
        _epoch(first, e)
    assert order(1, 3) == order(1, 3)
    assert [sid for b in first(3) for sid in _which(b["image"], cache_dir, ids)] == order(1, 3)
    assert order(1, 3) != order(1, 4) and order(1, 3) != order(2, 3)
    assert order(1, 0, shuffle=False) == ids == order(9, 7, shuffle=False)


def test_workers_give_the_same_batches_as_the_training_thread(cache):
    cache_dir, ids = cache
    inline = _epoch(VolumeBatches(cache_dir, ids, batch_size=2, seed=3, workers=0), 2)
    pooled = _epoch(VolumeBatches(cache_dir, ids, batch_size=2, seed=3, workers=2), 2)
    assert len(inline) == len(pooled)
    for a, b in zip(inline, pooled):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])


def test_shape_mismatch_names_the_subjects(tmp_path):
    rng = np.random.default_rng(1)
    write_subject(tmp_path / "a.npz", **_subject(rng))
    write_subject(tmp_path / "b.npz", **_subject(rng, (2, 6, 5, 3)))
    with pytest.raises(ValueError, match=r"subjects \['a', 'b'\] have different shapes"):
        list(VolumeBatches(tmp_path, ["a", "b"], batch_size=2, shuffle=False, workers=0)(0))


def test_bad_loader_arguments(cache, monkeypatch):
    cache_dir, ids = cache
    with pytest.raises(ValueError, match="no subjects"):
        VolumeBatches(cache_dir, [], workers=0)
    with pytest.raises(ValueError, match="batch_size"):
        VolumeBatches(cache_dir, ids, batch_size=0, workers=0)
    with pytest.raises(ValueError, match="workers"):
        VolumeBatches(cache_dir, ids, workers=-1)
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert default_workers() == 3 and VolumeBatches(cache_dir, ids).workers == 3
    monkeypatch.setenv(WORKERS_ENV, "two")
    with pytest.raises(ValueError, match=WORKERS_ENV):
        default_workers()
    monkeypatch.delenv(WORKERS_ENV)
    assert default_workers() == (min(2, len(__import__("os").sched_getaffinity(0)))
                                 if torch.cuda.is_available() else 0)


def test_stored_arrays_read_raw_members_and_compressed_ones(tmp_path):
    rng = np.random.default_rng(2)
    arrays = dict(_subject(rng), true_prob=rng.random(SHAPE[1:]).astype(np.float32))
    write_subject(tmp_path / "new.npz", **arrays)
    np.savez_compressed(tmp_path / "old.npz", **arrays)  # a format-1 cache file
    np.savez(tmp_path / "fortran.npz", **{k: np.asfortranarray(v) for k, v in arrays.items()})
    for sid in ("new", "old", "fortran"):
        stored = stored_arrays(tmp_path, sid)
        assert sorted(stored) == ["image", "label", "mask", "true_prob"]
        for k, v in arrays.items():
            assert stored[k].dtype == v.dtype and stored[k].shape == v.shape
            np.testing.assert_array_equal(stored[k].read(), v)
            out = np.full(v.shape, 7, v.dtype)
            stored[k].read_into(out)
            np.testing.assert_array_equal(out, v)
        as_float = np.zeros(SHAPE[1:], np.float64)  # read_into converts to the buffer's dtype
        stored["true_prob"].read_into(as_float)
        np.testing.assert_array_equal(as_float, arrays["true_prob"])
        with pytest.raises(ValueError, match=r"image is \(2, 6, 5, 4\), the buffer \(2, 6, 5\)"):
            stored["image"].read_into(np.zeros(SHAPE[:3], np.float32))
    assert all(a.offset is not None for a in stored_arrays(tmp_path, "new").values())
    assert all(a.offset is None for a in stored_arrays(tmp_path, "old").values())
    np.testing.assert_array_equal(load_subject(tmp_path, "new").image, arrays["image"])


def test_stored_arrays_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(3)
    write_subject(tmp_path / "s1.npz", **_subject(rng))
    with pytest.raises(DataError, match="subject 'nobody' not in cache"):
        stored_arrays(tmp_path, "nobody")
    np.savez(tmp_path / "part.npz", image=np.zeros(SHAPE, np.float32))
    with pytest.raises(DataError, match=r"part\.npz lacks array\(s\) label, mask"):
        stored_arrays(tmp_path, "part")
    path = tmp_path / "s1.npz"
    located = stored_arrays(tmp_path, "s1")
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])  # cut short: the zip directory at the end is gone
    with pytest.raises(DataError, match=r"s1\.npz: unreadable cached subject 's1'"):
        stored_arrays(tmp_path, "s1")
    with pytest.raises(DataError, match=r"s1\.npz: truncated cached array 'mask'"):
        located["mask"].read()  # located before the cut: the short read is caught
    with pytest.raises(DataError, match=r"s1\.npz: unreadable cached subject 's1'"):
        load_subject(tmp_path, "s1")
    # A directory that claims more data than the file holds (a member overwritten in place).
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as zf:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (1000,)})
        header = buf.getvalue()
        zf.writestr("image.npy", header + b"\0" * 16)
        for k in ("label", "mask"):
            zf.writestr(f"{k}.npy", header + b"\0" * 16)
    with pytest.raises(DataError, match=r"big\.npz: unreadable cached subject 'big'.*do not fit"):
        stored_arrays(tmp_path, "big")


def test_preprocess_writes_mappable_subjects(phantom_roots, tmp_path):
    cache = preprocess_dataset("brats18", phantom_roots["brats18"], tmp_path / "out", shape=(24, 24, 16),
                               workers=1, progress=False)
    meta = read_meta(cache)
    assert meta["config"]["format_version"] == 2
    for sid in meta["subjects"]:
        with zipfile.ZipFile(cache / f"{sid}.npz") as zf:
            assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
        stored, loaded = stored_arrays(cache, sid), load_subject(cache, sid)
        for k in ("image", "label", "mask", "true_prob"):
            assert stored[k].offset is not None
            np.testing.assert_array_equal(stored[k].read(), getattr(loaded, k))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_subject_fails_the_epoch_naming_the_file(cache, workers):
    """In the training thread or in a worker: a DataError (not retried by the sweep) naming it."""
    cache_dir, ids = cache
    path = cache_dir / "s3.npz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"s3\.npz: unreadable cached subject 's3'"):
        list(VolumeBatches(cache_dir, ids, batch_size=2, shuffle=False, workers=workers)(0))
