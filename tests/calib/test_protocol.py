"""The evaluation protocol's guarantees: calibrators fit on held-out subjects and fix a known
miscalibration, MC validation is deterministic, the paper protocol keeps the last epoch, the
degenerate-model guard, the constant-output check."""

import builtins

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.special import expit, logit

from calib.data import make_folds, preprocess_dataset, write_phantoms
from calib.guard import CONSTANT_RANGE, EVERYWHERE_FRACTION, check_degenerate, constant_output
from calib.logits import write_index, write_subject_logits
from calib.methods import SubjectSet, build_method
from calib.nets import UNet3D, UNetConfig
from calib.stages import make_split, run_base, run_calibrate
from calib.training import TrainConfig, fit

CPU = torch.device("cpu")
NET = UNetConfig.tiny(4, levels=3, base=2)
TRAIN = TrainConfig(lr=3e-3, max_epochs=2, batch_size=2)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ---- calibrators fit on held-out subjects ---------------------------------------------------

@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("protocol")
    ids = write_phantoms("brats18", root / "raw", 10, seed=2, shape=(48, 48, 36))
    cache = preprocess_dataset("brats18", root / "raw", root / "pp", shape=(24, 24, 18),
                               workers=1, progress=False)
    split = make_split(cache, make_folds(ids, 2, seed=0), 0, protocol="honest", seed=0)
    base = run_base("SD", NET, TRAIN, split, root / "base", CPU, init_weights=None)
    return root, split, base


def _opened_subjects(monkeypatch, subject_ids) -> set:
    """Subject ids whose files are opened from now on (any loader reads through open())."""
    seen: set = set()
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        name = str(file)
        seen.update(s for s in subject_ids if f"/{s}." in name or f"/{s}_" in name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    return seen


@pytest.mark.parametrize("method", ["platt", "finetune"])
def test_honest_calibrators_never_read_a_training_subject(base_model, monkeypatch, tmp_path, method):
    root, split, base = base_model
    assert split.train_ids and split.calib_ids and not set(split.train_ids) & set(split.calib_ids)
    seen = _opened_subjects(monkeypatch, split.all_ids())
    result = run_calibrate(method, {"max_epochs": 2}, "SD", NET, TRAIN, split, base.weights,
                           base.extra_artifacts["logits"], tmp_path, CPU)
    monkeypatch.undo()
    assert result.params["fit_split"] == "calib"
    assert seen & set(split.calib_ids), "the calibration subjects were read"
    assert not seen & set(split.train_ids), f"training subjects read: {seen & set(split.train_ids)}"


def test_mc_dropout_retrains_on_train_and_stops_on_val(base_model, monkeypatch, tmp_path):
    root, split, base = base_model
    seen = _opened_subjects(monkeypatch, split.all_ids())
    result = run_calibrate("mc_decoder", {"max_epochs": 1, "lr": 1e-4, "n_samples": 2}, "SD", NET,
                           TRAIN, split, base.weights, None, tmp_path, CPU)
    monkeypatch.undo()
    assert result.params["fit_split"] == "train"
    assert set(split.train_ids) <= seen and not seen & set(split.calib_ids)


def _overconfident_logit_cache(tmp_path, n_subjects=8, factor=3.0, seed=0):
    """Subjects whose base logits are ``factor * logit(p*)`` with labels drawn from p*."""
    rng = np.random.default_rng(seed)
    shape = (20, 20, 8)
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 1:-1] = True
    true_prob, ids = {}, []
    for i in range(n_subjects):
        sid = f"s{i}"
        field = gaussian_filter(rng.normal(size=shape), 2.0)
        p = np.clip(expit(2.5 * field / field.std()), 1e-4, 1 - 1e-4).astype(np.float32)
        label = (rng.random(shape) < p).astype(np.uint8)
        write_subject_logits(tmp_path, sid, factor * logit(p), label, mask)
        true_prob[sid], ids = p, ids + [sid]
    write_index(tmp_path, ids, shape)
    return ids, true_prob, mask


@pytest.mark.parametrize("method", ["platt", "temperature"])
def test_calibrators_fitted_on_calib_halve_the_true_error_of_an_overconfident_model(tmp_path, method):
    ids, true_prob, mask = _overconfident_logit_cache(tmp_path, n_subjects=16)
    folds = {k: ids[4 * k:4 * k + 4] for k in range(4)}  # pool of 12: 2 val, 2 calib, 8 train
    split = make_split("/unused", folds, 0, protocol="honest", seed=1)
    sets = {k: SubjectSet(split.ids(k), logits_dir=tmp_path) for k in ("calib", "val", "test")}
    # 16 calibration slices: batches of 2 give the optimiser steps enough to get there
    cal = build_method(method, {"max_epochs": 50, "batch_size": 2}, weights="CE")
    cal.fit(sets["calib"], sets["val"], CPU)
    before, after = [], []
    for ref in sets["test"]:
        p_star = true_prob[ref.subject_id][mask]
        before.append(np.abs(expit(ref.logits[mask].astype(np.float64)) - p_star).mean())
        after.append(np.abs(cal.predict_proba(ref)[mask] - p_star).mean())
    assert np.mean(after) <= 0.5 * np.mean(before), (np.mean(before), np.mean(after))


# ---- deterministic MC validation --------------------------------------------------------------

def test_mc_validation_loss_is_the_same_every_time(base_model):
    root, split, base = base_model
    mc = build_method("mc_decoder", {"lr": 1e-4}, weights="SD", net_cfg=NET,
                      base_weights=base.weights)
    ref = split.subjects("val").subject(split.val_ids[0])
    batch = {"image": torch.from_numpy(ref.image)[None],
             "label": torch.from_numpy(ref.label.astype(np.float32))[None, None],
             "mask": torch.from_numpy(ref.mask)[None, None]}
    mc.net.train()
    noisy = {float(mc._loss(mc.net, batch).detach()) for _ in range(3)}
    assert len(noisy) > 1, "dropout is on while training"
    mc.net.eval()  # what calib.training.fit does for the validation pass
    assert len({float(mc._loss(mc.net, batch)) for _ in range(3)}) == 1
    assert mc.net.active_sites(), "the dropout setting is left as it was"


# ---- paper protocol: the last epoch is kept ---------------------------------------------------

def test_restore_best_false_keeps_the_last_epoch():
    torch.manual_seed(0)
    x = torch.randn(64, 1)
    train, val = (x, 3 * x), (x, -3 * x)  # validation gets worse as training goes on

    def loss(module, batch):
        return ((module(batch[0]) - batch[1]) ** 2).mean()

    def run(restore_best):
        torch.manual_seed(1)
        module = torch.nn.Linear(1, 1)
        cfg = TrainConfig(lr=0.05, max_epochs=4, early_stop_patience=10, restore_best=restore_best)
        snapshots, losses = [], []

        def record(ep):
            snapshots.append(module.weight.detach().clone())
            losses.append(ep.val_loss)

        fit(module, loss, lambda e: [train], lambda: [val], cfg, CPU, callbacks=[record])
        return module.weight.detach(), snapshots, losses

    last, snaps, losses = run(False)
    assert int(np.argmin(losses)) != len(losses) - 1  # the test means something
    assert torch.equal(last, snaps[-1])
    best, snaps, losses = run(True)
    assert torch.equal(best, snaps[int(np.argmin(losses))])


def test_weight_decay_penalises_kernels_only():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.InstanceNorm3d(2, affine=True))
    x = torch.randn(2, 1, 4, 4, 4)

    def zero_loss(m, batch):  # depends on every parameter, with a zero gradient
        return (m(batch) * 0.0).sum()

    kernel0, bias0 = module[0].weight.detach().clone(), module[0].bias.detach().clone()
    fit(module, zero_loss, lambda e: [x], lambda: [x],
        TrainConfig(lr=0.1, max_epochs=3, weight_decay=0.5), CPU)
    # only the L2 penalty moves the weights: kernels shrink, biases and norm scales stay
    assert module[0].weight.abs().sum() < kernel0.abs().sum()
    assert torch.equal(module[0].bias.detach(), bias0)
    assert torch.equal(module[1].weight.detach(), torch.ones(2))


# ---- the degenerate-model guard ---------------------------------------------------------------

def _case(logit_value, shape=(10, 10, 4), lesion=True):
    mask = np.ones(shape, bool)
    label = np.zeros(shape, np.uint8)
    if lesion:
        label[3:6, 3:6, 1:3] = 1
    return np.full(shape, logit_value, np.float32), label, mask


def test_guard_flags_constant_huge_logits_as_saturated():
    report = check_degenerate([_case(900.0), _case(566.0)])
    assert report.reason is not None and report.reason.startswith("saturated logits")
    assert report.median_abs_logit > 500


def test_guard_flags_foreground_everywhere_and_nowhere():
    assert "almost everywhere" in check_degenerate([_case(5.0)]).reason
    assert "nowhere" in check_degenerate([_case(-5.0)]).reason
    # an empty prediction is right when there is no lesion to find
    assert check_degenerate([_case(-5.0, lesion=False)]).reason is None


def test_guard_passes_a_model_that_segments():
    logits, label, mask = _case(-6.0)
    logits[label > 0] = 4.0
    logits[0, 0, 0] = 2.0  # a false positive or two is not a collapse
    report = check_degenerate([(logits, label, mask)])
    assert report.reason is None and 0 < report.foreground_fraction < EVERYWHERE_FRACTION


def test_guard_refuses_empty_masks():
    logits, label, mask = _case(1.0)
    with pytest.raises(ValueError, match="no voxel inside a mask"):
        check_degenerate([(logits, label, np.zeros_like(mask))])


# ---- constant calibrated output -----------------------------------------------------------------

def _masked(values, shape=(6, 6, 4)):
    """A map equal to ``values`` (broadcast) inside a mask and 0.9 outside it, and that mask."""
    mask = np.zeros(shape, bool)
    mask[1:5, 1:5, 1:3] = True
    prob = np.full(shape, 0.9, np.float32)
    prob[mask] = values
    return prob, mask


def test_constant_output_flags_one_value_over_the_mask_on_every_subject():
    (p1, m1), (p2, m2) = _masked(0.0052), _masked(0.0052)
    p2[m2] += np.float32(CONSTANT_RANGE / 4) * np.arange(m2.sum()) / m2.sum()  # float rounding
    reason = constant_output([p1, p2], [m1, m2])
    assert reason is not None and reason.startswith("constant output") and "2 test subjects" in reason
    assert "p = 0.0052" in reason
    # a different constant on each subject ranks no voxel either
    (p3, m3) = _masked(0.3)
    assert "across subjects" in constant_output([p1, p3], [m1, m3])
    # outside the mask nothing counts (0.9 there)
    assert constant_output(iter([p1]), iter([m1])) is not None


def test_constant_output_passes_maps_that_rank_voxels():
    ramp = np.linspace(0.01, 0.99, 32, dtype=np.float32)
    p1, m1 = _masked(ramp)
    p2, m2 = _masked(0.0052)
    assert constant_output([p1, p2], [m1, m2]) is None  # one subject still ranked
    # two values (a histogram binning with two occupied bins) are not constant
    two = np.where(np.arange(32) < 30, 0.0052, 0.61).astype(np.float32)
    assert constant_output([_masked(two)[0]], [_masked(two)[1]]) is None
    p3, m3 = _masked(0.2)
    p3[m3] += np.float32(10 * CONSTANT_RANGE) * (np.arange(32) % 2)
    assert constant_output([p3], [m3]) is None
    # no voxel to look at: nothing to flag
    assert constant_output([p1], [np.zeros_like(m1)]) is None
    with pytest.raises(ValueError):
        constant_output([p1, p2], [m1])
