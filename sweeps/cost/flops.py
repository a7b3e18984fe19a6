"""What one volume costs a network, in floating-point operations, counted rather than assumed.

:func:`net_flops` builds the trial's :class:`calib.nets.UNet3D` on PyTorch's ``meta`` device (shapes
only: no memory, no arithmetic) and runs each kind of pass the stages run once, at the grid's
volume shape, under ``torch.utils.flop_counter.FlopCounterMode``:

* ``forward``: inference (validation, evaluation, logit export);
* ``train_step``: forward + backward into every parameter (pretrain, base);
* ``finetune_step``: forward + backward into the last 1x1x1 conv only (calib.methods.finetune);
* per MC-dropout setting, the deterministic prefix, one stochastic remainder, and a training step of
  the remainder (the frozen prefix runs without autograd, calib.methods.mc_dropout).

The counter counts matrix products and convolutions (2 FLOPs per multiply-add), the work a GPU's
tensor cores do; normalisation, activations, pooling and interpolation are memory-bound and left
out -- a device roofline's utilisation (sweeps.cost.devices) is what covers them. The net pads its
input to a multiple of ``pool_factor ** (levels - 1)`` (27 for the paper's), so 136 x 136 x 82 runs
as 162 x 162 x 108: counted as run.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

# torch is heavy (seconds to import): this module is imported only when a cost is asked for,
# never to read a grid or plan a launch.
import torch
from torch.utils.flop_counter import FlopCounterMode

from calib.nets import DROPOUT_SETTINGS, UNet3D, UNetConfig


@dataclass(frozen=True)
class MCFlops:
    """FLOPs of one MC-dropout setting per volume: the prefix once, each remainder sample, and a
    training step of the remainder."""

    prefix: float
    remainder: float
    remainder_step: float


@dataclass(frozen=True)
class NetFlops:
    """FLOPs per volume of each pass of one network at one shape (module doc)."""

    shape: tuple[int, int, int]
    forward: float
    train_step: float
    finetune_step: float
    mc: dict[str, MCFlops]

    @property
    def voxels(self) -> int:
        """Voxels of the volume as given (before the net pads it)."""
        return math.prod(self.shape)

    @property
    def train_flops_per_voxel(self) -> float:
        """A training step's FLOPs per input voxel: converts FLOP/s to training voxels/s."""
        return self.train_step / self.voxels


def _count(run) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def _train_only(net: UNet3D, params) -> None:
    keep = {id(p) for p in params}
    for p in net.parameters():
        p.requires_grad_(id(p) in keep)


@functools.lru_cache(maxsize=None)
def net_flops(cfg: UNetConfig, shape: tuple[int, int, int]) -> NetFlops:
    """The FLOPs of ``cfg``'s network on one volume of ``shape`` (X, Y, Z), per pass (module doc).

    Nothing is allocated: the network and its input live on the meta device. Cached per
    (config, shape): a plan asks for each dataset's net once.
    """
    shape = tuple(int(s) for s in shape)
    with torch.device("meta"):
        net = UNet3D(cfg)
        x = torch.empty(1, cfg.in_channels, *shape)
        mask = torch.ones(1, 1, *shape, dtype=torch.bool)
    net.train()

    def forward():
        with torch.no_grad():
            net(x, mask)

    def step():
        net(x, mask).sum().backward()

    fwd = _count(forward)
    _train_only(net, net.parameters())
    train = _count(step)
    _train_only(net, net.last_layer().parameters())
    finetune = _count(step)
    mc = {}
    for setting in DROPOUT_SETTINGS:
        net.set_dropout(setting)
        _train_only(net, net.remainder_parameters())
        with torch.no_grad():
            state = net.forward_prefix(x)

        def prefix():
            with torch.no_grad():
                net.forward_prefix(x)

        def remainder():
            with torch.no_grad():
                net.forward_remainder(state, mask)

        def remainder_step():
            net.forward_remainder(state, mask).sum().backward()

        mc[setting] = MCFlops(_count(prefix), _count(remainder), _count(remainder_step))
    return NetFlops(shape, fwd, train, finetune, mc)
