"""What a grid will cost before it is launched: GPU-hours and wall time per stage.

``python sweeps/launch.py --grid paper --dry-run --estimate [--gpus N] [--throughput FILE]``.

The cost model, per trial (V = voxels of one preprocessed volume, T = the U-Net's training
throughput in voxels/s on the target device, measured, never assumed):

* an epoch of a U-Net stage (pretrain, base, MC retraining) trains on its split's volumes at T
  and validates on ``val`` at 3 T (a forward pass costs about a third of forward + backward);
* fine-tuning trains the last layer only: every volume is a forward pass (3 T);
* logit-based calibrators never run the U-Net: an epoch reads the cached logits at 300 T;
* a stage runs ``max_epochs x EXPECTED_EPOCH_FRACTION`` epochs (early stopping), at least one;
* each trial then scores its test fold (forward passes; MC: ``n_samples`` of them) and a base
  model exports the logits of every subject of its fold.

Throughput comes from ``--throughput FILE`` (the JSON line ``bench/unet.py --json`` writes on the
target device; its ``train_voxels_per_s`` is the BraTS net's) or, without one, from two timed steps
of each dataset's network measured here, on this machine's CPU: the printout says which. With a
file, the ISLES net (half the features) is scaled from its BraTS figure by the two nets' speed
ratio measured here. Wall time packs trials on ``--gpus`` devices by the grid's ``resources:`` (fractional
GPUs share a device) with sweeps.simulate's list scheduler, as the graph scheduler runs them.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from calib.vocabulary import STAGES
from sweeps.plan import Plan, TrialSpec

#: Fraction of ``max_epochs`` a stage is expected to run before early stopping stops it: the
#: paper's schedule (patience 6, plateau x0.1 after 3) typically stops mid-way. A planning
#: figure, not a measurement: the README says so.
EXPECTED_EPOCH_FRACTION = 0.5
#: Real dataset sizes (training sets as distributed) when no cache or phantom spec says more.
DATASET_SUBJECTS = {"brats18": 285, "isles18": 94}
FORWARD_SPEEDUP = 3.0  # forward only vs forward + backward + optimizer step
LOGIT_SPEEDUP = 300.0  # a calibrator epoch on cached logits vs a U-Net training pass


class EstimateError(ValueError):
    """A throughput file that cannot be used; the message names it."""


@dataclass(frozen=True)
class Throughput:
    """Training voxels/s of each dataset's network, and where the figures come from."""

    voxels_per_s: dict[str, float]
    source: str


def read_throughput(path: Path, plan: Plan) -> Throughput:
    """The last JSON line of ``bench/unet.py --json`` output in ``path`` (the BraTS net on the
    target device); other datasets' nets are scaled by their speed relative to it, measured here."""
    path = Path(path)
    try:
        line = [ln for ln in path.read_text().splitlines() if ln.strip().startswith("{")][-1]
        data = json.loads(line)
        brats = float(data["train_voxels_per_s"])
    except (OSError, IndexError, ValueError, KeyError) as exc:
        raise EstimateError(f"throughput file {path}: expected the JSON line of bench/unet.py "
                            f"--json with train_voxels_per_s ({exc})") from None
    here = measure_throughput(plan).voxels_per_s
    ref = here.get("brats18")
    vps = {d: brats * (v / ref if ref else 1.0) for d, v in here.items()}
    return Throughput(vps, f"{path} ({data.get('device', 'device not named')}; other nets scaled by "
                           "their speed relative to the BraTS net measured here)")


def measure_throughput(plan: Plan, shape=(54, 54, 54), steps: int = 1) -> Throughput:
    """Time ``steps`` training steps (after one warm-up) of each dataset's network on this CPU."""
    import torch

    from calib.losses import LOSSES
    from calib.nets import UNet3D
    from sweeps.plan import net_config

    vps = {}
    for ds in plan.grid.datasets:
        cfg = net_config(plan.grid, ds.name)
        torch.manual_seed(0)
        net = UNet3D(cfg)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        x = torch.randn(1, cfg.in_channels, *shape)
        y = (torch.rand(1, 1, *shape) > 0.9).float()
        m = torch.ones(1, 1, *shape, dtype=torch.bool)

        def step():
            opt.zero_grad()
            LOSSES["ce"](net(x, mask=m), y, m).backward()
            opt.step()

        step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        vps[ds.name] = steps * math.prod(shape) / (time.perf_counter() - start)
    return Throughput(vps, f"measured now on this machine's CPU ({torch.get_num_threads()} "
                           f"thread(s), {shape[0]}x{shape[1]}x{shape[2]} crop)")


def subjects_of(plan: Plan) -> dict[str, int]:
    """Subjects per dataset: the phantom spec's, else the real dataset's size."""
    return {d.name: d.phantom.subjects if d.phantom else DATASET_SUBJECTS.get(d.name, 100)
            for d in plan.grid.datasets}


def split_sizes(grid, n: int) -> dict[str, float]:
    """Expected subjects per split of one fold (calib.stages.make_split's rule)."""
    test = n / grid.folds.n_folds
    pool = n - test
    if grid.protocol == "paper":
        return {"train": pool, "val": test, "calib": pool, "test": test, "all": n}
    val = max(1, round(grid.val_fraction * pool))
    calib = max(1, round(grid.calib_fraction * pool)) if grid.protocol == "honest" else pool - val
    train = pool - val - (calib if grid.protocol == "honest" else 0)
    return {"train": train, "val": val, "calib": calib, "test": test, "all": n}


def trial_seconds(t: TrialSpec, plan: Plan, vps: float, n_subjects: int) -> float:
    """Expected seconds of one trial on a device training at ``vps`` voxels/s (module doc)."""
    from calib.methods import get_method

    grid = plan.grid
    voxels = math.prod(grid.preprocessing.shape)
    sizes = split_sizes(grid, n_subjects)
    epochs = max(1.0, t.config["train"]["max_epochs"] * EXPECTED_EPOCH_FRACTION)
    if t.stage == "calibrate" and "max_epochs" in t.config["params"]:
        epochs = max(1.0, float(t.config["params"]["max_epochs"]) * EXPECTED_EPOCH_FRACTION)
    forward = voxels / (vps * FORWARD_SPEEDUP)
    if t.stage in ("pretrain", "base"):
        per_epoch = sizes["train"] * voxels / vps + sizes["val"] * forward
        tail = sizes["test"] * forward + (sizes["all"] * forward if t.stage == "base" else 0.0)
        return epochs * per_epoch + tail
    method = get_method(t.method)
    if method.uses == "logits":
        return epochs * (sizes["calib"] + sizes["val"]) * voxels / (vps * LOGIT_SPEEDUP) + \
            sizes["test"] * voxels / (vps * LOGIT_SPEEDUP)
    samples = float(t.config["params"].get("n_samples", 1) or 1)
    fit = sizes[method.fit_split]
    if method.has_lr:  # MC retraining: the layers after the first dropout site train
        per_epoch = fit * voxels / vps + sizes["val"] * forward
    else:  # fine-tuning: forward passes, the last layer's backward is negligible
        per_epoch = (fit + sizes["val"]) * forward
    return epochs * per_epoch + sizes["test"] * forward * samples


def makespan(plan: Plan, seconds: dict[str, float], gpus: int) -> float:
    """Wall seconds on ``gpus`` devices as the graph scheduler runs the plan (sweeps.simulate):
    each trial takes its ``resources.gpu`` share of one device (a whole device when it asks for
    none)."""
    from sweeps.simulate import Task, simulate

    tasks = [Task(t.key, seconds[t.key], t.resources.gpu or 1.0, 0.0, t.upstream, t.wave, t.stage, t.label)
             for t in plan.trials]
    return simulate(tasks, gpus, "graph").makespan


def estimate(plan: Plan, throughput: Throughput, gpus: int = 1) -> dict:
    """Per stage: trials, GPU-hours (device time x GPU share) and the expected wall time."""
    n = subjects_of(plan)
    seconds = {t.key: trial_seconds(t, plan, throughput.voxels_per_s[t.dataset], n[t.dataset])
               for t in plan.trials}
    per_stage: dict[str, dict] = defaultdict(lambda: {"trials": 0, "gpu_hours": 0.0, "hours": 0.0})
    for t in plan.trials:
        row = per_stage[t.stage]
        row["trials"] += 1
        row["hours"] += seconds[t.key] / 3600
        row["gpu_hours"] += seconds[t.key] * (t.resources.gpu or 1.0) / 3600
    return {"stages": {s: dict(per_stage[s]) for s in STAGES if s in per_stage},
            "gpu_hours": sum(r["gpu_hours"] for r in per_stage.values()),
            "wall_hours": makespan(plan, seconds, gpus) / 3600, "gpus": gpus,
            "throughput": throughput.voxels_per_s, "source": throughput.source,
            "subjects": n}


def estimate_text(result: dict) -> str:
    """The dry run's estimate table."""
    lines = [f"estimate ({result['gpus']} GPU(s); throughput {result['source']}: "
             + ", ".join(f"{d} {v:,.0f} voxels/s" for d, v in result["throughput"].items())
             + "; subjects " + ", ".join(f"{d} {k}" for d, k in result["subjects"].items()) + ")",
             f"{'stage':10s} {'trials':>6s} {'GPU-hours':>10s} {'device-hours':>13s}"]
    for stage, row in result["stages"].items():
        lines.append(f"{stage:10s} {row['trials']:6d} {row['gpu_hours']:10.2f} {row['hours']:13.2f}")
    lines.append(f"{'total':10s} {sum(r['trials'] for r in result['stages'].values()):6d} "
                 f"{result['gpu_hours']:10.2f}")
    lines.append(f"expected wall time on {result['gpus']} GPU(s): {result['wall_hours']:.2f} h "
                 f"(early stopping assumed at {EXPECTED_EPOCH_FRACTION:.0%} of max_epochs; "
                 "trials without a GPU share count as one device)")
    return "\n".join(lines)
