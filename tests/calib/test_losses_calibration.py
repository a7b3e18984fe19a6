"""The train-time calibration losses (focal, SVLS, CE + mL1-ACE) on hand-worked tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calib.losses import (ace_loss, bce_loss, build_loss, focal_loss, loss_params, marginal_ace,
                          svls_kernel, svls_labels, svls_loss)
from calib.metrics.average import average_calibration_error

torch.set_num_threads(1)


def _case(seed: int = 0, shape=(2, 1, 6, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 2
    labels = (torch.rand(shape, generator=g) > 0.6).float()
    mask = torch.rand(shape, generator=g) > 0.2
    return logits, labels, mask


def test_focal_with_gamma_zero_is_ce_and_hand_value():
    logits, labels, mask = _case()
    assert torch.allclose(focal_loss(logits, labels, mask, gamma=0.0), bce_loss(logits, labels, mask))
    # one voxel, p = sigmoid(0) = 0.5, label 1: (1 - 0.5)^2 * log 2
    value = focal_loss(torch.zeros(1), torch.ones(1), gamma=2.0)
    assert value.item() == pytest.approx(0.25 * np.log(2.0), rel=1e-6)


def test_focal_down_weights_confident_correct_voxels():
    logits = torch.tensor([4.0, -4.0])  # confident and correct for labels 1, 0
    labels = torch.tensor([1.0, 0.0])
    assert focal_loss(logits, labels, gamma=2.0) < 0.01 * bce_loss(logits, labels)


def test_svls_with_sigma_zero_is_ce_and_kernel_sums_to_one():
    logits, labels, mask = _case(1)
    assert torch.allclose(svls_loss(logits, labels, mask, sigma=0.0), bce_loss(logits, labels, mask),
                          atol=1e-7)
    assert torch.allclose(svls_loss(logits, labels, mask, sigma=1e-3), bce_loss(logits, labels, mask),
                          atol=1e-6)
    for centre in ("gaussian", "neighbours"):
        k = svls_kernel(1.0, 3, centre)
        assert k.shape == (3, 3, 3) and k.sum().item() == pytest.approx(1.0, abs=1e-6)
    # the published rule: the centre keeps half the weight
    assert svls_kernel(1.0, 3, "neighbours")[1, 1, 1].item() == pytest.approx(0.5, abs=1e-6)


def test_svls_labels_hand_case():
    # a single foreground voxel in an all-inside 3x3x3 volume; plain Gaussian kernel, sigma 1
    labels = torch.zeros(1, 1, 3, 3, 3)
    labels[0, 0, 1, 1, 1] = 1.0
    k = svls_kernel(1.0, 3)
    soft = svls_labels(labels, None, k)
    # at the centre: weight of the centre over the weights of the voxels inside the volume (all)
    assert soft[0, 0, 1, 1, 1].item() == pytest.approx(k[1, 1, 1].item() / k.sum().item(), rel=1e-5)
    # at a corner: only the 2x2x2 block of the volume is inside its window
    corner = k[1, 1, 1] * 0 + k[0, 0, 0]  # the centre voxel seen from the corner is a corner offset
    den = k[1:, 1:, 1:].sum()
    assert soft[0, 0, 0, 0, 0].item() == pytest.approx((corner / den).item(), rel=1e-5)
    # voxels outside the mask do not count as background
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[0, 0, 1, 1, 1] = True
    assert svls_labels(labels, mask, k)[0, 0, 1, 1, 1].item() == pytest.approx(1.0)


def test_ace_term_zero_on_a_calibrated_constant_case():
    # p = 0.25 everywhere, exactly a quarter of the voxels foreground: both classes calibrated
    probs = torch.full((1, 1, 4, 4, 4), 0.25)
    labels = torch.zeros_like(probs)
    labels.view(-1)[:16] = 1.0
    assert marginal_ace(probs, labels).item() == pytest.approx(0.0, abs=1e-7)
    logits = torch.logit(probs)
    assert torch.allclose(ace_loss(logits, labels, weight=5.0), bce_loss(logits, labels), atol=1e-6)


def test_ace_term_matches_the_metric_on_a_hand_example():
    # probabilities in three bins (none on a bin edge), labels chosen by hand
    p = torch.tensor([0.12, 0.13, 0.14, 0.61, 0.62, 0.91, 0.93, 0.97]).view(1, 1, 2, 2, 2)
    y = torch.tensor([0, 1, 0, 1, 0, 1, 1, 1], dtype=torch.float32).view(1, 1, 2, 2, 2)
    # foreground by hand: bins 2 (0.13 vs 1/3), 12 (0.615 vs 1/2), 18 (0.92 vs 1), 19 (0.97 vs 1)
    fg = (abs(1 / 3 - 0.13) + abs(0.5 - 0.615) + abs(1 - 0.92) + abs(1 - 0.97)) / 4
    assert average_calibration_error(p.numpy(), y.numpy()) == pytest.approx(fg, abs=1e-6)
    bg = average_calibration_error(1.0 - p.double().numpy(), 1 - y.numpy())
    assert marginal_ace(p, y).item() == pytest.approx((fg + bg) / 2, abs=1e-6)


def test_gradients_flow_through_every_loss():
    logits, labels, mask = _case(2)
    for name in ("focal", "svls", "ace"):
        x = logits.clone().requires_grad_(True)
        loss = build_loss(name)(x, labels, mask)
        loss.backward()
        assert torch.isfinite(loss) and x.grad is not None
        assert x.grad.abs().sum() > 0
        assert torch.all(x.grad[~mask] == 0)  # nothing learnt outside the mask


def test_loss_params_defaults_and_unknown_key():
    assert loss_params("focal") == {"gamma": 2.0}
    assert loss_params("ace", {"weight": 0.5})["weight"] == 0.5
    with pytest.raises(ValueError, match="unknown parameter 'sigma'.*valid: gamma"):
        loss_params("focal", {"sigma": 1.0})
    with pytest.raises(ValueError, match="valid choices"):
        build_loss("dice_focal")


def test_loss_params_check_their_values_without_torch():
    import subprocess
    import sys

    assert loss_params("svls", {"size": 5.0, "centre": "neighbours"})["size"] == 5
    for params, expected in (({"gamma": -1}, "must be >= 0"), ({"gamma": "two"}, "must be a number"),
                             ({"n_bins": 2.5}, "integer >= 1")):
        name = "ace" if "n_bins" in params else "focal"
        with pytest.raises(ValueError, match=f"loss '{name}': parameter .*{expected}"):
            loss_params(name, params)
    with pytest.raises(ValueError, match="centre' must be one of gaussian, neighbours"):
        loss_params("svls", {"centre": "mean"})
    code = "import sys, calib.loss_recipes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
