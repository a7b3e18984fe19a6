"""A finished trial as a model: its resolved config and weights, predicting on model-grid arrays.

A model folder holds what a trial leaves (``tracking`` assembles it from MLflow)::

    <dir>/trial_config.json   the trial's resolved config (stage, method, params, net, data)
    <dir>/weights.pt          base / pretrain stage: the U-Net's weights
    <dir>/method.pt           calibrate stage: the fitted method (calib.methods.load_method)
    <dir>/base_weights.pt     calibrate stage of a logit-based method on a U-Net: the base weights

:meth:`FittedModel.predict` reproduces the trial's own test-fold prediction: the U-Net in eval
mode, base logits rounded through float16 as the base stage's logit cache stores them (the
calibrator was fitted and scored on those), MC dropout with the method's seeds (the mean equals
the method's ``predict_proba``; the standard deviation over the samples comes with it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calib.logits import LOGIT_DTYPE
from calib.methods import CalibrationMethod, load_method
from calib.methods.mc_dropout import MCDropout, sample_seeds
from calib.methods.network_based import as_unet_config, load_weights
from calib.nets import UNet3D
from calib.vocabulary import BASE, PRETRAIN

TRIAL_CONFIG = "trial_config.json"
STAGE_WEIGHTS = "weights.pt"
METHOD_FILE = "method.pt"
BASE_WEIGHTS = "base_weights.pt"
_FP16_MAX = float(np.finfo(np.float16).max)


class ApplyError(ValueError):
    """A model or an input that cannot be applied; the message names the file."""


@dataclass
class Prediction:
    """Foreground probability (X, Y, Z) float32 in [0, 1], 0 outside the mask, and the standard
    deviation over MC samples (same shape) for methods that sample, else None."""

    prob: np.ndarray
    std: np.ndarray | None = None


class _Arrays:
    """The subject interface the methods read (calib.methods.SubjectRef), over arrays in memory."""

    def __init__(self, subject_id: str, mask: np.ndarray, image: np.ndarray | None = None,
                 logits: np.ndarray | None = None):
        self.subject_id, self.mask, self.image, self.logits = subject_id, mask, image, logits
        self.label, self.true_prob = None, None


def as_cached_logits(logits: np.ndarray) -> np.ndarray:
    """Logits as the logit cache returns them: clipped to float16's range, rounded to float16."""
    return np.clip(np.asarray(logits, dtype=np.float32), -_FP16_MAX, _FP16_MAX).astype(LOGIT_DTYPE).astype(np.float32)


@torch.no_grad()
def mc_mean_std(net: UNet3D, image: torch.Tensor, mask: torch.Tensor, n_samples: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of ``n_samples`` dropout samples of ``sigmoid(logits)``.

    Sample ``i`` draws its masks from the seed ``calib.methods.mc_dropout.sample_seeds`` gives it
    and the prefix before the first dropout site runs once, as the method's own prediction
    (``mc_probability``) does, so the mean equals it; 0 outside ``mask`` for both.
    """
    devices = [image.device.index or 0] if image.device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=devices):
        state = net.forward_prefix(image)
        total, total_sq = None, None
        for s in sample_seeds(seed, n_samples):
            torch.manual_seed(s)
            prob = torch.sigmoid(net.forward_remainder(state).float())
            total = prob.clone() if total is None else total.add_(prob)
            sq = prob.double() ** 2
            total_sq = sq if total_sq is None else total_sq.add_(sq)
        mean = total.div_(n_samples)
        var = (total_sq / n_samples - mean.double() ** 2).clamp_(min=0.0)
        inside = mask.bool()
        zero = torch.zeros((), device=mean.device)
        mean = torch.where(inside, mean, zero)
        std = torch.where(inside, var.sqrt().float(), zero)
    return mean[0, 0].cpu().numpy(), std[0, 0].cpu().numpy()


@dataclass
class FittedModel:
    """A finished trial, ready to predict (see the module doc for the files it is read from).

    ``inputs`` is ``"images"`` (a preprocessed subject: a U-Net runs) or ``"logits"`` (another
    network's predictions: the calibrator alone).
    """

    config: dict[str, Any]
    net: UNet3D | None
    calibrator: CalibrationMethod | None
    source: Path
    #: what the user named the model by (a ``models:/`` URI, ``run <id>``); messages say this,
    #: not ``source``, which may be a temporary download folder. Default: ``source``.
    origin: str = ""

    def __post_init__(self) -> None:
        self.origin = self.origin or str(self.source)

    @property
    def stage(self) -> str:
        return self.config["stage"]

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def data(self) -> dict[str, Any]:
        return self.config.get("data") or {}

    @property
    def dataset(self) -> str:
        return self.data.get("dataset") or self.config.get("dataset", "")

    @property
    def inputs(self) -> str:
        logit_only = self.calibrator is None or self.calibrator.uses == "logits"
        return "logits" if self.net is None and logit_only else "images"

    @property
    def samples(self) -> bool:
        """True for methods whose prediction is a mean over MC samples (a std comes with it)."""
        return isinstance(self.calibrator, MCDropout)

    def describe(self) -> str:
        return f"{self.dataset}/{self.config.get('weights', '')}/{self.method} ({self.stage}) from {self.origin}"

    def predict(self, mask: np.ndarray, image: np.ndarray | None = None, logits: np.ndarray | None = None,
                device: torch.device | str = "cpu", subject_id: str = "input") -> Prediction:
        """The prediction on the model's grid: ``image`` (C, X, Y, Z) float32 for a U-Net model,
        ``logits`` (X, Y, Z) for a calibrator of external predictions; ``mask`` bool (X, Y, Z)."""
        device = torch.device(device)
        mask = np.asarray(mask, dtype=bool)
        if self.inputs == "images":
            if image is None:
                raise ApplyError(f"{self.describe()} needs an image (a subject folder), got none")
            image = np.ascontiguousarray(image, dtype=np.float32)
            if self.samples:
                net = self.calibrator.net.to(device).eval()
                try:
                    mean, std = mc_mean_std(net, torch.from_numpy(image)[None].to(device),
                                            torch.from_numpy(mask)[None, None].to(device),
                                            int(self.calibrator.params["n_samples"]), int(self.calibrator.params["seed"]))
                finally:
                    net.to("cpu")
                return Prediction(mean, std)
            if self.calibrator is not None and self.calibrator.uses == "images":
                return Prediction(self.calibrator.predict_proba(_Arrays(subject_id, mask, image=image), device))
            with torch.no_grad():
                self.net.to(device).eval()
                z = self.net(torch.from_numpy(image)[None].to(device),
                             mask=torch.from_numpy(mask)[None, None].to(device))[0, 0].float()
                self.net.to("cpu")
            if self.calibrator is None:  # a base model: its own probability (as unet_probability)
                return Prediction(np.where(mask, torch.sigmoid(z).cpu().numpy(), np.float32(0.0)))
            logits = z.cpu().numpy()
        elif logits is None:
            raise ApplyError(f"{self.describe()} calibrates another network's predictions: give a "
                             "probability or logit map, not a subject folder")
        subject = _Arrays(subject_id, mask, logits=as_cached_logits(logits))
        return Prediction(self.calibrator.predict_proba(subject, device))


def _read_config(path: Path, name: str) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ApplyError(f"{name}: trial config missing (every trial logs {TRIAL_CONFIG})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ApplyError(f"{name}: cannot read the trial config ({exc})") from None
    missing = [k for k in ("stage", "method") if k not in config]
    if missing:
        raise ApplyError(f"{name}: not a trial config (lacks {', '.join(missing)})")
    return config


def load_fitted(model_dir: Path, origin: str | None = None) -> FittedModel:
    """Read a model folder (module doc) into a :class:`FittedModel`; errors name the file.

    ``origin``: what the user named the model by when ``model_dir`` is a download of it (a
    ``models:/`` URI, ``run <id>``); errors and :meth:`FittedModel.describe` then name a file as
    ``<origin>: <file name>`` instead of its temporary path.
    """
    model_dir = Path(model_dir)

    def name(path: Path) -> str:
        return f"{origin}: {path.relative_to(model_dir)}" if origin else str(path)

    def renamed(exc: Exception) -> ApplyError:
        # messages of calib.methods / calib.nets name the file by its path: say the origin instead
        text = str(exc)
        return ApplyError(text.replace(str(model_dir), origin) if origin else text)

    if not model_dir.is_dir():
        raise ApplyError(f"{origin or model_dir}: no model folder there")
    config = _read_config(model_dir / TRIAL_CONFIG, name(model_dir / TRIAL_CONFIG))
    external = (config.get("data") or {}).get("kind") == "predictions"
    net_cfg = None if external or not config.get("net") else as_unet_config(config["net"])

    def unet(weights: Path) -> UNet3D:
        if net_cfg is None:
            raise ApplyError(f"{name(model_dir / TRIAL_CONFIG)}: no network config for {weights.name}")
        try:
            return load_weights(UNet3D(net_cfg), weights)
        except ValueError as exc:
            raise renamed(exc) from exc

    if config["stage"] in (PRETRAIN, BASE):
        weights = model_dir / STAGE_WEIGHTS
        if not weights.is_file():
            raise ApplyError(f"{name(weights)}: the {config['stage']} model's weights are missing")
        return FittedModel(config, unet(weights), None, model_dir, origin or "")
    method_file = model_dir / METHOD_FILE
    try:
        calibrator = load_method(method_file)
    except ValueError as exc:
        raise renamed(exc) from exc
    net = None
    if calibrator.uses == "logits" and not external:
        base = model_dir / BASE_WEIGHTS
        if not base.is_file():
            raise ApplyError(f"{name(base)}: {calibrator.name} calibrates a U-Net's logits; its base weights "
                             "are missing from the model folder")
        net = unet(base)
    return FittedModel(config, net, calibrator, model_dir, origin or "")
