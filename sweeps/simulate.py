"""A plan on paper: trial durations from a cost model, and two schedules of them on N GPUs.

Pure Python (no Ray): ``bench/schedule.py`` and the launcher's estimate use it before anything
runs. Two parts:

* :class:`CostModel` -- seconds per epoch for each dataset x stage/method and the fixed seconds
  of a trial (evaluation, logit export), either from the training-step throughput that
  ``bench/unet.py --json`` measured on the target device or from documented defaults; a trial's
  epochs are drawn around ``epoch_fraction`` x its ``max_epochs`` (early stopping).
* :func:`simulate` -- list scheduling of the trials on ``gpus`` devices, each trial holding its
  ``resources.gpu`` share (1, 0.5, 0.25 in the paper grid) of *one* device (best fit, as Ray
  packs fractional GPUs), under ``"waves"`` (a wave starts when every trial of the one before
  has ended -- sweeps/execute.py's Tuner per wave; plan order inside a wave, Tune's FIFO) or
  ``"graph"`` (a trial starts as soon as its upstream has ended and resources allow,
  longest-path-first).

Assumption: a trial's duration does not depend on what shares its GPU (the ``resources:``
fractions are meant to be sized so), which is also how GPU-hours are counted (duration x share).
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

POLICIES = ("waves", "graph")
EPS = 1e-9

# ---- the cost model ------------------------------------------------------------------------------

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

    def tasks(self, plan, seed: int = 0) -> list["Task"]:
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


# ---- the schedule --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """One trial to place: ``duration`` seconds holding ``gpu`` of one device and ``cpu`` CPUs."""

    key: str
    duration: float
    gpu: float = 0.0
    cpu: float = 0.0
    upstream: str | None = None
    wave: int = 0
    stage: str = ""
    label: str = ""
    epochs: int = 0


@dataclass(frozen=True)
class Schedule:
    """Start and end second of every task under one policy on ``gpus`` devices."""

    policy: str
    gpus: int
    tasks: Mapping[str, Task]
    start: Mapping[str, float]
    end: Mapping[str, float]
    device: Mapping[str, int | None]
    critical_path: float
    bound: float

    @property
    def makespan(self) -> float:
        return max(self.end.values(), default=0.0)

    @property
    def gpu_seconds(self) -> float:
        return sum(t.duration * t.gpu for t in self.tasks.values())

    @property
    def utilisation(self) -> float:
        """GPU work / (makespan x GPUs): the busy fraction of the devices."""
        return self.gpu_seconds / (self.makespan * self.gpus) if self.makespan and self.gpus else 0.0

    @property
    def makespan_vs_critical_path(self) -> float:
        """makespan / max(critical path, work / capacity); 1.0 is the physical limit."""
        return self.makespan / self.bound if self.bound else 1.0

    def by_stage(self) -> dict[str, dict[str, float]]:
        """Per stage: trials, GPU-hours, first start and last end (seconds)."""
        out: dict[str, dict[str, float]] = {}
        for k, t in self.tasks.items():
            s = out.setdefault(t.stage, {"trials": 0, "gpu_hours": 0.0, "start": math.inf, "end": 0.0})
            s["trials"] += 1
            s["gpu_hours"] += t.duration * t.gpu / 3600
            s["start"] = min(s["start"], self.start[k])
            s["end"] = max(s["end"], self.end[k])
        return out


def _check(tasks: Sequence[Task], gpus: int, cpus: float | None) -> dict[str, Task]:
    by_key = {t.key: t for t in tasks}
    if len(by_key) != len(tasks):
        raise ValueError("two tasks share a key")
    for t in tasks:
        if t.upstream is not None and t.upstream not in by_key:
            raise ValueError(f"task {t.label or t.key}: upstream {t.upstream} is not in the plan")
        if t.duration < 0 or not math.isfinite(t.duration):
            raise ValueError(f"task {t.label or t.key}: duration {t.duration} is not a finite number >= 0")
        if t.gpu > 1 + EPS:
            raise ValueError(f"task {t.label or t.key}: gpu {t.gpu:g}; the simulator places a trial "
                             "on one device (gpu <= 1)")
        if t.gpu > EPS and gpus < 1:
            raise ValueError(f"task {t.label or t.key} needs a GPU and none is simulated")
        if cpus is not None and t.cpu > cpus + EPS:
            raise ValueError(f"task {t.label or t.key}: cpu {t.cpu:g} exceeds the {cpus:g} CPUs")
    return by_key


def _tail_lengths(by_key: Mapping[str, Task]) -> dict[str, float]:
    """Longest path from each task to the end of the plan, its own duration included."""
    children: dict[str, list[str]] = defaultdict(list)
    for t in by_key.values():
        if t.upstream is not None:
            children[t.upstream].append(t.key)
    tail: dict[str, float] = {}

    def visit(k: str) -> float:  # iterative depth-first (a plan is a forest of short chains)
        stack = [k]
        while stack:
            cur = stack[-1]
            todo = [c for c in children[cur] if c not in tail]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            tail[cur] = by_key[cur].duration + max((tail[c] for c in children[cur]), default=0.0)
        return tail[k]

    for k in by_key:
        if k not in tail:
            visit(k)
    return tail


def critical_path(tasks: Iterable[Task]) -> float:
    """Length in seconds of the longest chain of upstream -> downstream durations."""
    by_key = {t.key: t for t in tasks}
    return max(_tail_lengths(by_key).values(), default=0.0)


def simulate(tasks: Sequence[Task], gpus: int, policy: str = "graph", cpus: float | None = None) -> Schedule:
    """Place ``tasks`` on ``gpus`` devices (and a pool of ``cpus``, None: unlimited) in time.

    Greedy list scheduling: whenever a task ends, every ready task that fits starts, in priority
    order (``graph``: longest remaining path first; ``waves``: plan order) -- a task that does
    not fit does not hold back a later one that does. A task of gpu share ``g`` goes to the
    device with the least free share that still holds ``g``. Raises ValueError for an unknown
    policy or a task that can never fit.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}: choose one of {', '.join(POLICIES)}")
    by_key = _check(tasks, gpus, cpus)
    tail = _tail_lengths(by_key)
    order = {t.key: i for i, t in enumerate(tasks)}
    if policy == "graph":
        rank = {k: (-tail[k], order[k]) for k in by_key}
    else:
        rank = {k: (order[k],) for k in by_key}
    children: dict[str, list[str]] = defaultdict(list)
    for t in tasks:
        if t.upstream is not None:
            children[t.upstream].append(t.key)
    waves = sorted({t.wave for t in tasks})
    by_wave = {w: [t.key for t in tasks if t.wave == w] for w in waves}
    left_in_wave = {w: len(ks) for w, ks in by_wave.items()}

    free = [1.0] * gpus
    free_cpu = math.inf if cpus is None else float(cpus)
    start, end, device = {}, {}, {}
    done: set[str] = set()
    ready: list[tuple] = []
    running: list[tuple[float, int, str]] = []
    now, wave_i = 0.0, 0

    def release(keys):
        for k in keys:
            if by_key[k].upstream is None or by_key[k].upstream in done:
                heapq.heappush(ready, (rank[k], k))

    if policy == "graph":
        release([t.key for t in tasks if t.upstream is None])
    elif waves:
        release(by_wave[waves[0]])
    seq = 0
    while len(done) < len(by_key):
        blocked = []
        while ready:
            item = heapq.heappop(ready)
            t = by_key[item[1]]
            fits = [d for d in range(gpus) if free[d] >= t.gpu - EPS] if t.gpu > EPS else [None]
            if not fits or t.cpu > free_cpu + EPS:
                blocked.append(item)
                continue
            d = min(fits, key=lambda i: (free[i], i)) if t.gpu > EPS else None
            if d is not None:
                free[d] -= t.gpu
            free_cpu -= t.cpu
            start[t.key], device[t.key] = now, d
            seq += 1
            heapq.heappush(running, (now + t.duration, seq, t.key))
        for item in blocked:
            heapq.heappush(ready, item)
        if not running:
            raise ValueError("no task can start: "
                             + ", ".join(by_key[k].label or k for _, k in ready[:3]))
        now, _, k = heapq.heappop(running)
        finished = [k]
        while running and running[0][0] <= now + EPS:
            finished.append(heapq.heappop(running)[2])
        for k in finished:
            t = by_key[k]
            end[k] = now
            done.add(k)
            if device[k] is not None:
                free[device[k]] += t.gpu
            free_cpu += t.cpu
            if policy == "graph":
                release(children[k])
            else:
                left_in_wave[t.wave] -= 1
        if policy == "waves":
            while wave_i < len(waves) and left_in_wave[waves[wave_i]] == 0:
                wave_i += 1
                if wave_i < len(waves):
                    release(by_wave[waves[wave_i]])
    cp = max(tail.values(), default=0.0)
    work_gpu = sum(t.duration * t.gpu for t in tasks) / gpus if gpus else 0.0
    work_cpu = sum(t.duration * t.cpu for t in tasks) / cpus if cpus else 0.0
    return Schedule(policy, gpus, by_key, start, end, device, cp, max(cp, work_gpu, work_cpu))
