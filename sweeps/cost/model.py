"""What a trial costs before it runs: counted FLOPs of each pass x the passes its stage makes.

Per trial (one volume = the grid's preprocessed shape; split sizes from calib.stages.make_split
for the trial's fold, protocol and fractions):

* pretrain / base: an epoch trains on ``train`` (forward + backward) and validates on ``val``;
  afterwards the model scores ``test`` and ``val`` (one pass when ``val`` is the test fold, under
  ``paper``), and a base model exports the logits of every subject;
* a calibration method reads what its recipe says (calib.methods.recipes.RECIPES ``uses``):
  ``images`` methods run the base network -- fine-tuning trains its last conv, MC dropout
  retrains what follows the first dropout site (the prefix once per volume, without autograd)
  and scores with ``n_samples`` remainders, test-time flips run ``flips`` forward passes --;
  ``logits`` methods never run it: a pass over one voxel of the logit cache counts
  :data:`LOGIT_FLOPS_PER_VOXEL`; either fits on the method's ``fit_split``, stops on ``val``;
* a stage runs ``max_epochs x epoch_fraction`` epochs (early stopping), at least
  ``early_stop_patience + 1``; a closed-form method or test-time flips one pass;
  :meth:`CostModel.tasks` draws each trial's epochs around that instead (bench/schedule.py).

Seconds = FLOPs / the device's effective FLOP/s (sweeps.cost.devices): a named roofline, or a
measured ``bench/unet.py --json`` file converted through the counted FLOPs of the net it timed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from calib.methods import get_method
from calib.methods.recipes import RECIPES, resolve
from calib.methods.tta import FLIPS
from calib.nets import DROPOUT_SETTINGS, UNetConfig
from calib.schedule import TrainConfig
from calib.stages import make_split
from calib.vocabulary import BASE, CALIBRATE, PRETRAIN
from sweeps.cost.devices import (DEFAULT_DEVICE, PAPER_SHAPE, EstimateError, Measured,
                                 read_throughput, roofline)
from sweeps.cost.flops import NetFlops, net_flops
from sweeps.cost.schedule import Task
from sweeps.grid.model import HONEST, PAPER_PROTOCOL, SplitSettings

#: Expected epochs run / max_epochs under early stopping (6 epochs without improvement), and the
#: half-width of the uniform draw around it. An assumption (the paper reports no epoch counts):
#: the paper's schedule (patience 6, plateau x0.1 after 3) typically stops mid-way.
EPOCH_FRACTION = 0.5
EPOCH_SPREAD = 0.3
#: Subjects of the datasets as distributed (BraTS 2018 train, ISLES 2018 train) when no phantom
#: spec says otherwise; another network's predictions are counted before their import.
DATASET_SUBJECTS = {"brats18": 285, "isles18": 94}
OTHER_SUBJECTS = 100
#: A logit-based method's pass over one voxel, in FLOP-equivalents: reading a float16 logit and
#: its target, a per-voxel map (or a small conv) and its gradient. An assumption: the work is
#: memory- and loader-bound, about 1/100 of the paper net's training step per voxel (1.5e6 FLOPs),
#: the ratio both earlier cost models of this project assumed.
LOGIT_FLOPS_PER_VOXEL = 1.5e4


def split_sizes(n_subjects: int, split: SplitSettings, fold: int = 0) -> dict[str, int]:
    """Subjects per split of ``fold``: calib.stages.make_split on ``n_subjects`` stand-in ids dealt
    into folds as calib.data.make_folds deals them (sizes differing by at most one)."""
    ids = [f"s{i:05d}" for i in range(n_subjects)]
    folds = {k: ids[k::split.n_folds] for k in range(split.n_folds)}
    s = make_split(Path("."), folds, fold, split.protocol, split.seed, split.val_fraction,
                   split.calib_fraction)
    return {"train": len(s.train_ids), "val": len(s.val_ids), "calib": len(s.calib_ids),
            "test": len(s.test_ids), "all": n_subjects}


@dataclass(frozen=True)
class Work:
    """FLOPs of one trial: ``per_epoch`` x epochs + ``fixed``; epochs in [min_epochs, max_epochs]."""

    per_epoch: float
    fixed: float
    max_epochs: int
    min_epochs: int


def _epochs_of(schedule: Mapping | TrainConfig) -> tuple[int, int]:
    """(max_epochs, min_epochs) of a TrainConfig or a method's resolved parameters: early
    stopping needs its patience + 1 epochs."""
    if isinstance(schedule, TrainConfig):
        top, patience = schedule.max_epochs, schedule.early_stop_patience
    else:
        top = int(schedule["max_epochs"])
        patience = int(schedule.get("early_stop_patience", TrainConfig.early_stop_patience))
    return top, min(top, patience + 1)


def stage_work(stage: str, method: str, params: Mapping, schedule: TrainConfig | None, flops: NetFlops | None,
               sizes: Mapping[str, int], voxels: int, protocol: str) -> Work:
    """The FLOPs of one trial of ``stage`` / ``method`` (module doc).

    ``params``: the method's resolved parameters; ``schedule``: the stage's training settings
    (None where nothing trains); ``flops``: the network's passes (None for another
    network's predictions: no network runs); ``sizes``: :func:`split_sizes`.
    """
    scored = sizes["test"] + (sizes["val"] if protocol != PAPER_PROTOCOL else 0)
    logit_pass = LOGIT_FLOPS_PER_VOXEL * voxels
    if stage in (PRETRAIN, BASE):
        if flops is None:  # another network's predictions: scored as they are, nothing trains
            return Work(0.0, scored * logit_pass, 1, 1)
        per_epoch = sizes["train"] * flops.train_step + sizes["val"] * flops.forward
        export = sizes["all"] * flops.forward if stage == BASE else 0.0
        return Work(per_epoch, scored * flops.forward + export, *_epochs_of(schedule))
    recipe = RECIPES[method]
    fit = sizes[get_method(method).fit_split]
    epochs = _epochs_of(params) if "max_epochs" in params else (1, 1)  # closed form: one pass
    if recipe.uses == "logits":
        return Work((fit + sizes["val"]) * logit_pass, scored * logit_pass, *epochs)
    if flops is None:
        raise EstimateError(f"method {method} runs a network; a predictions dataset has none")
    setting = getattr(get_method(method), "setting", None)
    if setting in DROPOUT_SETTINGS:  # MC dropout: retrain the remainder, sample it at inference
        mc = flops.mc[setting]
        per_epoch = fit * (mc.prefix + mc.remainder_step) + sizes["val"] * (mc.prefix + mc.remainder)
        samples = int(params.get("n_samples", 1) or 1)
        return Work(per_epoch, scored * (mc.prefix + samples * mc.remainder), *epochs)
    if "flips" in recipe.defaults:  # test-time flips: no training; val is its one pass
        passes = len(FLIPS[params.get("flips", recipe.defaults["flips"])]) * flops.forward
        return Work(sizes["val"] * passes, scored * passes, 1, 1)
    # fine-tuning: forward passes, back-propagated into the last conv only
    return Work(fit * flops.finetune_step + sizes["val"] * flops.forward, scored * flops.forward,
                *epochs)


def plan_subjects(plan) -> dict[str, int]:
    """Subjects per dataset of a plan: the phantom spec's, else the dataset's as distributed."""
    return {d.name: d.phantom.subjects if d.phantom else DATASET_SUBJECTS.get(d.name, OTHER_SUBJECTS)
            for d in plan.grid.datasets}


def trial_work(t, plan, n_subjects: int) -> Work:
    """The :class:`Work` of trial ``t`` of ``plan`` when its dataset has ``n_subjects``."""
    shape = tuple(plan.grid.preprocessing.shape)
    flops = None if t.net is None else net_flops(t.net, shape)
    sizes = split_sizes(n_subjects, t.split, t.fold)
    if isinstance(t.calib_subjects, int):  # a calib_subjects trial fits on its subset of calib
        sizes["calib"] = min(sizes["calib"], t.calib_subjects)
    return stage_work(t.stage, t.method, t.config["params"], t.train, flops, sizes, math.prod(shape),
                      t.split.protocol)


def expected_epochs(work: Work, fraction: float = EPOCH_FRACTION) -> float:
    """Epochs early stopping is expected to leave: ``fraction`` of the maximum, clipped."""
    return min(work.max_epochs, max(work.min_epochs, fraction * work.max_epochs))


def trial_seconds(t, plan, flops_per_s: float, n_subjects: int, fraction: float = EPOCH_FRACTION) -> float:
    """Expected seconds of trial ``t`` on a device reaching ``flops_per_s`` (module doc)."""
    w = trial_work(t, plan, n_subjects)
    return (expected_epochs(w, fraction) * w.per_epoch + w.fixed) / flops_per_s


def _paper_flops(dataset: str, shape: Sequence[int] = PAPER_SHAPE) -> NetFlops:
    return net_flops(UNetConfig.paper(dataset), tuple(shape))


@dataclass(frozen=True)
class CostModel:
    """Trial durations on one kind of device (module doc).

    ``flops_per_s``: effective FLOP/s per dataset (``"*"``: any other); ``source``: where they come
    from; ``train_voxels_per_s``: the same rates as training voxels/s of each paper net at
    136 x 136 x 82 (measured ones as measured); ``subjects``: per dataset, None for the plan's.
    """

    flops_per_s: Mapping[str, float]
    source: str
    train_voxels_per_s: Mapping[str, float] = field(default_factory=dict)
    subjects: Mapping[str, int] | None = None
    epoch_fraction: float = EPOCH_FRACTION
    epoch_spread: float = EPOCH_SPREAD

    @classmethod
    def for_device(cls, device: str = DEFAULT_DEVICE, **kw) -> "CostModel":
        """The named roofline's effective FLOP/s (sweeps.cost.devices.DEVICES)."""
        r = roofline(device)
        vps = {d: r.effective_flops / _paper_flops(d).train_flops_per_voxel for d in DATASET_SUBJECTS}
        return cls({"*": r.effective_flops}, r.describe(), vps, **kw)

    @classmethod
    def from_files(cls, paths: Sequence[Path] = (), device: str = DEFAULT_DEVICE, **kw) -> "CostModel":
        """From ``bench/unet.py --json`` files (one per dataset at most); without one, the
        defaults: ``device``'s roofline. A dataset without a file runs at the FLOP/s measured
        for the other."""
        measured: list[Measured] = [read_throughput(p) for p in paths]
        if not measured:
            base = cls.for_device(device, **kw)
            return cls(base.flops_per_s, f"defaults (no throughput file): {base.source}",
                       base.train_voxels_per_s, **kw)
        flops = {m.dataset: m.train_voxels_per_s * _paper_flops(m.dataset, m.shape).train_flops_per_voxel
                 for m in measured}
        flops["*"] = flops.get("brats18", next(iter(flops.values())))
        vps = {m.dataset: m.train_voxels_per_s for m in measured}
        for d in DATASET_SUBJECTS:
            flops.setdefault(d, flops["*"])
            vps.setdefault(d, flops[d] / _paper_flops(d).train_flops_per_voxel)
        return cls(flops, "; ".join(m.describe() for m in measured), vps, **kw)

    def rate(self, dataset: str) -> float:
        """Effective FLOP/s of ``dataset``'s trials (``"*"``'s for a dataset not named)."""
        if dataset in self.flops_per_s:
            return float(self.flops_per_s[dataset])
        try:
            return float(self.flops_per_s["*"])
        except KeyError:
            raise EstimateError(f"no FLOP/s for dataset {dataset!r} ({self.source})") from None

    def subjects_of(self, plan) -> dict[str, int]:
        n = plan_subjects(plan)
        return {**n, **{d: k for d, k in (self.subjects or {}).items() if d in n}}

    # ---- a plan -------------------------------------------------------------------------------

    def trial_seconds(self, t, plan) -> float:
        """Expected seconds of trial ``t`` of ``plan``."""
        return trial_seconds(t, plan, self.rate(t.dataset), self.subjects_of(plan)[t.dataset],
                             self.epoch_fraction)

    def epochs(self, max_epochs: int, min_epochs: int, rng: random.Random) -> int:
        """Epochs run, drawn uniformly in ``max_epochs x (fraction +- spread)``, clipped."""
        f = rng.uniform(self.epoch_fraction - self.epoch_spread, self.epoch_fraction + self.epoch_spread)
        return int(min(max_epochs, max(min_epochs, round(f * max_epochs))))

    def tasks(self, plan, seed: int = 0) -> list[Task]:
        """One :class:`Task` per trial of ``plan``, its epochs drawn with ``(seed, trial key)``."""
        n = self.subjects_of(plan)
        out = []
        for t in plan.trials:
            w = trial_work(t, plan, n[t.dataset])
            epochs = self.epochs(w.max_epochs, w.min_epochs, random.Random(f"{seed}:{t.key}"))
            seconds = (epochs * w.per_epoch + w.fixed) / self.rate(t.dataset)
            out.append(Task(t.key, seconds, t.resources.gpu, t.resources.cpu, t.upstream, t.wave,
                            t.stage, t.label, epochs))
        return out

    # ---- the paper's nets, without a plan -----------------------------------------------------

    def _paper_work(self, dataset: str, method: str, n_folds: int, val_fraction: float,
                    **params) -> Work:
        stage = method if method in (PRETRAIN, BASE) else CALIBRATE
        resolved = {} if stage != CALIBRATE else resolve(method, params, "CE")
        schedule = TrainConfig(lr=1e-3, max_epochs=1)  # per-epoch and fixed work need no epochs
        n = (self.subjects or DATASET_SUBJECTS)[dataset]
        sizes = split_sizes(n, SplitSettings(n_folds=n_folds, val_fraction=val_fraction))
        return stage_work(stage, method, resolved, schedule, _paper_flops(dataset), sizes,
                          math.prod(PAPER_SHAPE), HONEST)

    def epoch_seconds(self, dataset: str, method: str, n_folds: int = 5, val_fraction: float = 0.2) -> float:
        """Seconds of one epoch of the paper's ``dataset`` net at 136 x 136 x 82 (honest protocol;
        ``method``: ``pretrain``, ``base`` or a calibration method with its recipe's defaults)."""
        return self._paper_work(dataset, method, n_folds, val_fraction).per_epoch / self.rate(dataset)

    def fixed_seconds(self, dataset: str, method: str, samples: int = 1, n_folds: int = 5,
                      val_fraction: float = 0.2) -> float:
        """Seconds outside the epochs (scoring, logit export) of :meth:`epoch_seconds`' trial;
        ``samples``: MC samples per volume (methods that sample)."""
        sampled = method in RECIPES and "n_samples" in RECIPES[method].defaults
        w = self._paper_work(dataset, method, n_folds, val_fraction,
                             **({"n_samples": samples} if sampled else {}))
        return w.fixed / self.rate(dataset)
