"""calib.shift_eval: a base U-Net and its calibrators scored on a shifted copy of the test
subjects, models unchanged; the in-distribution rows are the stage's own."""

import numpy as np
import pandas as pd
import pytest
import torch

from calib.data import make_folds, preprocess_dataset, write_phantoms
from calib.logits import read_index
from calib.nets import UNetConfig
from calib.shift_eval import score_shifts
from calib.shift_rows import SHIFT_COLUMN, shift_means
from calib.stages import StageError, make_split, run_base, run_calibrate
from calib.training import TrainConfig

CPU = torch.device("cpu")
NET = UNetConfig.tiny(4, levels=2, base=2)
TRAIN = TrainConfig(lr=3e-3, max_epochs=1, batch_size=2)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("shift_eval")
    ids = write_phantoms("brats18", root / "raw", 6, seed=0, shape=(36, 36, 24))
    write_phantoms("brats18", root / "noisy", 6, seed=0, shape=(36, 36, 24), shift={"noise": 4.0})
    cache = preprocess_dataset("brats18", root / "raw", root / "pp", shape=(18, 18, 12), workers=1,
                               progress=False)
    noisy = preprocess_dataset("brats18", root / "noisy", root / "pp", shape=(18, 18, 12), workers=1,
                               progress=False)
    split = make_split(cache, make_folds(ids, 2, seed=0), 0)
    base = run_base("SD", NET, TRAIN, split, root / "base", CPU, init_weights=None)
    shifts = {"noisy": {"cache_dir": str(noisy), "paired": True}}
    shifted_base = score_shifts(base, "base", shifts, NET, 0, root / "base", CPU)
    temp = run_calibrate("temperature", {}, "SD", NET, TRAIN, split, base_weights=base.weights,
                         base_logits=base.extra_artifacts["logits"], work_dir=root / "temp", device=CPU)
    logits_shift = shifted_base.extra_artifacts["logits_shift"]
    shifted_temp = score_shifts(temp, "calibrate", shifts, NET, 0, root / "temp", CPU, logits_shift)
    return split, base, shifted_base, temp, shifted_temp, shifts


def test_base_rows_per_shift_and_its_shifted_logits(stages):
    split, base, shifted, _, _, _ = stages
    rows = shifted.shift_per_subject
    assert list(rows.columns[:2]) == [SHIFT_COLUMN, "subject_id"]
    none = rows[rows[SHIFT_COLUMN] == "none"].drop(columns=SHIFT_COLUMN).reset_index(drop=True)
    pd.testing.assert_frame_equal(none, base.per_subject.reset_index(drop=True))
    noisy = rows[rows[SHIFT_COLUMN] == "noisy"]
    assert sorted(noisy["subject_id"]) == sorted(split.test_ids)
    # the same subjects with the same p*, other images: the true ECE is defined and the scores move
    assert noisy["true_ece"].notna().all()
    assert not np.allclose(noisy.sort_values("subject_id")["ece"].to_numpy(),
                           base.per_subject.sort_values("subject_id")["ece"].to_numpy())
    assert read_index(shifted.extra_artifacts["logits_shift"] / "noisy")["subjects"] == list(split.test_ids)
    assert shifted.extra_artifacts["logits"] == base.extra_artifacts["logits"]  # untouched
    means = shift_means(rows)
    assert set(means) == {("noisy", "dice"), ("noisy", "ece"), ("noisy", "true_ece")}
    assert means[("noisy", "ece")] == pytest.approx(noisy["ece"].mean())


def test_calibrator_scored_on_the_base_shifted_logits(stages):
    split, _, _, temp, shifted, shifts = stages
    rows = shifted.shift_per_subject
    assert sorted(rows.loc[rows[SHIFT_COLUMN] == "noisy", "subject_id"]) == sorted(split.test_ids)
    assert shifted.weights == temp.weights and shifted.best_val_loss == temp.best_val_loss
    with pytest.raises(StageError, match="logits_shift/noisy is required"):
        score_shifts(temp, "calibrate", shifts, NET, 0, temp.weights.parent, CPU, None)


def test_unpaired_shift_scores_every_subject_it_holds(stages, tmp_path):
    _, base, _, _, _, shifts = stages
    site = {"site": {"cache_dir": shifts["noisy"]["cache_dir"], "paired": False}}
    rows = score_shifts(base, "base", site, NET, 0, tmp_path, CPU).shift_per_subject
    held = rows.loc[rows[SHIFT_COLUMN] == "site", "subject_id"]
    assert len(held) == 6 and held.is_unique  # another data root: all of its subjects, not the fold's
