"""The paper plan on paper: makespan on 1, 4, 8 and 32 GPUs, waves vs a dependency-graph scheduler.

Builds the paper plan with the real planner (``sweeps.grid.load_grid("paper")`` and
``sweeps.plan.expand``: 490 trials, the paper's 310 and the methods beyond it), draws each trial's
duration from ``sweeps.cost.model.CostModel`` (counted FLOPs per trial over the effective FLOP/s
of ``--throughput FILE`` -- written by ``python bench/unet.py --json`` on the target device, one
per dataset at most -- else of the ``--device`` roofline; epochs around ``--epoch-fraction`` x
each trial's ``max_epochs``), and simulates, with the fractional GPU shares of the grid's
``resources:``,

* ``waves``: every trial of a dependency wave ends before the next wave starts (one Tuner per
  wave, what sweeps/execute.py did), Tune's FIFO order inside a wave;
* ``graph``: a trial starts as soon as its upstream has ended and resources allow,
  longest-path-first.

Figures per GPU count and policy: makespan, utilisation (GPU work / (makespan x GPUs)) and
``makespan_vs_critical_path`` = makespan / max(critical path, GPU work / GPUs) -- 1.0 is the
physical limit; target for ``graph`` on 8 GPUs: <= 1.15. ``--json``: the last line is one JSON
object.

    python bench/schedule.py [--json] [--device h100] [--throughput FILE ...] [--gpus 1 4 8 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import json_tail  # noqa: E402
from sweeps.grid import load_grid  # noqa: E402
from sweeps.cost.devices import DEFAULT_DEVICE, DEVICES  # noqa: E402
from sweeps.cost.model import EPOCH_FRACTION, EPOCH_SPREAD, CostModel  # noqa: E402
from sweeps.cost.schedule import POLICIES, simulate  # noqa: E402
from sweeps.plan import expand  # noqa: E402


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:7.2f} h"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--grid", default="paper", help="grid name or YAML path (default: paper)")
    ap.add_argument("--throughput", type=Path, nargs="+", default=[], metavar="FILE",
                    help="bench/unet.py --json output(s) of the target device (override --device)")
    ap.add_argument("--device", choices=tuple(DEVICES), default=DEFAULT_DEVICE,
                    help=f"roofline without a throughput file (default {DEFAULT_DEVICE})")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 4, 8, 32])
    ap.add_argument("--cpus-per-gpu", type=float, help="CPUs per GPU (default: CPUs never limit)")
    ap.add_argument("--epoch-fraction", type=float, default=EPOCH_FRACTION,
                    help=f"expected epochs run / max_epochs under early stopping (default {EPOCH_FRACTION})")
    ap.add_argument("--epoch-spread", type=float, default=EPOCH_SPREAD,
                    help=f"half-width of the uniform draw around it (default {EPOCH_SPREAD})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the drawn epoch counts")
    args = ap.parse_args(argv)
    if min(args.gpus) < 1:
        ap.error("--gpus must be positive")
    if not 0 < args.epoch_fraction <= 1 or args.epoch_spread < 0:
        ap.error("--epoch-fraction must be in (0, 1] and --epoch-spread >= 0")
    try:
        cost = CostModel.from_files(args.throughput, device=args.device, epoch_fraction=args.epoch_fraction,
                                    epoch_spread=args.epoch_spread)
    except ValueError as exc:
        ap.error(str(exc))

    t0 = time.perf_counter()
    plan = expand(load_grid(args.grid, require_data=False))
    tasks = cost.tasks(plan, seed=args.seed)
    plan_s = time.perf_counter() - t0
    results = []
    for gpus in args.gpus:
        for policy in POLICIES:
            cpus = args.cpus_per_gpu * gpus if args.cpus_per_gpu else None
            s = simulate(tasks, gpus, policy, cpus=cpus)
            results.append({"gpus": gpus, "policy": policy, "makespan_s": s.makespan,
                            "utilisation": s.utilisation, "critical_path_s": s.critical_path,
                            "bound_s": s.bound, "makespan_vs_critical_path": s.makespan_vs_critical_path,
                            "stages": s.by_stage()})
    by = {(r["gpus"], r["policy"]): r for r in results}
    gpu_hours = results[0]["stages"]
    summary = {
        "grid": plan.grid.name, "trials": len(tasks), "cost_source": cost.source,
        "train_voxels_per_s": dict(cost.train_voxels_per_s),
        "flops_per_s": dict(cost.flops_per_s), "epoch_fraction": cost.epoch_fraction,
        "epoch_spread": cost.epoch_spread, "seed": args.seed, "cpus_per_gpu": args.cpus_per_gpu,
        "gpu_hours": sum(s["gpu_hours"] for s in gpu_hours.values()),
        "gpu_hours_by_stage": {k: v["gpu_hours"] for k, v in gpu_hours.items()},
        "results": results,
    }
    for gpus in args.gpus:
        g, w = by[(gpus, "graph")], by[(gpus, "waves")]
        summary[f"graph_{gpus}gpu_makespan_vs_critical_path"] = g["makespan_vs_critical_path"]
        summary[f"waves_{gpus}gpu_makespan_vs_critical_path"] = w["makespan_vs_critical_path"]
        summary[f"graph_vs_waves_speedup_{gpus}gpu"] = w["makespan_s"] / g["makespan_s"]

    print(f"{plan.grid.name} plan: {len(tasks)} trials, {summary['gpu_hours']:.1f} GPU-hours "
          f"({', '.join(f'{k} {v:.1f}' for k, v in summary['gpu_hours_by_stage'].items())}); "
          f"planned in {plan_s:.1f} s")
    print(f"  cost: {cost.source}")
    print(f"  epochs: {cost.epoch_fraction:g} +- {cost.epoch_spread:g} of max_epochs, seed {args.seed}")
    print(f"  {'GPUs':>4} {'policy':6} {'makespan':>10} {'critical path':>14} {'bound':>10} "
          f"{'utilisation':>11} {'vs bound':>8}")
    for r in results:
        print(f"  {r['gpus']:4d} {r['policy']:6} {_hours(r['makespan_s']):>10} {_hours(r['critical_path_s']):>14} "
              f"{_hours(r['bound_s']):>10} {r['utilisation']:11.1%} {r['makespan_vs_critical_path']:8.3f}")
    print("  graph vs waves: " + ", ".join(
        f"{g} GPUs x{summary[f'graph_vs_waves_speedup_{g}gpu']:.2f}" for g in args.gpus))
    json_tail(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
