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


def test_the_paper_folds_reproduce_the_published_case_lists():
    import json

    from calib.data import DataError, paper_folds_file, read_folds

    sizes = {"brats18": [57] * 5, "isles18": [19, 19, 19, 19, 18]}
    for dataset, expected in sizes.items():
        published = json.loads(paper_folds_file(dataset).read_text())
        ids = [s for fold in published.values() for s in fold]
        folds = read_folds(paper_folds_file(dataset), ids)
        assert [len(folds[k]) for k in range(5)] == expected
        assert {k: sorted(v) for k, v in folds.items()} == \
            {int(k): sorted(v) for k, v in published.items()}
        assert len(set(ids)) == sum(expected)
    # spot checks against the public code's lists
    brats = read_folds(paper_folds_file("brats18"), [f"case_{i}" for i in range(285)])
    assert "case_5" in brats[0] and "case_16" in brats[1] and "case_0" in brats[3]
    isles = read_folds(paper_folds_file("isles18"), [f"case_{i}" for i in range(94)])
    assert "case_2" in isles[0] and "case_9" in isles[4]
    # a dataset lacking listed cases: one error naming them
    with pytest.raises(DataError, match=r"not in the dataset: case_0, case_1"):
        read_folds(paper_folds_file("isles18"), [f"case_{i}" for i in range(2, 94)])
    with pytest.raises(DataError, match="publishes no folds for dataset 'wmh17'"):
        paper_folds_file("wmh17")
