"""The paper's U-Net: layout, padding, masking, dropout sites, prefix/remainder split."""

from __future__ import annotations

import time

import pytest
import torch

from calib.nets import BACKGROUND_LOGIT, DROPOUT_SETTINGS, UNet3D, UNetConfig, count_parameters

torch.set_num_threads(1)


def _conv(cin: int, cout: int, k: tuple[int, int, int]) -> int:
    return cin * cout * k[0] * k[1] * k[2] + cout


def _expected_params(cfg: UNetConfig) -> int:
    """Parameter count from the paper's layout, written out independently of the module."""
    f = cfg.features
    L = len(f)
    n, cin = 0, cfg.in_channels
    for lvl, (a, b) in enumerate(f):
        k1 = (3, 3, 3) if lvl == L - 1 else (3, 3, 1)
        n += _conv(cin, a, k1) + _conv(a, b, (3, 3, 3))
        cin = b
    below = f[-1][1]
    for lvl in range(L - 2, -1, -1):
        a, b = f[lvl]
        n += _conv(b + below, b, (3, 3, 3)) + _conv(b, a, (3, 3, 1))
        below = a
    return n + _conv(below, 1, (1, 1, 1))


@pytest.mark.parametrize("dataset", ["brats18", "isles18"])
def test_paper_config_layout_and_parameter_count(dataset):
    cfg = UNetConfig.paper(dataset)
    assert cfg.levels == 4 and cfg.size_multiple == 27
    if dataset == "brats18":
        assert cfg.features == ((20, 40), (40, 80), (80, 160), (160, 160))
        assert (cfg.in_channels, cfg.pooling, cfg.norm) == (4, "max", "instance")
    else:
        assert cfg.features == ((10, 20), (20, 40), (40, 80), (80, 80))
        assert (cfg.in_channels, cfg.pooling, cfg.norm) == (5, "avg", "none")
    net = UNet3D(cfg)
    assert count_parameters(net) == _expected_params(cfg)
    kernels = [tuple(c.kernel_size) for c in net.encoders[0].convs]
    assert kernels == [(3, 3, 1), (3, 3, 3)]
    assert [tuple(c.kernel_size) for c in net.encoders[-1].convs] == [(3, 3, 3), (3, 3, 3)]
    assert [tuple(c.kernel_size) for c in net.decoders[0].convs] == [(3, 3, 3), (3, 3, 1)]
    assert tuple(net.last_layer().kernel_size) == (1, 1, 1) and net.last_layer().out_channels == 1


def test_config_errors_name_the_choices():
    with pytest.raises(ValueError, match="brats18"):
        UNetConfig.paper("brats2018")
    with pytest.raises(ValueError, match="'max', 'avg'"):
        UNetConfig(in_channels=1, features=((2, 2), (2, 2)), pooling="min")
    with pytest.raises(ValueError, match="features"):
        UNetConfig(in_channels=1, features=((2, 2),))


def _tiny(dataset="brats18", levels=3) -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(UNetConfig.tiny(2, dataset=dataset, levels=levels))


@pytest.mark.parametrize("shape", [(10, 9, 9), (10, 13, 7), (20, 22, 17)])
@pytest.mark.parametrize("dataset", ["brats18", "isles18"])
def test_any_input_size_is_padded_and_cropped_back(shape, dataset):
    net = _tiny(dataset)
    x = torch.randn(2, 2, *shape)
    out = net(x)
    assert out.shape == (2, 1, *shape)
    assert torch.isfinite(out).all()


def test_mask_forces_background_logit():
    net = _tiny()
    x = torch.randn(1, 2, 10, 11, 12)
    mask = torch.rand(1, 10, 11, 12) > 0.5
    out = net(x, mask)
    assert (out[0, 0][~mask[0]] == BACKGROUND_LOGIT).all()
    assert torch.equal(out[0, 0][mask[0]], net(x)[0, 0][mask[0]])
    assert torch.sigmoid(torch.tensor(BACKGROUND_LOGIT)) == 0.0


def test_wrong_input_channels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(N, 2, X, Y, Z\)"):
        _tiny()(torch.randn(1, 3, 9, 9, 9))
    with pytest.raises(ValueError, match="too small"):
        _tiny()(torch.randn(1, 2, 9, 9, 9))
    assert _tiny("isles18")(torch.randn(1, 2, 9, 9, 9)).shape == (1, 1, 9, 9, 9)  # no norm: fine


def test_dropout_settings_rename_no_weight_and_load_base_weights():
    base = _tiny()
    keys = list(base.state_dict())
    for setting in DROPOUT_SETTINGS:
        mc = UNet3D(base.cfg)
        mc.set_dropout(setting)
        assert list(mc.state_dict()) == keys
        mc.load_state_dict(base.state_dict())  # strict
    with pytest.raises(ValueError, match="'decoder', 'center'"):
        base.set_dropout("encoder")


def test_dropout_sites_of_each_setting():
    net = _tiny(levels=4)
    net.set_dropout("decoder")
    assert net.active_sites() == ["dec2", "dec1", "dec0", "head"]
    net.set_dropout("center")
    assert net.active_sites() == ["enc2", "enc3", "dec2", "dec1"]
    net.set_dropout(None)
    assert net.active_sites() == []


def test_dropout_is_active_in_eval_mode_only_when_set():
    net = _tiny().eval()
    x = torch.randn(1, 2, 10, 9, 9)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        net.set_dropout("decoder")
        assert not torch.equal(net(x), net(x))


@pytest.mark.parametrize("setting", [None, *DROPOUT_SETTINGS])
def test_prefix_then_remainder_equals_forward_for_fixed_masks(setting):
    net = _tiny(levels=4).eval()
    net.set_dropout(setting)
    x = torch.randn(1, 2, 28, 12, 9)
    mask = torch.rand(1, 1, 28, 12, 9) > 0.2
    with torch.no_grad():
        torch.manual_seed(123)
        full = net(x, mask)
        torch.manual_seed(123)
        state = net.forward_prefix(x)
        split = net.forward_remainder(state, mask)
        assert torch.equal(full, split)
        # the state is reusable: a second remainder is another sample (or the same without MC)
        again = net.forward_remainder(state, mask)
    assert torch.equal(again, full) == (setting is None)


def test_prefix_and_remainder_parameters_partition_the_net():
    net = _tiny(levels=4)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    all_ids = ids(net.parameters())
    net.set_dropout(None)
    assert ids(net.prefix_parameters()) == all_ids and net.remainder_parameters() == []
    net.set_dropout("decoder")  # first site: before the lowest decoder block
    assert ids(net.prefix_parameters()) == ids(net.encoders.parameters())
    assert ids(net.remainder_parameters()) == all_ids - ids(net.encoders.parameters())
    net.set_dropout("center")  # first site: after encoder level L-2
    assert ids(net.prefix_parameters()) == ids(p for e in net.encoders[:3] for p in e.parameters())
    assert ids(net.prefix_parameters()) | ids(net.remainder_parameters()) == all_ids


def test_remainder_refuses_a_prefix_from_another_setting():
    net = _tiny()
    net.set_dropout("center")
    state = net.forward_prefix(torch.randn(1, 2, 10, 9, 9))
    net.set_dropout("decoder")
    with pytest.raises(ValueError, match="recompute forward_prefix"):
        net.forward_remainder(state)


def test_gradients_reach_only_through_the_remainder_when_prefix_is_detached():
    net = _tiny()
    net.set_dropout("decoder")
    with torch.no_grad():
        state = net.forward_prefix(torch.randn(1, 2, 10, 9, 9))
    net.forward_remainder(state).sum().backward()
    assert all(p.grad is None for p in net.prefix_parameters())
    assert all(p.grad is not None for p in net.remainder_parameters())


@pytest.mark.slow
def test_paper_brats_net_forward_on_full_volume(capsys):
    torch.manual_seed(0)
    net = UNet3D(UNetConfig.paper("brats18")).eval()
    x = torch.randn(1, 4, 136, 136, 82)
    mask = torch.ones(1, 1, 136, 136, 82, dtype=torch.bool)
    mask[..., :5] = False
    t0 = time.perf_counter()
    with torch.no_grad():
        out = net(x, mask)
    secs = time.perf_counter() - t0
    assert out.shape == (1, 1, 136, 136, 82)
    assert torch.isfinite(out).all() and (out[..., :5] == BACKGROUND_LOGIT).all()
    with capsys.disabled():
        print(f"\npaper BraTS U-Net: {count_parameters(net)} parameters, forward (1,4,136,136,82) "
              f"in {secs:.1f} s on {torch.get_num_threads()} CPU thread(s)")
