"""sweeps.run.resume: the project's own checkpoint index (no Ray) and what a launch picks up."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from sweeps.run.resume import CheckpointIndex, checkpoint_dir, pick_up
from tracking.runs import TrialRun, start_sweep_run
from tracking.store import get_or_create_experiment


def test_the_index_names_the_latest_complete_checkpoint(tmp_path):
    index = CheckpointIndex(checkpoint_dir(tmp_path / "work"))
    ckpt = tmp_path / "checkpoint.pt"
    for epoch in range(3):
        ckpt.write_bytes(f"state at epoch {epoch}".encode())
        index.save("k", ckpt, epoch, compute_seconds=10.0 * (epoch + 1))
    # one copy kept: the older ones are removed once the entry names the new one
    assert sorted(p.name for p in index.folder.iterdir()) == ["k.epoch-000002.pt", "k.json"]
    target = tmp_path / "restored.pt"
    restored = index.restore("k", target)
    assert (restored.epoch, restored.compute_seconds) == (2, 30.0)
    assert target.read_bytes() == b"state at epoch 2"


def test_without_an_entry_a_trial_starts_afresh(tmp_path):
    index = CheckpointIndex(tmp_path / "checkpoints")
    target = tmp_path / "restored.pt"
    assert index.restore("missing", target).epoch is None and not target.exists()
    index.folder.mkdir()
    (index.folder / "bad.json").write_text("{not json")
    (index.folder / "other.json").write_text(json.dumps({"trial_key": "someone-else", "epoch": 3}))
    assert index.restore("bad", target).epoch is None and index.restore("other", target).epoch is None
    ckpt = tmp_path / "c.pt"
    ckpt.write_text("x")
    index.save("gone", ckpt, 4, 1.0)
    (index.folder / "gone.epoch-000004.pt").unlink()  # deleted by hand
    assert index.restore("gone", target).epoch is None and not target.exists()


def test_a_stage_without_a_checkpoint_still_carries_its_epoch_and_seconds(tmp_path):
    index = CheckpointIndex(tmp_path / "checkpoints")
    index.save("k", tmp_path / "none.pt", 0, 2.5)
    restored = index.restore("k", tmp_path / "restored.pt")
    assert (restored.epoch, restored.compute_seconds) == (0, 2.5) and not (tmp_path / "restored.pt").exists()


def test_pick_up_skips_finished_trials_only_with_resume(mlflow_store):
    client = MlflowClient(mlflow_store)
    exp = get_or_create_experiment(client, "calib-test", mlflow_store)
    dead = start_sweep_run(client, exp, grid_name="test", grid_yaml="name: test\n")
    TrialRun.open(client, exp, dead, "done", {}, "t").finish()
    TrialRun.open(client, exp, dead, "open", {}, "t")  # left RUNNING by a launch without a lease
    fresh = pick_up(client, exp, ["done", "open"], resume=False)
    assert set(fresh.finished) == {"done"} and fresh.done_before == {} and fresh.closed == []
    resumed = pick_up(client, exp, ["done", "open"], resume=True)
    assert set(resumed.done_before) == {"done"} and len(resumed.closed) == 2  # its trial and sweep run
    assert {client.get_run(r).info.status for r in resumed.closed} == {"KILLED"}
