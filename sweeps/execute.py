"""Running a plan on Ray Tune: data preparation, one Tuner per dependency wave, bookkeeping.

Waves: wave 0 holds the trials without upstream (pretraining, SD base models), wave 1 what
depends on them, and so on (:meth:`sweeps.plan.Plan.waves`). Each wave is one ``tune.Tuner``
whose trials are a grid over trial specs (or, with ``--search optuna``, suggested by
:class:`sweeps.search.PlanSearcher`), each with its own resources (``tune.with_resources``),
retried ``max_failures`` times and resumed from its last per-epoch checkpoint. A trial whose
upstream failed is skipped; its dependants too.

After each wave the MLflow runs are the record: a trial counts as FINISHED only if its run is;
a run a crashed worker left RUNNING is ended FAILED with Ray's error in ``calib.error``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from sweeps.config import GridConfig, Resources
from sweeps.plan import Plan, TrialSpec
from sweeps.trainable import ERROR_METRIC, PROGRESS_FILE, STATUS_METRIC, TrialContext, run_trial, trial_tags

FINISHED, FAILED, SKIPPED, DONE_BEFORE = "FINISHED", "FAILED", "SKIPPED", "DONE_BEFORE"


@dataclass
class Outcome:
    """What became of one planned trial in this launch."""

    spec: TrialSpec
    status: str  # FINISHED | FAILED | SKIPPED | DONE_BEFORE (finished by an earlier launch)
    run_id: str | None = None
    error: str = ""
    compute_seconds: float = 0.0


# ---- Ray ---------------------------------------------------------------------------------------

def connect_ray(address: str | None, num_cpus: int | None = None, verbose: bool = False) -> bool:
    """Connect to ``address`` (or $RAY_ADDRESS), else start a local Ray; True when started here.

    A Ray already initialised in this process (tests, notebooks) is used as it is.
    """
    import ray

    # Per-epoch checkpoints force an experiment snapshot (num_to_keep=1): expected, not a problem.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # The legacy reporter is silent at verbose=0; our callback prints one line per trial.
    # Ctrl-C must abort the launch (Tune's own handler would end only the current wave).
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(include_dashboard=False, log_to_driver=verbose, configure_logging=True,
                  logging_level="INFO" if verbose else "WARNING")
    if address:
        ray.init(address=address, **kwargs)
        return False
    ray.init(num_cpus=num_cpus, **kwargs)
    return True


def resource_problems(trials: Iterable[TrialSpec], cluster: Mapping[str, float]) -> list[str]:
    """Trials that ask for more CPU/GPU than the whole cluster has (they would wait forever)."""
    problems, seen = [], set()
    for t in trials:
        what = (t.stage, t.method, t.resources)
        if what in seen:
            continue
        seen.add(what)
        for name, need in (("CPU", t.resources.cpu), ("GPU", t.resources.gpu)):
            have = float(cluster.get(name, 0.0))
            if need > have:
                problems.append(f"{t.stage}/{t.method} trials need {name.lower()} {need:g} per "
                                f"trial but the Ray cluster has {have:g}")
    return problems


def prepare_data(grid: GridConfig, datasets: Iterable[str], cpus: int = 1) -> dict[str, dict | Exception]:
    """calib.data preparation of each dataset as a Ray task, in parallel; errors are returned."""
    import ray

    from sweeps.data_prep import prepare_dataset

    task = ray.remote(lambda g, d, w: prepare_dataset(g, d, workers=w).to_dict())
    refs = {d: task.options(num_cpus=cpus, max_retries=0).remote(grid, d, cpus) for d in datasets}
    out: dict[str, dict | Exception] = {}
    for d, ref in refs.items():
        try:
            out[d] = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the task's own error, without Ray's traceback
            out[d] = getattr(exc, "cause", None) or exc
    return out


def _resources(config: dict):
    from ray import tune

    return tune.PlacementGroupFactory([Resources(**config["spec"]["resources"]).as_ray()])


def _spec_of(trial) -> TrialSpec:
    return TrialSpec.from_dict(trial.config["spec"])


def _trial_name(trial) -> str:
    return _spec_of(trial).label.replace(" ", "_")


def _trial_dirname(trial) -> str:
    s = trial.config["spec"]
    return f"{s['stage']}-{s['method']}-{s['key'][:12]}-{trial.trial_id}"


def find_resume_checkpoints(storage: str, keys: Iterable[str]) -> dict[str, str]:
    """Checkpoints earlier launches left in Tune's storage for ``keys``: key -> folder.

    Each checkpoint folder holds ``progress.json`` naming its trial key and epoch; the latest
    epoch per key wins. Lets a ``--resume`` after a crashed driver continue mid-training. Only
    for storage on a file system (a shared volume); with cloud storage trials restart their epoch
    loop, still without duplicate runs.
    """
    wanted = set(keys)
    best: dict[str, tuple[int, str]] = {}
    if "://" in storage or not Path(storage).is_dir():
        return {}
    storage = Path(storage)
    for progress in storage.glob(f"*/*/checkpoint_*/{PROGRESS_FILE}"):
        try:
            info = json.loads(progress.read_text())
        except (OSError, ValueError):
            continue
        key, epoch = info.get("trial_key"), int(info.get("epoch", -1))
        if key in wanted and epoch > best.get(key, (-2, ""))[0]:
            best[key] = (epoch, str(progress.parent))
    return {k: v for k, (_, v) in best.items()}


# ---- progress lines ----------------------------------------------------------------------------

def _make_printer(total: int, out: TextIO):
    from ray import tune

    class ProgressPrinter(tune.Callback):
        """One line per trial that ends or is retried (Tune's own tables are switched off)."""

        def __init__(self):
            self.done = 0

        def _line(self, status: str, trial, extra: str = "") -> None:
            print(f"[{self.done:>{len(str(total))}}/{total}] {status:<8} {_spec_of(trial).label}{extra}",
                  file=out, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            r = trial.last_result or {}
            if r.get(STATUS_METRIC) == "FAILED":
                self._line("FAILED", trial, f"  {r.get(ERROR_METRIC, '')[:200]}")
                return
            extra = ""
            if "dice_mean" in r:
                extra = (f"  dice {r['dice_mean']:.3f}  ece {r['ece_mean']:.4f}"
                         f"  {r.get('compute_seconds', 0):.1f} s")
            self._line("FINISHED", trial, extra)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            self._line("FAILED", trial, "  (error after retries; see calib.error)")

        def on_trial_recover(self, iteration, trials, trial, **info):
            self._line("RETRY", trial, f"  (attempt {trial.num_failures + 1})")

    return ProgressPrinter()


# ---- the waves ---------------------------------------------------------------------------------

@dataclass
class ExecutionSettings:
    """How to run (none of it changes a result)."""

    storage_path: str  # Tune's storage: a path every node sees, or a URI (s3://...)
    launch_name: str
    max_failures: int = 2
    max_concurrent: int | None = None
    stage_runner: Callable | None = None


class Executor:
    """Runs the trials of a plan that are not done yet, wave after wave (module doc)."""

    def __init__(self, plan: Plan, client, ctx: TrialContext, settings: ExecutionSettings,
                 done_before: Mapping[str, object], data_errors: Mapping[str, str],
                 out: TextIO = sys.stdout):
        self.plan, self.client, self.ctx, self.settings = plan, client, ctx, settings
        self.done_before = dict(done_before)  # key -> FINISHED run of an earlier launch
        self.data_errors = dict(data_errors)
        self.out = out
        self.outcomes: dict[str, Outcome] = {}

    def run(self) -> dict[str, Outcome]:
        todo = [t for t in self.plan.trials if t.key not in self.done_before]
        for t in self.plan.trials:
            if t.key in self.done_before:
                run = self.done_before[t.key]
                self.outcomes[t.key] = Outcome(t, DONE_BEFORE, run.info.run_id,
                                               compute_seconds=run.data.metrics.get("compute_seconds", 0.0))
        printer = _make_printer(len(todo), self.out)
        resume = find_resume_checkpoints(self.settings.storage_path, [t.key for t in todo])
        for index, wave in enumerate(self.plan.waves()):
            runnable, no_data = [], {}
            for t in wave:
                if t.key in self.outcomes:
                    continue
                reason = self._skip_reason(t)
                if not reason:
                    runnable.append(t)
                    continue
                self.outcomes[t.key] = Outcome(t, SKIPPED, error=reason)
                printer.done += 1
                if t.dataset in self.data_errors:  # one line per dataset, the error was printed
                    no_data[t.dataset] = no_data.get(t.dataset, 0) + 1
                else:
                    print(f"[{printer.done}/{len(todo)}] SKIPPED  {t.label}  ({reason})", file=self.out, flush=True)
            for dataset, n in no_data.items():
                print(f"[{printer.done}/{len(todo)}] SKIPPED  {n} trials of {dataset} (its data are "
                      "not usable, see the error above)", file=self.out, flush=True)
            if runnable:
                stages = sorted({t.stage for t in runnable}, key=["pretrain", "base", "calibrate"].index)
                print(f"wave {index + 1}/{len(self.plan.waves())}: {len(runnable)} trials "
                      f"({', '.join(stages)})", file=self.out, flush=True)
                self._run_wave(index, runnable, printer, resume)
        return self.outcomes

    def _skip_reason(self, t: TrialSpec) -> str:
        if t.dataset in self.data_errors:
            return f"data of {t.dataset} not ready: {self.data_errors[t.dataset]}"
        if t.upstream is not None:
            up = self.outcomes.get(t.upstream)
            if up is None or up.status not in (FINISHED, DONE_BEFORE):
                return f"upstream {self.plan.by_key[t.upstream].label} did not finish"
        return ""

    def _upstream_runs(self, trials: list[TrialSpec]) -> dict[str, str]:
        return {t.upstream: self.outcomes[t.upstream].run_id for t in trials if t.upstream}

    def _run_wave(self, index: int, trials: list[TrialSpec], printer, resume: dict[str, str]) -> None:
        from ray import tune

        from sweeps.search import PlanSearcher

        s = self.settings
        ctx = replace(self.ctx, upstream_runs=self._upstream_runs(trials),
                      resume_checkpoints={t.key: resume[t.key] for t in trials if t.key in resume},
                      stage_runner=s.stage_runner)
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), _resources)
        common = dict(max_concurrent_trials=s.max_concurrent, reuse_actors=True,
                      trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname)
        if any(t.search == "optuna" for t in trials):
            grid = self.plan.grid.search
            searcher = PlanSearcher(trials, grid.lr_low, grid.lr_high, grid.seed,
                                    prior=self._optuna_prior(trials))
            tune_config = tune.TuneConfig(search_alg=searcher, num_samples=searcher.total, **common)
            param_space = {}
        else:
            tune_config = tune.TuneConfig(**common)
            param_space = {"spec": tune.grid_search([t.to_dict() for t in trials])}
        run_config = tune.RunConfig(
            name=f"{s.launch_name}-wave{index}", storage_path=str(s.storage_path),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0, callbacks=[printer])
        results = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                             run_config=run_config).fit()
        tune_errors = {}
        for result in results:
            key = (result.config or {}).get("spec", {}).get("key")
            if key and result.error is not None:
                tune_errors[key] = f"{type(result.error).__name__}: {result.error}"
        self._reconcile(trials, tune_errors)

    def _optuna_prior(self, trials: list[TrialSpec]) -> dict[str, list[tuple[float, float]]]:
        """(lr, best_val_loss) of the Optuna samples of these groups that earlier launches finished."""
        groups = {t.search_group for t in trials if t.search == "optuna"}
        prior: dict[str, list[tuple[float, float]]] = {}
        for t in self.plan.trials:
            run = self.done_before.get(t.key)
            if run is None or t.search_group not in groups:
                continue
            lr = run.data.tags.get("calib.lr")
            loss = run.data.metrics.get("best_val_loss")
            if lr and loss is not None:
                prior.setdefault(t.search_group, []).append((float(lr), float(loss)))
        return prior

    def _reconcile(self, trials: list[TrialSpec], tune_errors: Mapping[str, str]) -> None:
        """Read each trial's run back; close what a crashed worker left open (module doc)."""
        from tracking import schema
        from tracking.runs import RUNNING, create_failed_run, fail_run, trial_runs_under

        runs = trial_runs_under(self.client, self.ctx.experiment_id, self.ctx.parent_run_id)
        for t in trials:
            run = runs.get(t.key)
            error = tune_errors.get(t.key, "")
            if run is None:
                message = error or "the trial never started (no MLflow run)"
                run_id = create_failed_run(self.client, self.ctx.experiment_id, self.ctx.parent_run_id,
                                           t.key, trial_tags(t), t.label, message)
                self.outcomes[t.key] = Outcome(t, FAILED, run_id, message)
                continue
            run_id, status = run.info.run_id, run.info.status
            err = run.data.tags.get(schema.ERROR) or error or status
            if status == RUNNING:
                # A worker that tagged its error but could not end the run: keep its message.
                err = error or run.data.tags.get(schema.ERROR) or "the trial ended without closing its run"
                fail_run(self.client, run_id, err)
                status = FAILED
            if status == FINISHED:
                self.outcomes[t.key] = Outcome(t, FINISHED, run_id,
                                               compute_seconds=run.data.metrics.get("compute_seconds", 0.0))
            else:
                self.outcomes[t.key] = Outcome(t, FAILED, run_id, err,
                                               compute_seconds=run.data.metrics.get("compute_seconds", 0.0))
