"""Running a plan on Ray Tune: data preparation, one Tuner for the whole dependency graph,
bookkeeping.

Scheduling: a trial is handed to Tune as soon as its own upstream trial has FINISHED -- the base
models of fold 0 train while fold 3 still pretrains, a calibration starts once its base model
exists (:mod:`sweeps.plan.graph`). One ``tune.Tuner`` runs them all: its searcher
(:class:`sweeps.plan.graph.GraphSearcher`) suggests only ready trials, each with its own resources
(``tune.with_resources``), retried ``max_failures`` times and resumed from its last per-epoch
checkpoint (sweeps.run.resume) inside its MLflow run; with ``--search optuna`` each group of samples
is suggested by its :class:`sweeps.plan.search.PlanSearcher` once its base model finished. A trial whose upstream
failed is skipped; its dependants too.

As each trial ends, the MLflow run is the record: a trial counts as FINISHED only if its run is
(it reports so with its run id after closing the run); otherwise the run is read back, and a run
a crashed worker left RUNNING is ended FAILED with Ray's error in ``calib.error``
(tracking.runs.reconcile_trial). A downstream
trial gets its upstream's FINISHED run id in its Tune config (``upstream_run_id``) and downloads
the upstream artifacts from that run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TextIO

from ray import tune

from calib.vocabulary import STAGES
from sweeps.grid import Resources
from sweeps.plan.graph import GraphSearcher, TrialGraph
from sweeps.plan.search import PlanSearcher
from sweeps.plan.trials import Plan, TrialSpec
from sweeps.run.cluster import cluster_resources, env_defaults, trial_slots
from sweeps.run.trainable import ERROR_METRIC, RUN_ID_METRIC, STATUS_METRIC, TrialContext, run_trial, trial_tags
from tracking import schema
from tracking.runs import TrialOutcome, reconcile_trial

FINISHED, FAILED, SKIPPED = TrialOutcome.FINISHED, TrialOutcome.FAILED, TrialOutcome.SKIPPED
DONE_BEFORE, ELSEWHERE = TrialOutcome.DONE_BEFORE, TrialOutcome.ELSEWHERE


@dataclass
class Outcome:
    """What became of one planned trial in this launch."""

    spec: TrialSpec
    status: TrialOutcome
    run_id: str | None = None
    error: str = ""
    compute_seconds: float = 0.0


def _resources(config: dict):
    return tune.PlacementGroupFactory([Resources(**config["spec"]["resources"]).as_ray()])


def _spec_of(trial) -> TrialSpec:
    return TrialSpec.from_dict(trial.config["spec"])


def _trial_name(trial) -> str:
    return _spec_of(trial).label.replace(" ", "_")


def _trial_dirname(trial) -> str:
    s = trial.config["spec"]
    return f"{s['stage']}-{s['method']}-{s['key'][:12]}-{trial.trial_id}"


# ---- the graph ---------------------------------------------------------------------------------

@dataclass
class ExecutionSettings:
    """How to run (none of it changes a result)."""

    storage_path: str  # Tune's storage: a path every node sees, or a URI (s3://...)
    launch_name: str
    checkpoint_dir: str | None = None  # sweeps.run.resume's checkpoint index (None: no mid-training resume)
    max_failures: int = 2
    max_concurrent: int | None = None
    stage_runner: Callable | None = None


def _error_text(trial) -> str:
    """The error Tune recorded for a trial that failed after its retries (as ResultGrid has it)."""
    try:
        error = trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001 - an unreadable error file must not stop the sweep
        error = None
    if error is None:
        return "the trial's worker failed (no error recorded by Ray Tune)"
    if isinstance(error, str):  # the text trace: its last line names the exception
        lines = [ln for ln in error.strip().splitlines() if ln.strip()]
        return lines[-1] if lines else "the trial's worker failed"
    return f"{type(error).__name__}: {error}"


def _make_callback(executor: "Executor"):
    class GraphCallback(tune.Callback):
        """Settles each trial Tune ends (FINISHED / FAILED from its MLflow run), which releases
        or skips its dependants, and prints one line per trial that ends or is retried (Tune's
        own tables are switched off)."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            executor.trial_ended(_spec_of(trial), trial.last_result or {}, error=None)

        def on_trial_error(self, iteration, trials, trial, **info):
            executor.trial_ended(_spec_of(trial), trial.last_result or {}, error=_error_text(trial))

        def on_trial_recover(self, iteration, trials, trial, **info):
            executor.line("RETRY", _spec_of(trial).label, f"  (attempt {trial.num_failures + 1})")

    return GraphCallback()


class Executor:
    """Runs the trials of a plan that are not done yet as one dependency graph (module doc)."""

    def __init__(self, plan: Plan, client, ctx: TrialContext, settings: ExecutionSettings,
                 done_before: Mapping[str, object], data_errors: Mapping[str, str],
                 out: TextIO = sys.stdout):
        self.plan, self.client, self.ctx, self.settings = plan, client, ctx, settings
        self.done_before = dict(done_before)  # key -> FINISHED run of an earlier launch
        self.data_errors = dict(data_errors)
        self.out = out
        self.outcomes: dict[str, Outcome] = {}
        self.graph = None  # the sweeps.plan.graph.TrialGraph of this launch's trials
        self.total = self.done = 0
        self.trials_wall = 0.0  # seconds of the one Tune run (its start-up and shutdown included)

    def run(self) -> dict[str, Outcome]:
        todo = [t for t in self.plan.trials if t.key not in self.done_before]
        for t in self.plan.trials:
            if t.key in self.done_before:
                run = self.done_before[t.key]
                self.outcomes[t.key] = Outcome(t, DONE_BEFORE, run.info.run_id,
                                               compute_seconds=run.data.metrics.get(schema.COMPUTE_SECONDS, 0.0))
        self.total = len(todo)
        runnable = self._skip_unusable_data(todo)
        if runnable:
            self._run_graph(runnable)
        return self.outcomes

    # ---- lines -------------------------------------------------------------------------------

    def line(self, status: str, label: str, extra: str = "") -> None:
        print(f"[{self.done:>{len(str(self.total))}}/{self.total}] {status:<8} {label}{extra}",
              file=self.out, flush=True)

    def _skip(self, t: TrialSpec, reason: str, quiet: bool = False) -> None:
        self.outcomes[t.key] = Outcome(t, SKIPPED, error=reason)
        self.done += 1
        if not quiet:
            self.line("SKIPPED", t.label, f"  ({reason})")

    def _skip_unusable_data(self, todo: list[TrialSpec]) -> list[TrialSpec]:
        """Skip the trials of datasets whose preparation failed (one line per dataset and stage:
        the error was printed); the others."""
        runnable, skipped = [], {}
        for t in todo:
            if t.dataset not in self.data_errors:
                runnable.append(t)
                continue
            self._skip(t, f"data of {t.dataset} not ready: {self.data_errors[t.dataset]}", quiet=True)
            skipped[(t.dataset, t.stage)] = skipped.get((t.dataset, t.stage), 0) + 1
        for (dataset, stage), n in skipped.items():
            self.line("SKIPPED", f"{n} trials of {dataset}",
                      f" ({stage}: its data are not usable, see the error above)")
        return runnable

    # ---- Tune --------------------------------------------------------------------------------

    def _run_graph(self, trials: list[TrialSpec]) -> None:
        s = self.settings
        self.graph = TrialGraph(trials, {k: r.info.run_id for k, r in self.done_before.items()})
        searcher = GraphSearcher(self.graph, self._optuna_group)
        ctx = replace(self.ctx, checkpoint_dir=s.checkpoint_dir, stage_runner=s.stage_runner)
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), _resources)
        # max_concurrent_trials wraps the searcher in Tune's ConcurrencyLimiter. Trials start in
        # the order they were suggested, so the ready queue's order holds but for the few
        # trials Tune keeps PENDING (a freed slot is filled at once).
        tune_config = tune.TuneConfig(search_alg=searcher, num_samples=len(trials),
                                      max_concurrent_trials=s.max_concurrent, reuse_actors=True,
                                      trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname)
        run_config = tune.RunConfig(
            name=s.launch_name, storage_path=str(s.storage_path),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            verbose=0, callbacks=[_make_callback(self)])
        # Tune keeps one trial PENDING beside the running ones for a custom searcher; one per
        # slot lets every slot's actor start at once (and an autoscaler see the demand).
        cluster = cluster_resources()
        pending = max(trial_slots(t.resources, cluster, s.max_concurrent) for t in trials)
        print(f"running {len(trials)} trials as a dependency graph "
              f"({', '.join(f'{n} {st}' for st, n in _per_stage(trials))}); each starts when its "
              "upstream has finished", file=self.out, flush=True)
        started = time.monotonic()
        with env_defaults(TUNE_MAX_PENDING_TRIALS_PG=str(pending)):
            results = tune.Tuner(trainable, param_space={}, tune_config=tune_config,
                                 run_config=run_config).fit()
        self.trials_wall = time.monotonic() - started
        # Normally the callback has settled every trial; this catches what Tune ended without
        # telling it (or never started), so that no trial is left without an outcome.
        tune_errors = {}
        for result in results:
            key = (result.config or {}).get("spec", {}).get("key")
            if key and result.error is not None:
                tune_errors[key] = f"{type(result.error).__name__}: {result.error}"
        for t in trials:
            if t.key in self.outcomes:
                continue
            up = self.outcomes.get(t.upstream) if t.upstream else None
            if t.upstream and (up is None or not up.status.finished):
                self._skip(t, f"upstream {self.plan.by_key[t.upstream].label} did not finish")
                continue
            self.trial_ended(t, {}, tune_errors.get(t.key, ""))

    def trial_ended(self, spec: TrialSpec, result: Mapping, error: str | None) -> None:
        """Record how ``spec`` ended, print its line, then release or skip its dependants."""
        if spec.key in self.outcomes:  # settled already (Tune may report an end twice)
            return
        o = self._settle(spec, result, error)
        self.outcomes[spec.key] = o
        self.done += 1
        if o.status.finished:
            extra = f"  ({o.error})" if o.status == DONE_BEFORE else ""
            if o.status == FINISHED and schema.DICE_MEAN in result:
                extra = (f"  dice {result[schema.DICE_MEAN]:.3f}  "
                         f"ece {result.get(schema.ECE_MEAN, float('nan')):.4f}  {o.compute_seconds:.1f} s")
            self.line("FINISHED" if o.status == FINISHED else "DONE", spec.label, extra)
            self.graph.finished(spec.key, o.run_id, o.compute_seconds if o.status == FINISHED else None, spec)
            return
        if o.status == ELSEWHERE:
            self.line(ELSEWHERE, spec.label, f"  ({o.error})")
            for t in self.graph.failed(spec.key):  # left to the launch that runs their upstream
                self.outcomes[t.key] = Outcome(t, ELSEWHERE, error=f"its upstream {spec.label} is {o.error}")
                self.done += 1
                self.line(ELSEWHERE, t.label, "  (its upstream runs elsewhere)")
            return
        self.line("FAILED", spec.label, f"  {o.error[:200]}")
        for t in self.graph.failed(spec.key):
            self._skip(t, f"upstream {self.plan.by_key[t.upstream].label} did not finish")

    def _settle(self, spec: TrialSpec, result: Mapping, error: str | None) -> Outcome:
        """FINISHED when the trial reported its run closed FINISHED; DONE_BEFORE / ELSEWHERE when
        another launch claimed it (tracking.runs.claimed_elsewhere); otherwise the MLflow run is
        read back and, if a crashed worker left it RUNNING, ended FAILED with Tune's error
        (tracking.runs.reconcile_trial)."""
        run_id, status = result.get(RUN_ID_METRIC), result.get(STATUS_METRIC)
        if not error and run_id and status in (DONE_BEFORE, ELSEWHERE):
            return Outcome(spec, TrialOutcome(status), run_id, error=str(result.get(ERROR_METRIC, "")))
        if not error and status == FINISHED and run_id:
            return Outcome(spec, FINISHED, run_id,
                           compute_seconds=float(result.get(schema.COMPUTE_SECONDS) or 0.0))
        end = reconcile_trial(self.client, self.ctx.experiment_id, self.ctx.parent_run_id, spec.key,
                              trial_tags(spec), spec.label, error or "")
        return Outcome(spec, end.outcome, end.run_id, end.error, end.compute_seconds)

    # ---- Optuna ------------------------------------------------------------------------------

    def _optuna_group(self, group: str, specs: list[TrialSpec]):
        """The PlanSearcher of one Optuna group, seeded by the group's place in the plan (the
        same seed whatever else this launch runs)."""
        groups = sorted({t.search_group for t in self.plan.trials if t.search == "optuna"})
        grid = self.plan.grid.search
        return PlanSearcher(specs, grid.lr_low, grid.lr_high, grid.seed + groups.index(group),
                            prior=self._optuna_prior(specs))

    def _optuna_prior(self, trials: list[TrialSpec]) -> dict[str, list[tuple[float, float]]]:
        """(lr, best_val_loss) of the Optuna samples of these groups that earlier launches finished."""
        groups = {t.search_group for t in trials if t.search == "optuna"}
        prior: dict[str, list[tuple[float, float]]] = {}
        for t in self.plan.trials:
            run = self.done_before.get(t.key)
            if run is None or t.search_group not in groups:
                continue
            lr = run.data.tags.get(schema.LR)
            loss = run.data.metrics.get(schema.BEST_VAL_LOSS)
            if lr and loss is not None:
                prior.setdefault(t.search_group, []).append((float(lr), float(loss)))
        return prior


def _per_stage(trials: Iterable[TrialSpec]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.stage] = counts.get(t.stage, 0) + 1
    return [(s, counts[s]) for s in STAGES if s in counts]
