"""A stand-in for calib.stages that the sweep's Ray glue is tested with (fast, no training).

It behaves as a stage must: resumes from ``work_dir/checkpoint.pt``, writes it every epoch before
calling the callbacks, returns a StageResult with per-subject rows of the test fold. A
:class:`FakeStage` picks trials by their fields (e.g. ``{"stage": "base", "fold": 1}``) to

* ``fail``: raise ValueError (bad data: no retry);
* ``crash_once``: on the first attempt raise RuntimeError at epoch 2 (a lost worker: Ray retries,
  the retry resumes from epoch 2); a marker file in ``marker_dir`` remembers the attempt;
* ``hold`` / ``release``: a ``hold`` trial waits at epoch 1 until a ``release`` trial has run
  all its epochs (a marker file in ``marker_dir``; at most HOLD_TIMEOUT_S), so that tests
  control which trial outlasts which without timing anything.

Ray pickles this module by value, so workers need not import it from the tests folder.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray.cloudpickle

EPOCHS = 4
HOLD_TIMEOUT_S = 90.0
RELEASED = "released"


def _matches(spec, selector) -> bool:
    return bool(selector) and all(getattr(spec, k) == v for k, v in selector.items())


class FakeStage:
    """Callable with sweeps.run.stage_runner.run_stage's signature (module doc)."""

    def __init__(self, fail: dict | None = None, crash_once: dict | None = None,
                 marker_dir: str | None = None, hold: dict | None = None, release: dict | None = None):
        self.fail, self.crash_once, self.marker_dir = fail, crash_once, marker_dir
        self.hold, self.release = hold, release

    def __call__(self, spec, data, work_dir, upstream, device, callbacks):
        marker = Path(self.marker_dir) / RELEASED if self.marker_dir else None
        return fake_run_stage(spec, data, work_dir, upstream, device, callbacks,
                              fail=_matches(spec, self.fail),
                              marker_dir=self.marker_dir if _matches(spec, self.crash_once) else None,
                              wait_for=marker if _matches(spec, self.hold) else None,
                              signal=marker if _matches(spec, self.release) else None)


def fake_run_stage(spec, data, work_dir, upstream, device, callbacks, fail=False, marker_dir=None,
                   wait_for: Path | None = None, signal: Path | None = None):
    from calib.stages import StageResult
    from calib.training import EpochResult

    work_dir = Path(work_dir)
    for name, path in upstream.items():  # the artifacts really arrived
        if not Path(path).exists():
            raise RuntimeError(f"upstream artifact {name} missing at {path}")
    if fail:
        raise ValueError(f"corrupt subject in {data['cache_dir']} (fake)")
    ckpt = work_dir / "checkpoint.pt"
    history = []
    start = 0
    if ckpt.exists():
        state = json.loads(ckpt.read_text())
        start, history = state["epoch"] + 1, state["history"]
    for epoch in range(start, EPOCHS):
        if wait_for is not None and epoch == 1:
            end = time.monotonic() + HOLD_TIMEOUT_S
            while not wait_for.exists() and time.monotonic() < end:
                time.sleep(0.2)
        if marker_dir and epoch == 2:
            marker = Path(marker_dir) / spec.key
            if not marker.exists():
                marker.write_text("crashed once")
                raise RuntimeError("worker lost (fake)")
        loss = 1.0 / (epoch + 1)
        history.append({"epoch": epoch, "train_loss": loss, "val_loss": loss + 0.1, "lr": 0.01})
        tmp = ckpt.with_suffix(".tmp")
        tmp.write_text(json.dumps({"epoch": epoch, "history": history}))
        os.replace(tmp, ckpt)
        for cb in callbacks:
            cb(EpochResult(epoch, loss, loss + 0.1, 0.01, ckpt))
    if signal is not None:
        signal.write_text(f"{spec.label} ran all its epochs")
    weights = work_dir / "weights.pt"
    weights.write_text(f"weights of {spec.key}")
    extra = {}
    if spec.stage == "base":
        logits = work_dir / "logits"
        logits.mkdir(exist_ok=True)
        (logits / "index.json").write_text("{}")
        extra["logits"] = logits
    test_ids = data["folds"][str(spec.fold)] if str(spec.fold) in data["folds"] else data["folds"][spec.fold]
    rng = np.random.default_rng(int(spec.key[:8], 16))
    per_subject = pd.DataFrame({"subject_id": test_ids, "fold": spec.fold,
                                "dice": rng.uniform(0.5, 0.9, len(test_ids)),
                                "ece": rng.uniform(0.01, 0.1, len(test_ids))})
    bins = pd.DataFrame([{"subject_id": s, "bin": b, "count": 10, "conf_sum": 0.5 * b, "pos_sum": 0.4 * b}
                         for s in test_ids for b in range(3)])
    return StageResult(weights, per_subject, bins, min(h["val_loss"] for h in history),
                       len(history), [EpochResult(h["epoch"], h["train_loss"], h["val_loss"], h["lr"])
                                      for h in history], extra, {"fake": True})


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
