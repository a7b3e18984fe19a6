"""The three stages of the study as plain functions the sweep calls: pretrain, base, calibrate.

Each stage trains with :func:`calib.training.fit` (checkpoint ``work_dir/checkpoint.pt``, resumed
when present, so a retried trial continues mid-training and a finished one returns at once),
writes its weights into ``work_dir``, evaluates on the split's test fold -- and, with the same
predict function (MC dropout with its samples), on the fold's ``val`` subjects, for held-out
model selection -- and returns a :class:`StageResult`. Nothing here knows about Ray or MLflow.

Protocols (:func:`make_split`), who fits on what within one fold (test = the held-out fold):

=============  ======================  =====================  ======================  ==========
protocol       base model trains on    early stopping on      post hoc calibrators    epoch kept
=============  ======================  =====================  ======================  ==========
``honest``     ``train``               ``val``                ``calib``               best val
``two_way``    ``train``               ``val``                ``train``               best val
``paper``      the training folds      the held-out fold      the training folds      last
=============  ======================  =====================  ======================  ==========

* ``honest`` (default): the training pool (the other folds) is split, seeded by (seed, fold), into
  ``train`` (fits the base model), ``val`` (early stopping and the kept epoch of every stage) and
  ``calib`` (fits the post hoc calibrators: every map of the base output and fine-tuning). MC
  dropout retrains the network, so it trains on ``train`` and stops on ``val`` like the base model.
  No stage sees the test fold before it is scored.
* ``two_way``: the previous default, kept for comparison: ``val`` carved out of the pool, the rest
  ``train``; calibrators are fitted on the base model's own training subjects.
* ``paper``: what the paper's public code does: every stage trains on the training folds, early
  stopping watches the held-out fold itself, and the weights of the last epoch run are kept
  (the public code predicts with its end-of-training weights).

Every stage records the split each part used (``StageResult.params["fit_split"]``) and the
subject ids of each split (``StageResult.splits``, logged as ``splits.json``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from calib.data.batches import VolumeBatches
from calib.evaluate import evaluate_subjects
from calib.guard import GuardReport, check_degenerate, constant_from_ranges, output_range
from calib.preview import keep_first_preview
from calib.stage_files import CHECKPOINT_NAME, LOGITS_DIRNAME, METHOD_NAME, WEIGHTS_NAME
from calib.logits import export_logits
from calib.losses import build_loss, loss_params as resolve_loss_params
from calib.methods import SubjectSet, build_method
from calib.methods.network_based import load_weights, save_weights, unet_probability
from calib.methods.params import MethodError, closest
from calib.nets import UNet3D, UNetConfig
from calib.training import EpochResult, FitResult, TrainConfig, fit, start_stage
from calib.vocabulary import BASE_WEIGHTS, PROTOCOLS

SPLITS = ("train", "val", "calib", "test")

Callback = Callable[[EpochResult], None]


class StageError(ValueError):
    """Bad stage input (fold, protocol, weights, missing upstream file); the message names it."""


@dataclass(frozen=True)
class FoldSplit:
    """Subjects of one cross-validation fold by role (module doc): ``train`` fits the base model,
    ``val`` early-stops every stage, ``calib`` fits the post hoc calibrators, ``test`` is scored.

    Under ``paper`` val is the test fold and calib the training folds; under ``two_way`` calib is
    train. ``restore_best``: keep the best validation epoch (False under ``paper``: the last).
    """

    cache_dir: Path
    fold: int
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    protocol: str
    calib_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.calib_ids:  # two-way splits built by hand: calibrators fit on train
            object.__setattr__(self, "calib_ids", self.train_ids)

    @property
    def restore_best(self) -> bool:
        return self.protocol != "paper"

    @property
    def stop_split(self) -> str:
        """The split early stopping watches, by its role: ``test`` under ``paper``, else ``val``."""
        return "test" if self.protocol == "paper" else "val"

    def describe(self, fit_split: str) -> dict[str, str]:
        """What a stage that fits on ``fit_split`` used, for the run's params and tags."""
        return {"fit_split": fit_split, "stop_split": self.stop_split,
                "kept_epoch": "best" if self.restore_best else "last"}

    def ids(self, which: str) -> tuple[str, ...]:
        """The subject ids of split ``which`` (one of :data:`SPLITS`)."""
        table = {"train": self.train_ids, "val": self.val_ids, "calib": self.calib_ids,
                 "test": self.test_ids}
        if which not in table:
            raise StageError(f"unknown split {which!r}{closest(which, SPLITS)}; valid choices: "
                             f"{', '.join(SPLITS)}")
        return table[which]

    def all_ids(self) -> tuple[str, ...]:
        """train + val + calib + test, each subject once."""
        return tuple(dict.fromkeys(self.train_ids + self.val_ids + self.calib_ids + self.test_ids))

    def subjects(self, which: str, logits_dir: Path | None = None) -> SubjectSet:
        """Split ``which`` (``"train"``, ``"val"``, ``"calib"`` or ``"test"``) as a SubjectSet."""
        return SubjectSet(self.ids(which), cache_dir=self.cache_dir, logits_dir=logits_dir)

    def to_dict(self) -> dict:
        """``splits.json``: the protocol, the fold and the subject ids of every split."""
        return {"protocol": self.protocol, "fold": self.fold,
                **{name: list(self.ids(name)) for name in SPLITS}}


def _draw(pool: tuple[str, ...], n: int, rng: np.random.Generator) -> tuple[tuple, tuple]:
    """``n`` subjects of ``pool`` drawn with ``rng`` (pool order kept), and the rest."""
    chosen = set(rng.choice(len(pool), n, replace=False).tolist())
    return (tuple(s for i, s in enumerate(pool) if i in chosen),
            tuple(s for i, s in enumerate(pool) if i not in chosen))


def make_split(cache_dir: Path, folds: Mapping[int, Sequence[str]], fold: int,
               protocol: str = "honest", seed: int = 0, val_fraction: float = 0.2,
               calib_fraction: float = 0.2) -> FoldSplit:
    """The split of ``fold`` under ``protocol`` (see the module doc).

    ``folds`` maps fold number -> subject ids (:func:`calib.data.make_folds`). The test fold is
    ``folds[fold]``; the training pool is every other fold. ``honest``: ``round(val_fraction *
    pool)`` subjects become val and ``round(calib_fraction * pool)`` calib (at least one each, and
    at least one left to train), drawn with an RNG seeded by ``(seed, fold)`` -- so every stage of
    a fold sees the same split. ``two_way``: the same val draw, calib = train. ``paper``: train =
    calib = pool, val = test.

    Raises StageError naming the fold when the pool is too small for the protocol.
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
        return FoldSplit(Path(cache_dir), fold, pool, test, test, protocol, calib_ids=pool)
    for name, value in (("val_fraction", val_fraction), ("calib_fraction", calib_fraction)):
        if not 0 < value < 1:
            raise StageError(f"{name} must be in (0, 1), got {value!r}")
    three_way = protocol == "honest"
    if three_way and val_fraction + calib_fraction >= 1:
        raise StageError(f"val_fraction + calib_fraction must be below 1 (something must be left "
                         f"to train on), got {val_fraction} + {calib_fraction}")
    need = 3 if three_way else 2
    if len(pool) < need:
        parts = "train, val and calib" if three_way else "train and val"
        raise StageError(f"fold {fold}: the {protocol} protocol needs >= {need} subjects in the "
                         f"training pool (at least one each for {parts}), got {len(pool)}: use "
                         f"more subjects or fewer folds")
    n_val = max(1, round(val_fraction * len(pool)))
    n_calib = max(1, round(calib_fraction * len(pool))) if three_way else 0
    while n_val + n_calib > len(pool) - 1:  # tiny pools: keep at least one training subject
        if n_calib > 1 and n_calib >= n_val:
            n_calib -= 1
        else:
            n_val -= 1
    rng = np.random.default_rng([seed, fold])
    # val is drawn first and the same way as in the two-way protocol, so honest and two_way
    # early-stop on the same subjects and differ only in what the calibrators fit on
    val, rest = _draw(pool, n_val, rng)
    if not three_way:
        return FoldSplit(Path(cache_dir), fold, rest, val, test, protocol, calib_ids=rest)
    calib, train = _draw(rest, n_calib, rng)
    return FoldSplit(Path(cache_dir), fold, train, val, test, protocol, calib_ids=calib)


@dataclass
class StageResult:
    """What a stage hands back to the sweep.

    ``weights``: the stage's model file; ``per_subject`` / ``reliability_bins``: the test fold's
    evaluation (columns as ``calib.evaluate``); ``history``: the EpochResults; ``extra_artifacts``:
    more files by name (``"logits"`` for the base stage); ``params``: resolved settings worth
    recording (protocol, fit split, loss, method parameters, learned scalars); ``splits``: the
    fold's subject ids by split (``splits.json``); ``guard``: the degenerate-model guard's
    report on the validation subjects (base stage only; :mod:`calib.guard`).
    """

    weights: Path
    per_subject: pd.DataFrame
    reliability_bins: pd.DataFrame
    best_val_loss: float
    epochs: int
    history: list
    extra_artifacts: dict[str, Path] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, Any] = field(default_factory=dict)
    guard: GuardReport | None = None
    preview: dict[str, np.ndarray] = field(default_factory=dict)  # calib.preview, first test subject
    val_per_subject: pd.DataFrame | None = None
    val_reliability_bins: pd.DataFrame | None = None
    constant_output: str | None = None

    @property
    def degenerate(self) -> str | None:
        """Why the base model is degenerate (:mod:`calib.guard`), or None."""
        return None if self.guard is None else self.guard.reason


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _evaluate_val(predict: Callable, split: FoldSplit, logits_dir: Path | None,
                  test: tuple[pd.DataFrame, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(per_subject, reliability_bins)`` of ``predict`` on the fold's val subjects. Where val
    is the test fold (``paper``) the test evaluation ``test`` is that evaluation: no second pass."""
    if split.val_ids == split.test_ids:
        return test[0].copy(), test[1].copy()
    return evaluate_subjects(predict, split.subjects("val", logits_dir), split.fold)


def _train_unet(model: UNet3D, loss: str, train_cfg: TrainConfig, split: FoldSplit,
                work_dir: Path, device: torch.device, callbacks: Sequence[Callback],
                loss_params: Mapping[str, Any] | None = None) -> FitResult:
    """Train every weight of ``model`` with ``loss`` (and its ``loss_params``) on whole-volume
    batches of ``train``, early stopping on ``val``; the protocol decides which epoch is kept."""
    loss_fn = build_loss(loss, loss_params)
    train_cfg = replace(train_cfg, restore_best=split.restore_best)

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
    preview: dict = {}

    def predict(s):
        return unet_probability(model, s, device)

    per_subject, bins = evaluate_subjects(keep_first_preview(predict, preview),
                                          split.subjects("test"), split.fold)
    val_per_subject, val_bins = _evaluate_val(predict, split, None, (per_subject, bins))
    model.cpu()
    params = {**params, **split.describe("train")}
    return StageResult(weights, per_subject, bins, result.best_val_loss, result.epochs_run,
                       list(result.history), {}, params, split.to_dict(), preview=preview,
                       val_per_subject=val_per_subject, val_reliability_bins=val_bins)


def run_pretrain(net_cfg: UNetConfig, train_cfg: TrainConfig, split: FoldSplit, work_dir: Path,
                 device: torch.device, callbacks: Sequence[Callback] = ()) -> StageResult:
    """Train a U-Net from scratch with CE (the paper's pre-training), evaluate it on the test fold."""
    start_stage(train_cfg.seed, device)  # initial weights; fit() reseeds for the batches
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model = UNet3D(net_cfg)
    result = _train_unet(model, "ce", train_cfg, split, work_dir, device, callbacks)
    return _finish_unet_stage(model, result, split, work_dir, device,
                              {"loss": "ce", "protocol": split.protocol, "init": "scratch"})


#: Loss of the base stage by weights (a name of calib.losses.LOSSES), and whether it continues
#: from the pre-trained weights; the train-time calibration losses are trained like CE-SD.
BASE_RECIPES = {"CE": ("ce", True), "CE-SD": ("sd", True), "SD": ("sd", False),
                "focal": ("focal", True), "svls": ("svls", True), "ace": ("ace", True)}


def run_base(weights: str, net_cfg: UNetConfig, train_cfg: TrainConfig, split: FoldSplit,
             work_dir: Path, device: torch.device, init_weights: Path | None,
             callbacks: Sequence[Callback] = (),
             loss_params: Mapping[str, Any] | None = None) -> StageResult:
    """Train a base model and export every split subject's logits.

    ``CE``: continue CE from the pre-trained ``init_weights``; ``CE-SD``: continue with soft Dice
    from them; ``SD``: soft Dice from scratch (``init_weights`` must be None); ``focal``, ``svls``,
    ``ace``: continue with that train-time calibration loss from them, ``loss_params`` overriding
    its defaults (calib.losses.LOSS_PARAMS). Evaluates on the test
    fold, writes the logits of every subject of the fold (train, val, calib, test; float16) into
    ``work_dir/logits`` -> ``extra_artifacts["logits"]`` and guards the model on its validation
    subjects (``StageResult.guard``).
    """
    if weights not in BASE_RECIPES:
        raise StageError(f"unknown base weights {weights!r}{closest(weights, BASE_WEIGHTS)}; "
                         f"valid choices: {', '.join(BASE_WEIGHTS)}")
    loss, from_pretrain = BASE_RECIPES[weights]
    try:
        resolved_loss = resolve_loss_params(loss, loss_params)
    except ValueError as exc:
        raise StageError(f"base {weights}: {exc}") from None
    if from_pretrain and init_weights is None:
        raise StageError(f"base weights {weights!r} continue from the pre-trained model: "
                         "init_weights is required")
    if not from_pretrain and init_weights is not None:
        raise StageError("base weights 'SD' train from scratch: init_weights must be None, "
                         f"got {init_weights}")
    start_stage(train_cfg.seed, device)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model = UNet3D(net_cfg)
    if init_weights is not None:
        try:
            load_weights(model, Path(init_weights))
        except MethodError as exc:
            raise StageError(f"base {weights}: {exc}") from exc
    result = _train_unet(model, loss, train_cfg, split, work_dir, device, callbacks, resolved_loss)
    stage = _finish_unet_stage(model, result, split, work_dir, device,
                               {"loss": loss, "protocol": split.protocol,
                                "init": "pretrain" if from_pretrain else "scratch",
                                **{f"loss.{k}": v for k, v in resolved_loss.items()}})
    logits = export_logits(model, split.cache_dir, split.all_ids(), work_dir / LOGITS_DIRNAME,
                           torch.device(device), source={"weights_sha256": _sha256(stage.weights)})
    model.cpu()
    stage.extra_artifacts[LOGITS_DIRNAME] = logits
    stage.guard = guard_model(logits, split.val_ids)
    return stage


IMPORTED_NAME = "imported.json"


def run_imported(split: FoldSplit, logits_dir: Path, work_dir: Path) -> StageResult:
    """The "base model" of another network's imported predictions (calib.data.predictions):
    nothing trains; their own probabilities are scored on the test fold and on ``val``, their BCE
    on ``val`` is the validation loss, and the guard looks at them as at a trained base model.
    The stage's file (``imported.json``) records the logit cache they came from."""
    from calib.losses import bce_loss
    from calib.methods.base import SubjectSet

    start_stage(0)  # nothing random here; the same process state as every stage
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    logits_dir = Path(logits_dir)

    def prob(s):
        return np.where(s.mask, 1.0 / (1.0 + np.exp(-s.logits.astype(np.float64))), 0.0).astype(np.float32)

    preview: dict = {}
    per_subject, bins = evaluate_subjects(keep_first_preview(prob, preview),
                                          split.subjects("test", logits_dir), split.fold)
    val_per_subject, val_bins = _evaluate_val(prob, split, logits_dir, (per_subject, bins))
    losses = []
    for s in SubjectSet(split.val_ids, cache_dir=split.cache_dir, logits_dir=logits_dir):
        z = torch.from_numpy(s.logits)[None, None]
        losses.append(float(bce_loss(z, torch.from_numpy(s.label.astype(np.float32))[None, None],
                                     torch.from_numpy(s.mask)[None, None])))
    record = work_dir / IMPORTED_NAME
    from calib.logits import read_index

    record.write_text(json.dumps({"logits": str(logits_dir), "index": read_index(logits_dir)}, indent=2, default=str))
    params = {"protocol": split.protocol, "init": "imported predictions", **split.describe("none")}
    stage = StageResult(record, per_subject, bins, float(np.mean(losses)), 0, [], {}, params,
                        split.to_dict(), preview=preview, val_per_subject=val_per_subject,
                        val_reliability_bins=val_bins)
    stage.guard = guard_model(logits_dir, split.val_ids)
    return stage


def guard_model(logits_dir: Path, subject_ids: Sequence[str]) -> GuardReport:
    """The degenerate-model guard (:func:`calib.guard.check_degenerate`) on exported logits."""
    refs = SubjectSet(tuple(subject_ids), logits_dir=Path(logits_dir))
    return check_degenerate((r.logits, r.label, r.mask) for r in refs)


def run_calibrate(method: str, params: Mapping[str, Any] | None, weights: str,
                  net_cfg: UNetConfig, train_cfg: TrainConfig, split: FoldSplit,
                  base_weights: Path, base_logits: Path | None, work_dir: Path,
                  device: torch.device, callbacks: Sequence[Callback] = ()) -> StageResult:
    """Fit calibration ``method`` and evaluate it on the test fold and on ``val``.

    Post hoc methods fit on the split's ``calib`` subjects, retrainings of the network (MC
    dropout) on ``train`` (the method's ``fit_split``); both early-stop on ``val``.

    Logit-based methods read ``base_logits`` (the base stage's export) only; network-based ones
    start from ``base_weights``. ``train_cfg`` gives the schedule (max_epochs, patience, factor,
    seed); the method's recipe gives LR and batch size; ``params`` override both. The fitted
    method is saved to ``work_dir/method.pt`` (:func:`calib.methods.load_method`). A method
    whose calibrated test maps are constant over the mask is flagged in
    ``StageResult.constant_output`` (:func:`calib.guard.constant_output`).
    """
    start_stage(train_cfg.seed, device)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    calibrator = build_method(method, params, weights=weights, net_cfg=net_cfg,
                              base_weights=base_weights,
                              schedule=replace(train_cfg, restore_best=split.restore_best))
    logits_dir = None
    if calibrator.uses == "logits":
        if base_logits is None:
            raise StageError(f"method {method!r} trains on the base logits: base_logits is required")
        logits_dir = Path(base_logits)
    fit_on = calibrator.fit_split
    fit_set, val = split.subjects(fit_on, logits_dir), split.subjects("val", logits_dir)
    result = calibrator.fit(fit_set, val, device, callbacks, work_dir / CHECKPOINT_NAME)
    saved = calibrator.save(work_dir / METHOD_NAME)
    preview: dict = {}
    ranges: list = []  # (min, max) inside the mask of each calibrated test map

    def predict(s):
        return calibrator.predict_proba(s, device)

    def predict_test(s):
        prob = predict(s)
        ranges.append(output_range(prob, s.mask))
        return prob

    # the preview and the constant-output check watch the test maps only; MC dropout seeds each
    # sample (calib.methods.mc_dropout.sample_seeds), so val after test changes no test number
    per_subject, bins = evaluate_subjects(keep_first_preview(predict_test, preview),
                                          split.subjects("test", logits_dir), split.fold)
    val_per_subject, val_bins = _evaluate_val(predict, split, logits_dir, (per_subject, bins))
    recorded = {"method": method, "weights": weights, "protocol": split.protocol,
                **split.describe(fit_on),
                **calibrator.params, **calibrator.describe()}
    if hasattr(calibrator, "loss_name"):
        recorded["loss"] = calibrator.loss_name()
    return StageResult(saved, per_subject, bins, result.best_val_loss, result.epochs_run,
                       list(result.history), {}, recorded, split.to_dict(), preview=preview,
                       val_per_subject=val_per_subject, val_reliability_bins=val_bins,
                       constant_output=constant_from_ranges(ranges))
