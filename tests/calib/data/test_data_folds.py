"""Folds: seeded K-fold and folds files, with clear errors."""

from __future__ import annotations

import json

import pytest

from calib.data import DataError, make_folds, read_folds, write_folds

IDS = [f"case_{i}" for i in range(1, 24)]


@pytest.mark.parametrize("k", [2, 5, 23])
def test_every_subject_in_exactly_one_fold(k):
    folds = make_folds(IDS, k, seed=0)
    assert sorted(folds) == list(range(k))
    flat = [s for fold in folds.values() for s in fold]
    assert sorted(flat) == sorted(IDS) and len(flat) == len(set(flat))
    sizes = [len(v) for v in folds.values()]
    assert max(sizes) - min(sizes) <= 1


def test_deterministic_and_seeded():
    a = make_folds(IDS, 5, seed=7)
    assert make_folds(list(reversed(IDS)), 5, seed=7) == a  # input order does not matter
    assert make_folds(IDS, 5, seed=8) != a


@pytest.mark.parametrize(
    "ids, k, match",
    [
        (IDS + ["case_3"], 5, "duplicated subject id.*case_3"),
        (IDS, 1, "at least 2"),
        (IDS[:3], 5, "exceeds the number of subjects"),
    ],
)
def test_make_folds_errors(ids, k, match):
    with pytest.raises(DataError, match=match):
        make_folds(ids, k, seed=0)


def test_round_trip_through_a_file(tmp_path):
    folds = make_folds(IDS, 5, seed=1)
    write_folds(tmp_path / "folds.json", folds)
    assert json.loads((tmp_path / "folds.json").read_text()).keys() == {"0", "1", "2", "3", "4"}
    assert read_folds(tmp_path / "folds.json", IDS) == folds


@pytest.mark.parametrize(
    "content, match",
    [
        ({"0": IDS[:10], "1": IDS[10:] + ["case_99"]}, "not in the dataset: case_99"),
        ({"0": IDS[:12], "1": IDS[11:]}, "in more than one fold .*case_12"),
        ({"0": IDS[:10], "1": IDS[10:-1]}, "in no fold: case_23"),
        ({"0": IDS[:10] + ["case_1"], "1": IDS[10:]}, "in more than one fold .*case_1"),
        ({"1": IDS[:10], "2": IDS[10:]}, "numbered 0..K-1"),
        ({"a": IDS[:10], "b": IDS[10:]}, "fold keys must be integers"),
        ([IDS], "JSON object"),
    ],
)
def test_read_folds_errors(tmp_path, content, match):
    path = tmp_path / "folds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=match) as excinfo:
        read_folds(path, IDS)
    assert str(path) in str(excinfo.value)


def test_read_folds_missing_or_broken_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_folds(tmp_path / "nope.json", IDS)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_folds(tmp_path / "bad.json", IDS)
