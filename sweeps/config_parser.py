"""The grid loader: a validated grid file (:mod:`sweeps.grid_schema`) plus where it runs -> GridConfig.

The schema checks the file on its own. Here comes what depends on the launch: command-line
overrides, paths relative to the working directory, the data roots (``--data-root``, the grid,
``$CALIB_DATA_ROOT``), the folds file, and each method's own check of its parameters. Every problem
is a one-line :class:`GridError` naming the file and the key; the data-root check comes last, so
that a mistake in the grid is reported before a missing data volume.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from calib.vocabulary import CALIBRATE, STAGES
from sweeps.grid_config import (DatasetSpec, Execution, Folds, GridConfig, MethodSpec, Network,
                                Overrides, PhantomSpec, PredictionsSpec, Preprocessing, Resources,
                                Search, frozen_map, resolved_method_params)
from sweeps.grid_schema import (PAPER_FOLDS, SEARCHES, GridError, GridFile, GridProblem,
                                ImagesDataset, PredictionsDataset, choice, closest, number,
                                read_grid_file)

#: Environment variable holding the data root when neither the grid nor --data-root names one.
DATA_ROOT_ENV = "CALIB_DATA_ROOT"


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
        pre = gf.preprocessing
        folds, network = self.folds(gf), self.network(gf)
        methods = self.methods(gf)
        self.check_method_params(methods, gf)
        grid = GridConfig(
            name=gf.name if gf.name is not None else self.path.stem, source=self.path, seed=gf.seed,
            protocol=gf.protocol, datasets=datasets, cache_dir=cache_dir,
            preprocessing=Preprocessing(pre.spacing, pre.shape, pre.normalisation),
            folds=folds, network=network, weights=gf.weights,
            training=frozen_map({s: frozen_map(getattr(gf.training, s).given()) for s in STAGES}),
            methods=methods, search=self.search(gf), execution=self.execution(gf), work_dir=work_dir,
            val_fraction=gf.val_fraction, calib_fraction=gf.calib_fraction)
        if self.require_data:
            self.check_data(datasets)
        return grid

    # -- sections --
    def dataset(self, name: str, spec: ImagesDataset | PredictionsDataset, gf: GridFile) -> DatasetSpec:
        if isinstance(spec, PredictionsDataset):
            p = PredictionsSpec(
                predictions=self.path_of(spec.predictions), labels=self.path_of(spec.labels),
                values=spec.values, masks=self.path_of(spec.masks) if spec.masks else None,
                mask_threshold=spec.mask_threshold, foreground=spec.foreground)
            return DatasetSpec(name, p.predictions, predictions=p)
        ph = spec.phantom
        phantom = None if ph is None else PhantomSpec(ph.subjects, ph.seed, ph.shape, ph.label_noise)
        return DatasetSpec(name, self.data_root(name, gf, phantom), phantom)

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
        return Folds(fo.n_folds, fo.seed, file, tuple(sorted(fo.only)) if fo.only else ())

    def network(self, gf: GridFile) -> Network:
        """The network; the L2 penalty of the datasets the grid runs (others are ignored)."""
        net, wd = gf.network, gf.network.weight_decay
        decay = ({d: v for d, v in wd.items() if d in gf.datasets} if isinstance(wd, Mapping)
                 else dict.fromkeys(gf.datasets, wd))
        return Network(preset=net.preset, levels=net.levels, base=net.base,
                       weight_decay=frozen_map({d: v for d, v in decay.items() if v}))

    def methods(self, gf: GridFile) -> tuple[MethodSpec, ...]:
        return tuple(MethodSpec(name=name, params=frozen_map(m.params),
                                lrs=m.lr if isinstance(m.lr, tuple) else (),
                                lr_by_weights=frozen_map(m.lr if isinstance(m.lr, dict) else {}))
                     for name, m in gf.methods.items())

    def check_method_params(self, methods: tuple[MethodSpec, ...], gf: GridFile) -> None:
        """Let each method check its own parameters now, not in a trial later."""
        schedule = getattr(gf.training, CALIBRATE).given()
        for m in methods:
            for w in gf.weights:
                for one in m.learning_rates(w):
                    try:
                        resolved_method_params(m, w, one, schedule, gf.seed)
                    except (ValueError, TypeError) as exc:
                        self.fail(f"methods.{m.name}", str(exc))

    def search(self, gf: GridFile) -> Search:
        se = gf.search
        kind = self.checked("search.kind", choice, self.ov.search, SEARCHES, "search") if self.ov.search else se.kind
        return Search(kind=kind, lr_low=se.lr_low, lr_high=se.lr_high, samples=se.samples,
                      methods=self.checked("", gf.searched_methods), seed=se.seed)

    def execution(self, gf: GridFile) -> Execution:
        ex, res = gf.execution, gf.resources
        max_conc = ex.max_concurrent
        if self.ov.max_concurrent is not None:
            max_conc = self.checked("execution.max_concurrent", number, self.ov.max_concurrent,
                                    integer=True, minimum=1)
        return Execution(
            max_failures=ex.max_failures, max_concurrent=max_conc,
            resources=frozen_map({s: Resources(getattr(res, s).cpu, getattr(res, s).gpu) for s in STAGES}),
            method_resources=frozen_map({m: Resources(r.cpu, r.gpu)
                                         for m, r in self.checked("", gf.method_resources).items()}),
            system_metrics=ex.system_metrics)

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
            if d.phantom is not None:
                continue
            if d.root is None:
                raise GridError(f"no data root for dataset {d.name!r}: pass --data-root DIR (holding "
                                f"{d.name}/) or --data-root {d.name}=DIR, or set ${DATA_ROOT_ENV}")
            if not d.root.is_dir():
                raise GridError(f"data root for dataset {d.name!r} does not exist: {d.root} "
                                f"(pass --data-root or set ${DATA_ROOT_ENV})")
