"""tracking.runs: the trial run lifecycle on a real SQLite MLflow store (no Ray)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tracking import schema
from tracking.runs import (TrialRun, close_stale_runs, create_failed_run, finished_trial_runs,
                           start_sweep_run, trial_runs_under)
from tracking.store import fetch_artifacts

from run_helpers import BASE_TRIAL_TAGS as TAGS


def test_sweep_run_and_local_artifacts(store, tmp_path, mlflow_store):
    client, exp, parent = store
    run = client.get_run(parent)
    assert run.data.tags[schema.ROLE] == "sweep" and run.data.tags[schema.GIT_COMMIT] == "abc"
    assert [a.path for a in client.list_artifacts(parent)] == [schema.GRID_FILE]
    location = client.get_experiment(exp).artifact_location
    assert location == (Path(mlflow_store[len("sqlite:///"):]).parent / "mlruns").as_uri()


def test_sweep_run_is_closed_when_its_grid_cannot_be_logged(store, monkeypatch):
    client, exp, _ = store

    def broken(*args, **kwargs):
        raise OSError("artifact store full")

    monkeypatch.setattr(client, "log_text", broken)
    with pytest.raises(OSError, match="artifact store full"):
        start_sweep_run(client, exp, grid_name="broken", grid_yaml="name: broken\n")
    runs = client.search_runs([exp], f"tags.`{schema.GRID}` = 'broken'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "artifact store full" in runs[0].data.tags[schema.ERROR]


def test_reopened_trial_reuses_its_run(store):
    client, exp, parent = store
    first = TrialRun.open(client, exp, parent, "k1", TAGS, "base fold 0")
    first.log_params({"stage": "base", "train.lr": 0.01})
    first.log_epoch(0, train_loss=1.0, val_loss=1.1)
    first.log_epoch(1, train_loss=0.9, val_loss=1.0)
    first.fail("RuntimeError: worker died")
    assert client.get_run(first.run_id).data.tags[schema.ERROR] == "RuntimeError: worker died"

    again = TrialRun.open(client, exp, parent, "k1", TAGS, "base fold 0")  # Ray's retry
    assert again.run_id == first.run_id and again.reused and again.logged_epochs == {0, 1}
    run = client.get_run(again.run_id)
    assert run.info.status == "RUNNING" and schema.ERROR not in run.data.tags
    again.log_params({"stage": "base", "train.lr": 0.01, "extra": 1})  # no error on known params
    again.log_epoch(1, train_loss=0.5, val_loss=0.5)  # already logged: skipped
    again.log_epoch(2, train_loss=0.8, val_loss=0.9)
    again.finish()
    steps = [m.step for m in client.get_metric_history(again.run_id, schema.TRAIN_LOSS)]
    assert sorted(steps) == [0, 1, 2]
    tags = client.get_run(again.run_id).data.tags
    assert tags[schema.TRIAL_KEY] == "k1" and tags[schema.PARENT_RUN_ID] == parent
    assert tags[schema.ROLE] == "trial" and tags[schema.FOLD] == "0"

    done = TrialRun.open(client, exp, parent, "k1", TAGS, "base fold 0")
    assert done.already_finished and done.run_id == first.run_id
    assert len(trial_runs_under(client, exp, parent)) == 1


def test_new_launch_gets_a_new_run_and_newest_finished_wins(store):
    client, exp, parent = store
    a = TrialRun.open(client, exp, parent, "k", TAGS, "t")
    a.finish()
    parent2 = start_sweep_run(client, exp, grid_name="test", grid_yaml="", resumed=True)
    b = TrialRun.open(client, exp, parent2, "k", TAGS, "t")
    assert b.run_id != a.run_id and not b.reused
    b.finish()
    assert finished_trial_runs(client, exp)["k"].info.run_id == b.run_id
    assert finished_trial_runs(client, exp, keys=["other"]) == {}


def test_close_stale_runs_kills_running_only(store):
    client, exp, parent = store
    running = TrialRun.open(client, exp, parent, "r", TAGS, "t")
    done = TrialRun.open(client, exp, parent, "d", TAGS, "t")
    done.finish()
    failed = create_failed_run(client, exp, parent, "f", TAGS, "t", "ValueError: bad data")
    closed = close_stale_runs(client, exp)
    assert set(closed) == {running.run_id, parent}
    assert client.get_run(running.run_id).info.status == "KILLED"
    assert client.get_run(parent).info.status == "KILLED"
    assert client.get_run(done.run_id).info.status == "FINISHED"
    assert client.get_run(failed).info.status == "FAILED"
    assert client.get_run(failed).data.tags[schema.ERROR] == "ValueError: bad data"
    assert close_stale_runs(client, exp) == []


def test_fetch_artifacts_downloads_once(store, tmp_path):
    client, exp, parent = store
    run = TrialRun.open(client, exp, parent, "b", TAGS, "t")
    logits = tmp_path / "logits"
    logits.mkdir()
    (logits / "a.npy").write_bytes(b"12345")
    run.log_artifact(logits, schema.LOGITS_DIR)
    cache = tmp_path / "cache"
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetch_artifacts(client, run.run_id, "logits", cache)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and (results[0] / "a.npy").read_bytes() == b"12345"
    assert sorted(p.name for p in (cache / run.run_id).iterdir()) == ["logits"]  # no temp leftovers
