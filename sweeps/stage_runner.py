"""The one place the sweep calls the science: a TrialSpec -> a calib.stages function call.

Everything a stage needs is in the trial spec (resolved configs, the payload of its key), the
prepared dataset (cache folder and folds) and the upstream artifacts the trial downloaded, so the
call is the same on any node. Tests swap this function for a fake through the trial context.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sweeps.plan import TrialSpec
from tracking import schema

if TYPE_CHECKING:
    from calib.stages import StageResult

#: Upstream artifacts each stage needs: artifact paths in the upstream run (tracking.schema).
WEIGHTS_ARTIFACT = schema.WEIGHTS_FILE
LOGITS_ARTIFACT = schema.LOGITS_DIR


def upstream_needs(spec: TrialSpec) -> tuple[str, ...]:
    """Which upstream artifacts ``spec`` reads: base weights and/or the exported base logits."""
    if spec.upstream is None or is_external(spec):
        return ()  # an import's logits are in its prepared cache, on the shared volume
    if spec.stage == "base":
        return (WEIGHTS_ARTIFACT,)
    from calib.methods import get_method

    return (LOGITS_ARTIFACT,) if get_method(spec.method).uses == "logits" else (WEIGHTS_ARTIFACT,)


def is_external(spec: TrialSpec) -> bool:
    """True for a trial on another network's predictions (a ``kind: predictions`` dataset)."""
    return spec.config["data"].get("kind") == "predictions"


def _net_config(spec: TrialSpec):
    from calib.nets import UNetConfig

    net = dict(spec.config["net"])
    net["features"] = tuple(tuple(level) for level in net["features"])
    return UNetConfig(**net)


def run_stage(spec: TrialSpec, data: Mapping, work_dir: Path, upstream: Mapping[str, Path],
              device, callbacks: Sequence[Callable]) -> "StageResult":
    """Run the stage of ``spec`` in ``work_dir`` (resuming from ``work_dir/checkpoint.pt``).

    ``data``: :meth:`PreparedData.to_dict` of the trial's dataset; ``upstream``: local paths of
    the artifacts :func:`upstream_needs` named.
    """
    from calib.stages import make_split, run_base, run_calibrate, run_pretrain
    from calib.training import TrainConfig

    cfg = spec.config
    folds = {int(k): list(v) for k, v in data["folds"].items()}
    split = make_split(Path(data["cache_dir"]), folds, spec.fold, protocol=cfg["data"]["protocol"],
                       seed=cfg["seed"], val_fraction=cfg["data"]["val_fraction"],
                       calib_fraction=cfg["data"].get("calib_fraction", 0.2))
    if is_external(spec):  # another network's predictions: their logits are the prepared cache's
        from calib.data.predictions import logits_dir
        from calib.stages import run_imported

        logits = logits_dir(data["cache_dir"])
        if spec.stage == "base":
            return run_imported(split, logits, work_dir)
        schedule = TrainConfig(**{"lr": spec.params.get("lr", 1e-3), "max_epochs": 1, **cfg["train"]})
        return run_calibrate(spec.method, spec.params, spec.weights, None, schedule, split,
                             base_weights=None, base_logits=logits, work_dir=work_dir, device=device,
                             callbacks=callbacks)
    net_cfg = _net_config(spec)
    if spec.stage == "pretrain":
        return run_pretrain(net_cfg, TrainConfig(**cfg["train"]), split, work_dir, device, callbacks)
    if spec.stage == "base":
        return run_base(spec.weights, net_cfg, TrainConfig(**cfg["train"]), split, work_dir, device,
                        init_weights=upstream.get(WEIGHTS_ARTIFACT), callbacks=callbacks)
    # The calibrate schedule (epochs, patience, factor, seed); the LR here is a placeholder the
    # method replaces with its recipe's or the trial's (``spec.params["lr"]``).
    schedule = TrainConfig(**{"lr": spec.params.get("lr", 1e-3), "max_epochs": 1, **cfg["train"]})
    return run_calibrate(spec.method, spec.params, spec.weights, net_cfg, schedule, split,
                         base_weights=upstream.get(WEIGHTS_ARTIFACT),
                         base_logits=upstream.get(LOGITS_ARTIFACT), work_dir=work_dir,
                         device=device, callbacks=callbacks)
