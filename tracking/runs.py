"""Lifecycle of the sweep's MLflow runs: one parent per launch, one child per trial.

Everything goes through an explicit :class:`MlflowClient` and run ids -- never MLflow's global
"active run" -- because trials run in Ray worker processes, several per process over time.

Guarantees the sweep relies on:

* **No duplicates after a retry.** A trial opens its run with :meth:`TrialRun.open`, which finds
  the run already created for the same trial key under the same parent (an earlier attempt that
  Ray retried or restored) and reuses it; epochs it already logged are not logged twice.
* **No run left RUNNING.** A failing trial ends its run FAILED with tag ``calib.error``; the
  launcher closes what a crashed worker left behind (:func:`fail_run`); a ``--resume`` launch
  closes the runs of a dead launch as KILLED (:func:`close_stale_runs`), never those of a live
  one (tracking.lease).
* **One launch per trial key.** The trial run is the trial's claim: created first, then checked
  against other launches' runs of the key (:func:`claimed_elsewhere`); the later of two claims
  yields and keeps no run. Claiming needs the store: while it is unreachable no trial starts
  (Ray retries the attempt), so none runs unclaimed.
* **Upstream results across nodes.** A downstream trial finds its upstream run by trial key
  (:func:`finished_trial_runs`) and downloads its artifacts (:func:`fetch_artifacts`) through the
  tracking server -- no path that exists on one node only.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from calib import atomic_io
from tracking import schema

RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
_MAX_TAG = 5000  # MLflow's tag value limit is 8000; one line of error is enough


def _q(value: str) -> str:
    """Quote a value for an MLflow filter string."""
    return "'" + str(value).replace("'", "\\'") + "'"


def search_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list:
    """Every run matching ``filter_string``, newest first (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


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
        try:
            status = KILLED if isinstance(exc, (KeyboardInterrupt, SystemExit)) else FAILED
            end_run(client, run.info.run_id, status, f"launch aborted: {type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    return run.info.run_id


def end_sweep_run(client: MlflowClient, run_id: str, status: str,
                  metrics: Mapping[str, float] | None = None) -> None:
    """Log the launch's totals and end its run with ``status``."""
    if metrics:
        ts = _now_ms()
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])
    client.set_terminated(run_id, status)


# ---- queries -------------------------------------------------------------------------------------

def finished_trial_runs(client: MlflowClient, experiment_id: str,
                        keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The newest FINISHED trial run per trial key in the experiment (optionally only ``keys``)."""
    wanted = None if keys is None else set(keys)
    out: dict[str, Any] = {}
    filt = f"tags.`{schema.ROLE}` = {_q(schema.ROLE_TRIAL)} and attributes.status = 'FINISHED'"
    for run in search_runs(client, experiment_id, filt):  # newest first: first seen wins
        key = run.data.tags.get(schema.TRIAL_KEY)
        if key and (wanted is None or key in wanted) and key not in out:
            out[key] = run
    return out


def trial_runs_under(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """The newest trial run per trial key among the children of ``parent_run_id``."""
    out: dict[str, Any] = {}
    filt = (f"tags.`{schema.ROLE}` = {_q(schema.ROLE_TRIAL)} and "
            f"tags.`{schema.PARENT_RUN_ID}` = {_q(parent_run_id)}")
    for run in search_runs(client, experiment_id, filt):
        out.setdefault(run.data.tags.get(schema.TRIAL_KEY, ""), run)
    return out


def find_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_key: str):
    """The newest run of ``trial_key`` under ``parent_run_id`` (any status), or None."""
    filt = (f"tags.`{schema.TRIAL_KEY}` = {_q(trial_key)} and "
            f"tags.`{schema.PARENT_RUN_ID}` = {_q(parent_run_id)}")
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
    from tracking.lease import LeaseCache

    filt = f"tags.`{schema.TRIAL_KEY}` = {_q(trial_key)} and tags.`{schema.ROLE}` = {_q(schema.ROLE_TRIAL)}"
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
    from tracking.lease import LeaseCache

    keep = set(keep)
    leases = LeaseCache(client, ttl_s=float("inf"))
    closed = []
    filt = "attributes.status = 'RUNNING'"
    for run in search_runs(client, experiment_id, filt):
        role = run.data.tags.get(schema.ROLE)
        if run.info.run_id in keep or role not in (schema.ROLE_SWEEP, schema.ROLE_TRIAL):
            continue
        owner = run.info.run_id if role == schema.ROLE_SWEEP else run.data.tags.get(schema.PARENT_RUN_ID, "")
        lease = leases.get(owner)
        if lease.alive:
            continue
        end_run(client, run.info.run_id, KILLED,
                f"killed: its launch died ({lease.reason}); closed by a --resume launch")
        closed.append(run.info.run_id)
    return closed


def close_running_trials(client: MlflowClient, experiment_id: str, parent_run_id: str,
                         status: str, message: str) -> list[str]:
    """End the RUNNING trial runs of one launch with ``status`` (an aborted launch); their ids."""
    closed = []
    for run in trial_runs_under(client, experiment_id, parent_run_id).values():
        if run.info.status == RUNNING:
            end_run(client, run.info.run_id, status, message)
            closed.append(run.info.run_id)
    return closed


def end_run(client: MlflowClient, run_id: str, status: str, message: str) -> None:
    """End a run with ``status`` (FAILED, KILLED) and its one-line reason in ``calib.error``."""
    client.set_tag(run_id, schema.ERROR, one_line(message))
    client.set_terminated(run_id, status)


def fail_run(client: MlflowClient, run_id: str, message: str) -> None:
    """End a run FAILED with its one-line reason in ``calib.error``."""
    end_run(client, run_id, FAILED, message)


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
                end_run(client, run_id, KILLED, f"not retried: the trial is {found.elsewhere_note}")
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
        if other is not None:  # lost the claim: leave no run of ours behind
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

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, FINISHED)

    def fail(self, message: str) -> None:
        fail_run(self.client, self.run_id, message)


def create_failed_run(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_key: str,
                      tags: Mapping[str, str], run_name: str, message: str) -> str:
    """Record a trial that failed before it could open its own run (e.g. its worker died): a
    FAILED run of the key under the launch (a record, not a claim)."""
    run = find_trial_run(client, experiment_id, parent_run_id, trial_key)
    if run is None:
        all_tags = {**{k: str(v) for k, v in tags.items()}, schema.TRIAL_KEY: trial_key,
                    schema.PARENT_RUN_ID: parent_run_id, schema.ROLE: schema.ROLE_TRIAL}
        run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    fail_run(client, run.info.run_id, message)
    return run.info.run_id


def _param_text(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        v = json.dumps(v, sort_keys=True, default=str)
    text = str(v)
    return text if len(text) <= 6000 else text[:5997] + "..."


# ---- upstream artifacts --------------------------------------------------------------------------

def fetch_artifacts(client: MlflowClient, run_id: str, artifact_path: str, cache_root: Path) -> Path:
    """Local copy of ``artifact_path`` of ``run_id`` under ``cache_root/<run_id>/``.

    Downloaded once per ``cache_root``; concurrent callers are safe: each downloads into its own
    temporary folder and the first to finish is renamed into place, so a reader never sees a
    half-written copy.
    """
    target = Path(cache_root) / run_id / artifact_path
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_io.temp_folder(target)
    try:
        local = Path(client.download_artifacts(run_id, artifact_path, str(tmp)))
        atomic_io.move_into_place(local, target)  # a lost race leaves the winner's copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

