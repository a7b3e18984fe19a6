"""Validation of a grid file's YAML tree into a GridConfig (sweeps.config.load_grid calls it).

Each check raises a :class:`GridError` naming the file and the dotted key, with the valid keys or
choices and the closest one to a typo. The data-root check comes last, so that a mistake in the
grid is reported before a missing data volume.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sweeps.config import (DATA_ROOT_ENV, DATASET_KINDS, NETWORK_PRESETS, NORMALISATIONS, PAPER_FOLDS, PROTOCOLS, SCHEDULE_KEYS, SEARCHES, STAGES,
                           TRAIN_KEYS, WEIGHTS, DatasetSpec, Execution, Folds, GridConfig, GridError,
                           MethodSpec, Network, Overrides, PhantomSpec, Preprocessing, Resources,
                           PredictionsSpec, Search, closest, frozen_map, resolved_method_params)

_TOP_KEYS = ("name", "seed", "protocol", "val_fraction", "calib_fraction", "work_dir", "datasets", "data",
             "preprocessing", "folds", "network", "weights", "training", "methods", "search",
             "resources", "execution")


class GridParser:
    """Turns the YAML tree into a GridConfig; each check raises a GridError naming its key."""

    def __init__(self, path: Path, ov: Overrides, env: Mapping[str, str], cwd: Path, require_data: bool):
        self.path, self.ov, self.env, self.cwd, self.require_data = path, ov, env, cwd, require_data

    # -- helpers --
    def fail(self, key: str, msg: str):
        raise GridError(f"grid {self.path.name}: {key}: {msg}")

    def section(self, value: Any, key: str, allowed: Sequence[str]) -> dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(key, f"must be a mapping, got {type(value).__name__}")
        for k in value:
            if k not in allowed:
                self.fail(f"{key}.{k}" if key else str(k),
                          f"unknown key{closest(k, allowed)}; valid keys: {', '.join(allowed)}")
        return dict(value)

    def number(self, value: Any, key: str, *, positive: bool = False, integer: bool = False,
               minimum: float | None = None) -> float | int:
        # YAML 1.1 reads 1e-4 (no dot) as a string: accept numeric strings rather than surprise.
        if isinstance(value, str):
            try:
                value = float(value) if not integer else int(value)
            except ValueError:
                self.fail(key, f"must be a number, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, f"must be a number, got {value!r}")
        if integer and int(value) != value:
            self.fail(key, f"must be an integer, got {value!r}")
        if positive and value <= 0:
            self.fail(key, f"must be > 0, got {value!r}")
        if minimum is not None and value < minimum:
            self.fail(key, f"must be >= {minimum:g}, got {value!r}")
        return int(value) if integer else float(value)

    def choice(self, value: Any, key: str, choices: Sequence[str], what: str) -> str:
        if value not in choices:
            self.fail(key, f"unknown {what} {value!r}{closest(str(value), choices)}; "
                           f"valid choices: {', '.join(choices)}")
        return value

    def names(self, value: Any, key: str, choices: Sequence[str], what: str) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, Sequence) or not value:
            self.fail(key, f"must be a non-empty list of {what}s; valid choices: {', '.join(choices)}")
        out = tuple(self.choice(v, key, choices, what) for v in value)
        if len(set(out)) != len(out):
            self.fail(key, f"lists a {what} twice: {list(out)}")
        return out

    def shape(self, value: Any, key: str) -> tuple[int, int, int]:
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
            self.fail(key, f"must be three integers [X, Y, Z], got {value!r}")
        return tuple(self.number(v, key, integer=True, positive=True) for v in value)

    def path_of(self, value: Any) -> Path:
        p = Path(os.path.expanduser(str(value)))
        return p if p.is_absolute() else (self.cwd / p)

    # -- sections --
    def parse(self, raw: Any) -> GridConfig:
        top = self.section(raw, "", _TOP_KEYS)
        name = str(top.get("name", self.path.stem))
        seed = self.number(top.get("seed", 0), "seed", integer=True, minimum=0)
        protocol = self.choice(top.get("protocol", "honest"), "protocol", PROTOCOLS, "protocol")
        val_fraction = self.number(top.get("val_fraction", 0.2), "val_fraction", positive=True)
        if val_fraction >= 1:
            self.fail("val_fraction", f"must be < 1, got {val_fraction}")
        calib_fraction = self.number(top.get("calib_fraction", 0.2), "calib_fraction", positive=True)
        if protocol == "honest" and val_fraction + calib_fraction >= 1:
            self.fail("calib_fraction", f"val_fraction + calib_fraction must be < 1 (the rest "
                      f"trains the base model), got {val_fraction} + {calib_fraction}")
        work_dir = self.path_of(self.ov.work_dir or top.get("work_dir", "calib_store"))

        from calib.data import SUPPORTED_DATASETS  # the data room owns the list

        ds_names, phantoms, external = self.dataset_names(top.get("datasets"), SUPPORTED_DATASETS)
        data = self.section(top.get("data"), "data", ("root", "roots", "cache"))
        self.section(data.get("roots"), "data.roots", [n for n in ds_names if n not in external])
        for k in self.ov.data_roots:
            if k != "*" and k not in ds_names:
                raise GridError(f"--data-root {k}=...: dataset {k!r} is not in grid {self.path.name}"
                                f"{closest(k, ds_names)}; its datasets: {', '.join(ds_names)}")
        datasets = tuple(DatasetSpec(n, external[n].predictions, predictions=external[n]) if n in external
                         else DatasetSpec(n, self.data_root(n, data, phantoms.get(n)), phantoms.get(n))
                         for n in ds_names)
        cache_dir = self.path_of(data["cache"]) if data.get("cache") else work_dir / "cache"

        pre = self.section(top.get("preprocessing"), "preprocessing", ("spacing", "shape", "normalisation"))
        preprocessing = Preprocessing(
            spacing=self.number(pre.get("spacing", 2.0), "preprocessing.spacing", positive=True),
            shape=self.shape(pre.get("shape", [136, 136, 82]), "preprocessing.shape"),
            normalisation=self.choice(pre.get("normalisation", "subject"), "preprocessing.normalisation",
                                      NORMALISATIONS, "normalisation"))

        fo = self.section(top.get("folds"), "folds", ("n_folds", "seed", "file", "only"))
        folds = Folds(n_folds=self.number(fo.get("n_folds", 5), "folds.n_folds", integer=True, minimum=2),
                      seed=self.number(fo.get("seed", 0), "folds.seed", integer=True, minimum=0),
                      file=self.folds_file(fo.get("file")))
        if fo.get("only") is not None:
            only = fo["only"] if isinstance(fo["only"], Sequence) and not isinstance(fo["only"], str) else [fo["only"]]
            only = tuple(self.number(v, "folds.only", integer=True, minimum=0) for v in only)
            bad = [f for f in only if f >= folds.n_folds]
            if bad or not only or len(set(only)) != len(only):
                self.fail("folds.only", f"must list distinct folds of 0..{folds.n_folds - 1}, got {list(only)}")
            folds = Folds(folds.n_folds, folds.seed, folds.file, tuple(sorted(only)))
        if folds.is_paper and folds.n_folds != 5:
            self.fail("folds.n_folds", f"the paper's folds are 5, got {folds.n_folds}")

        network = self.network(top.get("network", "paper"), ds_names, SUPPORTED_DATASETS)
        weights = self.names(top.get("weights", list(WEIGHTS)), "weights", WEIGHTS, "weights")
        images = [d.name for d in datasets if d.predictions is None]
        training = self.training(top.get("training"), seed, unet=bool(images))
        methods = self.methods(top.get("methods"), weights, images[0] if images else SUPPORTED_DATASETS[0])
        self.check_external_methods(external, methods)
        search = self.search(top.get("search"), methods)
        execution = self.execution(top.get("execution"), top.get("resources"), methods)
        if self.require_data:
            self.check_data(datasets)
        return GridConfig(name=name, source=self.path, seed=seed, protocol=protocol,
                          datasets=datasets, cache_dir=cache_dir, preprocessing=preprocessing,
                          folds=folds, network=network, weights=weights, training=training,
                          methods=methods, search=search, execution=execution, work_dir=work_dir,
                          val_fraction=val_fraction, calib_fraction=calib_fraction)

    def dataset_names(self, value: Any, supported: Sequence[str]) -> tuple[tuple[str, ...], dict, dict]:
        """``datasets: [brats18]`` or ``datasets: {brats18: {phantom: {...}}, mynet: {kind:
        predictions, ...}}``: the names, their phantom specs and their predictions specs."""
        if value is None:
            self.fail("datasets", f"is required; valid choices: {', '.join(supported)} (or any name "
                      "with kind: predictions)")
        if isinstance(value, Mapping):
            external = {n: self.predictions(n, spec) for n, spec in value.items()
                        if isinstance(spec, Mapping) and spec.get("kind") == DATASET_KINDS[1]}
            images = [n for n in value if n not in external]
            if images:  # every other dataset must be one the sweep knows the layout of
                self.names(images, "datasets", supported, "dataset")
            names = tuple(value)  # the grid's order
            phantoms = {}
            for n in names:
                if n in external:
                    continue
                spec = self.section(value[n], f"datasets.{n}", ("phantom", "kind"))
                if spec.get("kind") is not None:
                    self.choice(spec["kind"], f"datasets.{n}.kind", DATASET_KINDS, "dataset kind")
                if spec.get("phantom") is not None:
                    ph = self.section(spec["phantom"], f"datasets.{n}.phantom", ("subjects", "seed", "shape"))
                    key = f"datasets.{n}.phantom"
                    phantoms[n] = PhantomSpec(
                        subjects=self.number(ph.get("subjects", 12), f"{key}.subjects", integer=True, minimum=2),
                        seed=self.number(ph.get("seed", 0), f"{key}.seed", integer=True, minimum=0),
                        shape=self.shape(ph["shape"], f"{key}.shape") if ph.get("shape") else None)
            return names, phantoms, external
        return self.names(value, "datasets", supported, "dataset"), {}, {}

    def predictions(self, name: Any, value: Mapping) -> PredictionsSpec:
        """A ``kind: predictions`` dataset (calib.data.predictions); folders are checked with the data."""
        key = f"datasets.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            self.fail(key, "a predictions dataset needs a name of letters, digits, '_', '.', '-'")
        spec = self.section(value, key, ("kind", "predictions", "values", "labels", "masks",
                                         "mask_threshold", "foreground"))
        for need in ("predictions", "labels"):
            if not spec.get(need):
                self.fail(f"{key}.{need}", "is required (a folder of <case>.nii.gz"
                          + (" maps, or nnU-Net's <case>.npz + <case>.pkl)" if need == "predictions" else " labels)"))
        fg = spec.get("foreground")
        if fg is not None:
            fg = fg if isinstance(fg, Sequence) and not isinstance(fg, str) else [fg]
            fg = tuple(self.number(c, f"{key}.foreground", integer=True, minimum=1) for c in fg)
            if not fg:
                self.fail(f"{key}.foreground", "must list the foreground class labels (>= 1)")
        return PredictionsSpec(
            predictions=self.path_of(spec["predictions"]), labels=self.path_of(spec["labels"]),
            values=self.choice(spec.get("values", "probability"), f"{key}.values", ("probability", "logit"), "values"),
            masks=self.path_of(spec["masks"]) if spec.get("masks") else None,
            mask_threshold=self.number(spec.get("mask_threshold", 0.0), f"{key}.mask_threshold"),
            foreground=fg)

    def check_external_methods(self, external: Mapping[str, PredictionsSpec], methods) -> None:
        """A predictions dataset runs the logit-based methods only: the grid must list one."""
        if not external:
            return
        from calib.methods import METHOD_NAMES, get_method

        if not any(get_method(m.name).uses == "logits" for m in methods):
            logit = [n for n in METHOD_NAMES if get_method(n).uses == "logits"]
            self.fail(f"datasets.{next(iter(external))}", "kind predictions runs only the logit-based "
                      f"methods ({', '.join(logit)}); the grid's methods list none")

    def data_root(self, name: str, data: dict, phantom: PhantomSpec | None) -> Path | None:
        """--data-root DATASET=DIR > --data-root DIR > data.roots > data.root > $CALIB_DATA_ROOT."""
        roots = data.get("roots") or {}
        ov = self.ov.data_roots
        if name in ov:
            root = self.path_of(ov[name])
        elif "*" in ov:
            root = self.path_of(ov["*"]) / name
        elif roots.get(name):
            root = self.path_of(roots[name])
        elif data.get("root"):
            root = self.path_of(data["root"]) / name
        elif self.env.get(DATA_ROOT_ENV):
            root = self.path_of(self.env[DATA_ROOT_ENV]) / name
        else:
            root = None
        if phantom is not None and root is None:
            self.fail(f"datasets.{name}.phantom", "needs a directory to write the phantoms "
                      "to: set data.root in the grid or pass --data-root")
        return root

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

    def folds_file(self, value: Any) -> Path | str | None:
        """``folds.file``: a JSON path that must exist, or ``paper`` (the published folds)."""
        if not value:
            return None
        if value == PAPER_FOLDS:
            return PAPER_FOLDS
        path = self.path_of(value)
        if not path.is_file():
            self.fail("folds.file", f"{path} does not exist (or use {PAPER_FOLDS!r} for the "
                      "folds of the paper's public code)")
        return path

    def network(self, value: Any, datasets: Sequence[str], supported: Sequence[str]) -> Network:
        if isinstance(value, str):
            return Network(preset=self.choice(value, "network", NETWORK_PRESETS, "network preset"))
        net = self.section(value, "network", ("preset", "levels", "base", "weight_decay"))
        wd = net.get("weight_decay", 0.0)
        if isinstance(wd, Mapping):  # per dataset (datasets the grid does not run are ignored)
            self.section(wd, "network.weight_decay", supported)
            decay = {d: self.number(v, f"network.weight_decay.{d}", minimum=0)
                     for d, v in wd.items() if d in datasets}
        else:
            decay = {d: self.number(wd, "network.weight_decay", minimum=0) for d in datasets}
        return Network(
            preset=self.choice(net.get("preset", "paper"), "network.preset", NETWORK_PRESETS, "network preset"),
            levels=self.number(net.get("levels", 3), "network.levels", integer=True, minimum=2),
            base=self.number(net.get("base", 4), "network.base", integer=True, minimum=1),
            weight_decay=frozen_map({d: v for d, v in decay.items() if v}))

    def training(self, value: Any, seed: int, unet: bool = True) -> Mapping[str, Mapping[str, Any]]:
        """Per-stage schedules; pretrain/base need lr and max_epochs only when a U-Net trains
        (a grid of another network's predictions has no such stage)."""
        from calib.training import TrainConfig

        tr = self.section(value, "training", STAGES)
        out = {}
        for stage in STAGES:
            key = f"training.{stage}"
            cfg = self.section(tr.get(stage), key, SCHEDULE_KEYS if stage == "calibrate" else TRAIN_KEYS)
            vals: dict[str, Any] = {}
            for k, v in cfg.items():
                if k in ("lr", "lr_factor"):
                    vals[k] = self.number(v, f"{key}.{k}", positive=True)
                elif k == "min_rel_improvement":
                    vals[k] = self.number(v, f"{key}.{k}", minimum=0)
                else:
                    vals[k] = self.number(v, f"{key}.{k}", integer=True,
                                          minimum=0 if k == "lr_patience" else 1)
            for need in (("max_epochs",) if stage == "calibrate" else (("lr", "max_epochs") if unet else ())):
                if need not in vals:
                    self.fail(f"{key}.{need}", "is required")
            try:  # the science's own checks (e.g. lr_factor < 1), reported against the grid key
                TrainConfig(**{"lr": 1e-3, "max_epochs": 1, **vals, "seed": seed})
            except (TypeError, ValueError) as exc:
                self.fail(key, str(exc))
            out[stage] = frozen_map(vals)
        return frozen_map(out)

    def methods(self, value: Any, weights: tuple[str, ...], dataset: str) -> tuple[MethodSpec, ...]:
        from calib.methods import METHOD_NAMES, method_has_lr

        if not isinstance(value, Mapping) or not value:
            self.fail("methods", f"must map method names to settings; valid choices: {', '.join(METHOD_NAMES)}")
        out = []
        for name, spec in value.items():
            key = f"methods.{name}"
            self.choice(name, "methods", METHOD_NAMES, "method")
            spec = self.section(spec, key, ("params", "lr"))
            params = spec.get("params") or {}
            if not isinstance(params, Mapping):
                self.fail(f"{key}.params", "must be a mapping")
            if "lr" in params:
                self.fail(f"{key}.params.lr", f"set the learning rate with {key}.lr")
            lrs: tuple[float, ...] = ()
            by_w: dict[str, float] = {}
            lr = spec.get("lr")
            if isinstance(lr, Mapping):  # one fixed LR per base weights (fine-tuning's recipe)
                for w, v in lr.items():
                    self.choice(w, f"{key}.lr", WEIGHTS, "weights")
                    by_w[w] = self.number(v, f"{key}.lr.{w}", positive=True)
                missing = [w for w in weights if w not in by_w]
                if missing:
                    self.fail(f"{key}.lr", f"has no learning rate for weights {', '.join(missing)}")
            elif lr is not None:  # an LR axis
                if not method_has_lr(name):
                    axis = [m for m in METHOD_NAMES if method_has_lr(m)]
                    self.fail(f"{key}.lr", f"method {name!r} has no learning-rate axis (its recipe "
                              f"fixes the LR; give {{CE: .., CE-SD: .., SD: ..}} to set it per weights); "
                              f"methods with an LR axis: {', '.join(axis)}")
                seq = lr if isinstance(lr, Sequence) and not isinstance(lr, str) else [lr]
                lrs = tuple(self.number(v, f"{key}.lr", positive=True) for v in seq)
                if not lrs or len(set(lrs)) != len(lrs):
                    self.fail(f"{key}.lr", f"must list distinct learning rates, got {list(lrs)}")
            m = MethodSpec(name=name, params=frozen_map(params), lrs=lrs, lr_by_weights=frozen_map(by_w))
            for w in weights:  # let the method check its own parameters now, not in a trial later
                for one in m.learning_rates(w):
                    try:
                        resolved_method_params(m, w, one, dataset, {})
                    except (ValueError, TypeError) as exc:
                        self.fail(f"{key}", str(exc))
            out.append(m)
        return tuple(out)

    def search(self, value: Any, methods: tuple[MethodSpec, ...]) -> Search:
        se = self.section(value, "search", ("kind", "lr_low", "lr_high", "samples", "methods", "seed"))
        kind = self.ov.search or se.get("kind", "grid")
        kind = self.choice(kind, "search.kind", SEARCHES, "search")
        low = self.number(se.get("lr_low", 1e-5), "search.lr_low", positive=True)
        high = self.number(se.get("lr_high", 1e-3), "search.lr_high", positive=True)
        if low >= high:
            self.fail("search", f"lr_low ({low:g}) must be below lr_high ({high:g})")
        names = [m.name for m in methods if m.lrs]
        searched = se.get("methods", [n for n in ("mc_decoder", "mc_center") if n in names])
        searched = self.names(searched, "search.methods", names, "method with an LR list") if searched else ()
        samples = se.get("samples")
        return Search(kind=kind, lr_low=low, lr_high=high,
                      samples=None if samples is None else self.number(samples, "search.samples", integer=True, minimum=1),
                      methods=searched,
                      seed=self.number(se.get("seed", 0), "search.seed", integer=True, minimum=0))

    def resources(self, value: Any, key: str) -> Resources:
        r = self.section(value, key, ("cpu", "gpu"))
        cpu = self.number(r.get("cpu", 1), f"{key}.cpu", positive=True)
        gpu = self.number(r.get("gpu", 0), f"{key}.gpu", minimum=0)
        if gpu > 1 and gpu != int(gpu):
            self.fail(f"{key}.gpu", f"a fraction is only allowed below 1, got {gpu}")
        return Resources(cpu=cpu, gpu=gpu)

    def execution(self, value: Any, resources: Any, methods: tuple[MethodSpec, ...]) -> Execution:
        ex = self.section(value, "execution", ("max_failures", "max_concurrent", "system_metrics"))
        system = ex.get("system_metrics", False)
        if not isinstance(system, bool):
            self.fail("execution.system_metrics", f"must be true or false, got {system!r}")
        res = self.section(resources, "resources", (*STAGES, "methods"))
        per_stage = {s: self.resources(res.get(s), f"resources.{s}") for s in STAGES}
        names = [m.name for m in methods]
        per_method = {}
        for m, r in self.section(res.get("methods"), "resources.methods", names).items():
            per_method[m] = self.resources(r, f"resources.methods.{m}")
        max_conc = self.ov.max_concurrent if self.ov.max_concurrent is not None else ex.get("max_concurrent")
        return Execution(
            max_failures=self.number(ex.get("max_failures", 2), "execution.max_failures", integer=True, minimum=0),
            max_concurrent=None if max_conc is None else self.number(max_conc, "execution.max_concurrent", integer=True, minimum=1),
            resources=frozen_map(per_stage), method_resources=frozen_map(per_method),
            system_metrics=system)
