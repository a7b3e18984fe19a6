"""What a grid will cost before it is launched: GPU-hours and wall time per stage, with the
assumptions behind them.

``python sweeps/launch.py --grid paper --dry-run --estimate --gpus 8 --device h100`` (or
``--throughput FILE``, a measured ``bench/unet.py --json``). Each trial's seconds come from
:class:`sweeps.cost.model.CostModel` (counted FLOPs / the device's effective FLOP/s, early
stopping at its expected epoch); the wall time packs the trials on ``--gpus`` devices by the
grid's ``resources:`` (fractional GPUs share a device) with the list scheduler of
:mod:`sweeps.cost.schedule`, as the graph scheduler runs them.
"""

from __future__ import annotations

import math
from collections import defaultdict

from calib.vocabulary import STAGES
from sweeps.cost.flops import net_flops
from sweeps.cost.model import LOGIT_FLOPS_PER_VOXEL, CostModel
from sweeps.cost.schedule import Task, simulate


def _share(t) -> float:
    """A trial's share of one device: its ``resources.gpu``, a whole device when it asks none."""
    return t.resources.gpu or 1.0


def makespan(plan, seconds: dict[str, float], gpus: int) -> float:
    """Wall seconds of ``plan`` on ``gpus`` devices when trial ``k`` takes ``seconds[k]``."""
    return _schedule(plan, seconds, gpus).makespan


def _schedule(plan, seconds, gpus):
    tasks = [Task(t.key, seconds[t.key], _share(t), 0.0, t.upstream, t.wave, t.stage, t.label)
             for t in plan.trials]
    return simulate(tasks, gpus, "graph")


def estimate(plan, cost: CostModel, gpus: int = 1) -> dict:
    """Per stage: trials, GPU-hours (device time x GPU share), device-hours, and when the stage
    runs in the packed schedule (first start, last end, hours); the totals and the inputs."""
    seconds = {t.key: cost.trial_seconds(t, plan) for t in plan.trials}
    schedule = _schedule(plan, seconds, gpus)
    per_stage: dict[str, dict] = defaultdict(lambda: {"trials": 0, "gpu_hours": 0.0, "hours": 0.0,
                                                      "start_hours": math.inf, "end_hours": 0.0})
    for t in plan.trials:
        row = per_stage[t.stage]
        row["trials"] += 1
        row["hours"] += seconds[t.key] / 3600
        row["gpu_hours"] += seconds[t.key] * _share(t) / 3600
        row["start_hours"] = min(row["start_hours"], schedule.start[t.key] / 3600)
        row["end_hours"] = max(row["end_hours"], schedule.end[t.key] / 3600)
    shape = tuple(plan.grid.preprocessing.shape)
    nets = {t.dataset: t.net for t in plan.trials if t.net is not None}  # one network per dataset
    flops = {d: {"forward": f.forward, "train_step": f.train_step}
             for d, f in ((d, net_flops(net, shape)) for d, net in nets.items())}
    return {"stages": {s: dict(per_stage[s]) for s in STAGES if s in per_stage},
            "gpu_hours": sum(r["gpu_hours"] for r in per_stage.values()),
            "wall_hours": schedule.makespan / 3600, "gpus": gpus, "source": cost.source,
            "flops_per_s": {d.name: cost.rate(d.name) for d in plan.grid.datasets},
            "flops_per_volume": flops, "shape": list(shape), "subjects": cost.subjects_of(plan),
            "epoch_fraction": cost.epoch_fraction}


def estimate_text(result: dict) -> str:
    """The dry run's estimate: a table per stage, then every assumption it rests on."""
    gpus = result["gpus"]
    lines = [f"estimate on {gpus} GPU(s)",
             f"{'stage':10s} {'trials':>6s} {'GPU-hours':>10s} {'device-hours':>13s} "
             f"{'runs from':>10s} {'to':>8s} {'wall':>8s}"]
    for stage, row in result["stages"].items():
        wall = row["end_hours"] - row["start_hours"]
        lines.append(f"{stage:10s} {row['trials']:6d} {row['gpu_hours']:10.2f} {row['hours']:13.2f} "
                     f"{row['start_hours']:8.2f} h {row['end_hours']:6.2f} h {wall:6.2f} h")
    lines.append(f"{'total':10s} {sum(r['trials'] for r in result['stages'].values()):6d} "
                 f"{result['gpu_hours']:10.2f}")
    lines.append(f"expected wall time on {gpus} GPU(s): {result['wall_hours']:.2f} h "
                 "(stages overlap: a trial starts when its own upstream has finished)")
    shape = "x".join(str(s) for s in result["shape"])
    lines.append("assumptions:")
    lines.append(f"  device: {result['source']}")
    for d, f in result["flops_per_volume"].items():
        lines.append(f"  {d} net at {shape} (counted, torch FlopCounterMode): forward "
                     f"{f['forward'] / 1e12:.3f} TFLOP, training step {f['train_step'] / 1e12:.3f} "
                     f"TFLOP per volume; effective {result['flops_per_s'][d] / 1e12:.3g} TFLOP/s")
    lines.append("  subjects: " + ", ".join(f"{d} {k}" for d, k in result["subjects"].items())
                 + " (phantom spec, else the dataset as distributed)")
    lines.append(f"  early stopping at {result['epoch_fraction']:.0%} of max_epochs (at least "
                 "patience + 1 epochs); logit-based methods "
                 f"{LOGIT_FLOPS_PER_VOXEL:.1e} FLOP-equivalents per voxel pass")
    lines.append("  a trial's duration does not depend on what shares its GPU; trials without a "
                 "GPU share count as one device")
    return "\n".join(lines)

