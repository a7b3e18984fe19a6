"""Lifecycle of the sweep's MLflow runs: one parent per launch, one child per trial.

Everything goes through an explicit :class:`MlflowClient` and run ids -- never MLflow's global
"active run" -- because trials run in Ray worker processes, several per process over time.

Guarantees the sweep relies on:

* **No duplicates after a retry.** A trial opens its run with :meth:`TrialRun.open`, which finds
  the run already created for the same trial key under the same parent (an earlier attempt that
  Ray retried or restored) and reuses it; epochs it already logged are not logged twice.
* **No run left RUNNING.** Every run is ended by :func:`close_run` -- from a trial's outcome
  (:class:`TrialOutcome`, :func:`sweep_status`) or from an exception (:func:`error_status`: KILLED
  for Ctrl-C / SIGTERM, FAILED otherwise) -- with its reason in tag ``calib.error``. A failing
  trial ends its run FAILED; the launch settles what a crashed worker left behind
  (:func:`reconcile_trial`) and, when it is aborted itself, closes its runs
  (:func:`abort_launch`); a ``--resume`` launch closes the runs of a dead launch as KILLED
  (:func:`close_stale_runs`), never those of a live one (tracking.lease).
* **One launch per trial key.** The trial run is the trial's claim: created first, then checked
  against other launches' runs of the key (:func:`claimed_elsewhere`); the later of two claims
  yields and keeps no run. Claiming needs the store: while it is unreachable no trial starts
  (Ray retries the attempt), so none runs unclaimed.
* **Upstream results across nodes.** A downstream trial finds its upstream run by trial key
  (:func:`finished_trial_runs`) and downloads its artifacts (tracking.store.fetch_artifacts) through the
  tracking server -- no path that exists on one node only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from tracking import schema
from tracking.lease import LeaseCache
from tracking.store import FAILED, FINISHED, KILLED, RUNNING, quoted, search_runs
_MAX_TAG = 5000  # MLflow's tag value limit is 8000; one line of error is enough


class TrialOutcome(str, Enum):
    """What became of one planned trial in a launch (not an MLflow status: only FINISHED and
    FAILED are the status of a run of this launch)."""

    FINISHED = "FINISHED"  # its run in this launch FINISHED
    FAILED = "FAILED"  # its run in this launch FAILED
    SKIPPED = "SKIPPED"  # not run: its data were unusable or its upstream did not finish
    DONE_BEFORE = "DONE_BEFORE"  # FINISHED by another launch (an earlier one, or a concurrent one)
    ELSEWHERE = "ELSEWHERE"  # claimed by another live launch (--force-concurrent), or below such a trial

    @property
    def finished(self) -> bool:
        """The trial has a FINISHED run (its dependants can run)."""
        return self in (TrialOutcome.FINISHED, TrialOutcome.DONE_BEFORE)

    @property
    def settled(self) -> bool:
        """Nothing is left for this launch to do: finished, or left to the live launch that runs it."""
        return self.finished or self is TrialOutcome.ELSEWHERE


def sweep_status(outcomes: Iterable[TrialOutcome]) -> str:
    """The launch's sweep run status: FINISHED when every trial is settled
    (:attr:`TrialOutcome.settled`), else FAILED."""
    return FINISHED if all(TrialOutcome(o).settled for o in outcomes) else FAILED


def error_status(exc: BaseException) -> str:
    """How a run that ``exc`` interrupted ends: KILLED for Ctrl-C / SIGTERM (``SystemExit``), as a
    ``--resume`` would call it; FAILED for a crash."""
    return KILLED if isinstance(exc, (KeyboardInterrupt, SystemExit)) else FAILED


def error_message(exc: BaseException, context: str = "") -> str:
    """``[context: ]Type: message`` -- the ``calib.error`` text of a run ended by ``exc``."""
    text = f"{type(exc).__name__}: {exc}"
    return f"{context}: {text}" if context else text


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---- the launch (parent) run ---------------------------------------------------------------------

def start_sweep_run(client: MlflowClient, experiment_id: str, *, grid_name: str, grid_yaml: str,
                    git_commit: str | None = None, resumed: bool = False,
                    extra_tags: Mapping[str, str] | None = None) -> str:
    """Create the launch's parent run (tag ``calib.role=sweep``) holding the resolved grid."""
    tags = {schema.ROLE: schema.ROLE_SWEEP, schema.GRID: grid_name,
            schema.RESUMED: "true" if resumed else "false", **(extra_tags or {})}
    if git_commit:
        tags[schema.GIT_COMMIT] = git_commit
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = client.create_run(experiment_id, tags=tags, run_name=f"sweep-{grid_name}-{stamp}")
    try:
        client.log_text(run.info.run_id, grid_yaml, schema.GRID_FILE)
    except BaseException as exc:  # the caller never gets the id: close the run here, not RUNNING
        _close_quietly(client, run.info.run_id, error_status(exc), error_message(exc, ABORTED))
        raise
    return run.info.run_id


ABORTED = "launch aborted"  # calib.error prefix of the runs of a launch that an exception ended


def end_sweep_run(client: MlflowClient, run_id: str, outcomes: Iterable[TrialOutcome],
                  metrics: Mapping[str, float] | None = None) -> str:
    """Log the launch's totals and end its run as :func:`sweep_status` of ``outcomes``; that status."""
    if metrics:
        ts = _now_ms()
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])
    status = sweep_status(outcomes)
    close_run(client, run_id, status)
    return status


def abort_launch(client: MlflowClient, experiment_id: str, parent_run_id: str, exc: BaseException) -> None:
    """Close a launch that ``exc`` ended (Ctrl-C, SIGTERM, a crash): its RUNNING trial runs, then
    its sweep run, as :func:`error_status` says. Best effort: a store error is swallowed, the
    original error matters more (a later ``--resume`` closes what is left)."""
    status, reason = error_status(exc), error_message(exc, ABORTED)
    try:
        close_running_trials(client, experiment_id, parent_run_id, status, reason)
        close_run(client, parent_run_id, status, reason)
    except Exception:  # noqa: BLE001 - the original error matters more
        pass


def _close_quietly(client: MlflowClient, run_id: str, status: str, message: str) -> None:
    try:
        close_run(client, run_id, status, message)
    except Exception:  # noqa: BLE001 - the original error matters more
        pass


# ---- queries -------------------------------------------------------------------------------------

def finished_trial_runs(client: MlflowClient, experiment_id: str,
                        keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The newest FINISHED trial run per trial key in the experiment (optionally only ``keys``)."""
    wanted = None if keys is None else set(keys)
    out: dict[str, Any] = {}
    filt = f"tags.`{schema.ROLE}` = {quoted(schema.ROLE_TRIAL)} and attributes.status = {quoted(FINISHED)}"
    for run in search_runs(client, experiment_id, filt):  # newest first: first seen wins
        key = run.data.tags.get(schema.TRIAL_KEY)
        if key and (wanted is None or key in wanted) and key not in out:
            out[key] = run
    return out


def trial_runs_under(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """The newest trial run per trial key among the children of ``parent_run_id``."""
    out: dict[str, Any] = {}
    filt = (f"tags.`{schema.ROLE}` = {quoted(schema.ROLE_TRIAL)} and "
            f"tags.`{schema.PARENT_RUN_ID}` = {quoted(parent_run_id)}")
    for run in search_runs(client, experiment_id, filt):
        out.setdefault(run.data.tags.get(schema.TRIAL_KEY, ""), run)
    return out


def find_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_key: str):
    """The newest run of ``trial_key`` under ``parent_run_id`` (any status), or None."""
    filt = (f"tags.`{schema.TRIAL_KEY}` = {quoted(trial_key)} and "
            f"tags.`{schema.PARENT_RUN_ID}` = {quoted(parent_run_id)}")
    found = search_runs(client, experiment_id, filt)
    return found[0] if found else None


def claimed_elsewhere(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_key: str,
                      own_run_id: str, since_ms: int):
    """Another launch's run that claims ``trial_key``, or None (then this launch's claim, run
    ``own_run_id`` made at ``since_ms``, holds).

    A claim is a trial run of the key under another sweep run that is either RUNNING, under a
    live lease (tracking.lease), and made before ours -- by (start time, run id), so two launches
    that claim at once agree on who won -- or FINISHED since this launch started (a concurrent
    launch did the trial; runs finished before are what a launch without ``--resume`` repeats).
    """
    filt = f"tags.`{schema.TRIAL_KEY}` = {quoted(trial_key)} and tags.`{schema.ROLE}` = {quoted(schema.ROLE_TRIAL)}"
    leases, launch_start = None, None
    for run in search_runs(client, experiment_id, filt):
        if run.info.run_id == own_run_id or run.data.tags.get(schema.PARENT_RUN_ID) == parent_run_id:
            continue
        if run.info.status == RUNNING and (run.info.start_time, run.info.run_id) < (since_ms, own_run_id):
            leases = leases or LeaseCache(client)
            if leases.get(run.data.tags.get(schema.PARENT_RUN_ID, "")).alive:
                return run
        elif run.info.status == FINISHED:
            if launch_start is None:
                launch_start = client.get_run(parent_run_id).info.start_time
            if (run.info.end_time or 0) > launch_start:
                return run
    return None


def close_stale_runs(client: MlflowClient, experiment_id: str, keep: Iterable[str] = ()) -> list[str]:
    """End the RUNNING sweep and trial runs of dead launches as KILLED; their ids.

    Called by a ``--resume`` launch: a run still RUNNING whose launch's lease is dead
    (tracking.lease: sweep run ended, heartbeat older than its timeout, or its driver gone from
    this machine) will never be ended by anybody. The runs of a live launch are never touched,
    nor runs in ``keep``.
    """
    keep = set(keep)
    leases = LeaseCache(client, ttl_s=float("inf"))
    closed = []
    filt = f"attributes.status = {quoted(RUNNING)}"
    for run in search_runs(client, experiment_id, filt):
        role = run.data.tags.get(schema.ROLE)
        if run.info.run_id in keep or role not in (schema.ROLE_SWEEP, schema.ROLE_TRIAL):
            continue
        owner = run.info.run_id if role == schema.ROLE_SWEEP else run.data.tags.get(schema.PARENT_RUN_ID, "")
        lease = leases.get(owner)
        if lease.alive:
            continue
        close_run(client, run.info.run_id, KILLED,
                  f"killed: its launch died ({lease.reason}); closed by a --resume launch")
        closed.append(run.info.run_id)
    return closed


def close_running_trials(client: MlflowClient, experiment_id: str, parent_run_id: str,
                         status: str, message: str) -> list[str]:
    """End the RUNNING trial runs of one launch with ``status`` (an aborted launch); their ids."""
    closed = []
    for run in trial_runs_under(client, experiment_id, parent_run_id).values():
        if run.info.status == RUNNING:
            close_run(client, run.info.run_id, status, message)
            closed.append(run.info.run_id)
    return closed


def close_run(client: MlflowClient, run_id: str, status: str, message: str | None = None) -> None:
    """End a run with MLflow status ``status`` (FINISHED, FAILED, KILLED); ``message``, why it did
    not finish, goes into ``calib.error`` as one line first. Every run is ended here."""
    if status not in (FINISHED, FAILED, KILLED):
        raise ValueError(f"a run ends FINISHED, FAILED or KILLED, not {status!r}")
    if message is not None:
        client.set_tag(run_id, schema.ERROR, one_line(message))
    client.set_terminated(run_id, status)


def one_line(message: str) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= _MAX_TAG else text[:_MAX_TAG - 3] + "..."


# ---- a trial's run -------------------------------------------------------------------------------

@dataclass
class TrialRun:
    """The MLflow run of one trial, opened (or re-opened) by :meth:`open`.

    ``already_finished``: an earlier attempt of this launch finished the trial (Ray retried it
    after the run was closed); the caller should report and return. ``logged_epochs``: epochs an
    earlier attempt logged, so a resumed attempt does not log an epoch twice. ``elsewhere``:
    RUNNING or FINISHED when another launch claims the trial key (:func:`claimed_elsewhere`);
    ``run_id`` is then that launch's run, ``elsewhere_sweep`` its sweep run, and the caller
    must not run the trial.
    """

    client: MlflowClient
    run_id: str
    reused: bool = False
    already_finished: bool = False
    logged_epochs: set[int] = field(default_factory=set)
    elsewhere: str = ""
    elsewhere_sweep: str = ""

    @property
    def elsewhere_outcome(self) -> TrialOutcome:
        """DONE_BEFORE when the other launch finished the trial, ELSEWHERE while it runs it."""
        return TrialOutcome.DONE_BEFORE if self.elsewhere == FINISHED else TrialOutcome.ELSEWHERE

    @property
    def elsewhere_note(self) -> str:
        """``running in sweep run 1a2b...`` / ``finished by sweep run ...``."""
        verb = "running in" if self.elsewhere == RUNNING else "finished by"
        return f"{verb} sweep run {self.elsewhere_sweep} (its run {self.run_id})"

    @classmethod
    def open(cls, client: MlflowClient, experiment_id: str, parent_run_id: str, trial_key: str,
             tags: Mapping[str, str], run_name: str) -> "TrialRun":
        """The run of ``trial_key`` under ``parent_run_id``: found and re-opened, else created --
        the trial's claim -- unless another launch claims the key (:func:`claimed_elsewhere`):
        then a TrialRun with ``elsewhere`` set, and this launch keeps no run for the key (a new
        claim is deleted; a re-opened run is ended KILLED)."""
        run = find_trial_run(client, experiment_id, parent_run_id, trial_key)
        if run is not None:
            run_id = run.info.run_id
            if run.info.status == FINISHED:
                return cls(client, run_id, reused=True, already_finished=True)
            # Re-opened after a failed attempt: the claim lapsed while the run was not RUNNING,
            # so a claim made since then wins.
            other = claimed_elsewhere(client, experiment_id, parent_run_id, trial_key, run_id, _now_ms())
            if other is not None:
                found = cls._elsewhere(client, other)
                close_run(client, run_id, KILLED, f"not retried: the trial is {found.elsewhere_note}")
                return found
            client.update_run(run_id, status=RUNNING)
            if schema.ERROR in run.data.tags:
                client.delete_tag(run_id, schema.ERROR)
            steps = {m.step for m in client.get_metric_history(run_id, schema.TRAIN_LOSS)}
            return cls(client, run_id, reused=True, logged_epochs=steps)
        all_tags = {**{k: str(v) for k, v in tags.items()}, schema.TRIAL_KEY: trial_key,
                    schema.PARENT_RUN_ID: parent_run_id, schema.ROLE: schema.ROLE_TRIAL}
        run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
        other = claimed_elsewhere(client, experiment_id, parent_run_id, trial_key, run.info.run_id,
                                  run.info.start_time)
        if other is not None:  # lost the claim: leave no run of ours behind, and none RUNNING
            client.set_terminated(run.info.run_id, KILLED)  # even in the trash
            client.delete_run(run.info.run_id)
            return cls._elsewhere(client, other)
        return cls(client, run.info.run_id)

    @classmethod
    def _elsewhere(cls, client: MlflowClient, other) -> "TrialRun":
        return cls(client, other.info.run_id, elsewhere=other.info.status,
                   elsewhere_sweep=other.data.tags.get(schema.PARENT_RUN_ID, ""))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params once (a re-opened run already has them; MLflow refuses changed values)."""
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(str(k), _param_text(v)) for k, v in params.items() if str(k) not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def log_epoch(self, epoch: int, **values: float) -> None:
        """Per-epoch metrics with ``step=epoch``; skipped for an epoch already logged."""
        if epoch in self.logged_epochs:
            return
        ts = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, int(epoch))
                                                    for k, v in values.items()])
        self.logged_epochs.add(int(epoch))

    def log_metrics(self, values: Mapping[str, float]) -> None:
        ts = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in values.items()])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set ``tags`` in one request (a trial's few tags; MLflow's batch limit is 100)."""
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_json(self, obj: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's contents, under ``artifact_path``."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def final_metrics(self) -> dict[str, float]:
        """The run's final metrics (:data:`schema.FINAL_METRICS`) that it has."""
        metrics = self.client.get_run(self.run_id).data.metrics
        return {k: metrics[k] for k in schema.FINAL_METRICS if k in metrics}

    def finish(self) -> None:
        """End the run FINISHED (:func:`close_run`)."""
        close_run(self.client, self.run_id, FINISHED)

    def fail(self, message: str) -> None:
        """End the run FAILED with ``message`` in ``calib.error`` (:func:`close_run`)."""
        close_run(self.client, self.run_id, FAILED, message)


def create_failed_run(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_key: str,
                      tags: Mapping[str, str], run_name: str, message: str) -> str:
    """Record a trial that failed before it could open its own run (e.g. its worker died): a
    FAILED run of the key under the launch (a record, not a claim)."""
    run = find_trial_run(client, experiment_id, parent_run_id, trial_key)
    if run is None:
        all_tags = {**{k: str(v) for k, v in tags.items()}, schema.TRIAL_KEY: trial_key,
                    schema.PARENT_RUN_ID: parent_run_id, schema.ROLE: schema.ROLE_TRIAL}
        run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    close_run(client, run.info.run_id, FAILED, message)
    return run.info.run_id


@dataclass(frozen=True)
class TrialEnd:
    """How a trial ended, read back from its MLflow run (:func:`reconcile_trial`)."""

    outcome: TrialOutcome
    run_id: str
    error: str = ""
    compute_seconds: float = 0.0


def reconcile_trial(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_key: str,
                    tags: Mapping[str, str], run_name: str, error: str = "") -> TrialEnd:
    """Settle a trial that did not report its run closed FINISHED, from its run: FINISHED or
    FAILED as the run says; a run a crashed worker left RUNNING is ended FAILED with ``error``
    (Ray's) or the error the worker tagged; a trial without a run (it never started, its worker
    died first) gets a FAILED record (:func:`create_failed_run`)."""
    run = find_trial_run(client, experiment_id, parent_run_id, trial_key)
    if run is None:
        message = error or "the trial never started (no MLflow run)"
        run_id = create_failed_run(client, experiment_id, parent_run_id, trial_key, tags, run_name, message)
        return TrialEnd(TrialOutcome.FAILED, run_id, message)
    run_id, status = run.info.run_id, run.info.status
    err = run.data.tags.get(schema.ERROR) or error or status
    if status == RUNNING:
        # A worker that tagged its error but could not end the run: keep its message.
        err = error or run.data.tags.get(schema.ERROR) or "the trial ended without closing its run"
        close_run(client, run_id, FAILED, err)
        status = FAILED
    seconds = run.data.metrics.get(schema.COMPUTE_SECONDS, 0.0)
    if status == FINISHED:
        return TrialEnd(TrialOutcome.FINISHED, run_id, compute_seconds=seconds)
    return TrialEnd(TrialOutcome.FAILED, run_id, err, compute_seconds=seconds)


def _param_text(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        v = json.dumps(v, sort_keys=True, default=str)
    text = str(v)
    return text if len(text) <= 6000 else text[:5997] + "..."
