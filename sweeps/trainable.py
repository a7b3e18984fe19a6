"""What runs inside a Ray worker for one trial: MLflow run, upstream artifacts, stage, results.

:func:`run_trial` is the Ray Tune function trainable. Per trial it

1. opens the trial's MLflow run -- or re-opens it when Ray retries or restores the trial, so a
   trial never has two runs (tracking.runs.TrialRun.open);
2. restores the stage's ``work_dir/checkpoint.pt`` from the last Ray checkpoint (a retried trial)
   or from a checkpoint an earlier launch left (``--resume`` after a crash), so training continues
   mid-way instead of from epoch 0;
3. downloads the upstream artifacts (base weights, exported logits) from the upstream trial's
   MLflow run -- never from a path on another node;
4. runs the stage (sweeps.stage_runner), logging ``train_loss`` / ``val_loss`` per epoch and
   reporting each epoch to Tune with a checkpoint of the stage's state;
5. logs the final metrics and artifacts and ends the run FINISHED -- or FAILED with
   ``calib.error``.

Errors that will recur on a retry (bad data, bad config, diverging training: ValueError and
calib.training.TrainingError) end the trial at once; anything else (a lost node, out of memory)
is raised so that Ray retries the trial (FailureConfig.max_failures).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sweeps.plan import TrialSpec

CHECKPOINT_FILE = "checkpoint.pt"  # what calib.stages resumes from, in its work_dir
PROGRESS_FILE = "progress.json"  # beside it in a Ray checkpoint: trial key, epoch, compute seconds
STATUS_METRIC = "calib_status"  # FINISHED / FAILED, in the last result a trial reports to Tune
ERROR_METRIC = "calib_error"
RUN_ID_METRIC = "calib_run_id"  # beside FINISHED: the trial's MLflow run, for its dependants
UPSTREAM_RUN_CONFIG = "upstream_run_id"  # in a trial's Tune config: its upstream's FINISHED run


@dataclass
class TrialContext:
    """What every trial of a launch shares (sent once to the workers with tune.with_parameters).

    ``data``: dataset -> PreparedData.to_dict(); ``upstream_runs``: upstream trial key -> the
    MLflow run id of its FINISHED run; ``resume_checkpoints``: trial key -> folder of a checkpoint
    an earlier launch reported; ``stage_runner``: replaces sweeps.stage_runner.run_stage (tests).
    """

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    data: dict[str, dict]
    upstream_runs: dict[str, str] = field(default_factory=dict)
    resume_checkpoints: dict[str, str] = field(default_factory=dict)
    stage_runner: Callable | None = None
    run_tags: dict[str, str] = field(default_factory=dict)  # on every trial run: its source
    system_metrics: bool = False  # log system/* metrics of each trial (tracking.models)


def trial_tags(spec: TrialSpec) -> dict[str, str]:
    """The DESIGN.md tags of a trial run (role, key and parent are added by TrialRun.open)."""
    from tracking import schema

    tags = {schema.STAGE: spec.stage, schema.DATASET: spec.dataset, schema.WEIGHTS: spec.weights,
            schema.METHOD: spec.method, schema.FOLD: str(spec.fold), schema.LR: spec.lr_tag,
            schema.PROTOCOL: spec.config["data"]["protocol"]}
    if spec.upstream:
        tags[schema.UPSTREAM_KEY] = spec.upstream
    if spec.search == "optuna":
        tags[schema.SEARCH] = "optuna"
    return tags


def is_permanent(exc: BaseException) -> bool:
    """True for errors a retry would hit again (bad input, diverging training)."""
    try:
        from calib.training import TrainingError
    except ImportError:  # pragma: no cover - calib is a dependency of the sweep
        TrainingError = ()  # noqa: N806
    return isinstance(exc, (ValueError, TrainingError))


class _EpochReporter:
    """The stages' per-epoch callback: MLflow metrics, then a Tune report with a checkpoint."""

    def __init__(self, run, spec: TrialSpec, work_dir: Path, scratch: Path, clock: Callable[[], float]):
        self.run, self.spec, self.work_dir, self.scratch, self.clock = run, spec, work_dir, scratch, clock
        self.best = float("inf")

    def __call__(self, ep) -> None:
        from ray import tune

        from tracking import schema

        self.run.log_epoch(ep.epoch, **{schema.TRAIN_LOSS: ep.train_loss, schema.VAL_LOSS: ep.val_loss,
                                        schema.EPOCH_LR: ep.lr})
        ck = self.scratch / f"ckpt-{ep.epoch}"
        ck.mkdir()
        try:
            src = self.work_dir / CHECKPOINT_FILE
            if src.exists():  # fit() wrote it atomically before calling us
                shutil.copy2(src, ck / CHECKPOINT_FILE)
            (ck / PROGRESS_FILE).write_text(json.dumps(
                {"trial_key": self.spec.key, "epoch": ep.epoch, "compute_seconds": self.clock()}))
            # report() copies the folder to the run's storage before returning. Every result
            # carries best_val_loss: a searcher (Optuna) requires its metric in each one.
            self.best = min(self.best, float(ep.val_loss))
            tune.report({"epoch": ep.epoch, "train_loss": ep.train_loss, "val_loss": ep.val_loss,
                         "best_val_loss": self.best},
                        checkpoint=tune.Checkpoint.from_directory(str(ck)))
        finally:
            shutil.rmtree(ck, ignore_errors=True)


def _restore(work_dir: Path, resume_from: str | None) -> tuple[float, int | None]:
    """Put the latest checkpoint into ``work_dir``: (compute seconds spent before it, its epoch
    or None when starting afresh)."""
    from ray import tune

    def take(folder: Path) -> tuple[float, int | None]:
        if (folder / CHECKPOINT_FILE).exists():
            shutil.copy2(folder / CHECKPOINT_FILE, work_dir / CHECKPOINT_FILE)
        progress = folder / PROGRESS_FILE
        if not progress.exists():
            return 0.0, None
        info = json.loads(progress.read_text())
        return float(info.get("compute_seconds", 0.0)), int(info.get("epoch", -1))

    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            return take(Path(folder))
    if resume_from and Path(resume_from).is_dir():
        return take(Path(resume_from))
    return 0.0, None


def _fetch_upstream(client, ctx: TrialContext, spec: TrialSpec, needs, scratch: Path) -> dict[str, Path]:
    """Download what the trial reads from its upstream run into its scratch folder (deleted
    with it: no per-node cache grows over a 310-trial sweep)."""
    from tracking.runs import fetch_artifacts

    if not needs:
        return {}
    run_id = ctx.upstream_runs.get(spec.upstream or "")
    if run_id is None:
        raise RuntimeError(f"upstream trial {spec.upstream} of {spec.label} has no FINISHED run")
    return {name: fetch_artifacts(client, run_id, name, scratch / "upstream") for name in needs}


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak) / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)


def _log_result(run, spec: TrialSpec, result, seconds: float) -> dict[str, float]:
    """Final metrics and artifacts of a finished stage; returns the metrics."""
    import pandas as pd

    from tracking import schema

    per_subject = result.per_subject
    metrics = {
        schema.DICE_MEAN: float(per_subject["dice"].mean()),
        schema.ECE_MEAN: float(per_subject["ece"].mean()),
        schema.BEST_VAL_LOSS: float(result.best_val_loss),
        schema.N_SUBJECTS: float(per_subject["subject_id"].nunique()),
        schema.COMPUTE_SECONDS: float(seconds),
        # the cost model's inputs (sweeps/simulate.py, --estimate): seconds per epoch run, and
        # the peak resident memory of the worker process that ran the trial
        schema.PEAK_RSS_MB: _peak_rss_mb(),
    }
    epochs = len(result.history or ())
    if epochs:
        metrics[schema.SECONDS_PER_EPOCH] = float(seconds) / epochs
    # every other per-subject metric the stage computed (brier, nll, true_ce, ...), as its mean
    for col in per_subject.columns:
        if col in ("subject_id", "fold", "dice", "ece"):
            continue
        values = pd.to_numeric(per_subject[col], errors="coerce")
        if values.notna().any():
            metrics[f"{col}_mean"] = float(values.mean())
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
    if tags:
        run.set_tags(tags)
    if getattr(result, "splits", None):
        run.log_json(result.splits, schema.SPLITS)
    if getattr(result, "preview", None):  # one slice of the first test subject, for the report
        from calib.preview import save_preview

        run.log_artifact(save_preview(result.preview, Path(result.weights).parent / schema.PREVIEW))
    run.log_text(per_subject.to_csv(index=False), schema.PER_SUBJECT)
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
    import ray
    from ray import tune

    import torch

    from tracking import schema
    from tracking.models import log_trial_lineage, system_metrics
    from tracking.runs import TrialRun
    from tracking.store import client as make_client
    from sweeps.stage_runner import run_stage, upstream_needs

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
        tune.report({schema.BEST_VAL_LOSS: None, STATUS_METRIC: f"{run.elsewhere}_ELSEWHERE",
                     RUN_ID_METRIC: run.run_id, ERROR_METRIC: run.elsewhere_note})
        return
    if run.already_finished:  # finished by an earlier attempt that Ray then retried
        metrics = client.get_run(run.run_id).data.metrics
        tune.report({schema.BEST_VAL_LOSS: None,
                     **{k: metrics.get(k) for k in schema.FINAL_METRICS if k in metrics},
                     STATUS_METRIC: "FINISHED", RUN_ID_METRIC: run.run_id})
        return

    scratch = Path(tempfile.mkdtemp(prefix=f"calib-{spec.key[:10]}-"))
    finished = False
    try:  # from here on every way out closes the run (FINISHED or FAILED)
        # Where this attempt runs: on a cluster, the node to look at when a trial misbehaves.
        run.set_tags({schema.NODE_ID: ray.get_runtime_context().get_node_id(),
                      schema.NODE_IP: ray.util.get_node_ip_address(), schema.WORKER_PID: os.getpid()})
        work_dir = scratch / "work"
        work_dir.mkdir()
        before, resumed_epoch = _restore(work_dir, ctx.resume_checkpoints.get(spec.key))
        if resumed_epoch is not None:
            run.set_tags({schema.RESUMED_EPOCH: resumed_epoch})
        start = time.monotonic()
        clock = lambda: before + time.monotonic() - start  # noqa: E731
        # The method's resolved parameters, with the LR a searcher chose where there is one.
        method_params = {**spec.config["params"], **({"lr": spec.lr} if spec.lr is not None else {})}
        run.log_params({"stage": spec.stage, "dataset": spec.dataset, "weights": spec.weights,
                        "method": spec.method, "fold": spec.fold, "lr": spec.lr_tag,
                        **{f"train.{k}": v for k, v in spec.config["train"].items()},
                        **{f"method.{k}": v for k, v in method_params.items()}})
        run.log_json({**spec.config, "lr": spec.lr, "trial_key": spec.key,
                      "passed_params": spec.params}, schema.TRIAL_CONFIG)
        upstream = _fetch_upstream(client, ctx, spec, upstream_needs(spec), scratch)
        device = torch.device("cuda" if spec.resources.gpu > 0 and torch.cuda.is_available() else "cpu")
        stage = ctx.stage_runner or run_stage
        with system_metrics(run.run_id, ctx.tracking_uri, ctx.system_metrics):
            result = stage(spec, ctx.data[spec.dataset], work_dir, upstream, device,
                           [_EpochReporter(run, spec, work_dir, scratch, clock)])
        metrics = _log_result(run, spec, result, clock())
        # MLflow's own view of the trial: its splits as datasets, its fitted model (tracking.models)
        log_trial_lineage(client, run.run_id, ctx.experiment_id,
                          {**spec.config, "lr": spec.lr, "trial_key": spec.key}, result.weights,
                          ctx.data[spec.dataset].get("cache_dir"), getattr(result, "splits", None),
                          ctx.upstream_runs.get(spec.upstream or ""), scratch / "lineage")
        run.finish()
        finished = True
        tune.report({**metrics, STATUS_METRIC: "FINISHED", RUN_ID_METRIC: run.run_id})
    except BaseException as exc:  # also Ctrl-C / SystemExit (Tune stopping the trial): no RUNNING run
        if finished:  # the run is complete; a failing last report must not turn it FAILED
            raise  # (a retry finds it FINISHED and only reports it)
        message = f"{type(exc).__name__}: {exc}"
        try:
            run.fail(message)
        except Exception:  # noqa: BLE001 - the store is down too: the driver closes the run
            traceback.print_exc()
        if not (isinstance(exc, Exception) and is_permanent(exc)):
            raise  # Ray retries the trial (it re-opens this run and resumes from its checkpoint)
        tune.report({STATUS_METRIC: "FAILED", ERROR_METRIC: message[:2000], schema.BEST_VAL_LOSS: None})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
