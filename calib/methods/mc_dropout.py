"""MC dropout (Gal & Ghahramani 2016) as the paper applies it to trained base models.

Dropout (rate 0.5) is switched on at the sites of a setting (``calib.nets``):
``mc_decoder`` -- before each decoder block and before the last conv; ``mc_center`` -- after the
lowest two encoder blocks and before the lowest two decoder blocks. The layers before the first
active site are frozen; the rest is retrained with soft Dice for SD-based weights (CE-SD, SD) or
CE for CE weights, at the given initial LR (the paper sweeps 1e-3, 1e-4, 1e-5 and keeps the best),
on batches of 2 volumes with the usual schedule. The prediction is the mean foreground probability
of 20 stochastic passes.

MC retraining is a retraining of the network, not a post hoc fit: it trains on the base model's
``train`` split and stops on ``val`` (``fit_split = "train"``). Its validation loss is computed
with dropout off (:meth:`calib.nets.UNet3D.dropout_suspended`), as the paper's Keras code does:
one stochastic pass is a noisy estimate (std ~0.005 between two passes of the same weights on
the demo, as large as an epoch's change), so early stopping, the kept epoch and the choice of LR
would follow the noise; the mean of K fixed-mask samples would be deterministic too, but costs
K forward passes per validation volume for a number that converges to the same quantity.

Cost: the prefix before the first dropout site is deterministic and frozen, so it runs once per
subject -- during retraining without autograd, at inference once for all 20 samples -- and only
the remainder runs per sample (``bench/methods.py`` measures the gain).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from calib.losses import LOSSES
from calib.methods.base import SubjectRef
from calib.methods.network_based import NetworkMethod
from calib.nets import UNet3D, UNetConfig

#: Loss of MC retraining by base weights (the paper: SD for SD-based weights, CE for CE weights).
MC_LOSS = {"CE": "ce", "CE-SD": "sd", "SD": "sd"}


@contextmanager
def _forked_rng(device: torch.device):
    """Sampling must not move the caller's RNG streams (a training run's, for instance)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def sample_seeds(seed: int, n_samples: int) -> list[int]:
    """The torch seed of each MC sample: sample ``i`` draws the same dropout masks whichever way
    (cached prefix or not) the net is run."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(n_samples)]


def mc_probability(net: UNet3D, image: torch.Tensor, mask: torch.Tensor | None, n_samples: int,
                   seed: int, cache_prefix: bool = True) -> torch.Tensor:
    """Mean of ``n_samples`` dropout samples of ``sigmoid(logits)``, (N, 1, X, Y, Z) float32,
    0 where ``mask`` (broadcastable to (N, 1, X, Y, Z)) is False.

    With ``cache_prefix`` the deterministic prefix (up to the first active dropout site) runs once
    and only the remainder per sample; without it the whole net runs per sample. Both draw sample
    ``i``'s dropout masks from the seed :func:`sample_seeds` gives it, so for the same ``seed``
    they return the same probabilities (up to float rounding). The mask is applied once to the
    mean rather than to every sample (the same result: outside it every sample is background).
    """
    with torch.inference_mode(), _forked_rng(image.device):
        state = net.forward_prefix(image) if cache_prefix else None
        total = None
        for s in sample_seeds(seed, n_samples):
            torch.manual_seed(s)
            logits = net.forward_remainder(state) if cache_prefix else net(image)
            prob = torch.sigmoid(logits.float())
            total = prob if total is None else total.add_(prob)
        total.div_(n_samples)
        if mask is not None:
            mask = torch.as_tensor(mask, device=total.device).bool()
            if mask.dim() == 4:  # (N, X, Y, Z)
                mask = mask.unsqueeze(1)
            total = torch.where(mask, total, torch.zeros((), device=total.device))
    return total


class MCDropout(NetworkMethod):
    """Base of the two MC settings. Parameters: ``lr`` (swept; default 1e-4), ``loss`` (default by
    weights), ``n_samples`` (20), ``dropout_rate`` (0.5), ``batch_size`` (2 volumes) and the
    schedule; ``seed`` also seeds the inference samples."""

    fit_split = "train"
    setting: str

    def net_config(self) -> UNetConfig:
        from dataclasses import replace

        return replace(self.net_cfg, dropout_rate=float(self.params["dropout_rate"]))

    def dropout_setting(self) -> str:
        return self.setting

    def trained_parameters(self) -> list[nn.Parameter]:
        return self.net.remainder_parameters()

    def loss_name(self) -> str:
        return self.params["loss"] or MC_LOSS[self.weights]

    def _loss(self, module: UNet3D, batch: dict) -> torch.Tensor:
        # calib.training.fit validates in eval() mode: there dropout is off, so the validation
        # loss of the same weights is the same number every time (module doc)
        if not module.training:
            with module.dropout_suspended():
                return self._remainder_loss(module, batch)
        return self._remainder_loss(module, batch)

    def _remainder_loss(self, module: UNet3D, batch: dict) -> torch.Tensor:
        # the frozen prefix needs no graph: run it without autograd, retrain what follows
        with torch.no_grad():
            state = module.forward_prefix(batch["image"])
        logits = module.forward_remainder(state, batch["mask"])
        return LOSSES[self.loss_name()](logits, batch["label"], batch["mask"])

    @torch.no_grad()
    def _predict_prob(self, subject: SubjectRef, device: torch.device) -> np.ndarray:
        self.net.to(device).eval()
        image, mask = self._inputs(subject, device)
        prob = mc_probability(self.net, image, mask, self.params["n_samples"], self.params["seed"])
        self.net.to("cpu")
        return prob[0, 0].cpu().numpy()


class MCDecoder(MCDropout):
    """MC-Decoder: dropout before each decoder block and before the last conv."""

    name = "mc_decoder"
    setting = "decoder"


class MCCenter(MCDropout):
    """MC-Center: dropout after the lowest two encoder blocks and before the lowest two decoder
    blocks."""

    name = "mc_center"
    setting = "center"
