"""tracking.runs: how runs end -- close_run, the KILLED-or-FAILED rule, the sweep run's status
from the trials' outcomes, an aborted launch, and the reconcile step -- on a real SQLite store."""

from __future__ import annotations

import pytest

from tracking import schema
from tracking.runs import (FAILED, FINISHED, KILLED, RUNNING, TrialOutcome, TrialRun, abort_launch, close_run,
                           end_sweep_run, error_status, find_trial_run, reconcile_trial,
                           sweep_status)

from run_helpers import BASE_TRIAL_TAGS as TAGS


def test_statuses_are_mlflows_and_the_error_rule_is_one():
    assert (RUNNING, FINISHED, FAILED, KILLED) == ("RUNNING", "FINISHED", "FAILED", "KILLED")
    assert error_status(KeyboardInterrupt()) == KILLED and error_status(SystemExit(143)) == KILLED
    assert error_status(RuntimeError("boom")) == FAILED


def test_sweep_status_from_the_outcomes():
    O = TrialOutcome  # noqa: N806
    assert sweep_status([O.FINISHED, O.DONE_BEFORE, O.ELSEWHERE]) == FINISHED
    assert sweep_status([O.FINISHED, O.SKIPPED]) == FAILED and sweep_status([O.FAILED]) == FAILED
    assert sweep_status(["FINISHED", "DONE_BEFORE"]) == FINISHED  # as a trial reports them to Tune
    assert [o for o in O if o.finished] == [O.FINISHED, O.DONE_BEFORE]


def test_close_run_tags_the_reason_and_refuses_running(store):
    client, exp, parent = store
    run = TrialRun.open(client, exp, parent, "k", TAGS, "t")
    with pytest.raises(ValueError, match="RUNNING"):
        close_run(client, run.run_id, RUNNING)
    close_run(client, run.run_id, KILLED, "stopped\nby hand")
    got = client.get_run(run.run_id)
    assert got.info.status == KILLED and got.data.tags[schema.ERROR] == "stopped by hand"


def test_end_sweep_run_logs_totals_and_ends_as_the_outcomes_say(store):
    client, exp, parent = store
    status = end_sweep_run(client, parent, [TrialOutcome.FINISHED, TrialOutcome.SKIPPED], {schema.TRIALS_PLANNED: 2})
    run = client.get_run(parent)
    assert status == FAILED == run.info.status and run.data.metrics[schema.TRIALS_PLANNED] == 2


def test_an_aborted_launch_closes_its_running_trials_and_its_sweep_run(store):
    client, exp, parent = store
    running = TrialRun.open(client, exp, parent, "r", TAGS, "t")
    done = TrialRun.open(client, exp, parent, "d", TAGS, "t")
    done.finish()
    abort_launch(client, exp, parent, KeyboardInterrupt())
    for run_id, status in ((running.run_id, KILLED), (parent, KILLED), (done.run_id, FINISHED)):
        assert client.get_run(run_id).info.status == status
    assert "launch aborted: KeyboardInterrupt" in client.get_run(running.run_id).data.tags[schema.ERROR]


def test_reconcile_closes_a_run_a_dead_worker_left_running(store):
    client, exp, parent = store
    run = TrialRun.open(client, exp, parent, "k", TAGS, "t")
    run.log_metrics({schema.COMPUTE_SECONDS: 5.0})
    end = reconcile_trial(client, exp, parent, "k", TAGS, "t", error="RayActorError: node lost")
    assert (end.outcome, end.run_id, end.error, end.compute_seconds) == (
        TrialOutcome.FAILED, run.run_id, "RayActorError: node lost", 5.0)
    got = client.get_run(run.run_id)
    assert got.info.status == FAILED and got.data.tags[schema.ERROR] == "RayActorError: node lost"


def test_reconcile_keeps_the_error_a_worker_tagged_and_reads_ended_runs_as_they_are(store):
    client, exp, parent = store
    tagged = TrialRun.open(client, exp, parent, "tagged", TAGS, "t")
    client.set_tag(tagged.run_id, schema.ERROR, "OSError: disk full")  # then the store went away
    end = reconcile_trial(client, exp, parent, "tagged", TAGS, "t")
    assert end.outcome == TrialOutcome.FAILED and end.error == "OSError: disk full"
    assert client.get_run(tagged.run_id).info.status == FAILED

    done = TrialRun.open(client, exp, parent, "done", TAGS, "t")
    done.finish()
    end = reconcile_trial(client, exp, parent, "done", TAGS, "t", error="a late Tune error")
    assert end.outcome == TrialOutcome.FINISHED and end.run_id == done.run_id
    assert client.get_run(done.run_id).info.status == FINISHED


def test_reconcile_records_a_trial_that_never_opened_its_run(store):
    client, exp, parent = store
    end = reconcile_trial(client, exp, parent, "never", TAGS, "t never")
    run = find_trial_run(client, exp, parent, "never")
    assert end.outcome == TrialOutcome.FAILED and end.run_id == run.info.run_id
    assert run.info.status == FAILED and run.data.tags[schema.ERROR] == "the trial never started (no MLflow run)"
    assert run.data.tags[schema.ROLE] == schema.ROLE_TRIAL and run.data.tags[schema.STAGE] == "base"
