"""The grid loader: a grid file (:mod:`sweeps.grid.schema`) plus where it runs -> GridConfig.

:func:`load_grid` reads a built-in grid (``sweeps/grids/<name>.yaml``) or any YAML path. The
schema checks the file on its own. Here comes what depends on the launch: command-line
overrides, paths relative to the working directory, the data roots (``--data-root``, the grid,
``$CALIB_DATA_ROOT``), the folds file, and each method's own check of its parameters. Every problem
is a one-line :class:`GridError` naming the file and the key; the data-root check comes last, so
that a mistake in the grid is reported before a missing data volume.

Paths in a grid (data roots, work dir, folds file) are relative to the working directory of the
launch, not to the YAML file: ``python sweeps/launch.py --grid demo`` from the repo root keeps
everything under ``./calib_store`` and ``./demo_data``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from calib.vocabulary import CALIBRATE
from sweeps.grid.checks import GridError, GridProblem, choice, closest, number
from sweeps.grid.model import DatasetSpec, GridConfig, Overrides, frozen_map, resolved_method_params
from sweeps.grid.schema import GridFile, read_grid_file
from sweeps.grid.sections import (PAPER_FOLDS, SEARCHES, Execution, Folds, ImagesDataset, MethodSpec,
                                  Network, PhantomSpec, PredictionsSpec, Search)
from sweeps.grid.subjects import resolve_methods
from sweeps.grid.shifts import DATA_ROOT, DatasetShift, check_kind, phantom_shift_root

#: Environment variable holding the data root when neither the grid nor --data-root names one.
DATA_ROOT_ENV = "CALIB_DATA_ROOT"
GRIDS_DIR = Path(__file__).resolve().parents[1] / "grids"


class GridLoader:
    """Turns a grid file's YAML tree into a GridConfig for one launch (working directory,
    environment, overrides); each check raises a GridError naming its key."""

    def __init__(self, path: Path, ov: Overrides, env: Mapping[str, str], cwd: Path, require_data: bool):
        self.path, self.ov, self.env, self.cwd, self.require_data = path, ov, env, cwd, require_data

    def fail(self, key: str, msg: str):
        raise GridError(f"grid {self.path.name}: {key}: {msg}")

    def checked(self, key: str, check, *args, **kwargs):
        """``check(*args, **kwargs)`` with its GridProblem reported against ``key``."""
        try:
            return check(*args, **kwargs)
        except GridProblem as exc:
            self.fail(".".join(k for k in (key, str(exc.key)) if k), exc.message)

    def path_of(self, value: Any) -> Path:
        p = Path(os.path.expanduser(str(value)))
        return p if p.is_absolute() else (self.cwd / p)

    def load(self, raw: Any) -> GridConfig:
        """The GridConfig of the YAML tree ``raw``."""
        gf = read_grid_file(self.path.name, raw)
        work_dir = self.path_of(self.ov.work_dir or gf.work_dir)
        ds_names = tuple(gf.datasets)
        for k in self.ov.data_roots:
            if k != "*" and k not in ds_names:
                raise GridError(f"--data-root {k}=...: dataset {k!r} is not in grid {self.path.name}"
                                f"{closest(k, ds_names)}; its datasets: {', '.join(ds_names)}")
        datasets = tuple(self.dataset(n, spec, gf) for n, spec in gf.datasets.items())
        cache_dir = self.path_of(gf.data.cache) if gf.data.cache else work_dir / "cache"
        folds, network = self.folds(gf), self.network(gf)
        methods = tuple(gf.methods.values())
        self.check_method_params(methods, gf)
        grid = GridConfig(
            name=gf.name if gf.name is not None else self.path.stem, source=self.path, seed=gf.seed,
            protocol=gf.protocol, datasets=datasets, cache_dir=cache_dir,
            preprocessing=gf.preprocessing, folds=folds, network=network, weights=gf.weights,
            training=gf.training, methods=methods, search=self.search(gf),
            execution=self.execution(gf), work_dir=work_dir,
            val_fraction=gf.val_fraction, calib_fraction=gf.calib_fraction,
            losses=frozen_map({w: frozen_map(p) for w, p in gf.losses.items()}),
            calib_subjects=None if gf.calib_subjects is None else resolve_methods(
                gf.calib_subjects, gf.protocol, tuple(gf.methods)))
        if self.require_data:
            self.check_data(datasets)
        return grid

    # -- sections --
    def dataset(self, name: str, spec: ImagesDataset | PredictionsSpec, gf: GridFile) -> DatasetSpec:
        if isinstance(spec, PredictionsSpec):  # its folders, relative to the launch
            p = spec.model_copy(update={
                "predictions": self.path_of(spec.predictions), "labels": self.path_of(spec.labels),
                "masks": self.path_of(spec.masks) if spec.masks else None})
            return DatasetSpec(name, p.predictions, predictions=p)
        root = self.data_root(name, gf, spec.phantom)
        return DatasetSpec(name, root, spec.phantom, shifts=self.shifts(name, spec, root))

    def shifts(self, name: str, spec: ImagesDataset, root: Path | None) -> tuple[DatasetShift, ...]:
        """``datasets.<name>.shift``: a phantom's written beside its root, a real dataset's at its
        ``data_root`` (relative to the launch)."""
        self.checked(f"datasets.{name}.shift", check_kind, spec.shift, name, spec.phantom is not None)
        if spec.phantom is not None:
            return tuple(DatasetShift(s, None if root is None else phantom_shift_root(root, s, name),
                                      tuple(sorted(f.items()))) for s, f in spec.shift.items())
        return tuple(DatasetShift(s, self.path_of(f[DATA_ROOT])) for s, f in spec.shift.items())

    def data_root(self, name: str, gf: GridFile, phantom: PhantomSpec | None) -> Path | None:
        """--data-root DATASET=DIR > --data-root DIR > data.roots > data.root > $CALIB_DATA_ROOT."""
        roots, ov = gf.data.roots, self.ov.data_roots
        if name in ov:
            root = self.path_of(ov[name])
        elif "*" in ov:
            root = self.path_of(ov["*"]) / name
        elif roots.get(name):
            root = self.path_of(roots[name])
        elif gf.data.root:
            root = self.path_of(gf.data.root) / name
        elif self.env.get(DATA_ROOT_ENV):
            root = self.path_of(self.env[DATA_ROOT_ENV]) / name
        else:
            root = None
        if phantom is not None and root is None:
            self.fail(f"datasets.{name}.phantom", "needs a directory to write the phantoms "
                      "to: set data.root in the grid or pass --data-root")
        return root

    def folds(self, gf: GridFile) -> Folds:
        """``folds.file``: a JSON path that must exist, or ``paper`` (the published folds)."""
        fo = gf.folds
        file = None
        if fo.file == PAPER_FOLDS:
            file = PAPER_FOLDS
        elif fo.file:
            file = self.path_of(fo.file)
            if not file.is_file():
                self.fail("folds.file", f"{file} does not exist (or use {PAPER_FOLDS!r} for the "
                          "folds of the paper's public code)")
        return fo.model_copy(update={"file": file, "only": tuple(sorted(fo.only)) if fo.only else ()})

    def network(self, gf: GridFile) -> Network:
        """The network; the L2 penalty of the datasets the grid runs (others are ignored)."""
        net, wd = gf.network, gf.network.weight_decay
        decay = ({d: v for d, v in wd.items() if d in gf.datasets} if isinstance(wd, Mapping)
                 else dict.fromkeys(gf.datasets, wd))
        return net.model_copy(update={"weight_decay": frozen_map({d: v for d, v in decay.items() if v})})

    def check_method_params(self, methods: tuple[MethodSpec, ...], gf: GridFile) -> None:
        """Let each method check its own parameters now, not in a trial later."""
        settings = gf.training[CALIBRATE].settings(gf.seed)
        for m in methods:
            for w in gf.weights:
                for one in m.learning_rates(w):
                    try:
                        resolved_method_params(m, w, one, settings)
                    except (ValueError, TypeError) as exc:
                        self.fail(f"methods.{m.name}", str(exc))

    def search(self, gf: GridFile) -> Search:
        se = gf.search
        kind = self.checked("search.kind", choice, self.ov.search, SEARCHES, "search") if self.ov.search else se.kind
        return se.model_copy(update={"kind": kind, "methods": self.checked("", gf.searched_methods)})

    def execution(self, gf: GridFile) -> Execution:
        ex = gf.execution
        self.checked("", gf.method_resources)
        if self.ov.max_concurrent is None:
            return ex
        return ex.model_copy(update={"max_concurrent": self.checked(
            "execution.max_concurrent", number, self.ov.max_concurrent, integer=True, minimum=1)})

    def check_data(self, datasets: tuple[DatasetSpec, ...]) -> None:
        """Every dataset without a phantom spec needs a root that exists (checked last, so that
        a grid mistake is reported before a missing data volume)."""
        for d in datasets:
            if d.predictions is not None:
                p = d.predictions
                for what, folder in (("predictions", p.predictions), ("labels", p.labels), ("masks", p.masks)):
                    if folder is not None and not folder.is_dir():
                        raise GridError(f"dataset {d.name!r}: the {what} folder {folder} does not exist")
                continue
            for s in d.shifts if d.phantom is None else ():
                if not s.root.is_dir():
                    raise GridError(f"dataset {d.name!r}: the data root of shift {s.name!r} does not "
                                    f"exist: {s.root}")
            if d.phantom is not None:
                continue
            if d.root is None:
                raise GridError(f"no data root for dataset {d.name!r}: pass --data-root DIR (holding "
                                f"{d.name}/) or --data-root {d.name}=DIR, or set ${DATA_ROOT_ENV}")
            if not d.root.is_dir():
                raise GridError(f"data root for dataset {d.name!r} does not exist: {d.root} "
                                f"(pass --data-root or set ${DATA_ROOT_ENV})")


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
