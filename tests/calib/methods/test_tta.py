"""Test-time flips on a tiny U-Net: shape, mask, the mean and std over flips against a manual
torch.flip average, training-free fit, save/load."""

import numpy as np
import pytest
import torch

from calib.methods import MethodError, SubjectSet, build_method, load_method
from calib.methods.network_based import save_weights
from calib.methods.tta import FLIPS
from calib.nets import UNet3D, UNetConfig

CPU = torch.device("cpu")
CHANNELS = 2  # as conftest.write_tiny_cache writes
NET = UNetConfig.tiny(CHANNELS, levels=3, base=2)


@pytest.fixture
def base(tmp_path):
    torch.manual_seed(0)
    net = UNet3D(NET)
    with torch.no_grad():  # a less trivial net than the initialisation: flips then disagree
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return save_weights(net, tmp_path / "base.pt")


def _manual(net, subject, flips):
    """Flip with torch.flip, run, flip back, without MONAI."""
    image = torch.from_numpy(subject.image)[None]
    mask = torch.from_numpy(subject.mask)[None, None]
    net.eval()
    outs = []
    with torch.no_grad():
        for axes in flips:
            dims = [a + 2 for a in axes]  # (N, C, X, Y, Z)
            img = torch.flip(image, dims) if dims else image
            msk = torch.flip(mask, dims) if dims else mask
            prob = torch.sigmoid(net(img, mask=msk))
            outs.append((torch.flip(prob, dims) if dims else prob)[0, 0])
    return torch.stack(outs).numpy()


def test_flip_sets():
    assert len(FLIPS["all"]) == 8 and len(set(FLIPS["all"])) == 8 and () in FLIPS["all"]
    assert FLIPS["single"] == ((), (0,), (1,), (2,))


@pytest.mark.parametrize("flips", ["all", "single"])
def test_mean_and_std_equal_the_manual_flip_average(tiny_cache, base, flips):
    cache_dir, ids = tiny_cache
    method = build_method("tta", {"flips": flips}, net_cfg=NET, base_weights=base)
    subject = SubjectSet(ids, cache_dir=cache_dir).subject(ids[0])
    mean, std = method.predict_mean_std(subject)
    assert mean.shape == std.shape == subject.mask.shape and mean.dtype == std.dtype == np.float32
    net = UNet3D(NET)
    net.load_state_dict(torch.load(base, weights_only=True))
    manual = _manual(net, subject, FLIPS[flips])
    inside = subject.mask
    np.testing.assert_allclose(mean[inside], manual.mean(0)[inside], atol=1e-6)
    np.testing.assert_allclose(std[inside], manual.std(0)[inside], atol=1e-6)
    assert (std >= 0).all() and (mean[~inside] == 0).all() and (std[~inside] == 0).all()
    assert std[inside].max() > 1e-3  # the passes do disagree, so the average is not trivial
    np.testing.assert_array_equal(method.predict_proba(subject), mean)
    np.testing.assert_array_equal(method.predict_std(subject), std)
    assert method.describe() == {"tta_passes": float(len(FLIPS[flips]))}


def test_fit_is_training_free_and_needs_base_weights(tiny_cache, base):
    cache_dir, ids = tiny_cache
    train, val = SubjectSet(ids[:2], cache_dir=cache_dir), SubjectSet(ids[2:], cache_dir=cache_dir)
    method = build_method("tta", net_cfg=NET, base_weights=base)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    result = method.fit(train, val, CPU)
    assert result.epochs_run == 0 and result.history == [] and result.stop_reason == "training_free"
    assert np.isfinite(result.best_val_loss) and result.best_val_loss > 0
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())
    with pytest.raises(MethodError, match="base_weights are required"):
        build_method("tta", net_cfg=NET).fit(train, val, CPU)
    with pytest.raises(MethodError, match="net_cfg is required"):
        build_method("tta")
    with pytest.raises(MethodError, match="flips='every'"):
        build_method("tta", {"flips": "every"}, net_cfg=NET)


def test_save_load_gives_identical_predictions(tiny_cache, base, tmp_path):
    cache_dir, ids = tiny_cache
    method = build_method("tta", {"flips": "single"}, net_cfg=NET, base_weights=base)
    loaded = load_method(method.save(tmp_path / "tta.pt"))
    subject = SubjectSet(ids, cache_dir=cache_dir).subject(ids[1])
    assert loaded.params == method.params
    for a, b in zip(loaded.predict_mean_std(subject), method.predict_mean_std(subject)):
        np.testing.assert_array_equal(a, b)
