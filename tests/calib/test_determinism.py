"""A stage's numbers do not depend on what ran before it in the process, nor on the process.

Issue 20, point 3: every stage starts from :func:`calib.training.start_stage` (RNGs seeded from its
config, deterministic algorithms), so the same base stage run twice in one process with another
random stage between gives bit-identical weights, logits and metrics, and so does a fresh process.
"""

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from calib.data import make_folds, preprocess_dataset, write_phantoms
from calib.logits import load_logits
from calib.nets import UNetConfig
from calib.stages import make_split, run_base, run_calibrate, run_pretrain
from calib.training import TrainConfig, start_stage

CPU = torch.device("cpu")
NET = UNetConfig.tiny(4, levels=3, base=2)
TRAIN = TrainConfig(lr=3e-3, max_epochs=2, batch_size=2)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    ids = write_phantoms("brats18", root / "raw", 6, seed=2, shape=(40, 40, 32))
    cache = preprocess_dataset("brats18", root / "raw", root / "pp", shape=(20, 20, 16),
                               workers=1, progress=False)
    split = make_split(cache, make_folds(ids, 3, seed=0), 0)
    torch.set_num_threads(1)
    pre = run_pretrain(NET, TRAIN, split, root / "pretrain", CPU)
    return root, split, pre


def _disturb(k: int) -> None:
    """What an earlier trial may leave behind in a reused worker: used RNGs, other torch flags."""
    torch.manual_seed(100 + k)
    np.random.seed(100 + k)
    random.seed(100 + k)
    torch.randn(10 + k)
    np.random.random(3 + k)
    random.random()
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_start_stage_resets_the_process_state():
    start_stage(7)
    reference = (torch.rand(4), np.random.random(4), random.random())
    _disturb(1)
    start_stage(7)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()  # strict on CPU
    assert torch.backends.cudnn.benchmark is False
    again = (torch.rand(4), np.random.random(4), random.random())
    assert torch.equal(reference[0], again[0]) and np.array_equal(reference[1], again[1])
    assert reference[2] == again[2]
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")  # before any cuBLAS handle


def test_same_base_stage_twice_with_another_stage_between_is_identical(pretrained):
    root, split, pre = pretrained
    first = run_base("CE", NET, TRAIN, split, root / "base-1", CPU, init_weights=pre.weights)
    _disturb(2)
    other = run_base("SD", NET, TRAIN, split, root / "sd", CPU, init_weights=None)  # random init
    _disturb(3)
    second = run_base("CE", NET, TRAIN, split, root / "base-2", CPU, init_weights=pre.weights)
    assert torch.are_deterministic_algorithms_enabled()  # the stage began with start_stage
    _assert_same_tensors(_weights(first.weights), _weights(second.weights))
    assert not torch.equal(*(next(iter(_weights(s.weights).values())) for s in (first, other)))
    assert first.best_val_loss == second.best_val_loss
    assert [h.val_loss for h in first.history] == [h.val_loss for h in second.history]
    pd.testing.assert_frame_equal(first.per_subject, second.per_subject, check_exact=True)
    pd.testing.assert_frame_equal(first.val_per_subject, second.val_per_subject, check_exact=True)
    for sid in split.test_ids:
        np.testing.assert_array_equal(load_logits(first.extra_artifacts["logits"], sid).logits,
                                      load_logits(second.extra_artifacts["logits"], sid).logits)
    # a calibrator fitted twice, another one between, is the same too
    runs = []
    for k, method in enumerate(("platt", "auxiliary", "platt")):
        _disturb(4 + k)
        runs.append(run_calibrate(method, {"max_epochs": 2}, "CE", NET, TRAIN, split, first.weights,
                                  first.extra_artifacts["logits"], root / f"cal-{k}", CPU))
        assert torch.are_deterministic_algorithms_enabled()
    assert runs[0].best_val_loss == runs[2].best_val_loss
    pd.testing.assert_frame_equal(runs[0].per_subject, runs[2].per_subject, check_exact=True)


def test_a_fresh_process_gives_the_same_base_stage(pretrained, tmp_path):
    root, split, pre = pretrained
    _disturb(5)
    here = run_base("CE", NET, TRAIN, split, root / "base-here", CPU, init_weights=pre.weights)
    script = textwrap.dedent(f"""
        import sys, torch
        from pathlib import Path
        from calib.nets import UNetConfig
        from calib.stages import FoldSplit, run_base
        from calib.training import TrainConfig
        torch.set_num_threads(1)
        split = FoldSplit(Path({str(split.cache_dir)!r}), {split.fold}, {split.train_ids!r}, {split.val_ids!r},
                          {split.test_ids!r}, {split.protocol!r}, {split.calib_ids!r})
        stage = run_base("CE", UNetConfig.tiny(4, levels=3, base=2),
                         TrainConfig(lr=3e-3, max_epochs=2, batch_size=2), split, Path(sys.argv[1]),
                         torch.device("cpu"), init_weights=Path({str(pre.weights)!r}))
        stage.per_subject.to_pickle(Path(sys.argv[1]) / "per_subject.pkl")
        print(stage.weights)
    """)
    out = tmp_path / "fresh"
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True,
                          timeout=300, cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_tensors(_weights(here.weights), _weights(done.stdout.strip().splitlines()[-1]))
    pd.testing.assert_frame_equal(here.per_subject, pd.read_pickle(out / "per_subject.pkl"), check_exact=True)
