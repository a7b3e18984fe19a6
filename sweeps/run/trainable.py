"""What runs inside a Ray worker for one trial: MLflow run, upstream artifacts, stage, results.

:func:`run_trial` is the Ray Tune function trainable. Per trial it

1. opens the trial's MLflow run -- or re-opens it when Ray retries or restores the trial, so a
   trial never has two runs (tracking.runs.TrialRun.open);
2. restores the stage's ``work_dir/checkpoint.pt`` from the trial key's latest checkpoint
   (sweeps.run.resume.CheckpointIndex: an earlier attempt that Ray retried, or an earlier launch that
   crashed), so training continues mid-way instead of from epoch 0;
3. downloads the upstream artifacts (base weights, exported logits) from the upstream trial's
   MLflow run -- never from a path on another node;
4. runs the stage (sweeps.run.stage_runner), logging ``train_loss`` / ``val_loss`` per epoch,
   recording the stage's checkpoint in the index and reporting each epoch to Tune;
5. logs the final metrics and artifacts and ends the run FINISHED -- or FAILED with
   ``calib.error``.

Errors that will recur on a retry (bad data, bad config, diverging training: ValueError and
calib.training.TrainingError) end the trial at once; anything else (a lost node, out of memory)
is raised so that Ray retries the trial (FailureConfig.max_failures).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import ray
import torch
from ray import tune

from calib.preview import save_preview
from calib.shift_rows import shift_means
from calib.stage_files import CHECKPOINT_NAME as CHECKPOINT_FILE  # what a stage resumes from
from calib.training import TrainingError
from sweeps.plan.graph import UPSTREAM_RUN_CONFIG
from sweeps.plan.trials import TrialSpec
from sweeps.run.resume import CheckpointIndex, Restored
from sweeps.run.stage_runner import run_stage, upstream_needs
from tracking import schema
from tracking.logged_model import log_trial_lineage
from tracking.runs import TrialOutcome, TrialRun, error_message
from tracking.store import client as make_client
from tracking.store import fetch_artifacts
from tracking.system_metrics import system_metrics

# In the last result a trial reports to Tune: its outcome (a tracking.runs.TrialOutcome: FINISHED,
# FAILED, or DONE_BEFORE / ELSEWHERE when another launch claims it), the error, and beside
# FINISHED the trial's MLflow run id, for its dependants.
STATUS_METRIC = "calib_status"
ERROR_METRIC = "calib_error"
RUN_ID_METRIC = "calib_run_id"


@dataclass
class TrialContext:
    """What every trial of a launch shares (sent once to the workers with tune.with_parameters).

    ``data``: dataset -> PreparedData.to_dict(); ``upstream_runs``: upstream trial key -> the
    MLflow run id of its FINISHED run; ``checkpoint_dir``: the sweeps.run.resume checkpoint index
    (None: every attempt starts at epoch 0); ``stage_runner``: replaces
    sweeps.run.stage_runner.run_stage (tests).
    """

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    data: dict[str, dict]
    upstream_runs: dict[str, str] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    stage_runner: Callable | None = None
    run_tags: dict[str, str] = field(default_factory=dict)  # on every trial run: its source
    system_metrics: bool = False  # log system/* metrics of each trial (tracking.logged_model)


def trial_tags(spec: TrialSpec) -> dict[str, str]:
    """The tags of a trial run (docs/architecture.md, "Trial run"; role, key and parent are added by TrialRun.open)."""
    tags = {schema.STAGE: spec.stage, schema.DATASET: spec.dataset, schema.WEIGHTS: spec.weights,
            schema.METHOD: spec.method, schema.FOLD: str(spec.fold), schema.LR: spec.lr_tag,
            schema.PROTOCOL: spec.split.protocol}
    if spec.upstream:
        tags[schema.UPSTREAM_KEY] = spec.upstream
    if spec.search == "optuna":
        tags[schema.SEARCH] = "optuna"
    if spec.calib_subjects is not None:
        tags[schema.CALIB_SUBJECTS] = str(spec.calib_subjects)
    return tags


def is_permanent(exc: BaseException) -> bool:
    """True for errors a retry would hit again (bad input, diverging training)."""
    return isinstance(exc, (ValueError, TrainingError))


class _EpochReporter:
    """The stages' per-epoch callback: MLflow metrics, the checkpoint index, then a Tune report."""

    def __init__(self, run, spec: TrialSpec, work_dir: Path, index: CheckpointIndex | None,
                 clock: Callable[[], float]):
        self.run, self.spec, self.work_dir, self.index, self.clock = run, spec, work_dir, index, clock
        self.best = float("inf")

    def __call__(self, ep) -> None:
        self.run.log_epoch(ep.epoch, **{schema.TRAIN_LOSS: ep.train_loss, schema.VAL_LOSS: ep.val_loss,
                                        schema.EPOCH_LR: ep.lr})
        if self.index is not None:  # fit() wrote the checkpoint atomically before calling us
            self.index.save(self.spec.key, self.work_dir / CHECKPOINT_FILE, ep.epoch, self.clock())
        # Every result carries best_val_loss: a searcher (Optuna) requires its metric in each one.
        self.best = min(self.best, float(ep.val_loss))
        tune.report({"epoch": ep.epoch, schema.TRAIN_LOSS: ep.train_loss, schema.VAL_LOSS: ep.val_loss,
                     schema.BEST_VAL_LOSS: self.best})


def _fetch_upstream(client, ctx: TrialContext, spec: TrialSpec, needs, scratch: Path) -> dict[str, Path]:
    """Download what the trial reads from its upstream run into its scratch folder (deleted
    with it: no per-node cache grows over a 310-trial sweep)."""
    if not needs:
        return {}
    run_id = ctx.upstream_runs.get(spec.upstream or "")
    if run_id is None:
        raise RuntimeError(f"upstream trial {spec.upstream} of {spec.label} has no FINISHED run")
    return {name: fetch_artifacts(client, run_id, name, scratch / "upstream") for name in needs}


def reset_peak_rss() -> bool:
    """Start a new peak-memory window for this process; True when the platform allows it.

    Ray reuses worker processes, so the process's lifetime peak (``ru_maxrss``) would charge a
    light trial with the memory of a heavy one that ran before it in the same worker. Linux
    resets the high-water mark ``VmHWM`` when "5" is written to ``/proc/self/clear_refs``.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB since :func:`reset_peak_rss` (Linux
    ``VmHWM``), or over the process's life (``ru_maxrss``) where ``/proc`` is not available."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak) / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)


def _log_result(run, spec: TrialSpec, result, seconds: float) -> dict[str, float]:
    """Final metrics and artifacts of a finished stage; returns the metrics."""
    per_subject = result.per_subject
    metrics = {
        schema.DICE_MEAN: float(per_subject["dice"].mean()),
        schema.ECE_MEAN: float(per_subject["ece"].mean()),
        schema.BEST_VAL_LOSS: float(result.best_val_loss),
        schema.N_SUBJECTS: float(per_subject["subject_id"].nunique()),
        schema.COMPUTE_SECONDS: float(seconds),
        # what a cost model can be checked against (sweeps/cost/): seconds per epoch run, and
        # the peak resident memory of the worker process while it ran this trial
        schema.PEAK_RSS_MB: peak_rss_mb(),
    }
    epochs = len(result.history or ())
    if epochs:
        metrics[schema.SECONDS_PER_EPOCH] = float(seconds) / epochs
    # every other per-subject metric the stage computed (brier, nll, true_ece, p_star_distance,
    # ...), as its mean
    for col in per_subject.columns:
        if col in schema.PER_SUBJECT_COLUMNS:
            continue
        values = pd.to_numeric(per_subject[col], errors="coerce")
        if values.notna().any():
            metrics[f"{col}_mean"] = float(values.mean())
    # the predictor scored on the fold's val subjects as on test: held-out model selection
    val = getattr(result, "val_per_subject", None)
    if val is not None and len(val):
        for name, col in ((schema.VAL_DICE_MEAN, "dice"), (schema.VAL_ECE_MEAN, "ece"),
                          (schema.VAL_NLL_MEAN, "nll"), (schema.VAL_BRIER_MEAN, "brier")):
            if col not in val.columns:
                continue
            values = pd.to_numeric(val[col], errors="coerce")
            if values.notna().any():
                metrics[name] = float(values.mean())
    splits = getattr(result, "splits", None) or {}
    # the real count, also for "all" (getattr: callers may pass only the spec fields they log)
    if getattr(spec, "calib_subjects", None) is not None and "calib" in splits:
        metrics[schema.N_CALIB_SUBJECTS] = float(len(splits["calib"]))
    guard = getattr(result, "guard", None)
    if guard is not None:  # the degenerate-model guard's view of the validation subjects
        metrics[schema.GUARD_FOREGROUND_FRACTION] = float(guard.foreground_fraction)
        metrics[schema.GUARD_MEDIAN_ABS_LOGIT] = float(guard.median_abs_logit)
    tags = {}
    fit_split = (getattr(result, "params", None) or {}).get("fit_split")
    if fit_split:
        tags[schema.FIT_SPLIT] = fit_split
    if getattr(result, "degenerate", None):
        tags[schema.DEGENERATE] = str(result.degenerate)[:500]
    if getattr(result, "constant_output", None):  # flagged, and the run still finishes
        tags[schema.CONSTANT_OUTPUT] = str(result.constant_output)[:500]
    if tags:
        run.set_tags(tags)
    if getattr(result, "splits", None):
        run.log_json(result.splits, schema.SPLITS)
    shifted = getattr(result, "shift_per_subject", None)  # test-time shifts (calib.shift_eval)
    if shifted is not None:
        run.log_text(shifted.to_csv(index=False), schema.PER_SUBJECT_SHIFT)
        metrics.update({schema.shift_metric(s, m): v for (s, m), v in shift_means(shifted).items()})
    if getattr(result, "preview", None):  # one slice of the first test subject, for the report
        run.log_artifact(save_preview(result.preview, Path(result.weights).parent / schema.PREVIEW))
    run.log_text(per_subject.to_csv(index=False), schema.PER_SUBJECT)
    if val is not None:
        run.log_text(val.to_csv(index=False), schema.VAL_PER_SUBJECT)
    run.log_text(result.reliability_bins.to_csv(index=False), schema.RELIABILITY_BINS)
    run.log_artifact(result.weights, schema.WEIGHTS_DIR)
    for name, path in result.extra_artifacts.items():
        run.log_artifact(path, name)
    # Epochs a crashed attempt ran but this run has not logged (a resume from another launch's
    # checkpoint): the stage's history has them all.
    for ep in result.history or ():
        run.log_epoch(ep.epoch, **{schema.TRAIN_LOSS: ep.train_loss, schema.VAL_LOSS: ep.val_loss,
                                   schema.EPOCH_LR: ep.lr})
    # What the stage resolved beyond the planned parameters (loss, learned scalars, ...).
    planned = spec.config["params"]
    run.log_params({f"result.{k}": v for k, v in (getattr(result, "params", None) or {}).items()
                    if k not in planned or planned[k] != v})
    run.log_metrics(metrics)
    return metrics


def run_trial(config: Mapping, ctx: TrialContext) -> None:
    """Ray Tune function trainable: ``config["spec"]`` is a TrialSpec.to_dict() (module doc).

    A searcher may add ``config["lr"]`` (Optuna), which becomes the trial's learning rate.
    """
    spec = TrialSpec.from_dict(config["spec"])
    if spec.search == "optuna" and config.get("lr") is not None:
        spec = spec.with_lr(config["lr"])
    if spec.upstream and config.get(UPSTREAM_RUN_CONFIG):  # the graph scheduler passes it in
        ctx = dataclasses.replace(ctx, upstream_runs={**ctx.upstream_runs,
                                                      spec.upstream: config[UPSTREAM_RUN_CONFIG]})
    # One torch thread per CPU Ray gave this trial: concurrent trials must not oversubscribe.
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    client = make_client(ctx.tracking_uri)
    run = TrialRun.open(client, ctx.experiment_id, ctx.parent_run_id, spec.key, {**trial_tags(spec), **ctx.run_tags},
                        run_name=spec.label)
    if run.elsewhere:  # another live launch claims this trial key: it is not run here
        tune.report({schema.BEST_VAL_LOSS: None, STATUS_METRIC: run.elsewhere_outcome.value,
                     RUN_ID_METRIC: run.run_id, ERROR_METRIC: run.elsewhere_note})
        return
    if run.already_finished:  # finished by an earlier attempt that Ray then retried
        tune.report({schema.BEST_VAL_LOSS: None, **run.final_metrics(),
                     STATUS_METRIC: TrialOutcome.FINISHED.value, RUN_ID_METRIC: run.run_id})
        return

    scratch = Path(tempfile.mkdtemp(prefix=f"calib-{spec.key[:10]}-"))
    reset_peak_rss()  # peak_rss_mb is this trial's, not the reused worker's lifetime peak
    finished = False
    try:  # from here on every way out closes the run (FINISHED or FAILED)
        # Where this attempt runs: on a cluster, the node to look at when a trial misbehaves.
        run.set_tags({schema.NODE_ID: ray.get_runtime_context().get_node_id(),
                      schema.NODE_IP: ray.util.get_node_ip_address(), schema.WORKER_PID: os.getpid()})
        work_dir = scratch / "work"
        work_dir.mkdir()
        index = CheckpointIndex(Path(ctx.checkpoint_dir)) if ctx.checkpoint_dir else None
        restored = index.restore(spec.key, work_dir / CHECKPOINT_FILE) if index else Restored()
        if restored.epoch is not None:
            run.set_tags({schema.RESUMED_EPOCH: restored.epoch})
        start = time.monotonic()
        clock = lambda: restored.compute_seconds + time.monotonic() - start  # noqa: E731
        # The method's resolved parameters, with the LR a searcher chose where there is one.
        method_params = {**spec.config["params"], **({"lr": spec.lr} if spec.lr is not None else {})}
        run.log_params({"stage": spec.stage, "dataset": spec.dataset, "weights": spec.weights,
                        "method": spec.method, "fold": spec.fold, "lr": spec.lr_tag,
                        **({} if spec.calib_subjects is None else {"calib_subjects": spec.calib_subjects}),
                        **{f"train.{k}": v for k, v in spec.config["train"].items()},
                        **{f"method.{k}": v for k, v in method_params.items()}})
        run.log_json({**spec.config, "lr": spec.lr, "trial_key": spec.key,
                      "passed_params": spec.params}, schema.TRIAL_CONFIG)
        upstream = _fetch_upstream(client, ctx, spec, upstream_needs(spec), scratch)
        device = torch.device("cuda" if spec.resources.gpu > 0 and torch.cuda.is_available() else "cpu")
        stage = ctx.stage_runner or run_stage
        with system_metrics(run.run_id, ctx.tracking_uri, ctx.system_metrics):
            result = stage(spec, ctx.data[spec.dataset], work_dir, upstream, device,
                           [_EpochReporter(run, spec, work_dir, index, clock)])
        metrics = _log_result(run, spec, result, clock())
        # MLflow's own view of the trial: its splits as datasets, its fitted model (tracking.logged_model)
        log_trial_lineage(client, run.run_id, ctx.experiment_id,
                          {**spec.config, "lr": spec.lr, "trial_key": spec.key}, result.weights,
                          ctx.data[spec.dataset].get("cache_dir"), getattr(result, "splits", None),
                          ctx.upstream_runs.get(spec.upstream or ""), scratch / "lineage")
        run.finish()
        finished = True
        tune.report({**metrics, STATUS_METRIC: TrialOutcome.FINISHED.value, RUN_ID_METRIC: run.run_id})
    except BaseException as exc:  # also Ctrl-C / SystemExit (Tune stopping the trial): no RUNNING run
        if finished:  # the run is complete; a failing last report must not turn it FAILED
            raise  # (a retry finds it FINISHED and only reports it)
        # FAILED whatever the exception (not tracking.runs.error_status): Ray retries what is
        # not permanent, re-opening this run; an aborted launch closes its own runs KILLED.
        message = error_message(exc)
        try:
            run.fail(message)
        except Exception:  # noqa: BLE001 - the store is down too: the driver closes the run
            traceback.print_exc()
        if not (isinstance(exc, Exception) and is_permanent(exc)):
            raise  # Ray retries the trial (it re-opens this run and resumes from its checkpoint)
        tune.report({STATUS_METRIC: TrialOutcome.FAILED.value, ERROR_METRIC: message[:2000],
                     schema.BEST_VAL_LOSS: None})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
