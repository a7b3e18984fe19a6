"""The cost model's counted FLOPs (sweeps/cost/flops.py) against a count by hand, and what a device
roofline or a measured file makes of them (sweeps/cost/model.py)."""

from __future__ import annotations

import json
import math

import pytest
from torch import nn

from calib.nets import UNet3D, UNetConfig
from sweeps.cost.devices import DEVICES, EstimateError, roofline
from sweeps.cost.flops import net_flops
from sweeps.cost.model import CostModel

SHAPE = (136, 136, 82)


def _conv_count(net: UNet3D, shape) -> float:
    """2 x prod(kernel) x C_in x C_out x output voxels over every conv, each at its level's grid:
    the input padded to a multiple of pool_factor ** (levels - 1), divided by pool_factor per level."""
    m = net.cfg.size_multiple
    padded = [math.ceil(s / m) * m for s in shape]
    levels = [(lvl, block) for lvl, block in enumerate(net.encoders)]
    levels += [(lvl, block) for lvl, block in enumerate(net.decoders)] + [(0, net.head)]
    total = 0.0
    for lvl, module in levels:
        voxels = math.prod(s // net.cfg.pool_factor ** lvl for s in padded)
        for conv in (c for c in module.modules() if isinstance(c, nn.Conv3d)):
            total += 2 * math.prod(conv.kernel_size) * conv.in_channels * conv.out_channels * voxels
    return total


@pytest.mark.parametrize("dataset", ["brats18", "isles18"])
def test_counted_forward_flops_agree_with_a_count_by_hand(dataset):
    cfg = UNetConfig.paper(dataset)
    counted = net_flops(cfg, SHAPE)
    by_hand = _conv_count(UNet3D(cfg), SHAPE)
    assert counted.forward == pytest.approx(by_hand, rel=0.01)
    # backward: a gradient for every weight and every activation but the input's, ~2 forwards
    assert 2.5 * counted.forward < counted.train_step < 3.0 * counted.forward
    # fine-tuning back-propagates into the last 1x1x1 conv only
    head = 2 * cfg.features[0][0] * math.prod(math.ceil(s / 27) * 27 for s in SHAPE)
    assert counted.finetune_step == pytest.approx(counted.forward + head, rel=1e-6)
    for mc in counted.mc.values():  # the prefix and one remainder make one forward pass
        assert mc.prefix + mc.remainder == pytest.approx(counted.forward, rel=1e-6)
        assert mc.remainder < mc.remainder_step < 3.0 * mc.remainder


def test_a_roofline_is_peak_times_utilisation_and_names_its_assumptions():
    h100 = roofline("h100")
    assert h100.effective_flops == pytest.approx(h100.bf16_flops * h100.utilisation)
    assert roofline("cpu").peak_flops == roofline("cpu").fp32_flops
    text = h100.describe()
    assert "989" in text and "utilisation 10%" in text
    with pytest.raises(EstimateError, match="unknown device 'v100'; valid choices: h100, a100, l4, cpu"):
        roofline("v100")
    a100, l4 = (CostModel.for_device(d) for d in ("a100", "l4"))
    # a faster roofline: the same work in less time
    assert a100.epoch_seconds("brats18", "base") < l4.epoch_seconds("brats18", "base")
    assert set(DEVICES) == {"h100", "a100", "l4", "cpu"}


def test_a_measured_file_overrides_the_roofline(tmp_path):
    path = tmp_path / "h100.json"
    path.write_text(json.dumps({"device": "H100", "dataset": "brats18", "shape": list(SHAPE),
                                "batch": 2, "train_voxels_per_s": 5.0e7, "precision": "bf16"}) + "\n")
    measured = CostModel.from_files([path], device="cpu")
    flops = net_flops(UNetConfig.paper("brats18"), SHAPE)
    assert measured.rate("brats18") == pytest.approx(5.0e7 * flops.train_step / math.prod(SHAPE))
    assert measured.rate("isles18") == measured.rate("brats18")  # the device's FLOP/s, not voxels/s
    assert "h100.json (brats18, H100, bf16)" in measured.source and "roofline" not in measured.source
    # the measured step of the BraTS net takes 1 / its voxels/s per voxel
    per_volume = flops.train_step / measured.rate("brats18")
    assert per_volume == pytest.approx(math.prod(SHAPE) / 5.0e7)
