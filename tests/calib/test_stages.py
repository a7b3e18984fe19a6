"""Stages on a tiny preprocessed phantom dataset: split protocols, pretrain -> base -> calibrate,
artifacts, resume, bad input."""

import numpy as np
import pandas as pd
import pytest
import torch

from calib.data import make_folds, preprocess_dataset, write_phantoms
from calib.logits import load_logits, read_index
from calib.methods import METHOD_NAMES, get_method, load_method
from calib.metrics.estimators import ESTIMATOR_COLUMNS
from calib.nets import UNetConfig
from calib.stages import (
    StageError,
    make_split,
    run_base,
    run_calibrate,
    run_imported,
    run_pretrain,
)
from calib.training import TrainConfig

CPU = torch.device("cpu")
NET = UNetConfig.tiny(4, levels=3, base=2)
TRAIN = TrainConfig(lr=3e-3, max_epochs=2, batch_size=2)
PER_SUBJECT = ["subject_id", "fold", "dice", "ece", "brier", "nll", "mce", "boundary_ece",
               "adaptive_ece", "classwise_ece", "ueo", "error_auroc", "true_ece", "p_star_distance",
               *ESTIMATOR_COLUMNS]
BINS = ["subject_id", "bin", "count", "conf_sum", "pos_sum"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    ids = write_phantoms("brats18", root / "raw", 9, seed=0, shape=(48, 48, 36))
    cache = preprocess_dataset("brats18", root / "raw", root / "pp", shape=(24, 24, 18),
                               workers=1, progress=False)
    return root, cache, make_folds(ids, 3, seed=0)


@pytest.fixture(scope="module")
def pipeline(dataset):
    """pretrain -> base CE-SD on fold 0 (honest protocol)."""
    root, cache, folds = dataset
    torch.set_num_threads(1)
    split = make_split(cache, folds, 0)
    pre = run_pretrain(NET, TRAIN, split, root / "pretrain", CPU)
    base = run_base("CE-SD", NET, TRAIN, split, root / "base", CPU, init_weights=pre.weights)
    return root, split, pre, base


def test_paper_protocol_validates_on_the_test_fold():
    folds = {0: ["a", "b"], 1: ["c", "d"], 2: ["e", "f"]}
    split = make_split("/c", folds, 1, protocol="paper")
    assert split.test_ids == split.val_ids == ("c", "d")
    assert split.train_ids == split.calib_ids == ("a", "b", "e", "f") and split.protocol == "paper"
    assert split.all_ids() == ("a", "b", "e", "f", "c", "d")
    assert not split.restore_best and split.stop_split == "test"  # the last epoch is kept


def _pool(folds, fold):
    return {s for k in folds if k != fold for s in folds[k]}


def test_honest_protocol_splits_the_pool_three_ways():
    folds = {k: [f"s{k}{i:02d}" for i in range(8)] for k in range(5)}
    for fold in folds:
        split = make_split("/c", folds, fold, protocol="honest", seed=3)
        parts = [set(split.train_ids), set(split.val_ids), set(split.calib_ids)]
        assert set(split.test_ids) == set(folds[fold])
        assert set().union(*parts) == _pool(folds, fold)  # the pool, all of it
        assert sum(map(len, parts)) == 32  # disjoint
        assert not set().union(*parts) & set(split.test_ids)
        assert len(split.val_ids) == len(split.calib_ids) == round(0.2 * 32)
        assert split.restore_best and split.stop_split == "val"
        # stable: every stage of the fold rebuilds the same split
        assert split == make_split("/c", folds, fold, seed=3)
    assert make_split("/c", folds, 2, seed=3).calib_ids != make_split("/c", folds, 2, seed=4).calib_ids
    assert make_split("/c", folds, 2, seed=3).val_ids != make_split("/c", folds, 3, seed=3).val_ids
    assert make_split("/c", folds, 2).protocol == "honest"  # the default
    custom = make_split("/c", folds, 0, val_fraction=0.25, calib_fraction=0.5)
    assert (len(custom.val_ids), len(custom.calib_ids), len(custom.train_ids)) == (8, 16, 8)
    as_json = custom.to_dict()
    assert set(as_json) == {"protocol", "fold", "train", "val", "calib", "test"}
    assert as_json["calib"] == list(custom.calib_ids)


def test_honest_keeps_one_subject_per_part_on_tiny_pools():
    folds = {0: ["a"], 1: ["b", "c"], 2: ["d"]}
    split = make_split("/c", folds, 2)
    assert sorted(len(x) for x in (split.train_ids, split.val_ids, split.calib_ids)) == [1, 1, 1]


def test_two_way_protocol_fits_calibrators_on_the_training_subjects():
    folds = {k: [f"s{k}{i}" for i in range(4)] for k in range(5)}
    split = make_split("/c", folds, 2, protocol="two_way", seed=3)
    assert len(split.val_ids) == round(0.2 * 16)
    assert set(split.val_ids) | set(split.train_ids) == _pool(folds, 2)
    assert not set(split.val_ids) & set(split.train_ids)
    assert split.calib_ids == split.train_ids
    # the same validation draw as honest: the two protocols differ only in what calibrates
    assert split.val_ids == make_split("/c", folds, 2, protocol="honest", seed=3).val_ids


def test_bad_split_arguments_are_clear_errors():
    folds = {0: ["a"], 1: ["b"]}
    with pytest.raises(StageError, match="did you mean 'honest'"):
        make_split("/c", folds, 0, protocol="honset")
    with pytest.raises(StageError, match="fold 7 .*valid folds: \\[0, 1\\]"):
        make_split("/c", folds, 7)
    with pytest.raises(StageError, match="fold 0: the honest protocol needs >= 3 subjects"):
        make_split("/c", folds, 0)
    with pytest.raises(StageError, match="fold 0: the two_way protocol needs >= 2 subjects"):
        make_split("/c", folds, 0, protocol="two_way")
    with pytest.raises(StageError, match="more than one fold"):
        make_split("/c", {0: ["a", "b"], 1: ["b", "c"]}, 0)
    with pytest.raises(StageError, match="val_fraction \\+ calib_fraction must be below 1"):
        make_split("/c", {0: list("abcd"), 1: list("efgh")}, 0, val_fraction=0.5, calib_fraction=0.5)
    with pytest.raises(StageError, match="unknown split 'calibration'"):
        make_split("/c", {0: list("abcd"), 1: list("efgh")}, 0).ids("calibration")


def test_base_stage_trains_evaluates_and_exports_every_subject(pipeline):
    root, split, pre, base = pipeline
    for stage in (pre, base):
        assert stage.weights.is_file() and stage.epochs == 2 and len(stage.history) == 2
        assert list(stage.per_subject.columns) == PER_SUBJECT
        assert list(stage.per_subject["subject_id"]) == list(split.test_ids)
        assert (stage.per_subject["fold"] == 0).all()
        assert list(stage.reliability_bins.columns) == BINS
        assert len(stage.reliability_bins) == 20 * len(split.test_ids)
        assert np.isfinite(stage.best_val_loss)
        # the same evaluation on the fold's val subjects (held-out selection)
        assert list(stage.val_per_subject.columns) == PER_SUBJECT
        assert list(stage.val_per_subject["subject_id"]) == list(split.val_ids)
        assert (stage.val_per_subject["fold"] == 0).all()
        assert stage.val_per_subject[["dice", "ece", "brier", "nll"]].notna().all().all()
        assert list(stage.val_reliability_bins.columns) == BINS
        assert len(stage.val_reliability_bins) == 20 * len(split.val_ids)
        assert stage.constant_output is None
    assert base.params == {"loss": "sd", "protocol": "honest", "init": "pretrain",
                           "fit_split": "train", "stop_split": "val", "kept_epoch": "best"}
    assert base.splits == split.to_dict()
    # the report's slice figure: the first test subject, its most lesioned axial slice
    pv = base.preview
    assert str(pv["subject_id"]) == split.test_ids[0]
    assert {k: pv[k].shape for k in ("image", "label", "mask", "prob", "true_prob")} == \
        {k: (24, 24) for k in ("image", "label", "mask", "prob", "true_prob")}
    full = load_logits(base.extra_artifacts["logits"], split.test_ids[0])
    z = int(pv["z"])
    assert pv["label"].sum() == full.label.sum(axis=(0, 1)).max() == full.label[:, :, z].sum()
    assert base.guard is not None and base.guard.n_subjects == len(split.val_ids)
    logits = base.extra_artifacts["logits"]
    index = read_index(logits)
    assert index["subjects"] == list(split.all_ids()) and len(split.all_ids()) == 9
    vol = load_logits(logits, split.test_ids[0])
    assert vol.logits.dtype == np.float16 and vol.logits.shape == (24, 24, 18)
    # bins add up to the mask size of each subject
    counts = base.reliability_bins.groupby("subject_id")["count"].sum()
    assert counts[split.test_ids[0]] == vol.mask.sum()


def test_imported_predictions_are_scored_on_test_and_val(pipeline):
    from scipy.special import expit

    root, split, pre, base = pipeline
    logits = base.extra_artifacts["logits"]  # a logit cache, as calib.data.predictions writes one
    result = run_imported(split, logits, root / "imported")
    assert list(result.per_subject["subject_id"]) == list(split.test_ids)
    assert list(result.val_per_subject.columns) == PER_SUBJECT
    assert list(result.val_per_subject["subject_id"]) == list(split.val_ids)
    for sid, row in result.val_per_subject.set_index("subject_id").iterrows():
        vol = load_logits(logits, sid)
        prob = np.where(vol.mask, expit(vol.logits.astype(np.float64)), 0.0)
        assert row["dice"] == pytest.approx(float(((prob > 0.5) & (vol.label > 0))[vol.mask].sum() * 2
                                                  / ((prob > 0.5)[vol.mask].sum() + vol.label[vol.mask].sum())))
    assert result.guard is not None and result.constant_output is None


def test_a_rerun_resumes_from_the_checkpoint(pipeline):
    root, split, pre, base = pipeline
    again = run_base("CE-SD", NET, TRAIN, split, root / "base", CPU, init_weights=pre.weights)
    assert again.best_val_loss == base.best_val_loss and again.epochs == base.epochs
    pd.testing.assert_frame_equal(again.per_subject, base.per_subject)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_calibrate_stage_runs_every_method(pipeline, method):
    root, split, pre, base = pipeline
    defaults = get_method(method).DEFAULTS
    # closed-form, full-batch (L-BFGS) and training-free ones run no epochs
    trains = "max_epochs" in defaults and defaults.get("optimizer", "adam") == "adam"
    params = {"max_epochs": 2} if trains else {}
    if method.startswith("mc_"):
        params.update(lr=1e-4, n_samples=3)
    result = run_calibrate(method, params, "CE-SD", NET, TRAIN, split, base.weights,
                           base.extra_artifacts["logits"], root / f"cal-{method}", CPU)
    assert list(result.per_subject.columns) == PER_SUBJECT
    assert list(result.per_subject["subject_id"]) == list(split.test_ids)
    assert result.per_subject[["dice", "ece", "brier", "nll"]].notna().all().all()
    assert list(result.reliability_bins.columns) == BINS
    assert result.params["method"] == method and result.params["protocol"] == "honest"
    # post hoc maps and fine-tuning fit on held-out calibration subjects; MC dropout retrains
    # the network on its own training subjects
    assert result.params["fit_split"] == ("train" if method.startswith("mc_") else "calib")
    assert result.splits["calib"] == list(split.calib_ids)
    assert load_method(result.weights).name == method
    assert result.epochs == (2 if trains else 0)
    assert list(result.val_per_subject.columns) == PER_SUBJECT
    assert list(result.val_per_subject["subject_id"]) == list(split.val_ids)
    assert result.val_per_subject[["dice", "ece", "brier", "nll"]].notna().all().all()
    assert len(result.val_reliability_bins) == 20 * len(split.val_ids)


def test_calibrate_scores_val_with_the_predictor_it_scores_test_with(pipeline):
    from calib.evaluate import evaluate_subjects

    root, split, pre, base = pipeline
    logits = base.extra_artifacts["logits"]
    result = run_calibrate("temperature", {"max_epochs": 2}, "CE-SD", NET, TRAIN, split, base.weights,
                           logits, root / "cal-val", CPU)
    method = load_method(result.weights)
    rows, bins = evaluate_subjects(lambda s: method.predict_proba(s, CPU), split.subjects("val", logits), 0)
    pd.testing.assert_frame_equal(result.val_per_subject, rows)
    pd.testing.assert_frame_equal(result.val_reliability_bins, bins)
    assert result.constant_output is None  # a temperature keeps the ranking
    assert not set(result.val_per_subject["subject_id"]) & set(result.per_subject["subject_id"])


def test_under_paper_val_is_the_test_fold_evaluated_once(pipeline, monkeypatch, dataset):
    import calib.stages as stages

    root, split, pre, base = pipeline
    _, cache, folds = dataset
    paper = make_split(cache, folds, 0, protocol="paper")
    passes = []
    real = stages.evaluate_subjects
    monkeypatch.setattr(stages, "evaluate_subjects",
                        lambda predict, subjects, fold: passes.append(1) or real(predict, subjects, fold))
    result = run_calibrate("platt", {"max_epochs": 1}, "CE-SD", NET, TRAIN, paper, base.weights,
                           base.extra_artifacts["logits"], root / "cal-paper", CPU)
    assert len(passes) == 1
    pd.testing.assert_frame_equal(result.val_per_subject, result.per_subject)
    pd.testing.assert_frame_equal(result.val_reliability_bins, result.reliability_bins)


def test_a_calibrator_with_constant_output_is_flagged_and_still_returns(pipeline, monkeypatch):
    import calib.stages as stages

    root, split, pre, base = pipeline
    real = stages.build_method

    def constant(*args, **kwargs):  # a fitted map that sends every voxel of the mask to 0.0052
        method = real(*args, **kwargs)
        method.predict_proba = lambda s, device="cpu": np.where(s.mask, 0.0052, 0.0).astype(np.float32)
        return method

    monkeypatch.setattr(stages, "build_method", constant)
    result = run_calibrate("platt", {"max_epochs": 1}, "CE-SD", NET, TRAIN, split, base.weights,
                           base.extra_artifacts["logits"], root / "cal-constant", CPU)
    assert result.constant_output is not None
    assert result.constant_output.startswith("constant output") and "0.0052" in result.constant_output
    assert f"{len(split.test_ids)} test subjects" in result.constant_output
    assert (result.per_subject["dice"] == 0).any()  # scored as any other trial


def test_calibrate_schedule_comes_from_the_stage_config(pipeline):
    root, split, pre, base = pipeline
    result = run_calibrate("platt", None, "CE", NET, TRAIN, split, base.weights,
                           base.extra_artifacts["logits"], root / "cal-sched", CPU)
    assert result.params["max_epochs"] == TRAIN.max_epochs and result.params["lr"] == 5e-3
    assert result.params["batch_size"] == 64


def test_bad_stage_input_is_a_clear_error(pipeline, tmp_path):
    root, split, pre, base = pipeline
    with pytest.raises(StageError, match="init_weights is required"):
        run_base("CE", NET, TRAIN, split, tmp_path, CPU, init_weights=None)
    with pytest.raises(StageError, match="from scratch"):
        run_base("SD", NET, TRAIN, split, tmp_path, CPU, init_weights=pre.weights)
    with pytest.raises(StageError, match="did you mean 'CE-SD'"):
        run_base("CE_SD", NET, TRAIN, split, tmp_path, CPU, init_weights=pre.weights)
    with pytest.raises(StageError, match="base_logits is required"):
        run_calibrate("platt", {}, "CE", NET, TRAIN, split, base.weights, None, tmp_path, CPU)


@pytest.mark.parametrize("weights, init, loss", [("CE", True, "ce"), ("SD", False, "sd")])
def test_base_recipes(pipeline, tmp_path, weights, init, loss):
    root, split, pre, base = pipeline
    one_epoch = TrainConfig(lr=3e-3, max_epochs=1, batch_size=2)
    result = run_base(weights, NET, one_epoch, split, tmp_path, CPU,
                      init_weights=pre.weights if init else None)
    assert result.params == {"loss": loss, "protocol": "honest",
                             "init": "pretrain" if init else "scratch",
                             "fit_split": "train", "stop_split": "val", "kept_epoch": "best"}
    assert (tmp_path / "logits" / "index.json").is_file() and (tmp_path / "checkpoint.pt").is_file()


def test_evaluate_subject_rows_and_bins():
    from calib import metrics
    from calib.evaluate import evaluate_subject

    rng = np.random.default_rng(0)
    prob = rng.random((8, 8, 6)).astype(np.float32)
    label = (rng.random((8, 8, 6)) < prob).astype(np.uint8)
    mask = np.zeros((8, 8, 6), bool)
    mask[1:7, 1:7, 1:5] = True
    true_prob = np.clip(prob + 0.1, 0, 1)
    row, bins = evaluate_subject(prob, label, mask, true_prob)
    assert list(row) == PER_SUBJECT[2:]
    assert row["ece"] == metrics.ece(prob, label, mask) and row["dice"] == metrics.dice(prob, label, mask)
    np.testing.assert_allclose(row["p_star_distance"], np.abs(prob - true_prob)[mask].mean(), rtol=1e-6)
    assert row["true_ece"] == metrics.true_ece(prob, true_prob, mask)
    assert 0 < row["true_ece"] <= row["p_star_distance"] + 1e-12  # Jensen (equal: p* - p >= 0 here)
    assert row["boundary_ece"] == metrics.boundary_ece(prob, label, mask, band="prediction")
    assert list(bins.columns) == ["bin", "count", "conf_sum", "pos_sum"] and len(bins) == 20
    assert bins["count"].sum() == mask.sum() and bins["pos_sum"].sum() == label[mask].sum()
    assert metrics.ece_from_bins(bins["count"].to_numpy(), bins["conf_sum"].to_numpy(),
                                 bins["pos_sum"].to_numpy()) == pytest.approx(row["ece"], abs=1e-9)
    no_truth = evaluate_subject(prob, label, mask)[0]
    assert "true_ece" not in no_truth and "p_star_distance" not in no_truth
    with pytest.raises(ValueError, match="one shape"):
        evaluate_subject(prob[:4], label, mask)
