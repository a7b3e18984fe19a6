"""The same command twice gives the same numbers (issue 20), and the train-time calibration
losses run as base weights end to end (issue 25).

Two launches of one small grid -- phantoms written by each launch into its own data root, CE
pretraining, base models CE-SD, focal, SVLS and CE + ACE, two post hoc calibrators on each --
run in separate processes, each with its own local Ray session, MLflow store and cache. Every
trial's metrics (timings aside) and its per_subject.csv must be identical between them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tracking import schema

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
#: What differs between two runs of one command by design: how long things took and the memory
#: the worker process held.
TIMINGS = {schema.COMPUTE_SECONDS, schema.SECONDS_PER_EPOCH, schema.PEAK_RSS_MB}


def _grid(root: Path) -> Path:
    grid = {
        "name": "repro",
        "seed": 0,
        "protocol": "honest",
        "work_dir": str(root / "work"),
        "datasets": {"brats18": {"phantom": {"subjects": 6, "seed": 0, "shape": [36, 36, 24],
                                             "label_noise": "correlated"}}},
        "data": {"root": str(root / "data"), "cache": str(root / "cache")},
        "preprocessing": {"spacing": 2.0, "shape": [18, 18, 12]},
        "folds": {"n_folds": 2, "seed": 0, "only": [0]},
        "network": {"preset": "tiny", "levels": 2, "base": 2},
        "weights": ["CE-SD", "focal", "svls", "ace"],
        "losses": {"focal": {"gamma": 3.0}},  # one set by the grid, the others their defaults
        "training": {"pretrain": {"lr": 1.0e-2, "max_epochs": 2, "batch_size": 2},
                     "base": {"lr": 1.0e-2, "max_epochs": 2, "batch_size": 2},
                     "calibrate": {"max_epochs": 2}},
        "methods": {"temperature": {}, "platt": {"params": {"optimizer": "adam"}}},
        "resources": {"pretrain": {"cpu": 1}, "base": {"cpu": 1}, "calibrate": {"cpu": 1}},
        "execution": {"max_failures": 1},
    }
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def _launch(root: Path) -> dict[str, tuple[dict, pd.DataFrame, dict]]:
    """Run the grid in a fresh process; per trial key: (metrics, per_subject, params)."""
    root.mkdir()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / "launch.py"), "--grid", str(_grid(root)),
                           "--tracking-uri", uri, "--num-cpus", "2", "--no-report", "--no-system-metrics"],
                          cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("calib-repro")
    out = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        if r.data.tags.get(schema.ROLE) != schema.ROLE_TRIAL:
            continue
        assert r.info.status == "FINISHED", r.data.tags
        per_subject = pd.read_csv(client.download_artifacts(r.info.run_id, schema.PER_SUBJECT,
                                                            str(root / r.info.run_id)))
        metrics = {k: v for k, v in r.data.metrics.items() if k not in TIMINGS}
        out[r.data.tags[schema.TRIAL_KEY]] = (metrics, per_subject, dict(r.data.params),
                                              r.data.tags[schema.STAGE], r.data.tags[schema.WEIGHTS])
    return out


def test_the_same_launch_twice_gives_identical_trials_and_train_time_losses_run(tmp_path):
    first, second = _launch(tmp_path / "a"), _launch(tmp_path / "b")
    # 1 pretrain, 4 base, 2 calibrators on each base model, every one FINISHED in both
    assert sorted(first) == sorted(second) and len(first) == 1 + 4 + 4 * 2
    for key, (metrics, per_subject, _, stage, weights) in first.items():
        metrics2, per_subject2, *_ = second[key]
        assert metrics == metrics2, (stage, weights)
        pd.testing.assert_frame_equal(per_subject, per_subject2, check_exact=True)

    # each train-time base model records the loss it trained with and its parameters (result.*:
    # what the stage resolved)
    base = {w: params for _, _, params, stage, w in first.values() if stage == "base"}
    assert set(base) == {"CE-SD", "focal", "svls", "ace"}
    assert float(base["focal"]["result.loss.gamma"]) == 3.0  # the grid's
    # calib.loss_recipes' defaults
    assert float(base["svls"]["result.loss.sigma"]) == 1.0 and int(base["svls"]["result.loss.size"]) == 3
    assert float(base["ace"]["result.loss.weight"]) == 1.0 and int(base["ace"]["result.loss.n_bins"]) == 20
    assert not any(k.startswith("result.loss.") for k in base["CE-SD"])
