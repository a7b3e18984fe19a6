"""Durations of a plan's trials before they run: per-epoch seconds x epochs + fixed seconds.

Per-epoch seconds for each dataset x stage/method come from the training-step throughput that
``bench/unet.py --json`` measured on the target device (``--throughput FILE``), else from the
documented defaults below; a trial's epochs are drawn around ``epoch_fraction`` x its grid
``max_epochs`` (early stopping). Pure Python: ``bench/schedule.py`` feeds the result to
``sweeps.simulate``, and the launch's estimate can reuse it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sweeps.simulate import Task

#: Subjects in the paper's datasets (BraTS 2018 train, ISLES 2018 train).
PAPER_SUBJECTS = {"brats18": 285, "isles18": 94}
#: Voxels of one preprocessed volume (136 x 136 x 82).
VOLUME_VOXELS = 136 * 136 * 82
#: Training-step throughput (voxels/s, forward + backward + Adam of the paper net) when no
#: ``bench/unet.py`` file is given. A placeholder, NOT a measurement, of the order of one current
#: data-centre GPU in bf16; every absolute time scales with it, while the schedule's ratios
#: (utilisation, makespan / bound, waves vs graph) do not, since all durations scale together.
DEFAULT_TRAIN_VOXELS_PER_S = {"brats18": 2.0e7}
#: ISLES net: half the features of BraTS (convolutions ~1/4 of the FLOPs per voxel); counted as
#: 2x the BraTS throughput (memory-bound layers only halve) unless a file for isles18 is given.
ISLES_SPEEDUP = 2.0
#: Cost of one volume in one training epoch, in full training steps of the U-Net (assumptions
#: from what each stage runs): pretrain / base train every layer; finetune runs the forward and
#: back-propagates only into the last conv (~ a forward, 1/3 of a step); MC-Decoder and
#: MC-Center freeze the layers before their first dropout and retrain the rest (~ 2/3); the
#: logit-based methods never run the U-Net (a 1x1 / k x k conv on float16 logit slices: 1 %).
TRAIN_COST = {"pretrain": 1.0, "base": 1.0, "finetune": 1 / 3, "mc_decoder": 2 / 3,
              "mc_center": 2 / 3, "platt": 0.01, "auxiliary": 0.01, "temperature": 0.01}
#: A forward pass (validation, evaluation, export) in training steps: forward ~ 1/3 of
#: forward + backward + update.
INFERENCE_COST = 1 / 3
#: MC samples of the evaluation when the method has them and the grid does not say.
DEFAULT_MC_SAMPLES = 20
#: Expected epochs run / max_epochs under early stopping (6 epochs without improvement), and the
#: half-width of the uniform spread around it. An assumption (the paper reports no epoch counts);
#: ``--epoch-fraction`` changes it.
EPOCH_FRACTION = 0.5
EPOCH_SPREAD = 0.3


def split_sizes(n_subjects: int, n_folds: int = 5, val_fraction: float = 0.2) -> dict[str, int]:
    """Subjects per split of one fold under the honest protocol (calib.stages.make_split)."""
    test = n_subjects // n_folds
    pool = n_subjects - test
    val = max(1, round(val_fraction * pool))
    return {"train": pool - val, "val": val, "test": test, "all": n_subjects}


def read_throughput(path: Path) -> dict:
    """The JSON object on the last line of a ``bench/unet.py --json`` output file."""
    path = Path(path)
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        data = json.loads(lines[-1])
    except (OSError, IndexError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a `bench/unet.py --json` output ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("train_voxels_per_s"), (int, float)):
        raise ValueError(f"{path}: its last line has no train_voxels_per_s (write it with "
                         "`python bench/unet.py --json > FILE`)")
    return data


@dataclass(frozen=True)
class CostModel:
    """Durations of trials from per-epoch seconds.

    ``train_voxels_per_s``: training-step throughput per dataset; ``source`` says where it came
    from. ``subjects`` per dataset (default: the paper's).
    """

    train_voxels_per_s: Mapping[str, float]
    source: str
    subjects: Mapping[str, int] = field(default_factory=lambda: dict(PAPER_SUBJECTS))
    epoch_fraction: float = EPOCH_FRACTION
    epoch_spread: float = EPOCH_SPREAD

    @classmethod
    def from_files(cls, paths: Sequence[Path] = (), **kw) -> "CostModel":
        """From ``bench/unet.py --json`` files (one per dataset at most), else the defaults."""
        rates, sources = {}, []
        for p in paths:
            data = read_throughput(p)
            ds = data.get("dataset", "brats18")
            rates[ds] = float(data["train_voxels_per_s"])
            sources.append(f"{p} ({ds}, {data.get('device', 'unknown device')}, "
                           f"{data.get('precision', '')})")
        if not rates:
            rates = dict(DEFAULT_TRAIN_VOXELS_PER_S)
            sources.append("defaults (no throughput file; DEFAULT_TRAIN_VOXELS_PER_S is an assumption)")
        if "isles18" not in rates:
            rates["isles18"] = rates["brats18"] * ISLES_SPEEDUP
        if "brats18" not in rates:
            rates["brats18"] = rates["isles18"] / ISLES_SPEEDUP
        return cls(rates, "; ".join(sources), **kw)

    def step_seconds_per_volume(self, dataset: str) -> float:
        """Seconds of one training step's work per volume (forward + backward + update)."""
        return VOLUME_VOXELS / self.train_voxels_per_s[dataset]

    def epoch_seconds(self, dataset: str, method: str, n_folds: int = 5, val_fraction: float = 0.2) -> float:
        """Seconds of one epoch: train the train split, validate the val split."""
        n = split_sizes(self.subjects[dataset], n_folds, val_fraction)
        cost = TRAIN_COST.get(method, 1.0) * n["train"] + INFERENCE_COST * n["val"]
        if method in ("platt", "auxiliary", "temperature"):
            cost = TRAIN_COST[method] * (n["train"] + n["val"])
        return cost * self.step_seconds_per_volume(dataset)

    def fixed_seconds(self, dataset: str, method: str, samples: int = 1, n_folds: int = 5,
                      val_fraction: float = 0.2) -> float:
        """Seconds outside the epochs: evaluation of the test split (``samples`` forwards per
        subject for MC methods), plus the base stage's logit export of every subject."""
        n = split_sizes(self.subjects[dataset], n_folds, val_fraction)
        forwards = n["test"] * max(1, samples)
        if method == "base":
            forwards += n["all"]
        return forwards * INFERENCE_COST * self.step_seconds_per_volume(dataset)

    def epochs(self, max_epochs: int, min_epochs: int, rng: random.Random) -> int:
        """Epochs run, drawn uniformly in ``max_epochs x (fraction +- spread)``, clipped."""
        f = rng.uniform(self.epoch_fraction - self.epoch_spread, self.epoch_fraction + self.epoch_spread)
        return int(min(max_epochs, max(min_epochs, round(f * max_epochs))))

    def tasks(self, plan, seed: int = 0) -> list[Task]:
        """One :class:`Task` per trial of a ``sweeps.plan.Plan`` (durations drawn with ``seed``)."""
        grid = plan.grid
        out = []
        for t in plan.trials:
            train = grid.training[t.stage]
            max_epochs = int(train["max_epochs"])
            min_epochs = min(max_epochs, int(train.get("early_stop_patience", 0)) + 1)
            rng = random.Random(f"{seed}:{t.key}")
            epochs = self.epochs(max_epochs, min_epochs, rng)
            samples = int(t.params.get("n_samples", DEFAULT_MC_SAMPLES)) if t.method.startswith("mc_") else 1
            nf, vf = grid.folds.n_folds, grid.val_fraction
            method = t.stage if t.stage != "calibrate" else t.method
            seconds = (epochs * self.epoch_seconds(t.dataset, method, nf, vf)
                       + self.fixed_seconds(t.dataset, method, samples, nf, vf))
            out.append(Task(t.key, seconds, t.resources.gpu, t.resources.cpu, t.upstream, t.wave,
                            t.stage, t.label, epochs))
        return out
