"""sweeps.run.trainable._log_result: a finished stage's metrics, tags and artifacts, on a recording
stand-in for the trial's MLflow run (no store, no Ray)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from calib.evaluate import BIN_COLUMNS
from calib.stages import StageResult
from calib.training import EpochResult
from sweeps.run.trainable import _log_result
from tracking import schema


class RecordingRun:
    """What _log_result hands to tracking.runs.TrialRun, kept for the assertions."""

    def __init__(self):
        self.tags, self.texts, self.metrics, self.artifacts = {}, {}, {}, []

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_text(self, text, name):
        self.texts[name] = text

    def log_metrics(self, metrics):
        self.metrics.update(metrics)

    def log_artifact(self, path, name=None):
        self.artifacts.append(name)

    def log_json(self, obj, name):
        self.texts[name] = obj

    def log_epoch(self, epoch, **metrics):
        pass

    def log_params(self, params):
        pass


def _rows(ids, seed, truth=True):
    rng = np.random.default_rng(seed)
    n = len(ids)
    df = pd.DataFrame({"subject_id": ids, "fold": 0, "dice": rng.uniform(0.5, 0.9, n),
                       "ece": rng.uniform(0.01, 0.1, n), "brier": rng.uniform(0.01, 0.05, n),
                       "nll": rng.uniform(0.05, 0.3, n)})
    if truth:
        df["true_ece"] = rng.uniform(0.0, 0.05, n)
        df["p_star_distance"] = df["true_ece"] + rng.uniform(0.0, 0.05, n)
    return df


def _result(tmp_path, val, constant=None):
    weights = tmp_path / "method.pt"
    weights.write_text("fitted")
    bins = pd.DataFrame([{"subject_id": "t0", "bin": b, "count": 1, "conf_sum": 0.0, "pos_sum": 0}
                         for b in range(20)])[list(BIN_COLUMNS)]
    return StageResult(weights, _rows(["t0", "t1", "t2"], 0), bins, 0.3, 1,
                       [EpochResult(0, 0.4, 0.3, 0.01)], params={"fit_split": "calib"},
                       val_per_subject=val, val_reliability_bins=None if val is None else bins,
                       constant_output=constant)


SPEC = SimpleNamespace(config={"params": {}})


def test_val_metrics_are_the_means_over_the_val_subjects_and_their_rows_are_logged(tmp_path):
    val = _rows(["v0", "v1"], 1)
    val.loc[1, "nll"] = np.nan  # a subject without a value is left out of the mean, as on test
    run = RecordingRun()
    metrics = _log_result(run, SPEC, _result(tmp_path, val), 12.0)
    assert metrics[schema.VAL_DICE_MEAN] == pytest.approx(val["dice"].mean())
    assert metrics[schema.VAL_ECE_MEAN] == pytest.approx(val["ece"].mean())
    assert metrics[schema.VAL_BRIER_MEAN] == pytest.approx(val["brier"].mean())
    assert metrics[schema.VAL_NLL_MEAN] == pytest.approx(val.loc[0, "nll"])
    assert metrics[schema.DICE_MEAN] != metrics[schema.VAL_DICE_MEAN]  # test and val kept apart
    logged = pd.read_csv(io.StringIO(run.texts[schema.VAL_PER_SUBJECT]))
    pd.testing.assert_frame_equal(logged, val, check_dtype=False)
    assert run.metrics == metrics
    # the phantom-only columns of per_subject.csv become <col>_mean
    test = _result(tmp_path, val).per_subject
    assert metrics["true_ece_mean"] == pytest.approx(test["true_ece"].mean())
    assert metrics["p_star_distance_mean"] == pytest.approx(test["p_star_distance"].mean())
    assert "true_ce_mean" not in metrics
    assert schema.CONSTANT_OUTPUT not in run.tags and run.tags[schema.FIT_SPLIT] == "calib"


def test_a_stage_without_val_rows_logs_no_val_metric(tmp_path):
    run = RecordingRun()
    metrics = _log_result(run, SPEC, _result(tmp_path, None), 1.0)
    assert not set(schema.VAL_METRICS) & set(metrics)
    assert schema.VAL_PER_SUBJECT not in run.texts and schema.PER_SUBJECT in run.texts


def test_a_constant_calibrator_is_tagged_with_its_reason(tmp_path):
    reason = "constant output: on each of the 3 test subjects ... (p = 0.0052); it ranks no voxel"
    run = RecordingRun()
    metrics = _log_result(run, SPEC, _result(tmp_path, _rows(["v0"], 2), constant=reason), 1.0)
    assert run.tags[schema.CONSTANT_OUTPUT] == reason
    assert schema.DEGENERATE not in run.tags
    assert metrics[schema.DICE_MEAN] > 0  # still scored and logged like any trial
