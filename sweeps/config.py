"""The grid file, read once into frozen, validated config objects.

A grid (``sweeps/grids/<name>.yaml`` or any YAML path) names every axis of the study -- datasets,
base weights, calibration methods with their learning rates, folds -- and the settings that shape
a result (preprocessing, network, training schedules, protocol, seed) or only its execution
(resources, retries). :func:`load_grid` turns it into a :class:`GridConfig`; every problem is a
:class:`GridError` whose one-line message names the file, the key and the valid choices, raised
before anything starts (the CLI prints it and exits 2).

Paths in a grid (data roots, work dir, folds file) are relative to the working directory of the
launch, not to the YAML file: ``python sweeps/launch.py --grid demo`` from the repo root keeps
everything under ``./calib_store`` and ``./demo_data``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from sweeps.config_parser import DATA_ROOT_ENV, GridLoader
from sweeps.grid_config import (DatasetSpec, Execution, Folds, GridConfig, MethodSpec, Network,
                                Overrides, PhantomSpec, PredictionsSpec, Preprocessing, Resources,
                                Search, frozen_map, method_params, resolved_method_params)
from sweeps.grid_schema import SEARCHES, GridError, closest

GRIDS_DIR = Path(__file__).resolve().parent / "grids"

#: The grid's public names: the loader, the config objects (sweeps.grid_config) and its error.
__all__ = [
    "DATA_ROOT_ENV", "GRIDS_DIR", "SEARCHES", "DatasetSpec", "Execution", "Folds", "GridConfig",
    "GridError", "MethodSpec", "Network", "Overrides", "PhantomSpec", "PredictionsSpec",
    "Preprocessing", "Resources", "Search", "builtin_grids", "frozen_map", "grid_path", "load_grid",
    "method_params", "resolved_method_params",
]


# ---- reading -----------------------------------------------------------------------------------

def builtin_grids() -> list[str]:
    """Names of the grids shipped in sweeps/grids/."""
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


def grid_path(grid: str) -> Path:
    """``demo`` -> sweeps/grids/demo.yaml; a path ending in .yaml/.yml is taken as is."""
    if grid.endswith((".yaml", ".yml")) or os.sep in grid:
        path = Path(grid)
        if not path.is_file():
            raise GridError(f"grid file {grid} does not exist")
        return path.resolve()
    names = builtin_grids()
    if grid not in names:
        raise GridError(f"unknown grid {grid!r}{closest(grid, names)}; valid choices: "
                        f"{', '.join(names)} or a path to a .yaml file")
    return GRIDS_DIR / f"{grid}.yaml"


def load_grid(grid: str, overrides: Overrides | None = None, *, require_data: bool = True,
              env: Mapping[str, str] | None = None, cwd: Path | None = None) -> GridConfig:
    """Read and validate a grid.

    Args:
        grid: a built-in grid name (``paper``, ``demo``) or a YAML path.
        overrides: command-line values that win over the grid's.
        require_data: when True every dataset needs a data root that exists (or a phantom spec,
            generated on first use); a dry run passes False and shows what is missing.
        env: environment to read ``CALIB_DATA_ROOT`` from (default ``os.environ``).
        cwd: directory relative paths are resolved against (default the current one).

    Raises:
        GridError: one line naming the file, key and valid choices.
    """
    path = grid_path(grid)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise GridError(f"grid {path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    return GridLoader(path, overrides or Overrides(), env if env is not None else os.environ,
                      Path(cwd or Path.cwd()), require_data).load(raw)
