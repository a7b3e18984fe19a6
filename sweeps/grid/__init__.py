"""The grid: the study's axes and settings in one YAML file, read once into one frozen, typed
:class:`GridConfig` (docs/architecture.md, "Grid file").

A grid (``sweeps/grids/<name>.yaml`` or any YAML path) names every axis of the study -- datasets,
base weights, calibration methods with their learning rates, folds -- and the settings that shape
a result (preprocessing, network, training schedules, protocol, seed) or only its execution
(resources, retries). :func:`load_grid` validates it; every problem is a :class:`GridError` whose
one-line message names the file, the key and the valid choices, raised before anything starts
(the CLI prints it and exits 2).

* :mod:`~sweeps.grid.checks`: the value checks and the error;
* :mod:`~sweeps.grid.sections`, :mod:`~sweeps.grid.schedules`: the file's sections, typed, with
  every default -- also the objects the sweep reads;
* :mod:`~sweeps.grid.schema`: the whole file and its checks across sections;
* :mod:`~sweeps.grid.loader`: the file plus where the launch runs (paths, data roots, overrides);
* :mod:`~sweeps.grid.model`: :class:`GridConfig`, what the loader returns.
"""

from sweeps.grid.checks import GridError
from sweeps.grid.loader import DATA_ROOT_ENV, GRIDS_DIR, builtin_grids, grid_path, load_grid
from sweeps.grid.model import (DatasetSpec, GridConfig, Overrides, SplitSettings, calibrate_train_config,
                               frozen_map, method_params, resolved_method_params)
from sweeps.grid.schedules import Schedule
from sweeps.grid.sections import (SEARCHES, Execution, Folds, MethodSpec, Network, PhantomSpec,
                                  PredictionsSpec, Preprocessing, Resources, Search)

__all__ = [
    "DATA_ROOT_ENV", "GRIDS_DIR", "SEARCHES", "DatasetSpec", "Execution", "Folds", "GridConfig",
    "GridError", "MethodSpec", "Network", "Overrides", "PhantomSpec", "PredictionsSpec",
    "Preprocessing", "Resources", "Schedule", "Search", "SplitSettings", "builtin_grids",
    "calibrate_train_config", "frozen_map", "grid_path", "load_grid", "method_params",
    "resolved_method_params",
]
