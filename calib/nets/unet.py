"""The paper's 3D U-Net with named MC-dropout sites and a prefix/remainder split.

Layout (pre-activation, as the study's public Keras code ``unet_generalized.py``):

* encoder level ``l``: pool by ``pool_factor`` (``l > 0``), then two convs, each preceded by
  [instance norm] + leaky ReLU -- except the very first conv of the net, which sees the raw input;
* decoder level ``l`` (``l = L-2 .. 0``): trilinear upsampling of the level below, concatenation
  with the encoder output of level ``l`` (skip first), two convs (each pre-activated);
* head: [instance norm] + leaky ReLU + 1x1x1 conv -> one logit per voxel;
* where the mask is False the logit is replaced by :data:`BACKGROUND_LOGIT` (the paper adds a
  log-mask to the linear output: same effect, sigmoid -> 0).

Inputs of any spatial size work: they are zero-padded at the high end of each axis up to a
multiple of ``pool_factor ** (levels - 1)`` (27 for the paper) and the logits are cropped back.

Dropout sites (elementwise dropout, like Keras ``Dropout``; they hold no weights, so the
state_dict is the same for every setting and base weights load into any of them):

* ``"decoder"`` (MC-Decoder): before each decoder block (after the concatenation) and before the
  last conv;
* ``"center"`` (MC-Center): after the lowest two encoder blocks (the bottom block and the one
  above it) and before the lowest two decoder blocks. The paper's text says "two"; its public
  code's index arithmetic also drops out after the encoder block one level higher (three encoder
  sites for 4 levels). We follow the text (docs/fidelity.md, "MC-Center sites").

An active site drops out whenever its setting is on, in ``train()`` *and* ``eval()`` mode, because
MC inference samples in eval mode (instance norm has no running statistics, so eval changes
nothing else).
"""

from __future__ import annotations

from contextlib import contextmanager

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calib.nets.config import UNetConfig

#: Logit written where the mask is False; sigmoid(-100) == 0 in float32 (and bf16 holds it exactly).
BACKGROUND_LOGIT = -100.0

#: MC-dropout settings accepted by :meth:`UNet3D.set_dropout` (besides ``None``).
DROPOUT_SETTINGS = ("decoder", "center")


class DropoutSite(nn.Module):
    """Elementwise dropout that is identity until switched on, then active in train and eval.

    ``suspended`` (set by :meth:`UNet3D.dropout_suspended`) makes an active site the identity for
    a while without changing which sites are active, so the prefix/remainder split is unchanged.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.active = False
        self.suspended = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or self.suspended or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p >= 1.0:
            return F.dropout(x, self.p, training=True)
        # The same elementwise dropout (keep with probability 1 - p, scale by 1 / (1 - p)) from a
        # uniform draw: on the CPU, F.dropout's Bernoulli sampling took about twice as long, a
        # third of an MC-dropout inference (20 passes through the sites per subject).
        keep = torch.rand_like(x) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, active={self.active}"


class ConvBlock(nn.Module):
    """Two 'same'-padded convs, each preceded by [instance norm] + leaky ReLU.

    ``raw_input=True`` skips norm and activation before the first conv (first block of the net).
    """

    def __init__(self, in_ch: int, feats: tuple[int, int], kernels: tuple[tuple[int, int, int], ...],
                 norm: str, slope: float, raw_input: bool = False) -> None:
        super().__init__()
        self.raw_input = raw_input
        self.slope = slope
        self.norms = nn.ModuleList()
        self.convs = nn.ModuleList()
        ch = in_ch
        for f, k in zip(feats, kernels):
            # affine-free instance norm: the paper's (x - mean) / std over the spatial axes
            self.norms.append(nn.InstanceNorm3d(ch) if norm == "instance" else nn.Identity())
            self.convs.append(nn.Conv3d(ch, f, k, padding=tuple(s // 2 for s in k)))
            ch = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (norm, conv) in enumerate(zip(self.norms, self.convs)):
            if not (i == 0 and self.raw_input):
                x = F.leaky_relu(norm(x), self.slope)
            x = conv(x)
        return x


@dataclass
class PrefixState:
    """What :meth:`UNet3D.forward_prefix` hands to :meth:`UNet3D.forward_remainder`.

    ``step`` is the index of the first step of the remainder (the first active dropout site),
    ``h`` the current activation (padded grid), ``skips`` the encoder outputs already computed
    (``None`` where not yet), ``shape`` the unpadded spatial size to crop back to.
    """

    step: int
    h: torch.Tensor
    skips: tuple[torch.Tensor | None, ...]
    shape: tuple[int, int, int]

    def to(self, device: torch.device | str) -> "PrefixState":
        """A copy with every tensor moved to ``device``."""
        return PrefixState(self.step, self.h.to(device),
                           tuple(None if s is None else s.to(device) for s in self.skips), self.shape)


_ENC_KERNELS = ((3, 3, 1), (3, 3, 3))
_BOTTOM_KERNELS = ((3, 3, 3), (3, 3, 3))
_DEC_KERNELS = ((3, 3, 3), (3, 3, 1))


class UNet3D(nn.Module):
    """The U-Net of Eelbode/Bertels et al. 2020 used by Rousseau et al. 2021 (see module doc).

    ``forward(x, mask)``: ``x`` float (N, C, X, Y, Z), ``mask`` bool broadcastable to
    (N, 1, X, Y, Z) (a (N, X, Y, Z) mask is accepted too) -> logits (N, 1, X, Y, Z).
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        L = cfg.levels
        feats = cfg.features
        self.encoders = nn.ModuleList()
        ch = cfg.in_channels
        for lvl in range(L):
            kernels = _BOTTOM_KERNELS if lvl == L - 1 else _ENC_KERNELS
            self.encoders.append(ConvBlock(ch, feats[lvl], kernels, cfg.norm, cfg.negative_slope,
                                           raw_input=lvl == 0))
            ch = feats[lvl][1]
        # decoder level l mirrors the encoder: (b, a) features on concat(skip_l, up(below))
        self.decoders = nn.ModuleList()
        below = feats[L - 1][1]
        dec_blocks: list[ConvBlock] = []
        for lvl in range(L - 2, -1, -1):
            a, b = feats[lvl]
            dec_blocks.append(ConvBlock(b + below, (b, a), _DEC_KERNELS, cfg.norm, cfg.negative_slope))
            below = a
        self.decoders.extend(reversed(dec_blocks))  # decoders[l] is level l
        self.head_norm = nn.InstanceNorm3d(below) if cfg.norm == "instance" else nn.Identity()
        self.head = nn.Conv3d(below, 1, 1)
        self.pool = (nn.MaxPool3d if cfg.pooling == "max" else nn.AvgPool3d)(cfg.pool_factor)

        names = [f"enc{lvl}" for lvl in range(L)] + [f"dec{lvl}" for lvl in range(L - 1)] + ["head"]
        # weightless modules: adding them changes no state_dict key
        self.dropout = nn.ModuleDict({n: DropoutSite(cfg.dropout_rate) for n in names})
        self._sites_of = {
            "decoder": [f"dec{lvl}" for lvl in range(L - 1)] + ["head"],
            "center": [f"enc{L - 2}", f"enc{L - 1}"] + [f"dec{lvl}" for lvl in range(max(0, L - 3), L - 1)],
        }
        self._setting: str | None = None
        self._steps = self._program()
        self._init_weights()

    # ---- construction helpers -------------------------------------------------------------
    def _program(self) -> list[tuple[str, object]]:
        """The forward pass as a flat list of steps, so that it can be split at any site."""
        L = self.cfg.levels
        steps: list[tuple[str, object]] = []
        for lvl in range(L):
            steps.append(("enc", lvl))
            steps.append(("site", f"enc{lvl}"))
            if lvl < L - 1:
                steps.append(("skip", lvl))
        for lvl in range(L - 2, -1, -1):
            steps.append(("up", lvl))
            steps.append(("site", f"dec{lvl}"))
            steps.append(("dec", lvl))
        steps.append(("head_act", None))
        steps.append(("site", "head"))
        steps.append(("head", None))
        return steps

    def _init_weights(self) -> None:
        # He-normal kernels and zero biases, as the Keras original (kernel_initializer='he_normal')
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, a=self.cfg.negative_slope, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)

    def _step_modules(self, step: tuple[str, object]) -> list[nn.Module]:
        kind, arg = step
        if kind == "enc":
            return [self.encoders[arg]]
        if kind == "dec":
            return [self.decoders[arg]]
        if kind == "head":
            return [self.head]
        return []

    # ---- dropout settings -----------------------------------------------------------------
    @property
    def dropout_setting(self) -> str | None:
        """The current MC-dropout setting (``None``, ``"decoder"`` or ``"center"``)."""
        return self._setting

    def set_dropout(self, setting: str | None) -> None:
        """Switch the dropout sites of ``setting`` on (all others off); ``None`` switches all off."""
        if setting is not None and setting not in DROPOUT_SETTINGS:
            raise ValueError(f"unknown dropout setting {setting!r}; valid choices: None, "
                             + ", ".join(repr(s) for s in DROPOUT_SETTINGS))
        on = set(self._sites_of[setting]) if setting else set()
        for name, site in self.dropout.items():
            site.active = name in on
        self._setting = setting

    @contextmanager
    def dropout_suspended(self):
        """Run the net deterministically: every dropout site is the identity inside the block.

        Inverted dropout (``F.dropout`` scales kept units by 1 / (1 - p)) makes the identity the
        expected activation of each site, i.e. the weight-scaling approximation of the MC mean;
        Keras' ``Dropout`` layers do the same outside training. The active sites and hence
        :meth:`forward_prefix` / :meth:`forward_remainder` are unchanged.
        """
        saved = {name: site.suspended for name, site in self.dropout.items()}
        for site in self.dropout.values():
            site.suspended = True
        try:
            yield self
        finally:
            for name, site in self.dropout.items():
                site.suspended = saved[name]

    def active_sites(self) -> list[str]:
        """Names of the dropout sites that are on, in forward order."""
        return [arg for kind, arg in self._steps if kind == "site" and self.dropout[arg].active]

    def _split(self) -> int:
        for i, (kind, arg) in enumerate(self._steps):
            if kind == "site" and self.dropout[arg].active:
                return i
        return len(self._steps)

    def prefix_parameters(self) -> list[nn.Parameter]:
        """Parameters used before the first active dropout site (all of them with no setting)."""
        split = self._split()
        return [p for s in self._steps[:split] for m in self._step_modules(s) for p in m.parameters()]

    def remainder_parameters(self) -> list[nn.Parameter]:
        """Parameters used from the first active dropout site on (none with no setting)."""
        split = self._split()
        return [p for s in self._steps[split:] for m in self._step_modules(s) for p in m.parameters()]

    def last_layer(self) -> nn.Conv3d:
        """The final 1x1x1 conv that produces the logit (what fine-tuning trains)."""
        return self.head

    # ---- forward --------------------------------------------------------------------------
    def _run(self, state: PrefixState, stop: int) -> PrefixState:
        h = state.h
        skips = list(state.skips)
        for kind, arg in self._steps[state.step:stop]:
            if kind == "enc":
                if arg > 0:
                    h = self.pool(h)
                h = self.encoders[arg](h)
            elif kind == "site":
                h = self.dropout[arg](h)
            elif kind == "skip":
                skips[arg] = h
            elif kind == "up":
                skip = skips[arg]
                h = F.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
                h = torch.cat([skip, h], dim=1)
            elif kind == "dec":
                h = self.decoders[arg](h)
            elif kind == "head_act":
                h = F.leaky_relu(self.head_norm(h), self.cfg.negative_slope)
            elif kind == "head":
                h = self.head(h)
        return PrefixState(stop, h, tuple(skips), state.shape)

    def forward_prefix(self, x: torch.Tensor) -> PrefixState:
        """Run the deterministic part of the net (up to the first active dropout site).

        ``x``: (N, C, X, Y, Z). MC inference computes this once and the remainder many times.
        """
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"UNet3D input must be (N, {self.cfg.in_channels}, X, Y, Z), "
                             f"got {tuple(x.shape)}")
        shape = tuple(int(s) for s in x.shape[2:])
        m = self.cfg.size_multiple
        pads = [(-s) % m for s in shape]
        bottom = [(s + p) // m for s, p in zip(shape, pads)]
        if self.cfg.norm == "instance" and bottom[0] * bottom[1] * bottom[2] < 2:
            # instance norm of a single voxel is undefined (torch raises an obscure error)
            raise ValueError(f"input {shape} is too small for {self.cfg.levels} levels with instance "
                             f"norm: the bottom level would be {tuple(bottom)} voxels; give at least "
                             f"one axis more than {m} voxels")
        if any(pads):
            # F.pad lists the last axis first
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        state = PrefixState(0, x, (None,) * (self.cfg.levels - 1), shape)  # type: ignore[arg-type]
        return self._run(state, self._split())

    def forward_remainder(self, state: PrefixState, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the rest of the net from ``state`` (stochastic when a setting is on) -> logits.

        ``state`` is not modified, so this may be called many times on one prefix.
        """
        if state.step != self._split():
            raise ValueError(f"prefix state was computed for step {state.step} but the current "
                             f"dropout setting {self._setting!r} splits at step {self._split()}; "
                             "recompute forward_prefix after set_dropout")
        out = self._run(state, len(self._steps)).h
        X, Y, Z = state.shape
        logits = out[:, :, :X, :Y, :Z]
        if mask is not None:
            mask = torch.as_tensor(mask, device=logits.device)
            if mask.dim() == 4:
                mask = mask.unsqueeze(1)
            logits = torch.where(mask.bool(), logits,
                                 torch.tensor(BACKGROUND_LOGIT, dtype=logits.dtype, device=logits.device))
        return logits

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, 1, X, Y, Z); ``BACKGROUND_LOGIT`` where ``mask`` is False."""
        return self.forward_remainder(self.forward_prefix(x), mask)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (all of them, or only those requiring grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
