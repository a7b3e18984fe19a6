"""Shared machinery of the methods that retrain part of the base U-Net (fine-tuning, MC dropout)."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calib.data.batches import VolumeBatches
from calib.losses import LOSSES
from calib.methods.base import CalibrationMethod, SubjectRef, SubjectSet
from calib.methods.params import MethodError
from calib.vocabulary import EXTERNAL_WEIGHTS
from calib.nets import UNet3D, UNetConfig
from calib.training import EpochResult, FitResult, atomic_save, fit


def save_weights(model: nn.Module, path: Path) -> Path:
    """Write ``model.state_dict()`` (CPU tensors) to ``path`` atomically."""
    path = Path(path)
    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load a state dict written by :func:`save_weights` into ``model``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MethodError(f"{path}: base weights not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - unreadable or mismatching: the same problem here
        raise MethodError(f"{path}: cannot load these weights into the network ({exc})") from exc
    return model


def unet_inputs(subject: SubjectRef, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One subject's image (1, C, X, Y, Z) float32 and mask (1, 1, X, Y, Z) bool on ``device``."""
    image = torch.from_numpy(subject.image)[None].to(device)
    mask = torch.from_numpy(subject.mask)[None, None].to(device)
    return image, mask


@torch.no_grad()
def unet_probability(net: UNet3D, subject: SubjectRef, device: torch.device) -> np.ndarray:
    """``sigmoid(net(image, mask))`` of one subject in eval mode, float32 (X, Y, Z); 0 outside
    the mask. Leaves ``net`` on ``device``."""
    net.to(device).eval()
    image, mask = unet_inputs(subject, device)
    return torch.sigmoid(net(image, mask=mask).float())[0, 0].cpu().numpy()


def as_unet_config(cfg) -> UNetConfig:
    """``cfg`` as a UNetConfig (accepts the dict form saved with a method)."""
    if isinstance(cfg, UNetConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return UNetConfig(**{**cfg, "features": tuple(tuple(f) for f in cfg["features"])})
    raise MethodError(f"expected a UNetConfig, got {type(cfg).__name__}")


class NetworkMethod(CalibrationMethod, abc.ABC):
    """A method that starts from the base U-Net weights and retrains some of its parameters.

    Subclasses choose the dropout setting (:meth:`dropout_setting`), the trained parameters
    (:meth:`trained_parameters`), the loss (:meth:`loss_name`) and the prediction.
    """

    uses_weight_decay = True

    def __init__(self, params: Mapping | None = None, **context):
        super().__init__(params, **context)
        if self.weights == EXTERNAL_WEIGHTS:
            raise MethodError(f"method {self.name!r} retrains a U-Net; another network's imported "
                              "predictions (weights 'external') come without one")
        if self.net_cfg is None:
            raise MethodError(f"method {self.name!r} retrains the base network: net_cfg is required")
        self.net_cfg = as_unet_config(self.net_cfg)
        self.net = UNet3D(self.net_config())
        if self.base_weights is not None:
            load_weights(self.net, self.base_weights)
        self.net.set_dropout(self.dropout_setting())

    def net_config(self) -> UNetConfig:
        """The network this method builds (the base config; MC methods set their dropout rate)."""
        return self.net_cfg

    def dropout_setting(self) -> str | None:
        return None

    @abc.abstractmethod
    def trained_parameters(self) -> list[nn.Parameter]:
        """The parameters that train; every other one stays bit-identical."""

    @abc.abstractmethod
    def loss_name(self) -> str:
        """``"ce"`` or ``"sd"``."""

    def _loss(self, module: UNet3D, batch: dict) -> torch.Tensor:
        # fit() freezes every parameter but the trained ones, so autograd records only the
        # layers that train (for fine-tuning: the last conv)
        logits = module(batch["image"], mask=batch["mask"])
        return LOSSES[self.loss_name()](logits, batch["label"], batch["mask"])

    def fit(self, train: SubjectSet, val: SubjectSet, device: torch.device,
            callbacks: Sequence[Callable[[EpochResult], None]] = (),
            checkpoint_path: Path | None = None) -> FitResult:
        if self.base_weights is None:
            raise MethodError(f"method {self.name!r}: base_weights are required to fit")
        cfg = self.train_config()
        train_batches = VolumeBatches(train.require("images", self.name), train.subject_ids,
                                      cfg.batch_size, shuffle=True, seed=cfg.seed)
        val_batches = VolumeBatches(val.require("images", self.name), val.subject_ids,
                                    cfg.batch_size, shuffle=False)
        try:
            return fit(self.net, self._loss, train_batches, lambda: val_batches(0), cfg,
                       torch.device(device), params=self.trained_parameters(),
                       checkpoint_path=checkpoint_path, callbacks=callbacks)
        finally:
            self.net.to("cpu")

    def _inputs(self, subject: SubjectRef, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return unet_inputs(subject, device)

    def _predict_prob(self, subject: SubjectRef, device: torch.device) -> np.ndarray:
        prob = unet_probability(self.net, subject, device)
        self.net.to("cpu")
        return prob

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.net.load_state_dict(dict(state))
