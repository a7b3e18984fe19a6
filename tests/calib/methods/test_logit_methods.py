"""Platt, auxiliary and temperature on cached phantom logits (numpy-made, no U-Net)."""

import numpy as np
import pytest
import torch

from calib.methods import SubjectSet, build_method, load_method
from calib.metrics import ece

CPU = torch.device("cpu")
# The test volumes have 24 z-slices each: batches of 8 slices give the optimiser as many steps per
# epoch as the paper's 64-slice batches get from a fold of real subjects.
FAST = {"batch_size": 8}
METHODS = [("platt", FAST), ("temperature", FAST), ("auxiliary", FAST), ("auxiliary", {"dims": 3})]


def _sets(logits_dir, ids):
    return (SubjectSet(ids[:8], logits_dir=logits_dir), SubjectSet(ids[8:11], logits_dir=logits_dir),
            SubjectSet(ids[11:], logits_dir=logits_dir))


def _mean_ece(probs_of, subjects):
    return float(np.mean([ece(probs_of(s), s.label, s.mask) for s in subjects]))


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))


@pytest.mark.parametrize("name, params", METHODS)
def test_overconfident_logits_ece_falls_by_half(phantom_logits, name, params):
    logits_dir, ids, _ = phantom_logits(15, scale=4.0)
    train, val, test = _sets(logits_dir, ids)
    method = build_method(name, params)
    result = method.fit(train, val, CPU)
    before = _mean_ece(lambda s: _sigmoid(s.logits), test)
    after = _mean_ece(method.predict_proba, test)
    assert before > 0.1  # the base logits really are overconfident
    assert after <= 0.5 * before, (name, before, after, method.describe())
    assert np.isfinite(result.best_val_loss)
    if method.params.get("optimizer") == "lbfgs":  # full batch to the optimum: no epochs
        assert result.stop_reason == "converged" and result.epochs_run == 0
    else:
        assert result.epochs_run >= 1


def test_platt_and_temperature_recover_the_scale(phantom_logits):
    logits_dir, ids, _ = phantom_logits(15, scale=4.0)
    train, val, _ = _sets(logits_dir, ids)
    platt = build_method("platt", FAST)
    platt.fit(train, val, CPU)
    a, b = platt.weight_bias
    assert abs(a - 0.25) < 0.03 and abs(b) < 0.1
    temp = build_method("temperature", FAST)
    temp.fit(train, val, CPU)
    assert abs(temp.temperature - 4.0) < 0.4


def test_platt_stays_near_identity_on_calibrated_logits(phantom_logits):
    logits_dir, ids, _ = phantom_logits(15, scale=1.0, seed=1)
    train, val, test = _sets(logits_dir, ids)
    platt = build_method("platt", FAST)
    platt.fit(train, val, CPU)
    a, b = platt.weight_bias
    assert abs(a - 1.0) < 0.1 and abs(b) < 0.1, (a, b)
    aux = build_method("auxiliary", FAST)
    aux.fit(train, val, CPU)
    before = _mean_ece(lambda s: _sigmoid(s.logits), test)
    assert _mean_ece(aux.predict_proba, test) < before + 0.02


@pytest.mark.parametrize("name, params", METHODS)
def test_save_load_gives_identical_predictions(phantom_logits, tmp_path, name, params):
    logits_dir, ids, _ = phantom_logits(4, scale=4.0)
    train, val = SubjectSet(ids[:2], logits_dir=logits_dir), SubjectSet(ids[2:3], logits_dir=logits_dir)
    method = build_method(name, {**params, "max_epochs": 2})
    method.fit(train, val, CPU)
    path = method.save(tmp_path / "m" / "method.pt")
    loaded = load_method(path)
    assert type(loaded) is type(method) and loaded.params == method.params
    subject = SubjectSet(ids[3:], logits_dir=logits_dir).subject(ids[3])
    np.testing.assert_array_equal(loaded.predict_proba(subject), method.predict_proba(subject))


def test_prediction_is_zero_outside_the_mask_and_a_probability(phantom_logits):
    logits_dir, ids, _ = phantom_logits(1, scale=4.0)
    subject = SubjectSet(ids, logits_dir=logits_dir).subject(ids[0])
    prob = build_method("auxiliary").predict_proba(subject)
    assert prob.dtype == np.float32 and prob.shape == subject.mask.shape
    assert (prob[~subject.mask] == 0).all() and prob.min() >= 0 and prob.max() <= 1
    # the untrained map is the identity: the base model's own probabilities
    np.testing.assert_allclose(prob[subject.mask], _sigmoid(subject.logits)[subject.mask], atol=1e-6)


def test_resume_from_a_finished_checkpoint_returns_the_same_fit(phantom_logits, tmp_path):
    logits_dir, ids, _ = phantom_logits(4, scale=4.0)
    train, val = SubjectSet(ids[:3], logits_dir=logits_dir), SubjectSet(ids[3:], logits_dir=logits_dir)
    ckpt = tmp_path / "checkpoint.pt"
    # the paper's Adam schedule is the one with epochs and checkpoints
    first = build_method("platt", {"max_epochs": 3, "optimizer": "adam", **FAST})
    r1 = first.fit(train, val, CPU, checkpoint_path=ckpt)
    assert ckpt.is_file()
    second = build_method("platt", {"max_epochs": 3, "optimizer": "adam", **FAST})
    r2 = second.fit(train, val, CPU, checkpoint_path=ckpt)
    assert r2.epochs_run == r1.epochs_run and r2.best_val_loss == r1.best_val_loss
    assert second.weight_bias == first.weight_bias


def test_logit_methods_refuse_a_set_without_logits(phantom_logits):
    logits_dir, ids, _ = phantom_logits(2, scale=1.0)
    from calib.methods import MethodError
    with pytest.raises(MethodError, match="no logits_dir"):
        build_method("platt").fit(SubjectSet(ids[:1]), SubjectSet(ids[1:]), CPU)


def test_auxiliary_with_k1_is_platt(phantom_logits):
    logits_dir, ids, _ = phantom_logits(4, scale=4.0)
    train, val = SubjectSet(ids[:3], logits_dir=logits_dir), SubjectSet(ids[3:], logits_dir=logits_dir)
    aux = build_method("auxiliary", {"k": 1, **FAST, "max_epochs": 3})
    platt = build_method("platt", {**FAST, "max_epochs": 3, "optimizer": "adam"})  # the same loop
    assert sum(p.numel() for p in aux.module.parameters()) == 2
    aux.fit(train, val, CPU)
    platt.fit(train, val, CPU)
    subject = val.subject(ids[3])
    np.testing.assert_allclose(aux.predict_proba(subject), platt.predict_proba(subject), atol=1e-6)


def test_platt_module_equals_a_1x1_convolution():
    from calib.methods.platt import PointwiseConv

    module = PointwiseConv()
    with torch.no_grad():
        module.weight.fill_(0.3)
        module.bias.fill_(-0.2)
    conv = torch.nn.Conv2d(1, 1, 1)
    conv.load_state_dict(module.state_dict())
    z = torch.randn(4, 1, 9, 7)
    torch.testing.assert_close(module(z), conv(z))
