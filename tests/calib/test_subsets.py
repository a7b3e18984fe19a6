"""calib.subsets: nested, seeded subsets of a fold's calib split; the rest of the split unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from calib.stages import StageError, make_split
from calib.subsets import calib_count, calib_subset

IDS = [f"s{i:02d}" for i in range(30)]
FOLDS = {k: IDS[k::3] for k in range(3)}


def _split(fold: int = 0, seed: int = 0, protocol: str = "honest"):
    return make_split(Path("."), FOLDS, fold, protocol=protocol, seed=seed, val_fraction=0.2,
                      calib_fraction=0.4)


def test_subsets_are_nested_and_change_only_calib():
    split = _split()
    assert len(split.calib_ids) == 8
    subsets = [set(calib_subset(split, n, seed=0).calib_ids) for n in (1, 2, 4, 8)]
    assert [len(s) for s in subsets] == [1, 2, 4, 8]
    for small, large in zip(subsets, subsets[1:]):
        assert small < large
    assert subsets[-1] == set(split.calib_ids)
    sub = calib_subset(split, 2, seed=0)
    assert (sub.train_ids, sub.val_ids, sub.test_ids) == (split.train_ids, split.val_ids, split.test_ids)
    assert calib_subset(split, "all", seed=0) == split


def test_the_same_seed_gives_the_same_subsets_other_folds_and_seeds_others():
    split = _split()
    assert calib_subset(split, 3, seed=0).calib_ids == calib_subset(_split(), 3, seed=0).calib_ids
    # the order does not depend on how the calib ids happen to be listed
    shuffled = type(split)(split.cache_dir, split.fold, split.train_ids, split.val_ids, split.test_ids,
                           split.protocol, calib_ids=tuple(reversed(split.calib_ids)))
    assert calib_subset(shuffled, 3, seed=0).calib_ids == calib_subset(split, 3, seed=0).calib_ids
    # another fold: other calib subjects, and another order over them
    other = calib_subset(_split(fold=1), 3, seed=0).calib_ids
    assert set(other) <= set(_split(fold=1).calib_ids) and set(other) != set(calib_subset(split, 3, 0).calib_ids)
    orders = {calib_subset(split, 4, seed=s).calib_ids for s in range(5)}
    assert len(orders) > 1  # the grid seed draws the order


def test_bad_sizes_and_protocols_name_the_key():
    split = _split()
    with pytest.raises(StageError, match=r"calib_subjects: size 9 is larger than the calib split of "
                                         r"brats18 fold 0 \(8 subjects\)"):
        calib_subset(split, 9, seed=0, dataset="brats18")
    with pytest.raises(StageError, match="calib_subjects: a size is a positive integer"):
        calib_subset(split, 0, seed=0)
    with pytest.raises(StageError, match="calib_subjects: needs protocol 'honest'.*'two_way'"):
        calib_subset(_split(protocol="two_way"), 1, seed=0)


def test_calib_count_follows_the_split_rule():
    for fold in range(3):
        assert calib_count(30, fold, 3, "honest", 0, 0.2, 0.4) == len(_split(fold).calib_ids)
