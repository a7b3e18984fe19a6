"""A plan on paper: list schedules of trials with known durations on N GPUs, two policies.

Pure Python (no Ray): ``bench/schedule.py`` and the launch's estimate use it before anything
runs; the durations come from :class:`sweeps.cost.CostModel`. :func:`simulate` places the
trials on ``gpus`` devices, each trial holding its ``resources.gpu`` share (1, 0.5, 0.25 in the
paper grid) of *one* device (best fit, as Ray packs fractional GPUs), under

* ``"waves"``: a wave (``TrialSpec.wave``, the dependency depth) starts when every trial of the
  one before has ended -- one Tuner per wave, how the sweep ran before its dependency graph --,
  plan order inside a wave (Tune's FIFO);
* ``"graph"``: a trial starts as soon as its upstream has ended and resources allow,
  longest-path-first.

Assumption: a trial's duration does not depend on what shares its GPU (the ``resources:``
fractions are meant to be sized so), which is also how GPU-hours are counted (duration x share).
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

POLICIES = ("waves", "graph")
EPS = 1e-9


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
