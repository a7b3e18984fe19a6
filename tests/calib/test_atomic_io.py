"""calib.atomic_io: a file or folder is the old one or the complete new one, never half-written."""

import json

import numpy as np
import pytest

from calib import atomic_io


class Boom(Exception):
    pass


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.json"
    atomic_io.write_json(target, {"a": 1})
    with pytest.raises(Boom):
        with atomic_io.atomic_open(target, "w") as fh:
            fh.write('{"a": 2, "trunc')
            raise Boom
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_files_get_the_permissions_open_gives(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    atomic_io.write_text(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode == plain.stat().st_mode  # not mkstemp's 0600


def test_several_files_are_all_written_before_any_is_replaced(tmp_path):
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    a.write_text("old a")
    with pytest.raises(Boom):
        with atomic_io.atomic_paths([a, b], suffix=".nii.gz") as (ta, tb):
            assert ta.name.endswith(".nii.gz") and ta.parent == tmp_path
            ta.write_text("new a")
            raise Boom  # b never written: a must not change either
    assert a.read_text() == "old a" and not b.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]
    with atomic_io.atomic_paths([a, b]) as (ta, tb):
        ta.write_text("new a")
        tb.write_text("new b")
    assert (a.read_text(), b.read_text()) == ("new a", "new b")


def test_arrays_round_trip(tmp_path):
    arr = np.arange(12, dtype=np.float16).reshape(3, 4)
    atomic_io.save_npy(tmp_path / "x.npy", arr)
    atomic_io.save_npz(tmp_path / "y.npz", a=arr)
    assert np.array_equal(np.load(tmp_path / "x.npy"), arr)
    with np.load(tmp_path / "y.npz") as npz:
        assert np.array_equal(npz["a"], arr)


def test_folder_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(Boom):
        with atomic_io.atomic_folder(target) as tmp:
            (tmp / "part").write_text("1")
            raise Boom
    assert list(tmp_path.iterdir()) == []
    target.mkdir()  # an empty folder is replaced
    with atomic_io.atomic_folder(target) as tmp:
        (tmp / "part").write_text("1")
    assert [p.name for p in target.iterdir()] == ["part"] and target.stat().st_mode & 0o777 == 0o755
    with pytest.raises(atomic_io.FolderConflict):  # a non-empty one is not, without a same-check
        with atomic_io.atomic_folder(target) as tmp:
            (tmp / "other").write_text("2")
    assert [p.name for p in target.iterdir()] == ["part"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_publish_keeps_the_same_folder_and_names_a_different_one(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "done").write_text("first")
    tmp = atomic_io.temp_folder(target)
    (tmp / "done").write_text("second")
    assert atomic_io.publish_folder(tmp, target, same=lambda t: (t / "done").exists()) is False
    assert (target / "done").read_text() == "first" and not tmp.exists()
    tmp = atomic_io.temp_folder(target)
    (tmp / "other").write_text("x")
    with pytest.raises(atomic_io.FolderConflict, match="holds first, this one other"):
        atomic_io.publish_folder(tmp, target, same=lambda t: (t / "other").exists(),
                                 conflict=lambda t: f"{t} holds first, this one other")
    assert (target / "done").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_stale_folder_is_removed_at_once_and_a_failed_writer_leaves_no_parents(tmp_path):
    stale = tmp_path / "stale"
    (stale / "sub").mkdir(parents=True)
    atomic_io.remove_folder(stale)
    atomic_io.remove_folder(stale)  # gone already: no error
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(Boom):
        with atomic_io.atomic_folder(tmp_path / "work" / "cache" / "ds") as tmp:
            (tmp / "part").write_text("1")
            raise Boom
    assert list(tmp_path.iterdir()) == []  # work/ and work/cache/ were created by it: removed


def test_move_into_place_tolerates_a_lost_race_only(tmp_path):
    winner, loser = tmp_path / "w", tmp_path / "l"
    for d in (winner, loser):
        d.mkdir()
        (d / "f").write_text(d.name)
    target = tmp_path / "target"
    atomic_io.move_into_place(winner, target)
    atomic_io.move_into_place(loser, target)  # a folder is there already: the winner's stands
    assert (target / "f").read_text() == "w"
    with pytest.raises(OSError):
        atomic_io.move_into_place(tmp_path / "missing", tmp_path / "nowhere")
