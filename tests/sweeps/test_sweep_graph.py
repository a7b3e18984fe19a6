"""The dependency-graph scheduler's bookkeeping (sweeps.plan.graph), without Ray: only trials whose
upstream FINISHED are suggested, a failed trial's dependants are skipped, the order follows the
work downstream, and the search ends when every trial was handed out or skipped."""

from __future__ import annotations

import pytest
from ray.tune.search import Searcher

from sweeps.grid import Overrides, load_grid
from sweeps.plan.graph import GraphSearcher, TrialGraph
from sweeps.plan import expand
from sweeps.plan.search import PlanSearcher
from sweeps.plan.graph import UPSTREAM_RUN_CONFIG


@pytest.fixture(scope="module")
def demo():
    return expand(load_grid("demo", require_data=False, env={}))


def _suggest_all(searcher: GraphSearcher) -> list[dict]:
    out = []
    while True:
        s = searcher.suggest(f"t{len(searcher.suggested)}")
        if not isinstance(s, dict):
            return out
        out.append(s)


def _of(plan, **fields):
    return [t for t in plan.trials if all(getattr(t, k) == v for k, v in fields.items())]


def test_only_trials_whose_upstream_finished_are_suggested(demo):
    searcher = GraphSearcher(TrialGraph(list(demo.trials), {}))
    first = _suggest_all(searcher)
    # At the start: every pretraining and every SD base model (no upstream), nothing else.
    assert {(s["spec"]["stage"], s["spec"]["weights"]) for s in first} == {("pretrain", "CE"), ("base", "SD")}
    n_pre, n_sd = len(_of(demo, stage="pretrain")), len(_of(demo, stage="base", weights="SD"))
    assert n_pre and n_sd and len(first) == n_pre + n_sd
    # Pretrainings first: more work waits below them (2 base models and their calibrations).
    assert [s["spec"]["stage"] for s in first[:n_pre]] == ["pretrain"] * n_pre
    assert all(s[UPSTREAM_RUN_CONFIG] is None for s in first)
    assert searcher.suggest("waiting") is None  # the rest wait for an upstream

    # Pretraining of brats18 fold 0 finishes: exactly its two base models become ready, with
    # its run id, while every other pretraining is still running.
    pre = _of(demo, stage="pretrain", dataset="brats18", fold=0)[0]
    released = searcher.graph.finished(pre.key, "run-pre0", 5.0, pre)
    assert sorted(t.weights for t in released) == ["CE", "CE-SD"]
    nxt = _suggest_all(searcher)
    assert sorted(s["spec"]["key"] for s in nxt) == sorted(t.key for t in released)
    assert {s[UPSTREAM_RUN_CONFIG] for s in nxt} == {"run-pre0"}


def test_a_failed_upstream_skips_what_waits_below_it(demo):
    graph = TrialGraph(list(demo.trials), {})
    pre = _of(demo, stage="pretrain", dataset="isles18", fold=0)[0]
    skipped = graph.failed(pre.key)
    below = demo.downstream_of([pre.key])
    per_base = len([t for t in demo.trials if t.upstream == _of(demo, stage="base", dataset="isles18",
                                                                 weights="CE", fold=0)[0].key])
    assert {t.key for t in skipped} == below and len(below) == 2 + 2 * per_base and per_base
    order = [t.key for t in skipped]
    for t in skipped:  # each after its upstream
        if t.upstream in below:
            assert order.index(t.upstream) < order.index(t.key)
    assert graph.failed(pre.key) == []  # already skipped: not twice


def test_finished_before_upstreams_make_trials_ready_and_the_search_ends(demo):
    # An earlier launch finished every base model: only calibrations are left, all ready, each
    # with the run id of its base model.
    bases = {t.key: f"run-{t.key[:6]}" for t in demo.trials if t.stage != "calibrate"}
    todo = [t for t in demo.trials if t.stage == "calibrate"]
    searcher = GraphSearcher(TrialGraph(todo, bases))
    got = _suggest_all(searcher)
    assert len(got) == len(todo) == len(_of(demo, stage="calibrate"))
    assert all(s[UPSTREAM_RUN_CONFIG] == bases[s["spec"]["upstream"]] for s in got)
    assert searcher.suggest("end") == Searcher.FINISHED


def test_longest_kind_first_among_calibrations(demo):
    bases = {t.key: "run" for t in demo.trials if t.stage != "calibrate"}
    todo = [t for t in demo.trials if t.stage == "calibrate" and t.fold == 0 and t.dataset == "brats18"]
    graph = TrialGraph(todo, bases)
    for method, seconds in (("platt", 0.1), ("mc_center", 9.0), ("auxiliary", 0.2)):
        done = [t for t in todo if t.method == method][0]
        graph.take(done.key)
        graph.finished(done.key, "run", seconds, done)
    methods = [specs[0].method for _, specs in graph.ready_entries()]
    assert methods.index("mc_center") < methods.index("auxiliary") < methods.index("platt")
    # Kinds not seen yet count as long: they come before the measured short ones.
    assert methods.index("mc_decoder") < methods.index("platt")


def test_optuna_groups_wait_for_their_base_then_one_sample_at_a_time(tmp_path):
    # the paper grid: its MC searches draw 3 learning rates each, so a second sample can follow
    plan = expand(load_grid("paper", Overrides(search="optuna"), require_data=False, env={}))
    base = _of(plan, stage="base", weights="SD", dataset="brats18", fold=0)[0]
    todo = [base] + [t for t in plan.trials if t.upstream == base.key]
    groups = {t.search_group for t in todo if t.search == "optuna"}
    assert groups  # mc_decoder and mc_center of this base model
    made = []

    def group_searcher(name, specs):
        made.append(name)
        return PlanSearcher(specs, 1e-5, 1e-3, seed=0)

    searcher = GraphSearcher(TrialGraph(todo, {}), group_searcher)
    assert searcher.suggest("b")["spec"]["key"] == base.key
    assert searcher.suggest("x") is None and not made  # the base model has not finished
    searcher.graph.finished(base.key, "run-base", 1.0, base)
    got = _suggest_all(searcher)
    optuna = [s for s in got if s["spec"]["search"] == "optuna"]
    assert sorted(made) == sorted(groups)
    assert len(optuna) == len(groups)  # one sample per search until it reports
    assert all(1e-5 <= s["lr"] <= 1e-3 and s[UPSTREAM_RUN_CONFIG] == "run-base" for s in optuna)
    trial_id = next(t for t, k in searcher.suggested.items() if k == optuna[0]["spec"]["key"])
    searcher.on_trial_complete(trial_id, {"best_val_loss": 0.5})
    again = _suggest_all(searcher)
    assert len(again) == 1 and again[0]["spec"]["search_group"] == optuna[0]["spec"]["search_group"]
