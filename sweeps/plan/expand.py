"""Expansion of a grid into staged trials, each named by a stable trial key.

Stages and their dependencies (see docs/architecture.md, "Trials and keys"):

* ``pretrain``  dataset x fold: CE training (only when CE or CE-SD weights are in the grid);
* ``base``      dataset x fold x weights: CE and CE-SD continue from the pretraining, SD trains
                from scratch; each base model exports its logits for the calibrate stage;
* ``calibrate`` dataset x fold x weights x method x LR: the LR axis is conditional -- a list
                (MC methods), one value per base weights (fine-tuning) or none (Platt, auxiliary);
                x calib subjects for the methods a ``calib_subjects`` key covers (sweeps.plan.subjects).

A trial's key is the SHA-256 of everything that changes its result -- stage, dataset, weights,
method and its parameters, fold, LR, resolved network and training configs, preprocessing,
folds, protocol, seed -- and of its upstream trial's key, so changing anything upstream re-keys
everything downstream. It leaves out what only changes how a trial runs (resources, retries,
tracking store, experiment name), so a relaunch of the same grid finds its finished trials.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from calib.data import paper_folds_file
from calib.methods.recipes import RECIPES
from calib.schedule import TrainConfig
from calib.vocabulary import (BASE, CALIBRATE, EXTERNAL_WEIGHTS, PREDICTIONS_KIND, PRETRAIN,
                              PRETRAINED_WEIGHTS, STAGES)
from sweeps.grid import GridConfig, GridError, calibrate_train_config, method_params, resolved_method_params
from sweeps.plan.subjects import UNCOVERED, check_sizes, subject_sizes
from sweeps.plan.trials import KEY_VERSION, Plan, TrialSpec, trial_key

if TYPE_CHECKING:
    from calib.nets import UNetConfig


# ---- resolution of the science configs (calib owns the classes) ---------------------------------

def net_config(grid: GridConfig, dataset: str) -> "UNetConfig":
    """The calib.nets.UNetConfig of ``dataset`` under the grid's network preset."""
    from calib.nets import UNetConfig  # torch: deferred, see sweeps.plan.trials.unet_config

    paper = UNetConfig.paper(dataset)
    if grid.network.preset == "paper":
        cfg = paper
    else:
        cfg = UNetConfig.tiny(paper.in_channels, dataset=dataset, levels=grid.network.levels,
                              base=grid.network.base)
    return cfg


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, BaseModel):
        obj = obj.model_dump()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "items"):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    return obj


def _file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data_payload(grid: GridConfig, dataset: str) -> dict:
    ds = grid.dataset(dataset)
    if ds.predictions is not None:  # another network's predictions: no preprocessing, a reading rule
        p = ds.predictions
        return {
            "dataset": dataset, "kind": PREDICTIONS_KIND,
            "predictions": {"values": p.values, "foreground": None if p.foreground is None else list(p.foreground),
                            "masks": p.masks is not None, "mask_threshold": p.mask_threshold},
            "folds": {"n_folds": grid.folds.n_folds, "seed": grid.folds.seed,
                      "file_sha256": _folds_digest(grid, dataset)},
            "protocol": grid.protocol, "val_fraction": grid.val_fraction,
            "calib_fraction": grid.calib_fraction,
        }
    return {
        "dataset": dataset,
        "phantom": _jsonable(ds.phantom) if ds.phantom else None,
        "preprocessing": _jsonable(grid.preprocessing),
        "folds": {"n_folds": grid.folds.n_folds, "seed": grid.folds.seed,
                  "file_sha256": _folds_digest(grid, dataset)},
        "protocol": grid.protocol,
        "val_fraction": grid.val_fraction,
        "calib_fraction": grid.calib_fraction,
        # test-time shifts: only with the grid key, so that every other key stays as it was
        **({"shift": {s.name: s.key_payload() for s in ds.shifts}} if ds.shifts else {}),
    }


def _folds_digest(grid: GridConfig, dataset: str) -> str | None:
    if grid.folds.file is None:
        return None
    if grid.folds.is_paper:
        return _file_digest(paper_folds_file(dataset))
    return _file_digest(grid.folds.file)


# ---- expansion -----------------------------------------------------------------------------------

def _train_config(stage: str, settings: dict) -> TrainConfig | None:
    """The TrainConfig a trial of ``stage`` runs with (None: nothing trains, an import's score)."""
    if not settings:
        return None
    return calibrate_train_config(settings) if stage == CALIBRATE else TrainConfig(**settings)


def expand(grid: GridConfig) -> Plan:
    """The grid's trials in dependency order (module doc); counts are exact, nothing is sampled."""
    trials: list[TrialSpec] = []
    search = grid.search
    resolved_cache: dict[tuple, dict] = {}
    check_sizes(grid)

    def resolved(m, weights, lr):
        k = (m.name, weights, lr)
        if k not in resolved_cache:
            resolved_cache[k] = resolved_method_params(m, weights, lr,
                                                       grid.training[CALIBRATE].settings(grid.seed))
        return resolved_cache[k]

    for dataset in grid.datasets:
        ds = dataset.name
        external = dataset.predictions is not None
        net = None if external else net_config(grid, ds)
        data = _data_payload(grid, ds)

        def make(stage, weights, method, fold, lr, params, upstream, wave, train, resolved_params,
                 sample=None, subjects=None):
            payload = {"version": KEY_VERSION, "stage": stage, "dataset": ds, "weights": weights,
                       "method": method, "fold": fold, "lr": lr,
                       "params": _jsonable(resolved_params), "train": _jsonable(train),
                       "net": _jsonable(net), "data": data, "seed": grid.seed, "upstream": upstream}
            if subjects is not None:  # only with the key: other grids keep their trial keys
                payload["calib_subjects"] = subjects
            group = None
            if sample is not None:
                payload["search"] = {"kind": "optuna", "sample": sample, "lr_low": search.lr_low,
                                     "lr_high": search.lr_high, "seed": search.seed}
                group = f"{ds}/{weights}/{method}/fold{fold}"
            t = TrialSpec(key=trial_key(payload), stage=stage, dataset=ds, weights=weights,
                          method=method, fold=fold, lr=lr, params=dict(params), upstream=upstream,
                          wave=wave, resources=grid.execution.resources_for(stage, method),
                          config=payload, train=_train_config(stage, train), split=grid.split,
                          net=net, search="optuna" if sample is not None else "grid",
                          sample=sample, search_group=group, calib_subjects=subjects)
            trials.append(t)
            return t

        # Pretrain / base LRs live in their training config: only calibration has an LR axis.
        # The network's L2 penalty goes with it into every stage that trains U-Net layers.
        train = {s: grid.stage_settings(s, ds) for s in STAGES}
        if external:
            _expand_external(grid, make, resolved, train)
            continue
        for fold in grid.folds.run_folds():
            pre = None
            if any(w in PRETRAINED_WEIGHTS for w in grid.weights):
                pre = make(PRETRAIN, "CE", PRETRAIN, fold, None, {}, None, 0, train[PRETRAIN], {})
            for weights in grid.weights:
                up = pre if weights in PRETRAINED_WEIGHTS else None
                # a train-time calibration loss's parameters are the base trial's (and its key's)
                loss = grid.loss_params(weights)
                base = make(BASE, weights, BASE, fold, None, loss, None if up is None else up.key,
                            0 if up is None else 1, train[BASE], loss)
                for m in grid.methods:
                    if search.kind == "optuna" and m.name in search.methods:
                        if subject_sizes(grid, m.name) != UNCOVERED:
                            raise GridError(f"grid {grid.source.name}: calib_subjects: covers "
                                            f"{m.name!r}, whose LR an Optuna search picks; leave it "
                                            "out of calib_subjects.methods or search by grid")
                        for i in range(search.samples or len(m.lrs)):
                            make(CALIBRATE, weights, m.name, fold, None, method_params(m, None),
                                 base.key, base.wave + 1, train[CALIBRATE],
                                 resolved(m, weights, None), sample=i)
                        continue
                    for lr in m.learning_rates(weights):
                        # Only an LR axis is the trial's ``lr`` (tagged calib.lr); a fixed LR by
                        # weights is one of the method's parameters.
                        for n in subject_sizes(grid, m.name):
                            make(CALIBRATE, weights, m.name, fold, lr if m.lrs else None,
                                 method_params(m, lr), base.key, base.wave + 1, train[CALIBRATE],
                                 resolved(m, weights, lr), subjects=n)
    # Dependency order: by wave, stable within a wave.
    trials.sort(key=lambda t: t.wave)
    return Plan(grid=grid, trials=tuple(trials))


def _expand_external(grid: GridConfig, make, resolved, train: dict) -> None:
    """Another network's predictions, per fold: a ``base`` trial that scores the imported
    predictions themselves (no training), then every logit-based method of the grid on them."""
    for fold in grid.folds.run_folds():
        base = make(BASE, EXTERNAL_WEIGHTS, BASE, fold, None, {}, None, 0, {}, {})
        for m in grid.methods:
            if RECIPES[m.name].uses != "logits":
                continue  # network-based methods need the network, which an import does not have
            for lr in (m.lrs or (None,)):
                for n in subject_sizes(grid, m.name):
                    make(CALIBRATE, EXTERNAL_WEIGHTS, m.name, fold, lr if m.lrs else None,
                         method_params(m, lr), base.key, 1, train[CALIBRATE],
                         resolved(m, EXTERNAL_WEIGHTS, lr), subjects=n)
