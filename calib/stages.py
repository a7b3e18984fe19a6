"""The three stages of the study as plain functions the sweep calls: pretrain, base, calibrate.

Each stage trains with :func:`calib.training.fit` (checkpoint ``work_dir/checkpoint.pt``, resumed
when present, so a retried trial continues mid-training and a finished one returns at once),
writes its weights into ``work_dir``, evaluates on the split's test fold and returns a
:class:`StageResult`. Nothing here knows about Ray or MLflow.

Protocols (:func:`make_split`):

* ``"paper"`` -- as the paper's public code: early stopping (of every stage) watches the
  held-out evaluation fold itself, so that fold also selects the epoch it is scored on;
* ``"honest"`` (default) -- a validation split is carved out of the training folds (seeded);
  the evaluation fold is not looked at until evaluation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from calib.evaluate import evaluate_subjects
from calib.logits import export_logits
from calib.losses import LOSSES
from calib.methods import SubjectSet, build_method
from calib.methods.network_based import load_weights, save_weights, unet_probability
from calib.methods.params import BASE_WEIGHTS, MethodError, closest
from calib.methods.volumes import VolumeBatches
from calib.nets import UNet3D, UNetConfig
from calib.training import EpochResult, FitResult, TrainConfig, fit

PROTOCOLS = ("honest", "paper")
CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "weights.pt"
METHOD_NAME = "method.pt"
LOGITS_DIRNAME = "logits"

Callback = Callable[[EpochResult], None]


class StageError(ValueError):
    """Bad stage input (fold, protocol, weights, missing upstream file); the message names it."""


@dataclass(frozen=True)
class FoldSplit:
    """Subjects of one cross-validation fold: train (fit), val (early stopping), test (scored)."""

    cache_dir: Path
    fold: int
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    protocol: str

    def all_ids(self) -> tuple[str, ...]:
        """train + val + test, each subject once (val == test under the paper protocol)."""
        return tuple(dict.fromkeys(self.train_ids + self.val_ids + self.test_ids))

    def subjects(self, which: str, logits_dir: Path | None = None) -> SubjectSet:
        """``"train"``, ``"val"`` or ``"test"`` as a :class:`SubjectSet`."""
        ids = {"train": self.train_ids, "val": self.val_ids, "test": self.test_ids}[which]
        return SubjectSet(ids, cache_dir=self.cache_dir, logits_dir=logits_dir)


def make_split(cache_dir: Path, folds: Mapping[int, Sequence[str]], fold: int,
               protocol: str = "honest", seed: int = 0, val_fraction: float = 0.2) -> FoldSplit:
    """The split of ``fold`` under ``protocol`` (see the module doc).

    ``folds`` maps fold number -> subject ids (:func:`calib.data.make_folds`). The test fold is
    ``folds[fold]``; the training pool is every other fold. ``paper``: val = test.
    ``honest``: ``round(val_fraction * pool)`` subjects (at least 1) drawn from the pool with
    ``seed`` and ``fold`` become val, the rest train -- the same for every stage of the fold.
    """
    if protocol not in PROTOCOLS:
        raise StageError(f"unknown protocol {protocol!r}{closest(protocol, PROTOCOLS)}; "
                         f"valid choices: {', '.join(PROTOCOLS)}")
    if fold not in folds:
        raise StageError(f"fold {fold!r} is not in the folds; valid folds: {sorted(folds)}")
    test = tuple(folds[fold])
    pool = tuple(s for f in sorted(folds) if f != fold for s in folds[f])
    if not test or not pool:
        raise StageError(f"fold {fold}: needs subjects in the test fold and in the other folds "
                         f"(got {len(test)} and {len(pool)})")
    overlap = set(test) & set(pool)
    if overlap:
        raise StageError(f"fold {fold}: subjects in more than one fold: {sorted(overlap)[:5]}")
    if protocol == "paper":
        return FoldSplit(Path(cache_dir), fold, pool, test, test, protocol)
    if not 0 < val_fraction < 1:
        raise StageError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if len(pool) < 2:
        raise StageError(f"fold {fold}: the honest protocol needs >= 2 training subjects to carve a "
                         f"validation split, got {len(pool)}")
    n_val = min(len(pool) - 1, max(1, round(val_fraction * len(pool))))
    chosen = set(np.random.default_rng([seed, fold]).choice(len(pool), n_val, replace=False).tolist())
    val = tuple(s for i, s in enumerate(pool) if i in chosen)
    train = tuple(s for i, s in enumerate(pool) if i not in chosen)
    return FoldSplit(Path(cache_dir), fold, train, val, test, protocol)


@dataclass
class StageResult:
    """What a stage hands back to the sweep.

    ``weights``: the stage's model file; ``per_subject`` / ``reliability_bins``: the test fold's
    evaluation (columns as INTERFACES.md); ``history``: the EpochResults; ``extra_artifacts``:
    more files by name (``"logits"`` for the base stage); ``params``: resolved settings worth
    recording (protocol, loss, method parameters, learned scalars).
    """

    weights: Path
    per_subject: pd.DataFrame
    reliability_bins: pd.DataFrame
    best_val_loss: float
    epochs: int
    history: list
    extra_artifacts: dict[str, Path] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _train_unet(model: UNet3D, loss: str, train_cfg: TrainConfig, split: FoldSplit,
                work_dir: Path, device: torch.device, callbacks: Sequence[Callback]) -> FitResult:
    """Train every weight of ``model`` with ``loss`` on whole-volume batches of the split."""
    loss_fn = LOSSES[loss]

    def step_loss(module: UNet3D, batch: dict) -> torch.Tensor:
        return loss_fn(module(batch["image"], mask=batch["mask"]), batch["label"], batch["mask"])

    train = VolumeBatches(split.cache_dir, split.train_ids, train_cfg.batch_size, shuffle=True,
                          seed=train_cfg.seed)
    val = VolumeBatches(split.cache_dir, split.val_ids, train_cfg.batch_size, shuffle=False)
    return fit(model, step_loss, train, lambda: val(0), train_cfg, torch.device(device),
               checkpoint_path=Path(work_dir) / CHECKPOINT_NAME, callbacks=callbacks)


def _finish_unet_stage(model: UNet3D, result: FitResult, split: FoldSplit, work_dir: Path,
                       device: torch.device, params: dict) -> StageResult:
    weights = save_weights(model.cpu(), Path(work_dir) / WEIGHTS_NAME)
    per_subject, bins = evaluate_subjects(lambda s: unet_probability(model, s, device),
                                          split.subjects("test"), split.fold)
    model.cpu()
    return StageResult(weights, per_subject, bins, result.best_val_loss, result.epochs_run,
                       list(result.history), {}, params)


def run_pretrain(net_cfg: UNetConfig, train_cfg: TrainConfig, split: FoldSplit, work_dir: Path,
                 device: torch.device, callbacks: Sequence[Callback] = ()) -> StageResult:
    """Train a U-Net from scratch with CE (the paper's pre-training), evaluate it on the test fold."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train_cfg.seed)  # initial weights; fit() reseeds for the batches
    model = UNet3D(net_cfg)
    result = _train_unet(model, "ce", train_cfg, split, work_dir, device, callbacks)
    return _finish_unet_stage(model, result, split, work_dir, device,
                              {"loss": "ce", "protocol": split.protocol, "init": "scratch"})


#: Loss of the base stage by weights, and whether it continues from the pre-trained weights.
BASE_RECIPES = {"CE": ("ce", True), "CE-SD": ("sd", True), "SD": ("sd", False)}


def run_base(weights: str, net_cfg: UNetConfig, train_cfg: TrainConfig, split: FoldSplit,
             work_dir: Path, device: torch.device, init_weights: Path | None,
             callbacks: Sequence[Callback] = ()) -> StageResult:
    """Train a base model and export every split subject's logits.

    ``CE``: continue CE from the pre-trained ``init_weights``; ``CE-SD``: continue with soft Dice
    from them; ``SD``: soft Dice from scratch (``init_weights`` must be None). Evaluates on the test
    fold and writes the logits of train + val + test subjects (float16) into
    ``work_dir/logits`` -> ``extra_artifacts["logits"]``.
    """
    if weights not in BASE_RECIPES:
        raise StageError(f"unknown base weights {weights!r}{closest(weights, BASE_WEIGHTS)}; "
                         f"valid choices: {', '.join(BASE_WEIGHTS)}")
    loss, from_pretrain = BASE_RECIPES[weights]
    if from_pretrain and init_weights is None:
        raise StageError(f"base weights {weights!r} continue from the pre-trained model: "
                         "init_weights is required")
    if not from_pretrain and init_weights is not None:
        raise StageError("base weights 'SD' train from scratch: init_weights must be None, "
                         f"got {init_weights}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train_cfg.seed)
    model = UNet3D(net_cfg)
    if init_weights is not None:
        try:
            load_weights(model, Path(init_weights))
        except MethodError as exc:
            raise StageError(f"base {weights}: {exc}") from exc
    result = _train_unet(model, loss, train_cfg, split, work_dir, device, callbacks)
    stage = _finish_unet_stage(model, result, split, work_dir, device,
                               {"loss": loss, "protocol": split.protocol,
                                "init": "pretrain" if from_pretrain else "scratch"})
    logits = export_logits(model, split.cache_dir, split.all_ids(), work_dir / LOGITS_DIRNAME,
                           torch.device(device), source={"weights_sha256": _sha256(stage.weights)})
    model.cpu()
    stage.extra_artifacts["logits"] = logits
    return stage


def run_calibrate(method: str, params: Mapping[str, Any] | None, weights: str,
                  net_cfg: UNetConfig, train_cfg: TrainConfig, split: FoldSplit,
                  base_weights: Path, base_logits: Path | None, work_dir: Path,
                  device: torch.device, callbacks: Sequence[Callback] = ()) -> StageResult:
    """Fit calibration ``method`` on the split's train/val subjects and evaluate it on test.

    Logit-based methods read ``base_logits`` (the base stage's export) only; network-based ones
    start from ``base_weights``. ``train_cfg`` gives the schedule (max_epochs, patience, factor,
    seed); the method's recipe gives LR and batch size; ``params`` override both. The fitted
    method is saved to ``work_dir/method.pt`` (:func:`calib.methods.load_method`).
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    calibrator = build_method(method, params, weights=weights, net_cfg=net_cfg,
                              base_weights=base_weights, schedule=train_cfg)
    logits_dir = None
    if calibrator.uses == "logits":
        if base_logits is None:
            raise StageError(f"method {method!r} trains on the base logits: base_logits is required")
        logits_dir = Path(base_logits)
    train, val = split.subjects("train", logits_dir), split.subjects("val", logits_dir)
    result = calibrator.fit(train, val, device, callbacks, work_dir / CHECKPOINT_NAME)
    saved = calibrator.save(work_dir / METHOD_NAME)
    per_subject, bins = evaluate_subjects(lambda s: calibrator.predict_proba(s, device),
                                          split.subjects("test", logits_dir), split.fold)
    recorded = {"method": method, "weights": weights, "protocol": split.protocol,
                **calibrator.params, **calibrator.describe()}
    if hasattr(calibrator, "loss_name"):
        recorded["loss"] = calibrator.loss_name()
    return StageResult(saved, per_subject, bins, result.best_val_loss, result.epochs_run,
                       list(result.history), {}, recorded)
