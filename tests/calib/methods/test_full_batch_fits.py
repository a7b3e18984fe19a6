"""Platt and temperature scaling fitted full batch (L-BFGS) to the likelihood optimum; the paper's
Adam recipe still selectable; local temperature scaling stops on a plateau."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import expit

from calib.data.batches import SliceBatches
from calib.logits import write_index, write_subject_logits
from calib.methods import MethodError, SubjectSet, build_method, load_method
from calib.methods.closed_form import calibration_voxels
from calib.methods.recipes import LTS_MAX_EPOCHS, LTS_PLATEAU_CUTS, resolve
from calib.schedule import TrainConfig
from calib.training import fit

CPU = torch.device("cpu")


def _write_scaled(out, n_subjects, scale, shape=(48, 48, 40), seed=0):
    """Independent voxels: true logits N(0, 2^2), labels Bernoulli(p*), cached logits
    ``scale * logit(p*)``, every voxel inside the mask."""
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n_subjects):
        true_logit = rng.normal(0.0, 2.0, shape)
        label = (rng.random(shape) < expit(true_logit)).astype(np.uint8)
        sid = f"s{i}"
        write_subject_logits(out, sid, scale * true_logit, label, np.ones(shape, bool))
        ids.append(sid)
    write_index(out, ids, shape)
    return ids


def _platt_nll(theta, z, y):
    s = theta[0] * z + theta[1]
    nll = np.mean(np.logaddexp(0.0, s) - y * s)
    r = expit(s) - y
    return nll, np.array([np.mean(r * z), np.mean(r)])


def test_temperature_recovers_three_on_three_times_the_true_logits(tmp_path):
    # 4 x 92,160 voxels: the sampling error of T is ~0.01, the band below is +-0.05
    ids = _write_scaled(tmp_path, 5, scale=3.0)
    train, val = SubjectSet(ids[:4], logits_dir=tmp_path), SubjectSet(ids[4:], logits_dir=tmp_path)
    method = build_method("temperature")
    result = method.fit(train, val, CPU)
    assert 2.95 <= method.temperature <= 3.05, method.temperature
    assert result.stop_reason == "converged" and result.epochs_run == 0 and result.history == []
    assert method.describe() == {"temperature": method.temperature, "optimizer": "lbfgs"}
    # best_val_loss is the fitted map's BCE on the val voxels, below the base model's
    ref = val.subject(ids[4])
    z, y = ref.logits[ref.mask].astype(np.float64), ref.label[ref.mask]
    base = np.mean(np.logaddexp(0.0, z) - y * z)
    zt = z / method.temperature
    assert result.best_val_loss == pytest.approx(np.mean(np.logaddexp(0.0, zt) - y * zt), rel=1e-4)
    assert result.best_val_loss < base


@pytest.mark.parametrize("max_voxels", [2_000_000, 20_000])
def test_platt_reaches_the_logistic_regression_optimum(phantom_logits, max_voxels):
    logits_dir, ids, _ = phantom_logits(6, scale=4.0)
    train, val = SubjectSet(ids[:5], logits_dir=logits_dir), SubjectSet(ids[5:], logits_dir=logits_dir)
    method = build_method("platt", {"max_voxels": max_voxels, "seed": 3})
    assert method.fit(train, val, CPU).stop_reason == "converged"
    # the same voxels, subsampled as the closed-form maps are (seeded), and the same NLL
    z, y = calibration_voxels(train, max_voxels, 3)
    assert (z.size < 30_000) == (max_voxels == 20_000)
    ref = minimize(_platt_nll, np.array([1.0, 0.0]), args=(z, y.astype(np.float64)), jac=True,
                   method="BFGS", options={"gtol": 1e-12, "maxiter": 10_000})
    np.testing.assert_allclose(method.weight_bias, ref.x, atol=1e-3)
    a, b = method.weight_bias
    assert method.describe() == {"platt_a": a, "platt_b": b, "optimizer": "lbfgs"}


def test_adam_runs_the_papers_loop(phantom_logits, tmp_path):
    logits_dir, ids, _ = phantom_logits(4, scale=4.0)
    train, val = SubjectSet(ids[:3], logits_dir=logits_dir), SubjectSet(ids[3:], logits_dir=logits_dir)
    params = {"optimizer": "adam", "max_epochs": 3, "batch_size": 8}
    method = build_method("temperature", params)
    result = method.fit(train, val, CPU, checkpoint_path=tmp_path / "ckpt.pt")
    assert result.epochs_run == 3 and len(result.history) == 3 and result.stop_reason == "max_epochs"
    assert (tmp_path / "ckpt.pt").is_file()
    assert method.describe()["optimizer"] == "adam"
    # exactly calib.training.fit on 8-slice batches with the method's schedule
    twin = build_method("temperature", params)
    fit(twin.module, twin._loss, SliceBatches(logits_dir, ids[:3], 8, shuffle=True, seed=0),
        lambda: SliceBatches(logits_dir, ids[3:], 8, shuffle=False)(0), twin.train_config(), CPU)
    assert method.temperature == twin.temperature
    lbfgs = build_method("temperature")
    lbfgs.fit(train, val, CPU)
    assert abs(lbfgs.temperature - method.temperature) > 0.1  # three Adam epochs stop short


@pytest.mark.parametrize("name, keys", [("platt", {"weight": (1, 1, 1, 1), "bias": (1,)}),
                                        ("temperature", {"log_t": ()})])
def test_full_batch_state_saves_and_loads_as_before(phantom_logits, tmp_path, name, keys):
    logits_dir, ids, _ = phantom_logits(3, scale=4.0)
    train, val = SubjectSet(ids[:2], logits_dir=logits_dir), SubjectSet(ids[2:], logits_dir=logits_dir)
    method = build_method(name)
    method.fit(train, val, CPU)
    state = method.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == keys
    assert all(v.dtype == torch.float32 for v in state.values())
    loaded = load_method(method.save(tmp_path / "method.pt"))
    assert loaded.describe() == method.describe()
    s = val.subject(ids[2])
    np.testing.assert_array_equal(loaded.predict_proba(s), method.predict_proba(s))


def test_full_batch_fit_needs_both_classes(tmp_path):
    shape = (8, 8, 4)
    write_subject_logits(tmp_path, "a", np.linspace(-3, 3, 256).reshape(shape), np.zeros(shape, np.uint8),
                         np.ones(shape, bool))
    write_index(tmp_path, ["a"], shape)
    only = SubjectSet(["a"], logits_dir=tmp_path)
    with pytest.raises(MethodError, match="only label 0"):
        build_method("platt").fit(only, only, CPU)
    with pytest.raises(MethodError, match="optimizer='sgd' is invalid"):
        build_method("temperature", {"optimizer": "sgd"})


# ---- local temperature scaling: plateau stop rule -----------------------------------------------

def test_lts_stop_rule_is_a_plateau_not_the_stage_cap():
    stage = TrainConfig(lr=1e-3, max_epochs=3, lr_patience=2, early_stop_patience=3)
    params = resolve("lts", None, "CE", stage)
    assert params["early_stop_patience"] == (LTS_PLATEAU_CUTS + 1) * (2 + 1)
    assert params["max_epochs"] == LTS_MAX_EPOCHS  # the stage's 3 epochs do not cap it
    assert resolve("platt", None, "CE", stage)["max_epochs"] == 3  # others keep the stage's
    explicit = resolve("lts", {"max_epochs": 2, "early_stop_patience": 4}, "CE", stage)
    assert (explicit["max_epochs"], explicit["early_stop_patience"]) == (2, 4)


def test_lts_trains_through_two_lr_cuts_before_it_stops(phantom_logits):
    logits_dir, ids, _ = phantom_logits(6, scale=3.0)
    train, val = SubjectSet(ids[:4], logits_dir=logits_dir), SubjectSet(ids[4:], logits_dir=logits_dir)
    method = build_method("lts", {"batch_size": 8})
    result = method.fit(train, val, CPU)
    patience = method.params["early_stop_patience"]
    assert result.stop_reason == "early_stop", result.stop_reason
    assert result.epochs_run == result.best_epoch + 1 + patience
    lrs = [h.lr for h in result.history[result.best_epoch + 1:]]
    # after the best epoch the LR was cut twice (three LRs tried) and no epoch improved on it
    lr_best = result.history[result.best_epoch].lr
    assert len(set(lrs)) == LTS_PLATEAU_CUTS + 1
    assert lrs[-1] == pytest.approx(lr_best * 0.1 ** LTS_PLATEAU_CUTS)
    best = result.history[result.best_epoch].val_loss
    assert min(h.val_loss for h in result.history[result.best_epoch + 1:]) >= best * (1 - 1e-4)
