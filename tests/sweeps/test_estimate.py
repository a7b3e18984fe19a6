"""The cost estimate before launch (sweeps/estimate.py): its model and its packing."""

import json

import pytest

from sweeps.config import load_grid
from sweeps.estimate import EstimateError, Throughput, estimate, makespan, read_throughput, trial_seconds
from sweeps.plan import expand


@pytest.fixture(scope="module")
def plan():
    return expand(load_grid("paper", require_data=False, env={}))


def test_trial_cost_follows_throughput_and_work(plan):
    base = next(t for t in plan.trials if t.stage == "base" and t.dataset == "brats18")
    platt = next(t for t in plan.trials if t.method == "platt" and t.dataset == "brats18")
    mc = next(t for t in plan.trials if t.method == "mc_decoder" and t.dataset == "brats18")
    slow, fast = (trial_seconds(base, plan, v, 285) for v in (1e5, 2e5))
    assert slow == pytest.approx(2 * fast)  # seconds scale as 1 / throughput
    assert trial_seconds(base, plan, 1e5, 570) > 1.9 * slow  # and with the subjects
    assert trial_seconds(platt, plan, 1e5, 285) < 0.05 * slow  # logits only: no U-Net
    assert trial_seconds(mc, plan, 1e5, 285) > trial_seconds(platt, plan, 1e5, 285)


def test_totals_and_packing(plan):
    tput = Throughput({"brats18": 1e6, "isles18": 4e6}, "test")
    one, eight = estimate(plan, tput, 1), estimate(plan, tput, 8)
    assert one["gpu_hours"] == pytest.approx(eight["gpu_hours"])  # the work does not change
    assert sum(r["trials"] for r in one["stages"].values()) == len(plan.trials) == 490
    device_hours = sum(r["hours"] for r in one["stages"].values())
    assert eight["wall_hours"] < one["wall_hours"] <= device_hours * 1.0001
    assert one["wall_hours"] >= one["gpu_hours"] * 0.999
    # never faster than the work spread evenly, nor than the longest dependency chain
    assert eight["wall_hours"] >= one["gpu_hours"] / 8 * 0.999


def test_a_chain_runs_in_sequence_and_independent_trials_in_parallel(plan):
    pre = next(t for t in plan.trials if t.stage == "pretrain")
    base = next(t for t in plan.trials if t.upstream == pre.key)
    other = next(t for t in plan.trials if t.stage == "pretrain" and t.key != pre.key)
    sub = type(plan)(plan.grid, (pre, base, other))
    seconds = {pre.key: 10.0, base.key: 5.0, other.key: 12.0}
    assert makespan(sub, seconds, 1) == pytest.approx(27.0)
    assert makespan(sub, seconds, 2) == pytest.approx(15.0)  # pre -> base beside other


def test_a_bad_throughput_file_is_named(plan, tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"device": "cuda"}))
    with pytest.raises(EstimateError, match="t.json.*train_voxels_per_s"):
        read_throughput(bad, plan)
