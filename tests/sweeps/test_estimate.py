"""The cost estimate before launch (sweeps/cost/): its model and its packing."""

import json

import pytest

from sweeps.grid import load_grid
from sweeps.cost.devices import EstimateError, read_throughput
from sweeps.cost.estimate import estimate, makespan
from sweeps.cost.model import CostModel as Throughput, trial_seconds
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
        read_throughput(bad)


def test_the_dry_run_estimate_prints_each_stage_and_its_assumptions(tmp_path, capsys):
    from sweeps.launch_sweep import LaunchOptions, launch

    opts = LaunchOptions(grid="paper", dry_run=True, estimate=True, gpus=8, device="a100",
                         tracking_uri=f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}")
    assert launch(opts) == 0
    out = capsys.readouterr().out
    text = out[out.index("estimate on 8 GPU(s)"):]
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:5]}
    assert set(rows) == {"pretrain", "base", "calibrate"}
    assert [int(rows[s][1]) for s in ("pretrain", "base", "calibrate")] == [10, 30, 450]
    assert "roofline a100" in text and "assumed utilisation" in text
    assert "brats18 net at 136x136x82" in text and "TFLOP per volume" in text
    assert "early stopping at 50% of max_epochs" in text
    bad = tmp_path / "t.json"
    bad.write_text("{}\n")
    assert launch(LaunchOptions(grid="paper", dry_run=True, estimate=True, throughput=bad,
                                tracking_uri=opts.tracking_uri)) == 2
    assert "t.json: its last line has no train_voxels_per_s" in capsys.readouterr().err
