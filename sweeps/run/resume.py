"""What a launch picks up from earlier attempts and launches: MLflow run state and checkpoints.

Two kinds of state let a sweep go on instead of starting over:

* **Runs** (MLflow, through tracking.runs). A ``--resume`` launch first closes the RUNNING runs
  of dead launches as KILLED, then skips every trial key with a FINISHED run
  (:func:`pick_up`). A retried or resumed trial re-opens its own run and does not log an epoch
  twice (tracking.runs.TrialRun.open).
* **Checkpoints** (:class:`CheckpointIndex`, this project's own). After every epoch a trial's
  stage checkpoint is copied into ``<work_dir>/checkpoints/`` and a small JSON per trial key
  records the copy, its epoch and the compute seconds spent so far -- each written atomically
  (calib.atomic_io), the JSON last, so it always names a complete copy. A trial that Ray retries
  (on any node: the work dir is shared, the prepared data live there too) and a trial of a later
  launch after a crash both restore from it and train on mid-way. The trial key hashes
  everything that changes a result, so a checkpoint is only ever reused for the same trial.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calib import atomic_io
from tracking.runs import close_stale_runs, finished_trial_runs

#: Name of the checkpoint index inside a grid's work dir.
CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class Restored:
    """What :meth:`CheckpointIndex.restore` put in place: the epoch of the checkpoint (None when
    the trial starts afresh) and the compute seconds spent before it."""

    epoch: int | None = None
    compute_seconds: float = 0.0


class CheckpointIndex:
    """The latest checkpoint of each trial key, in one folder (module doc).

    ``<folder>/<key>.json``: ``{"trial_key", "epoch", "compute_seconds", "checkpoint"}``, the last
    the file name of the copy beside it (``<key>.epoch-<n>.pt``), or None for a stage that keeps
    no checkpoint (its epoch and compute seconds still carry over).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _entry(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def read(self, key: str) -> dict[str, Any] | None:
        """The index entry of ``key``, or None when there is none (or it is unreadable: then
        the trial starts afresh, as it would without the index)."""
        try:
            entry = json.loads(self._entry(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("trial_key") != key:
            return None
        return entry

    def save(self, key: str, checkpoint: Path, epoch: int, compute_seconds: float) -> None:
        """Record ``checkpoint`` (a stage's checkpoint file, if it wrote one) as the latest of
        ``key`` at ``epoch``: copied, then the entry rewritten, then the copy it named before
        removed -- at every moment the entry names a complete copy."""
        checkpoint = Path(checkpoint)
        self.folder.mkdir(parents=True, exist_ok=True)
        before = self.read(key)
        name = None
        if checkpoint.exists():
            name = f"{key}.epoch-{int(epoch):06d}.pt"
            atomic_io.atomic_write(self.folder / name, lambda tmp: shutil.copyfile(checkpoint, tmp))
        atomic_io.write_json(self._entry(key), {"trial_key": key, "epoch": int(epoch),
                                                "compute_seconds": float(compute_seconds), "checkpoint": name})
        if before and before.get("checkpoint") not in (None, name):
            (self.folder / Path(before["checkpoint"]).name).unlink(missing_ok=True)

    def restore(self, key: str, target: Path) -> Restored:
        """Copy the latest checkpoint of ``key`` to ``target`` (a stage's ``checkpoint.pt``);
        what was restored (nothing when the index has no complete entry)."""
        entry = self.read(key)
        if entry is None:
            return Restored()
        if entry.get("checkpoint"):
            source = self.folder / Path(str(entry["checkpoint"])).name
            if not source.is_file():  # removed by hand: start afresh
                return Restored()
            shutil.copyfile(source, target)
        return Restored(int(entry.get("epoch", -1)), float(entry.get("compute_seconds", 0.0)))


def checkpoint_dir(work_dir: Path) -> Path:
    """The checkpoint index of a grid's work dir."""
    return Path(work_dir) / CHECKPOINTS_DIR


@dataclass
class PickedUp:
    """The MLflow state a launch starts from (:func:`pick_up`): ``closed``, the stale runs a
    ``--resume`` ended; ``finished``, trial key -> newest FINISHED run in the experiment;
    ``done_before``, the ones this launch skips (all of them with ``--resume``, else none)."""

    closed: list[str] = field(default_factory=list)
    finished: dict[str, Any] = field(default_factory=dict)
    done_before: dict[str, Any] = field(default_factory=dict)


def pick_up(client, experiment_id: str, keys: Iterable[str], resume: bool) -> PickedUp:
    """Close what dead launches left RUNNING (``resume`` only; tracking.runs.close_stale_runs),
    then find the FINISHED runs of ``keys``; with ``resume`` those trials are done before."""
    closed = close_stale_runs(client, experiment_id) if resume else []
    finished = finished_trial_runs(client, experiment_id, keys)
    return PickedUp(closed, finished, dict(finished) if resume else {})
