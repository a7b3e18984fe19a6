"""tracking.lease and the trial claims of tracking.runs on a real SQLite MLflow store (no Ray):
a lease is alive while its heartbeat is fresh and its driver exists, --resume closes only the
runs of dead launches, and two launches never both keep a run of one trial key."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from tracking import schema
from tracking.lease import Heartbeat, driver_tags, heartbeat_every, lease_of, live_leases
from tracking.runs import TrialRun, claimed_elsewhere, close_stale_runs, start_sweep_run, trial_runs_under
from tracking.store import get_or_create_experiment

TAGS = {schema.STAGE: "base", schema.DATASET: "brats18", schema.WEIGHTS: "CE", schema.METHOD: "base",
        schema.FOLD: "0", schema.LR: "", schema.PROTOCOL: "honest"}


@pytest.fixture
def store(mlflow_store):
    client = MlflowClient(mlflow_store)
    return client, get_or_create_experiment(client, "calib-lease", mlflow_store)


def _launch(client, exp, **tags) -> str:
    """A sweep run holding this process's lease (``tags`` override some of its tags)."""
    return start_sweep_run(client, exp, grid_name="t", grid_yaml="name: t\n",
                           extra_tags={**driver_tags(timeout_s=60), **tags})


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lease_lives_while_its_heartbeat_is_fresh_and_its_driver_exists(store):
    client, exp = store
    mine = _launch(client, exp)
    lease = lease_of(client.get_run(mine))
    assert lease.alive and lease.pid and lease.host and lease.timeout_s == 60
    assert mine in lease.describe() and "heartbeat 0 s ago" in lease.describe()

    assert not lease_of(client.get_run(mine), now=time.time() + 61).alive  # heartbeat timed out
    assert "timeout 60 s" in lease_of(client.get_run(mine), now=time.time() + 61).reason

    gone = _launch(client, exp, **{schema.DRIVER_PID: str(_dead_pid())})
    dead = lease_of(client.get_run(gone))
    assert not dead.alive and "is gone" in dead.reason  # same machine: no waiting for the timeout

    # On another machine the pid says nothing: only the heartbeat counts.
    remote = _launch(client, exp, **{schema.DRIVER_PID: str(_dead_pid()), schema.DRIVER_MACHINE: "other"})
    assert lease_of(client.get_run(remote)).alive
    assert {lease.run_id for lease in live_leases(client, exp)} == {mine, remote}

    client.set_terminated(remote, "FINISHED")
    assert [lease.run_id for lease in live_leases(client, exp, exclude=[mine])] == []
    legacy = start_sweep_run(client, exp, grid_name="t", grid_yaml="")  # a launch before leases
    assert not lease_of(client.get_run(legacy)).alive


def test_heartbeat_thread_refreshes_the_tag(store):
    client, exp = store
    run = _launch(client, exp, **{schema.HEARTBEAT: "1000.0"})
    assert heartbeat_every(180) == 30 and heartbeat_every(3) == 0.5
    with Heartbeat(client, run, every_s=0.2):
        end = time.monotonic() + 20
        while time.monotonic() < end and client.get_run(run).data.tags[schema.HEARTBEAT] == "1000.0":
            time.sleep(0.1)
    assert float(client.get_run(run).data.tags[schema.HEARTBEAT]) > time.time() - 30


def test_resume_closes_the_runs_of_dead_launches_only(store):
    client, exp = store
    live = _launch(client, exp)
    dead = _launch(client, exp, **{schema.DRIVER_PID: str(_dead_pid())})
    live_trial = TrialRun.open(client, exp, live, "a", TAGS, "t")
    dead_trial = TrialRun.open(client, exp, dead, "b", TAGS, "t")
    closed = close_stale_runs(client, exp)
    assert set(closed) == {dead, dead_trial.run_id}
    assert client.get_run(live).info.status == "RUNNING"
    assert client.get_run(live_trial.run_id).info.status == "RUNNING"
    killed = client.get_run(dead_trial.run_id)
    assert killed.info.status == "KILLED" and "is gone" in killed.data.tags[schema.ERROR]


def test_a_trial_key_claimed_by_a_live_launch_is_not_run_again(store):
    client, exp = store
    a, b = _launch(client, exp), _launch(client, exp)
    first = TrialRun.open(client, exp, a, "k", TAGS, "t")
    assert not first.elsewhere
    second = TrialRun.open(client, exp, b, "k", TAGS, "t")  # B's claim loses to A's RUNNING run
    assert second.elsewhere == "RUNNING" and second.run_id == first.run_id and second.elsewhere_sweep == a
    assert f"running in sweep run {a}" in second.elsewhere_note
    assert trial_runs_under(client, exp, b) == {}  # B keeps no run of the key
    # ... and the claim it made and lost is in the trash ended KILLED, not RUNNING
    lost = client.search_runs([exp], f"tags.`{schema.PARENT_RUN_ID}` = '{b}'", run_view_type=ViewType.DELETED_ONLY)
    assert [r.info.status for r in lost] == ["KILLED"]

    first.finish()
    again = TrialRun.open(client, exp, b, "k", TAGS, "t")  # A finished it while B runs
    assert again.elsewhere == "FINISHED" and again.run_id == first.run_id
    assert trial_runs_under(client, exp, b) == {}

    # A launch started after A finished (without --resume) runs the trial again, as before.
    c = _launch(client, exp)
    third = TrialRun.open(client, exp, c, "k", TAGS, "t")
    assert not third.elsewhere and third.run_id != first.run_id

    # A RUNNING run of a dead launch claims nothing.
    d = _launch(client, exp, **{schema.DRIVER_PID: str(_dead_pid())})
    TrialRun.open(client, exp, d, "z", TAGS, "t")
    assert not TrialRun.open(client, exp, a, "z", TAGS, "t").elsewhere


def test_two_claims_at_once_agree_on_one_winner(store):
    client, exp = store
    a, b = _launch(client, exp), _launch(client, exp)
    # Both created their run before either checked: each sees the other.
    ra = client.create_run(exp, tags={schema.TRIAL_KEY: "k", schema.PARENT_RUN_ID: a, schema.ROLE: "trial"})
    rb = client.create_run(exp, tags={schema.TRIAL_KEY: "k", schema.PARENT_RUN_ID: b, schema.ROLE: "trial"})
    wins = [claimed_elsewhere(client, exp, parent, "k", r.info.run_id, r.info.start_time) is None
            for parent, r in ((a, ra), (b, rb))]
    assert sorted(wins) == [False, True]
