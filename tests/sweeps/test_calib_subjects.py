"""The grid key calib_subjects: its errors (one line each, naming the key), the plan's trials per
size with the size in key, label and tag, and grids without it keyed as before."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml
from support.grids import tiny_grid

from calib.stages import make_split
from calib.subsets import calib_subset
from sweeps.cost.model import plan_subjects, trial_work
from sweeps.grid import GridError, load_grid
from sweeps.plan import expand
from sweeps.run.trainable import trial_tags
from tracking import schema

#: two logit-based methods (platt, temperature) and a network-based one (finetune); 3 folds of 6
#: phantoms with calib_fraction 0.4 leave 2 calib subjects per fold
METHODS = {"platt": {}, "temperature": {}, "finetune": {"lr": {"CE": 1.0e-4}}}
SETTINGS = {"methods": METHODS, "folds": {"n_folds": 3, "seed": 0}, "calib_fraction": 0.4}


def _grid(tmp_path: Path, **changes):
    path = tiny_grid(tmp_path / "g.yaml", tmp_path / "data", tmp_path / "cache", **{**SETTINGS, **changes})
    return load_grid(str(path), require_data=False, env={}, cwd=tmp_path)


def _calibrate(plan):
    return [t for t in plan.trials if t.stage == "calibrate"]


def test_each_covered_method_runs_once_per_size(tmp_path):
    plan = expand(_grid(tmp_path, calib_subjects=[2, 1, "all"]))
    counts = Counter((t.method, t.calib_subjects) for t in _calibrate(plan))
    folds = 3
    assert counts == {("platt", 1): folds, ("platt", 2): folds, ("platt", "all"): folds,
                      ("temperature", 1): folds, ("temperature", 2): folds, ("temperature", "all"): folds,
                      ("finetune", None): folds}  # 2 logit methods x 3 sizes; finetune once, on all
    t = next(t for t in _calibrate(plan) if t.method == "platt" and t.calib_subjects == 2)
    assert t.label == "calibrate brats18/CE/platt calib_subjects=2 fold 0"
    assert t.config["calib_subjects"] == 2
    assert trial_tags(t)[schema.CALIB_SUBJECTS] == "2"
    ft = next(t for t in _calibrate(plan) if t.method == "finetune")
    assert schema.CALIB_SUBJECTS not in trial_tags(ft) and "calib_subjects" not in ft.config


def test_without_the_key_the_keys_are_unchanged_and_uncovered_methods_keep_theirs(tmp_path):
    before = {t.label: t.key for t in expand(_grid(tmp_path)).trials}
    assert all(" calib_subjects=" not in label for label in before)
    after = expand(_grid(tmp_path, calib_subjects=[1, "all"])).trials
    untouched = {t.label: t.key for t in after if t.calib_subjects is None}
    # pretrain, base and the uncovered finetune trials are the same trials as without the key
    assert untouched == {k: v for k, v in before.items() if "platt" not in k and "temperature" not in k}
    assert all(t.key not in before.values() for t in after if t.calib_subjects is not None)


def test_the_mapping_form_widens_or_narrows_the_methods(tmp_path):
    plan = expand(_grid(tmp_path, calib_subjects={"sizes": [1, "all"], "methods": ["platt", "finetune"]}))
    covered = {t.method for t in _calibrate(plan) if t.calib_subjects is not None}
    assert covered == {"platt", "finetune"}
    assert Counter(t.method for t in _calibrate(plan))["temperature"] == 3


@pytest.mark.parametrize("value, message", [
    ([0, "all"], r"calib_subjects\.sizes: a size must be >= 1, got 0"),
    ([1.5, "all"], r"calib_subjects\.sizes: a size is a positive integer or 'all', got 1\.5"),
    ([1, 2], r"calib_subjects\.sizes: must include 'all'"),
    ([1, 1, "all"], r"calib_subjects\.sizes: lists a size twice"),
    ({"sizes": [1, "all"], "methods": ["platt", "isotonic"]},
     r"calib_subjects\.methods: unknown method of the grid 'isotonic'.*valid choices: platt, temperature, finetune"),
    ({"size": [1]}, r"calib_subjects\.size: unknown key.*valid keys: sizes, methods"),
])
def test_bad_values_are_one_line_naming_the_key(tmp_path, value, message):
    with pytest.raises(GridError, match=rf"^grid g\.yaml: {message}"):
        _grid(tmp_path, calib_subjects=value)


def test_another_protocol_is_one_error_naming_both_keys(tmp_path):
    with pytest.raises(GridError, match=r"^grid g\.yaml: calib_subjects: .*protocol 'honest'.*"
                                        r"protocol is 'two_way'$"):
        _grid(tmp_path, protocol="two_way", calib_subjects=[1, "all"])


def test_a_size_above_the_smallest_calib_split_fails_at_plan_time(tmp_path):
    grid = _grid(tmp_path, calib_subjects=[3, "all"])
    with pytest.raises(GridError, match=r"^grid g\.yaml: calib_subjects: size 3 is larger than the "
                                        r"calib split of brats18 fold 0 \(2 subjects\)$"):
        expand(grid)
    expand(_grid(tmp_path, calib_subjects=[2, "all"]))  # the largest that fits


def test_the_trial_fits_on_the_first_n_of_its_calib_split(tmp_path):
    """What stage_runner applies: splits.json's calib is the subset, the rest is the fold's."""
    trial = next(t for t in _calibrate(expand(_grid(tmp_path, calib_subjects=[1, "all"])))
                 if t.calib_subjects == 1 and t.fold == 1)
    ids = [f"s{i}" for i in range(6)]
    folds = {k: ids[k::3] for k in range(3)}
    s = trial.split
    split = make_split(Path("."), folds, trial.fold, s.protocol, s.seed, s.val_fraction, s.calib_fraction)
    sub = calib_subset(split, trial.calib_subjects, s.seed)
    assert len(sub.to_dict()["calib"]) == 1 and set(sub.calib_ids) < set(split.calib_ids)
    assert sub.to_dict()["test"] == split.to_dict()["test"]


def test_the_resolved_grid_yaml_keeps_the_key(tmp_path):
    grid = _grid(tmp_path, calib_subjects=[1, "all"])
    assert yaml.safe_load(grid.to_yaml())["calib_subjects"] == {"sizes": [1, "all"],
                                                                "methods": ["platt", "temperature"]}
    assert "calib_subjects" not in yaml.safe_load(_grid(tmp_path).to_yaml())


def test_the_cost_model_counts_the_subset_a_trial_fits_on(tmp_path):
    plan = expand(_grid(tmp_path, calib_subjects=[1, "all"]))
    n = plan_subjects(plan)["brats18"]
    work = {t.calib_subjects: trial_work(t, plan, n) for t in _calibrate(plan)
            if t.method == "temperature" and t.fold == 0}
    assert work[1].per_epoch < work["all"].per_epoch  # 1 calib subject of 2: less to fit on
