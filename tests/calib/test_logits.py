"""Logit cache: exact round trip, slice batches (mask-only slices, seeded per-epoch shuffle), errors."""

import numpy as np
import pytest
import torch

from calib.data.batches import SliceBatches, VolumeLogitBatches
from calib.logits import (
    LogitCacheError,
    load_logits,
    read_index,
    write_index,
    write_subject_logits,
)

SHAPE = (6, 5, 7)


def _subject(rng, shape=SHAPE):
    logits = rng.normal(0, 5, shape).astype(np.float32)
    label = (rng.random(shape) < 0.3).astype(np.uint8)
    mask = np.zeros(shape, bool)
    mask[1:-1, 1:-1, 2:5] = True  # z-slices 0, 1, 5, 6 hold no mask voxel
    return logits, label, mask


def _write(tmp_path, n=3, seed=0):
    rng = np.random.default_rng(seed)
    subjects = {f"s{i}": _subject(rng) for i in range(n)}
    for sid, (lg, lb, m) in subjects.items():
        write_subject_logits(tmp_path, sid, lg, lb, m)
    write_index(tmp_path, list(subjects), SHAPE, {"weights_sha256": "abc"})
    return subjects


def test_round_trip_keeps_orientation_label_and_mask(tmp_path):
    subjects = _write(tmp_path)
    for sid, (lg, lb, m) in subjects.items():
        vol = load_logits(tmp_path, sid)
        assert vol.logits.shape == SHAPE and vol.logits.dtype == np.float16
        np.testing.assert_array_equal(vol.logits, lg.astype(np.float16))
        np.testing.assert_array_equal(vol.mask, m)
        np.testing.assert_array_equal(vol.label, np.where(m, lb, 0))
    assert read_index(tmp_path)["source"] == {"weights_sha256": "abc"}
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_slice_batches_serve_each_masked_slice_once_per_epoch(tmp_path):
    subjects = _write(tmp_path)
    batches = SliceBatches(tmp_path, list(subjects), batch_size=4, seed=1)
    assert batches.n_slices == 3 * 3 and len(batches) == 3
    seen = []
    for batch in batches(0):
        assert batch["logits"].shape[1:] == (1, SHAPE[0], SHAPE[1])
        assert batch["logits"].dtype == torch.float32 and batch["mask"].dtype == torch.bool
        assert batch["mask"].flatten(1).any(1).all()
        # outside the mask the label is 0
        assert not (batch["label"].bool() & ~batch["mask"]).any()
        seen.extend(batch["logits"][:, 0].numpy())
    expected = [lg[:, :, z].astype(np.float16).astype(np.float32)
                for lg, _, _ in subjects.values() for z in (2, 3, 4)]
    key = lambda a: a.tobytes()  # noqa: E731
    assert sorted(map(key, seen)) == sorted(map(key, expected))


def test_shuffle_is_seeded_per_epoch(tmp_path):
    subjects = _write(tmp_path)

    def order(loader, epoch):
        return np.concatenate([b["logits"][:, 0, 0, 0].numpy() for b in loader(epoch)])

    a = SliceBatches(tmp_path, list(subjects), batch_size=4, seed=1)
    b = SliceBatches(tmp_path, list(subjects), batch_size=4, seed=1)
    np.testing.assert_array_equal(order(a, 3), order(b, 3))
    assert not np.array_equal(order(a, 0), order(a, 1))
    fixed = SliceBatches(tmp_path, list(subjects), batch_size=4, shuffle=False)
    np.testing.assert_array_equal(order(fixed, 0), order(fixed, 5))


def test_volume_batches_return_xyz_volumes(tmp_path):
    subjects = _write(tmp_path)
    batch = next(iter(VolumeLogitBatches(tmp_path, list(subjects), batch_size=2, shuffle=False)()))
    assert batch["logits"].shape == (2, 1, *SHAPE)
    lg, _, m = subjects["s0"]
    np.testing.assert_array_equal(batch["logits"][0, 0].numpy(), lg.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(batch["mask"][0, 0].numpy(), m)


def test_errors_name_the_subject_or_file(tmp_path):
    subjects = _write(tmp_path)
    with pytest.raises(LogitCacheError, match="'nobody'"):
        SliceBatches(tmp_path, ["s0", "nobody"])
    with pytest.raises(LogitCacheError, match="'nobody'"):
        load_logits(tmp_path, "nobody")
    with pytest.raises(LogitCacheError, match="index"):
        read_index(tmp_path / "elsewhere")
    rng = np.random.default_rng(1)
    write_subject_logits(tmp_path, "odd", *_subject(rng, (6, 5, 8)))
    SliceBatches(tmp_path, ["odd"])  # one shape alone is fine
    with pytest.raises(LogitCacheError, match="different shapes"):
        SliceBatches(tmp_path, [*subjects, "odd"])
    lg, lb, m = _subject(rng)
    lg[m.nonzero()[0][0], m.nonzero()[1][0], m.nonzero()[2][0]] = np.nan
    with pytest.raises(LogitCacheError, match="'bad'.*non-finite"):
        write_subject_logits(tmp_path, "bad", lg, lb, m)
