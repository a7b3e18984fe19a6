"""The grid key ``datasets.<name>.shift`` (sweeps.grid.shifts): phantom renderings, real data roots,
one clear error per mistake, trial keys unchanged without it."""

from __future__ import annotations

import pytest
import yaml

from support.grids import tiny_grid
from sweeps.grid import GridError, load_grid
from sweeps.plan import expand


def _grid(tmp_path, dataset_spec: dict, name: str = "brats18"):
    path = tiny_grid(tmp_path / "grid.yaml", tmp_path / "data", tmp_path / "cache",
                     datasets={name: dataset_spec})
    return path


def test_phantom_shifts_resolve_beside_the_root_and_round_trip(tmp_path):
    spec = {"phantom": {"subjects": 6}, "shift": {"dim": {"contrast": 0.7}, "noisy": {"noise": 2}}}
    grid = load_grid(str(_grid(tmp_path, spec)), cwd=tmp_path)
    shifts = {s.name: s for s in grid.dataset("brats18").shifts}
    assert set(shifts) == {"dim", "noisy"}
    assert shifts["dim"].render == (("contrast", 0.7),) and shifts["noisy"].render == (("noise", 2.0),)
    assert shifts["dim"].root == tmp_path / "data" / "shifts" / "dim" / "brats18"
    again = tmp_path / "again.yaml"
    again.write_text(grid.to_yaml())
    assert load_grid(str(again), cwd=tmp_path).dataset("brats18").shifts == grid.dataset("brats18").shifts


def test_real_shift_is_a_data_root(tmp_path):
    (tmp_path / "data" / "brats18").mkdir(parents=True)
    (tmp_path / "lgg").mkdir()
    grid = load_grid(str(_grid(tmp_path, {"shift": {"lgg": {"data_root": "lgg"}}})), cwd=tmp_path)
    (s,) = grid.dataset("brats18").shifts
    assert s.root == tmp_path / "lgg" and not s.phantom
    with pytest.raises(GridError, match="data root of shift 'site2' does not exist"):
        load_grid(str(_grid(tmp_path, {"shift": {"site2": {"data_root": "nowhere"}}})), cwd=tmp_path)


@pytest.mark.parametrize("spec, match", [
    ({"phantom": {}, "shift": {"x": {"data_root": "/d"}}},
     r"datasets\.brats18\.shift\.x\.data_root: a phantom's shift is rendered.*contrast, noise, bias_field"),
    ({"shift": {"x": {"contrast": 0.5}}},
     r"datasets\.brats18\.shift\.x\.contrast: 'contrast' is a phantom shift; .*data_root"),
    ({"phantom": {}, "shift": {"x": {"contrst": 0.5}}},
     r"datasets\.brats18\.shift\.x\.contrst: unknown key.*valid keys: contrast, noise, bias_field, slab_mm, data_root"),
    ({"phantom": {}, "shift": {"x": {"noise": -2}}}, r"datasets\.brats18\.shift\.x\.noise: must be >= 0"),
    ({"phantom": {}, "shift": {"x": {}}}, r"datasets\.brats18\.shift\.x: names no change"),
    ({"phantom": {}, "shift": {"none": {"noise": 2}}}, r"not 'none'"),
    ({"phantom": {}, "shift": {"x": {"slab_mm": 8}}}, r"brats18 phantoms cannot shift 'slab_mm'"),
])
def test_bad_shift_is_one_line(tmp_path, spec, match):
    with pytest.raises(GridError, match=match):
        load_grid(str(_grid(tmp_path, spec)), cwd=tmp_path, require_data=False)


def test_isles_phantom_has_no_bias_field(tmp_path):
    spec = {"phantom": {"shape": [36, 36, 6]}, "shift": {"b": {"bias_field": 2}}}
    with pytest.raises(GridError, match=r"isles18\.shift\.b\.bias_field: isles18 phantoms cannot shift"):
        load_grid(str(_grid(tmp_path, spec, "isles18")), cwd=tmp_path, require_data=False)


def test_keys_change_only_with_the_key(tmp_path):
    plain = expand(load_grid(str(_grid(tmp_path, {"phantom": {}})), cwd=tmp_path))
    (tmp_path / "b").mkdir()
    shifted_path = tiny_grid(tmp_path / "b" / "grid.yaml", tmp_path / "data", tmp_path / "cache",
                             datasets={"brats18": {"phantom": {}, "shift": {"n": {"noise": 2}}}})
    shifted = expand(load_grid(str(shifted_path), cwd=tmp_path))
    assert all("shift" not in t.config["data"] for t in plain.trials)
    assert {t.key for t in plain.trials}.isdisjoint({t.key for t in shifted.trials})
    assert all(t.config["data"]["shift"] == {"n": {"noise": 2.0}} for t in shifted.trials)
    assert yaml.safe_load(plain.grid.to_yaml())["datasets"]["brats18"].keys() == {"phantom"}


def test_a_phantom_shift_holds_the_test_subjects_of_the_folds_that_run(tmp_path):
    from sweeps.run.data_prep import shift_subjects

    spec = {"phantom": {"subjects": 6}, "shift": {"dim": {"contrast": 0.7}}}
    folds = {0: ["b", "d", "f"], 1: ["a", "c", "e"]}
    every = load_grid(str(_grid(tmp_path, spec)), cwd=tmp_path)
    assert shift_subjects(every, folds) is None  # every fold runs: the whole dataset
    path = tiny_grid(tmp_path / "one.yaml", tmp_path / "data", tmp_path / "cache",
                     datasets={"brats18": spec}, folds={"n_folds": 2, "seed": 0, "only": [1]})
    assert shift_subjects(load_grid(str(path), cwd=tmp_path), folds) == ["a", "c", "e"]
