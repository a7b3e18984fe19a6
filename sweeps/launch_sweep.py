"""One launch of a grid: validate, plan, track, run on Ray, summarise, report.

:func:`launch` is what ``python sweeps/launch.py`` calls. Exit status: 0 every planned trial is
FINISHED (in this launch or another) or left to a live launch that claimed it; 1 some trial failed
or was skipped; 2 bad arguments, grid, data root or tracking store, another launch live on the
experiment (without ``--force-concurrent``), or a local tracking store with a Ray cluster whose
other nodes cannot reach it -- reported in one line before any trial starts.

The launch holds a lease on the experiment (tracking.lease): its sweep run carries its driver's
host and pid and a heartbeat that a driver thread refreshes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import ray

from calib import atomic_io
from sweeps.cost.devices import DEFAULT_DEVICE, EstimateError
from sweeps.grid import GridConfig, GridError, Overrides, frozen_map, load_grid
from sweeps.plan import Plan, expand
from sweeps.run import cluster
from sweeps.run.execute import ExecutionSettings, Executor
from sweeps.run.resume import checkpoint_dir, pick_up
from sweeps.run.trainable import TrialContext
from sweeps.summary import DataErrorReport, degenerate_text, outcome_table, plan_table
from tracking import runs as tr
from tracking import schema
from tracking.guard import degenerate_models
from tracking.lease import DEFAULT_TIMEOUT_S, Heartbeat, driver_tags, heartbeat_every, live_leases
from tracking.store import (TrackingError, check_reachable, get_or_create_experiment, local_store_path,
                            resolve_tracking_uri, ui_command)
from tracking.store import client as make_client
from tracking.ui import prepare_experiment, source_tags

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_USAGE = 0, 1, 2
ENTRY_POINT = "sweeps/launch.py"  # mlflow.source.name of every run a launch creates
DATA_ERRORS_DIR = "data_errors"  # in the work dir: the full problem lists of unusable data


@dataclass(frozen=True)
class LaunchOptions:
    """Everything the command line can say (sweeps.cli builds it)."""

    grid: str
    dry_run: bool = False
    estimate: bool = False  # with dry_run: GPU-hours and wall time (sweeps.cost.estimate)
    gpus: int = 1
    device: str = DEFAULT_DEVICE  # the roofline of the estimate without a throughput file
    throughput: Path | None = None
    resume: bool = False
    address: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    data_roots: Mapping[str, str] = field(default_factory=frozen_map)
    search: str | None = None
    max_concurrent: int | None = None
    work_dir: str | None = None
    storage_path: str | None = None
    num_cpus: int | None = None
    report: bool = True
    verbose: bool = False
    force_concurrent: bool = False  # run beside a live launch, only the trials it has not claimed
    lease_timeout: float = DEFAULT_TIMEOUT_S  # seconds without a heartbeat: this launch counts as dead
    stage_runner: Callable | None = None  # tests: replaces sweeps.run.stage_runner.run_stage
    system_metrics: bool | None = None  # log system/* metrics per trial; None: the grid's setting


def _err(msg: str, err: TextIO) -> int:
    print(f"error: {msg}", file=err, flush=True)
    return EXIT_USAGE


def git_commit(repo: Path | None = None) -> str | None:
    """HEAD of the sweep's source tree, or None outside git / before the first commit."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _exit_on_sigterm() -> None:
    """SIGTERM (a pod eviction, ``kill``) unwinds like Ctrl-C, so runs are closed, not left RUNNING."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def launch(opts: LaunchOptions, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run (or, with ``dry_run``, describe) one launch of ``opts.grid``; the exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    started = time.monotonic()
    # Progress bars of artifact downloads would drown the one-line-per-trial log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    overrides = Overrides(data_roots=frozen_map(opts.data_roots), search=opts.search,
                          work_dir=opts.work_dir, max_concurrent=opts.max_concurrent)
    try:
        grid = load_grid(opts.grid, overrides, require_data=not opts.dry_run)
        plan = expand(grid)
    except (GridError, ValueError) as exc:
        return _err(str(exc), err)
    experiment = opts.experiment or f"calib-{grid.name}"
    uri = resolve_tracking_uri(opts.tracking_uri)
    if opts.dry_run:
        rc = dry_run(plan, uri, experiment, out, err)
        if rc == EXIT_OK and opts.estimate:
            rc = _estimate(plan, opts, out, err)
        return rc
    address = opts.address or os.environ.get("RAY_ADDRESS") or None
    if local_store_path(uri) is not None and not cluster.is_local_address(address):
        return _err(_store_guard(uri, f"the Ray cluster at {address} is not on this machine"), err)
    try:
        check_reachable(uri)
    except TrackingError as exc:
        return _err(str(exc), err)
    _exit_on_sigterm()
    return _run(grid, plan, opts, uri, experiment, started, out, err)


def _store_guard(uri: str, why: str) -> str:
    """The one line refusing a local tracking store that the cluster's workers cannot reach."""
    return (f"the tracking store {uri} is a file on this machine, but {why}: trials on other "
            "nodes could not record their runs. Run an MLflow server (e.g. `mlflow server "
            "--backend-store-uri postgresql://USER@DBHOST/mlflow --serve-artifacts --host 0.0.0.0 "
            "--port 5000`) and pass its URI: --tracking-uri http://THIS_HOST:5000")


def _estimate(plan: Plan, opts: LaunchOptions, out: TextIO, err: TextIO) -> int:
    # counting FLOPs loads the science (calib.stages, MONAI: seconds): only --estimate needs it
    from sweeps.cost.estimate import estimate, estimate_text
    from sweeps.cost.model import CostModel

    try:
        cost = CostModel.from_files([opts.throughput] if opts.throughput else [], device=opts.device)
        result = estimate(plan, cost, opts.gpus)
    except EstimateError as exc:
        return _err(str(exc), err)
    print(estimate_text(result), file=out, flush=True)
    return EXIT_OK


def dry_run(plan: Plan, uri: str, experiment: str, out: TextIO, err: TextIO) -> int:
    """Print the plan and what MLflow already holds; start nothing (no Ray, no new store)."""
    grid = plan.grid
    print(f"grid {grid.name} ({grid.source}); protocol {grid.protocol}; search {grid.search.kind}; "
          f"network {grid.network.preset}; {grid.folds.n_folds} folds", file=out)
    finished: set[str] | None = set()
    note = ""
    local = local_store_path(uri)
    if local is not None and not local.exists():
        note = " (store does not exist yet)"
    else:
        try:
            check_reachable(uri)
            finished = _finished_keys(uri, experiment, plan)
        except TrackingError as exc:
            print(plan_table(plan, None), file=out)
            return _err(str(exc), err)
    print(plan_table(plan, finished), file=out)
    for d in grid.datasets:
        state = "not set" if d.root is None else (
            "exists" if d.root.is_dir() else ("phantoms written on first use" if d.phantom else "MISSING"))
        print(f"data {d.name}: {d.root or '-'} ({state})", file=out)
    print(f"MLflow: {uri}, experiment {experiment}{note}", file=out)
    print("dry run: nothing started", file=out, flush=True)
    return EXIT_OK


def _finished_keys(uri: str, experiment: str, plan: Plan) -> set[str]:
    c = make_client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return set()
    return set(tr.finished_trial_runs(c, exp.experiment_id, plan.by_key))


def _run(grid: GridConfig, plan: Plan, opts: LaunchOptions, uri: str, experiment: str,
         started: float, out: TextIO, err: TextIO) -> int:
    client = make_client(uri)
    exp_id = get_or_create_experiment(client, experiment, uri)
    live = live_leases(client, exp_id)
    if live and not opts.force_concurrent:
        other = live[0]
        return _err(f"another launch is live on experiment {experiment}: {other.describe()}. Wait for "
                    f"it to end, or pass --force-concurrent to run only the trials it has not claimed "
                    f"(it counts as dead {other.timeout_s:g} s after its last heartbeat; --resume "
                    "then takes over)", err)
    for other in live:
        print(f"note: {other.describe()} is live on experiment {experiment}; --force-concurrent: "
              "this launch runs only the trials it has not claimed", file=out)
    runs_url = prepare_experiment(client, exp_id, uri)  # the UI opens on the runs (tracking.ui)
    run_tags = source_tags(ENTRY_POINT, git_commit())
    picked = pick_up(client, exp_id, plan.by_key, opts.resume)
    if picked.closed:
        print(f"resume: closed {len(picked.closed)} stale RUNNING run(s) of a dead launch as KILLED", file=out)
    done_before = picked.done_before
    if picked.finished and not opts.resume:
        print(f"note: {len(picked.finished)} of these trials already FINISHED in experiment {experiment}; "
              "they run again (--resume skips them)", file=out)
    todo = [t for t in plan.trials if t.key not in done_before]

    # Nothing to run (a --resume of a complete sweep): no Ray at all.
    started_ray = cluster.connect_ray(opts.address, opts.num_cpus, opts.verbose) if todo else False
    parent, parent_done, beat = None, False, None
    try:
        nodes = cluster.alive_nodes() if todo else 1
        if nodes > 1 and local_store_path(uri) is not None:
            return _err(_store_guard(uri, f"the Ray cluster has {nodes} nodes"), err)
        problems = cluster.resource_problems(todo, cluster.cluster_resources()) if todo else []
        if problems:
            msg = "; ".join(problems)
            if started_ray:  # a local Ray will never grow
                return _err(f"{msg} (lower resources in the grid, or connect to a cluster with --address)", err)
            print(f"warning: {msg} (waiting for the cluster to scale up)", file=err)

        grid_yaml = grid.to_yaml()
        parent = tr.start_sweep_run(client, exp_id, grid_name=grid.name, grid_yaml=grid_yaml,
                                    git_commit=git_commit(), resumed=opts.resume,
                                    extra_tags={**driver_tags(opts.lease_timeout), **run_tags})
        beat = Heartbeat(make_client(uri), parent, heartbeat_every(opts.lease_timeout)).start()
        print(f"launch: grid {grid.name}, {len(plan.trials)} trials, {len(todo)} to run; "
              f"experiment {experiment}; sweep run {parent}", file=out, flush=True)
        print(f"runs: {runs_url}", file=out, flush=True)

        data, data_errors = _prepare(grid, todo, err, parent[:8])
        system = opts.system_metrics if opts.system_metrics is not None else grid.execution.system_metrics
        ctx = TrialContext(tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent, data=data,
                           run_tags=run_tags, system_metrics=system)
        settings = ExecutionSettings(storage_path=_storage_path(opts, grid),
                                     launch_name=f"{grid.name}-{parent[:8]}",
                                     max_failures=grid.execution.max_failures,
                                     max_concurrent=grid.execution.max_concurrent,
                                     checkpoint_dir=str(checkpoint_dir(grid.work_dir).resolve()),
                                     stage_runner=opts.stage_runner)
        executor = Executor(plan, client, ctx, settings, done_before, data_errors, out)
        outcomes = executor.run()
        wall = time.monotonic() - started
        capacity = cluster.cluster_resources() if todo else {}
        ok = _end_sweep(client, parent, outcomes, wall)
        parent_done = True
    except BaseException as exc:
        if parent is not None and not parent_done:
            # Interrupted (Ctrl-C, SIGTERM): KILLED, as --resume would call them; a crash: FAILED.
            tr.abort_launch(client, exp_id, parent, exc)
        raise
    finally:
        if beat is not None:
            beat.stop()
        if started_ray:
            ray.shutdown()

    slots_of = (lambda t: cluster.trial_slots(t.resources, capacity, settings.max_concurrent)) if capacity else None
    print("\n" + outcome_table(outcomes, wall, slots_of, executor.trials_wall), file=out)
    print(degenerate_text(degenerate_models(client, exp_id, plan.by_key)), file=out)
    if opts.report:
        _report(experiment, uri, parent, grid.work_dir / "report", out, err)
    print(f"\nbrowse the runs: {ui_command(uri)}, then {runs_url}", file=out, flush=True)
    return EXIT_OK if ok else EXIT_TRIALS_FAILED


def _prepare(grid: GridConfig, todo, err: TextIO, launch_id: str) -> tuple[dict, dict]:
    """Prepare (phantoms, cache, folds) every dataset with trials to run, as Ray tasks:
    (dataset -> PreparedData dict, dataset -> one-line error)."""
    datasets = sorted({t.dataset for t in todo})
    if not datasets:
        return {}, {}
    # Preprocessing workers: one task on one node, so the CPUs of the largest node, not the
    # cluster's total (two 1-CPU nodes cannot run a 2-CPU task: it would wait forever).
    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    cpus = max(1, min(4, int(max(node_cpus, default=1))))
    prepared = cluster.prepare_data(grid, datasets, cpus=cpus)
    data = {d: v for d, v in prepared.items() if not isinstance(v, Exception)}
    failed = {d: v for d, v in prepared.items() if isinstance(v, Exception)}
    return data, report_data_errors(failed, grid.work_dir / DATA_ERRORS_DIR, launch_id, err)


def report_data_errors(failed: Mapping[str, BaseException], folder: Path, launch_id: str,
                       err: TextIO) -> dict[str, str]:
    """Print why each dataset in ``failed`` could not be prepared, every problem in full up to
    sweeps.summary.DATA_PROBLEMS_SHOWN (a longer list is written whole to
    ``folder/<dataset>-<launch_id>.txt``, named in the message); the one-line reason per dataset."""
    reasons = {}
    for d, exc in failed.items():
        report = DataErrorReport.of(d, exc)
        full_list = folder / f"{d}-{launch_id}.txt"
        if report.truncated:
            full_list.parent.mkdir(parents=True, exist_ok=True)
            atomic_io.write_text(full_list, report.full_text())
        print("\n".join(report.lines(full_list)), file=err, flush=True)
        reasons[d] = report.reason
    return reasons


def _storage_path(opts: LaunchOptions, grid: GridConfig) -> str:
    """Ray Tune's storage: --storage-path or <work_dir>/ray_results; URIs (s3://) as given."""
    storage = opts.storage_path or str(grid.work_dir / "ray_results")
    return storage if "://" in storage else str(Path(storage).resolve())


def _end_sweep(client, parent: str, outcomes: Mapping, wall: float) -> bool:
    """End the sweep run FINISHED when every trial is (or another live launch runs it), else
    FAILED (tracking.runs.sweep_status), with the launch's totals; True when FINISHED."""
    O = tr.TrialOutcome  # noqa: N806
    n = {s: sum(o.status == s for o in outcomes.values()) for s in O}
    status = tr.end_sweep_run(client, parent, [o.status for o in outcomes.values()], {
        schema.TRIALS_PLANNED: len(outcomes), schema.TRIALS_FINISHED: n[O.FINISHED],
        schema.TRIALS_FAILED: n[O.FAILED], schema.TRIALS_SKIPPED: n[O.SKIPPED],
        schema.TRIALS_DONE_BEFORE: n[O.DONE_BEFORE], schema.TRIALS_ELSEWHERE: n[O.ELSEWHERE],
        schema.WALL_SECONDS: wall,
        schema.COMPUTE_SECONDS: sum(o.compute_seconds for o in outcomes.values() if o.status != O.DONE_BEFORE)})
    return status == tr.FINISHED


def _report(experiment: str, uri: str, parent: str, out_dir: Path, out: TextIO, err: TextIO) -> None:
    """The analysis report (tracking.report) of the whole experiment; its failure is reported,
    not fatal -- the trials' exit status stands."""
    # the report's tables and figures (pandas, scipy, matplotlib) load only after the trials ran
    from tracking.report import ReportWarning, build_report

    try:
        with warnings.catch_warnings():  # printed below, once each, without a stack line
            warnings.simplefilter("ignore", ReportWarning)
            outcome = build_report(experiment, out_dir, tracking_uri=uri, sweep_run=parent,
                                   scope="experiment")
    except Exception as exc:  # noqa: BLE001 - a report problem must not hide the sweep's result
        print(f"report: failed: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}", file=err)
        return
    print(f"report: {out_dir} ({len(outcome.files)} files)", file=out)
    for r in getattr(outcome, "registered", ()):
        print(f"registered {r.uri}: {r.dataset}/{r.weights}/{r.method}", file=out)
    for w in outcome.warnings[:5]:
        print(f"report warning: {w}", file=out)
    if len(outcome.warnings) > 5:
        print(f"report: {len(outcome.warnings) - 5} more warning(s) in {out_dir / 'report.md'}", file=out)
