"""The schedule simulator (sweeps/cost/schedule.py) and its cost model (sweeps/cost/model.py): no Ray."""

from __future__ import annotations

import json
import random

import pytest

from sweeps.cost.model import CostModel
from sweeps.cost.schedule import POLICIES, Task, critical_path, simulate


def _chain(durations, gpu=1.0):
    tasks, up = [], None
    for i, d in enumerate(durations):
        tasks.append(Task(f"t{i}", d, gpu, 0, up, i))
        up = tasks[-1].key
    return tasks


@pytest.mark.parametrize("policy", POLICIES)
def test_a_chain_takes_the_sum_of_its_durations(policy):
    tasks = _chain([3.0, 5.5, 1.25, 7.0], gpu=0.25)
    s = simulate(tasks, gpus=4, policy=policy)
    assert s.makespan == pytest.approx(16.75) == critical_path(tasks)
    assert [s.start[t.key] for t in tasks] == pytest.approx([0.0, 3.0, 8.5, 9.75])
    assert s.makespan_vs_critical_path == pytest.approx(1.0)


@pytest.mark.parametrize("policy", POLICIES)
def test_two_independent_trials_run_in_parallel_on_two_slots(policy):
    tasks = [Task("a", 4.0, 1.0), Task("b", 6.0, 1.0)]
    two = simulate(tasks, gpus=2, policy=policy)
    assert two.start == {"a": 0.0, "b": 0.0} and two.makespan == 6.0
    assert two.device["a"] != two.device["b"] and two.utilisation == pytest.approx(10 / 12)
    one = simulate(tasks, gpus=1, policy=policy)
    assert one.makespan == 10.0 and one.utilisation == pytest.approx(1.0)


def test_fractional_packing_fits_four_quarters_on_one_gpu():
    quarters = [Task(f"q{i}", 10.0, 0.25) for i in range(4)]
    s = simulate(quarters, gpus=1)
    assert set(s.start.values()) == {0.0} and set(s.device.values()) == {0} and s.makespan == 10.0
    fifth = simulate(quarters + [Task("q4", 1.0, 0.25)], gpus=1)
    assert fifth.start["q4"] == 10.0  # a fifth quarter waits for a free one
    halves = simulate([Task("h0", 2.0, 0.5), Task("h1", 2.0, 0.5), Task("q", 2.0, 0.25)], gpus=1)
    assert halves.start["q"] == 2.0
    # Best fit: two quarters share one device, so a whole-GPU trial starts at once on the other.
    mixed = simulate([Task("q0", 5.0, 0.25), Task("q1", 5.0, 0.25), Task("w", 5.0, 1.0)], gpus=2)
    assert mixed.device["q0"] == mixed.device["q1"] != mixed.device["w"] and mixed.makespan == 5.0


def test_waves_wait_for_the_whole_wave_and_the_graph_does_not():
    """A base model whose pretraining ended starts at once under the graph scheduler; under waves
    it waits for the slowest pretraining (an unrelated fold)."""
    tasks = [Task("pre0", 1.0, 1.0, wave=0), Task("pre1", 9.0, 1.0, wave=0),
             Task("base0", 3.0, 1.0, upstream="pre0", wave=1)]
    graph, waves = simulate(tasks, 2, "graph"), simulate(tasks, 2, "waves")
    assert graph.start["base0"] == 1.0 and graph.makespan == 9.0
    assert waves.start["base0"] == 9.0 and waves.makespan == 12.0
    assert waves.makespan_vs_critical_path == pytest.approx(12.0 / 9.0)


def _random_plan(seed: int, unit: bool = False) -> tuple[list[Task], int]:
    """A random forest of trials (each has at most one upstream, as in sweeps.plan)."""
    r = random.Random(seed)
    tasks: list[Task] = []
    for i in range(r.randint(2, 40)):
        up = None if not tasks or r.random() < 0.25 else r.choice(tasks)
        tasks.append(Task(f"t{i}", 1.0 if unit else r.uniform(0.5, 50.0),
                          1.0 if unit else r.choice([1.0, 0.5, 0.25, 0.0]), r.choice([0.0, 1.0, 2.0]),
                          None if up is None else up.key, 0 if up is None else up.wave + 1))
    tasks.sort(key=lambda t: t.wave)  # plan order: by wave
    return tasks, r.randint(1, 5)


@pytest.mark.parametrize("seed", range(40))
def test_random_plans_give_feasible_schedules(seed):
    tasks, gpus = _random_plan(seed)
    cpus = 4.0 if seed % 2 else None
    for policy in POLICIES:
        s = simulate(tasks, gpus, policy, cpus=cpus)
        for t in tasks:
            assert s.end[t.key] == pytest.approx(s.start[t.key] + t.duration)
            if t.upstream:
                assert s.start[t.key] >= s.end[t.upstream] - 1e-9
            if policy == "waves":
                assert all(s.start[t.key] >= s.end[u.key] - 1e-9 for u in tasks if u.wave < t.wave)
        for moment in sorted(set(s.start.values())):  # the load at every start instant
            live = [t for t in tasks if s.start[t.key] <= moment < s.end[t.key]]
            for d in range(gpus):
                assert sum(t.gpu for t in live if s.device[t.key] == d) <= 1.0 + 1e-9
            assert cpus is None or sum(t.cpu for t in live) <= cpus + 1e-9
        assert s.makespan >= s.bound - 1e-9 and s.bound >= critical_path(tasks) - 1e-9


@pytest.mark.parametrize("seed", range(60))
def test_graph_is_never_worse_than_waves_on_random_unit_plans(seed):
    """Unit trials on whole GPUs with out-forest precedence: the critical-path (longest path
    first) list schedule is optimal (Pinedo, Scheduling, 5.1: Pm | p_j = 1, outtree | Cmax), so it
    never loses to the wave schedule, itself a feasible schedule. With arbitrary durations and
    fractional shares greedy list scheduling has Graham's anomalies: the graph scheduler can then
    lose (3 of 2000 random paper-shaped plans, by up to 9 %, when this test was written)."""
    tasks, gpus = _random_plan(seed, unit=True)
    assert simulate(tasks, gpus, "graph").makespan <= simulate(tasks, gpus, "waves").makespan + 1e-9


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="choose one of waves, graph"):
        simulate([Task("a", 1.0)], 1, "fifo")
    with pytest.raises(ValueError, match="gpu 2; the simulator places a trial on one device"):
        simulate([Task("a", 1.0, 2.0, label="base x")], 4)
    with pytest.raises(ValueError, match="needs a GPU and none is simulated"):
        simulate([Task("a", 1.0, 0.5)], 0)
    with pytest.raises(ValueError, match="upstream nope is not in the plan"):
        simulate([Task("a", 1.0, upstream="nope")], 1)


def _unet_json(tmp_path, name, rate, dataset="brats18"):
    path = tmp_path / name
    path.write_text("paper brats18 U-Net ...\n" + json.dumps(
        {"device": "Test GPU", "dataset": dataset, "train_voxels_per_s": rate, "precision": "bf16"}) + "\n")
    return path


def test_cost_model_scales_with_the_measured_throughput(tmp_path):
    slow = CostModel.from_files([_unet_json(tmp_path, "slow.json", 1e6)])
    fast = CostModel.from_files([_unet_json(tmp_path, "fast.json", 4e6)])
    assert "slow.json (brats18, Test GPU" in slow.source
    assert "defaults" in CostModel.from_files().source
    for ds in ("brats18", "isles18"):
        for m in ("pretrain", "base", "finetune", "mc_decoder", "platt"):
            assert slow.epoch_seconds(ds, m) == pytest.approx(4 * fast.epoch_seconds(ds, m))
    # Training every layer costs more than fine-tuning the last one; a logit method far less.
    assert slow.epoch_seconds("brats18", "base") > slow.epoch_seconds("brats18", "mc_decoder") \
        > slow.epoch_seconds("brats18", "finetune") > 10 * slow.epoch_seconds("brats18", "platt")
    assert slow.epoch_seconds("isles18", "base") < slow.epoch_seconds("brats18", "base")  # 94 vs 285
    assert slow.fixed_seconds("brats18", "mc_center", samples=20) > slow.fixed_seconds("brats18", "platt")
    both = CostModel.from_files([_unet_json(tmp_path, "b.json", 1e6),
                                 _unet_json(tmp_path, "i.json", 5e6, "isles18")])
    assert both.train_voxels_per_s == {"brats18": 1e6, "isles18": 5e6}
    bad = tmp_path / "bad.json"
    bad.write_text('{"device": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.json: its last line has no train_voxels_per_s"):
        CostModel.from_files([bad])


def test_epochs_stay_within_the_schedule():
    cm = CostModel.from_files()
    r = random.Random(0)
    drawn = [cm.epochs(100, 7, r) for _ in range(500)]
    assert min(drawn) >= 7 and max(drawn) <= 100
    assert abs(sum(drawn) / len(drawn) - 100 * cm.epoch_fraction) < 5  # mean of a uniform draw
    assert {cm.epochs(5, 5, r) for _ in range(20)} == {5}


def test_tasks_of_a_real_plan(tmp_path):
    from sweeps.grid import load_grid
    from sweeps.plan import expand

    plan = expand(load_grid("demo", require_data=False, cwd=tmp_path))
    cm = CostModel.from_files()
    tasks = cm.tasks(plan)
    assert [t.key for t in tasks] == [t.key for t in plan.trials]
    for task, trial in zip(tasks, plan.trials):
        assert task.upstream == trial.upstream and task.wave == trial.wave
        assert (task.gpu, task.cpu) == (trial.resources.gpu, trial.resources.cpu)
        # a method's own schedule wins over the stage's (the demo's platt runs up to 30 epochs)
        top = trial.config["params"].get("max_epochs", plan.grid.training[trial.stage]["max_epochs"])
        assert task.duration > 0 and 1 <= task.epochs <= top
    assert cm.tasks(plan) == tasks  # durations are drawn from (seed, trial key): repeatable
    assert cm.tasks(plan, seed=1) != tasks
