"""Fine-tuning and MC dropout on a tiny U-Net: what trains, what stays bit-identical, MC sampling."""

import numpy as np
import pytest
import torch

from calib.methods import SubjectSet, build_method, load_method
from calib.methods.mc_dropout import mc_probability
from calib.methods.network_based import save_weights
from calib.nets import UNet3D, UNetConfig

CPU = torch.device("cpu")
CHANNELS = 2  # as conftest.write_tiny_cache writes
NET = UNetConfig.tiny(CHANNELS, levels=3, base=2)
FAST = {"max_epochs": 2, "lr": 1e-2}  # big steps so that every trained weight visibly moves


@pytest.fixture
def base(tmp_path):
    torch.manual_seed(0)
    return save_weights(UNet3D(NET), tmp_path / "base.pt")


def _sets(cache_dir, ids):
    return SubjectSet(ids[:3], cache_dir=cache_dir), SubjectSet(ids[3:], cache_dir=cache_dir)


def _changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_finetune_trains_only_the_last_layer(tiny_cache, base):
    train, val = _sets(*tiny_cache)
    method = build_method("finetune", FAST, weights="SD", net_cfg=NET, base_weights=base)
    before = method.state_dict()
    result = method.fit(train, val, CPU)
    changed = _changed(before, method.state_dict())
    assert changed == {"head.weight", "head.bias"}, changed
    assert result.epochs_run == 2
    assert method.loss_name() == "ce"


def test_finetune_lr_follows_the_base_weights(base):
    assert build_method("finetune", weights="CE", net_cfg=NET).params["lr"] == 1e-4
    assert build_method("finetune", weights="CE-SD", net_cfg=NET).params["lr"] == 1e-3
    assert build_method("finetune", {"lr": 5e-4}, weights="SD", net_cfg=NET).params["lr"] == 5e-4


@pytest.mark.parametrize("name", ["mc_decoder", "mc_center"])
def test_mc_retraining_changes_only_layers_after_the_first_dropout(tiny_cache, base, name):
    train, val = _sets(*tiny_cache)
    method = build_method(name, FAST, weights="CE-SD", net_cfg=NET, base_weights=base)
    names = {id(p): n for n, p in method.net.named_parameters()}
    prefix = {names[id(p)] for p in method.net.prefix_parameters()}
    remainder = {names[id(p)] for p in method.net.remainder_parameters()}
    assert prefix and remainder and not prefix & remainder
    before = method.state_dict()
    method.fit(train, val, CPU)
    changed = _changed(before, method.state_dict())
    assert changed and changed <= remainder, changed - remainder
    assert method.loss_name() == "sd"  # SD-based weights retrain with soft Dice


def test_mc_loss_follows_the_base_weights():
    assert build_method("mc_center", weights="CE", net_cfg=NET).loss_name() == "ce"
    assert build_method("mc_decoder", weights="SD", net_cfg=NET).loss_name() == "sd"
    assert build_method("mc_decoder", {"loss": "ce"}, weights="SD", net_cfg=NET).loss_name() == "ce"


@pytest.mark.parametrize("setting", ["decoder", "center"])
def test_mc_prediction_with_cached_prefix_equals_uncached(setting):
    torch.manual_seed(0)
    net = UNet3D(NET).eval()
    net.set_dropout(setting)
    x = torch.randn(1, CHANNELS, 18, 18, 9)
    mask = torch.ones(1, 1, 18, 18, 9, dtype=torch.bool)
    cached = mc_probability(net, x, mask, n_samples=5, seed=3, cache_prefix=True)
    uncached = mc_probability(net, x, mask, n_samples=5, seed=3, cache_prefix=False)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-6)
    other = mc_probability(net, x, mask, n_samples=5, seed=4, cache_prefix=True)
    assert (other - cached).abs().max() > 1e-3  # dropout really samples: other masks, other output
    one = mc_probability(net, x, mask, n_samples=1, seed=3)
    assert (one - cached).abs().max() > 1e-3  # the mean over samples is not a single sample


def test_mc_sampling_leaves_the_global_rng_alone():
    net = UNet3D(NET).eval()
    net.set_dropout("decoder")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    mc_probability(net, torch.randn(1, CHANNELS, 18, 18, 9), None, n_samples=2, seed=0)
    torch.manual_seed(7)  # reseed; the randn above moved the stream legitimately
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", ["finetune", "mc_decoder", "mc_center"])
def test_save_load_gives_identical_predictions(tiny_cache, base, tmp_path, name):
    cache_dir, ids = tiny_cache
    train, val = _sets(cache_dir, ids)
    method = build_method(name, {"max_epochs": 1, "n_samples": 3} if name != "finetune"
                          else {"max_epochs": 1}, weights="CE", net_cfg=NET, base_weights=base)
    method.fit(train, val, CPU)
    loaded = load_method(method.save(tmp_path / f"{name}.pt"))
    subject = val.subject(ids[3])
    prob = method.predict_proba(subject)
    assert prob.shape == subject.mask.shape and prob.dtype == np.float32
    assert (prob[~subject.mask] == 0).all()
    np.testing.assert_array_equal(loaded.predict_proba(subject), prob)


def test_fit_without_base_weights_is_a_clear_error(tiny_cache):
    from calib.methods import MethodError

    train, val = _sets(*tiny_cache)
    with pytest.raises(MethodError, match="base_weights are required"):
        build_method("finetune", net_cfg=NET).fit(train, val, CPU)
    with pytest.raises(MethodError, match="base weights not found"):
        build_method("finetune", net_cfg=NET, base_weights=tiny_cache[0] / "missing.pt")
