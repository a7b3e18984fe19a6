"""BCE and soft Dice on logits, restricted to the mask."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from calib.losses import DICE_SMOOTH, LOSSES, bce_loss, get_loss, soft_dice_loss

torch.set_num_threads(1)


def test_bce_is_the_mean_over_masked_voxels():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 4, 5, 6)
    labels = (torch.rand(2, 4, 5, 6) > 0.5).to(torch.uint8)
    mask = torch.rand(2, 4, 5, 6) > 0.3
    ref = F.binary_cross_entropy_with_logits(logits[:, 0][mask], labels[mask].float())
    assert torch.allclose(bce_loss(logits, labels, mask), ref)
    assert torch.allclose(bce_loss(logits, labels), F.binary_cross_entropy_with_logits(
        logits[:, 0], labels.float()))


def test_bce_hand_value_and_saturated_logits():
    logits = torch.tensor([0.0, 100.0, -100.0])
    labels = torch.tensor([1.0, 1.0, 1.0])
    # log 2 + 0 + 100 (log-sum-exp form, finite even for saturated logits)
    assert bce_loss(logits, labels).item() == pytest.approx((math.log(2) + 100.0) / 3, rel=1e-6)


def test_losses_ignore_voxels_outside_the_mask():
    torch.manual_seed(1)
    logits = torch.randn(1, 1, 3, 3, 3, requires_grad=True)
    labels = torch.randint(0, 2, (1, 3, 3, 3))
    mask = torch.zeros(1, 3, 3, 3, dtype=torch.bool)
    mask[0, 1] = True
    for fn in (bce_loss, soft_dice_loss):
        logits.grad = None
        fn(logits, labels, mask).backward()
        assert (logits.grad[0, 0][~mask[0]] == 0).all()
        assert (logits.grad[0, 0][mask[0]] != 0).any()
    changed = labels.clone()
    changed[~mask] = 1 - changed[~mask]
    for fn in (bce_loss, soft_dice_loss):
        assert fn(logits, labels, mask).item() == fn(logits, changed, mask).item()


def test_empty_mask_gives_zero_not_nan():
    logits = torch.randn(1, 1, 2, 2, 2, requires_grad=True)
    empty = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    loss = bce_loss(logits, torch.ones(1, 2, 2, 2), empty)
    assert loss.item() == 0.0
    loss.backward()
    assert (logits.grad == 0).all()


def test_soft_dice_hand_values():
    big = 50.0  # sigmoid -> 1 or 0 to float32 precision
    logits = torch.tensor([[big, big, -big, -big]]).view(1, 1, 4, 1, 1)
    labels = torch.tensor([1, 0, 1, 0]).view(1, 4, 1, 1)
    # p = 1,1,0,0 ; 2*1 / (2 + 2)
    assert soft_dice_loss(logits, labels).item() == pytest.approx(0.5, abs=1e-6)
    p = torch.tensor([0.8, 0.3, 0.6])
    y = torch.tensor([1.0, 0.0, 1.0])
    expected = 1 - (2 * (0.8 + 0.6)) / (1.7 + 2.0)
    assert soft_dice_loss(torch.logit(p), y).item() == pytest.approx(expected, rel=1e-5)
    # perfect prediction of an empty label: smoothing keeps it at 0, not NaN
    assert soft_dice_loss(torch.full((1, 1, 3, 1, 1), -big), torch.zeros(1, 3, 1, 1)).item() == \
        pytest.approx(0.0, abs=DICE_SMOOTH * 10)


def test_soft_dice_batch_versus_per_image():
    big = 50.0
    # image 0: perfect (dice 1); image 1: predicts 1 voxel, label has 3 others (dice 0)
    logits = torch.full((2, 1, 4, 1, 1), -big)
    logits[0, 0, :2] = big
    logits[1, 0, 0] = big
    labels = torch.zeros(2, 4, 1, 1)
    labels[0, :2] = 1
    labels[1, 1:] = 1
    batch = 1 - (2 * 2) / (3 + 5)
    assert soft_dice_loss(logits, labels).item() == pytest.approx(batch, abs=1e-6)
    assert soft_dice_loss(logits, labels, per_image=True).item() == pytest.approx(0.5, abs=1e-6)


def test_registry_and_shape_errors():
    assert {k: LOSSES[k] for k in ("ce", "sd")} == {"ce": bce_loss, "sd": soft_dice_loss}
    assert set(LOSSES) == {"ce", "sd", "focal", "svls", "ace"}
    assert get_loss("sd") is soft_dice_loss
    with pytest.raises(ValueError, match=r"\['ace', 'ce', 'focal', 'sd', 'svls'\]"):
        get_loss("dice")
    with pytest.raises(ValueError, match="labels shape"):
        bce_loss(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 3, 2, 2))
