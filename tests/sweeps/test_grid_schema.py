"""The grid schema and loader: the same trials as before the schema (keys and resolved method
parameters captured from the earlier parser), unknown keys forbidden in every section, defaults
in one place, and no torch to read a grid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweeps.grid import schema as grid_schema
from sweeps.grid import GridError, load_grid
from sweeps.plan import expand

REPO = Path(__file__).resolve().parents[2]
#: Captured from the parser that built every method on a U-Net (before the schema); the demo
#: grid is left out because it changes with the demo.
FIXTURE = json.loads((REPO / "tests/sweeps/fixtures/resolved_grids.json").read_text())


@pytest.mark.parametrize("name", sorted(FIXTURE))
def test_builtin_grids_resolve_as_before(name):
    plan = expand(load_grid(name, require_data=False, env={}))
    params = {}
    for t in plan.trials:
        if t.stage == "calibrate":
            params[f"{t.dataset}/{t.weights}/{t.method}/lr={t.lr}/sample={t.sample}"] = t.config["params"]
    assert params == FIXTURE[name]["params"]
    assert sorted(t.key for t in plan.trials) == FIXTURE[name]["keys"]


def test_reading_a_grid_does_not_load_torch():
    code = ("import sys; from sweeps.grid import load_grid; "
            "[load_grid(g, require_data=False, env={}) for g in ('paper', 'paper-smoke', 'external-example')]; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def _sections():
    seen, todo = [], [grid_schema.GridFile]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.append(model)
        todo.extend(v for v in vars(grid_schema).values()
                    if isinstance(v, type) and issubclass(v, grid_schema.Section) and v not in seen)
    return [m for m in seen if m.model_fields]  # the abstract bases have no keys


@pytest.mark.parametrize("model", _sections(), ids=lambda m: m.__name__)
def test_every_section_forbids_unknown_keys(model):
    assert model.model_config["extra"] == "forbid"
    with pytest.raises(Exception, match="unknown key .*did you mean"):
        model.model_validate({f"{model.allowed_keys()[0]}x": 1})
    assert set(model.allowed_keys()) == set(model.model_fields)


def test_a_minimal_grid_takes_the_schema_defaults(tmp_path):
    raw = {"datasets": ["brats18"], "training": {"pretrain": {"lr": 1e-3, "max_epochs": 2},
                                                 "base": {"lr": 1e-3, "max_epochs": 2},
                                                 "calibrate": {"max_epochs": 2}},
           "methods": {"platt": {}}}
    path = tmp_path / "minimal.yaml"
    path.write_text(yaml.safe_dump(raw))
    grid = load_grid(str(path), require_data=False, env={}, cwd=tmp_path)
    file = grid_schema.GridFile.model_validate(raw)
    assert grid.name == "minimal" and grid.work_dir == tmp_path / file.work_dir
    assert (grid.seed, grid.protocol, grid.val_fraction, grid.calib_fraction) == (
        file.seed, file.protocol, file.val_fraction, file.calib_fraction)
    assert grid.weights == file.weights == ("CE", "CE-SD", "SD")
    pre = file.preprocessing
    assert (grid.preprocessing.spacing, grid.preprocessing.shape, grid.preprocessing.normalisation) == (
        pre.spacing, pre.shape, pre.normalisation)
    assert (grid.folds.n_folds, grid.folds.seed, grid.folds.only) == (file.folds.n_folds, file.folds.seed, ())
    assert (grid.network.preset, grid.network.levels, grid.network.base) == (
        file.network.preset, file.network.levels, file.network.base)
    assert grid.execution.max_failures == file.execution.max_failures
    assert grid.execution.resources_for("base", "base").cpu == file.resources.base.cpu
    assert grid.search.kind == file.search.kind and grid.search.methods == ()


def test_schema_errors_are_one_line_with_the_key(tmp_path):
    raw = yaml.safe_load((REPO / "sweeps/grids/paper.yaml").read_text())
    raw["folds"]["only"] = [0, "x"]
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(GridError, match=r"^grid g\.yaml: folds\.only: must be a number, got 'x'$"):
        load_grid(str(path), require_data=False, env={})
