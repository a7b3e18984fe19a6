"""The interface every calibration method implements, and the subject sets it reads.

A method is built with its parameters and the base model it calibrates, fitted on a training set
with early stopping on a validation set, then asked for each test subject's foreground
probabilities::

    method = get_method("platt")(params, weights="CE", net_cfg=cfg, base_weights=path)
    result = method.fit(train_set, val_set, device, callbacks, checkpoint_path)   # FitResult
    prob = method.predict_proba(test_set.subject(sid), device)                  # (X, Y, Z)
    method.save(path); same = load_method(path)

Logit-based methods (``uses == "logits"``) read only the base stage's logit cache; network-based
ones (``uses == "images"``) read the preprocessed images and the base weights.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from calib.methods.params import MethodError
from calib.methods.recipes import RECIPES, resolve
from calib.training import EpochResult, FitResult, TrainConfig, atomic_save
from calib.vocabulary import METHOD_TRAIN_KEYS

SAVE_FORMAT = 1


@dataclass(frozen=True)
class SubjectSet:
    """Subjects a method trains, validates or predicts on.

    ``cache_dir``: the preprocessed subjects (``<id>.npz``; images, labels, masks, true
    probabilities), needed by network-based methods and for true probabilities. ``logits_dir``:
    the base stage's logit cache (:mod:`calib.logits`), needed by logit-based methods.
    """

    subject_ids: tuple[str, ...]
    cache_dir: Path | None = None
    logits_dir: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "subject_ids", tuple(self.subject_ids))
        if not self.subject_ids:
            raise MethodError("a SubjectSet needs at least one subject id")

    def subject(self, subject_id: str) -> "SubjectRef":
        return SubjectRef(subject_id, self.cache_dir, self.logits_dir)

    def __iter__(self) -> Iterator["SubjectRef"]:
        return (self.subject(s) for s in self.subject_ids)

    def __len__(self) -> int:
        return len(self.subject_ids)

    def require(self, what: str, method: str) -> Path:
        """The directory of ``what`` (``"logits"`` or ``"images"``), or a MethodError."""
        path = self.logits_dir if what == "logits" else self.cache_dir
        if path is None:
            key = "logits_dir" if what == "logits" else "cache_dir"
            raise MethodError(f"method {method!r} reads {what} but the SubjectSet has no {key}")
        return Path(path)


class SubjectRef:
    """One subject; its arrays load on first use, (X, Y, Z) order.

    Label and mask come from the logit cache when there is one (no image load needed), else from
    the preprocessed subject.
    """

    def __init__(self, subject_id: str, cache_dir: Path | None, logits_dir: Path | None):
        self.subject_id = subject_id
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.logits_dir = None if logits_dir is None else Path(logits_dir)

    @cached_property
    def _cached_logits(self):
        from calib.logits import load_logits

        if self.logits_dir is None:
            raise MethodError(f"subject {self.subject_id!r}: no logit cache given")
        return load_logits(self.logits_dir, self.subject_id)

    @cached_property
    def _subject(self):
        from calib.data import load_subject

        if self.cache_dir is None:
            raise MethodError(f"subject {self.subject_id!r}: no preprocessed cache given")
        return load_subject(self.cache_dir, self.subject_id)

    @property
    def logits(self) -> np.ndarray:
        """Cached base logits, float32 (X, Y, Z)."""
        return np.asarray(self._cached_logits.logits, dtype=np.float32)

    @property
    def image(self) -> np.ndarray:
        """Preprocessed image, float32 (C, X, Y, Z)."""
        return np.asarray(self._subject.image, dtype=np.float32)

    @property
    def label(self) -> np.ndarray:
        src = self._cached_logits if self.logits_dir is not None else self._subject
        return np.asarray(src.label).astype(np.uint8)

    @property
    def mask(self) -> np.ndarray:
        src = self._cached_logits if self.logits_dir is not None else self._subject
        return np.asarray(src.mask, dtype=bool)

    @property
    def true_prob(self) -> np.ndarray | None:
        """The phantom's true foreground probability, or None (real data, or no cache_dir)."""
        if self.cache_dir is None:
            return None
        tp = self._subject.true_prob
        return None if tp is None else np.asarray(tp, dtype=np.float32)


class CalibrationMethod(abc.ABC):
    """Base class of the calibration methods (see the module doc for the workflow).

    Class attributes of each method: ``name`` (registry key); ``uses`` (``"logits"`` or
    ``"images"``), ``has_lr`` (True where the LR is a swept axis) and ``DEFAULTS`` (every accepted
    parameter with its default, the paper's recipe) come from its recipe
    (:mod:`calib.methods.recipes`), set when the class is defined.

    Constructor: ``params`` override ``DEFAULTS``; ``weights`` names the base weights
    (``"CE"``, ``"CE-SD"``, ``"SD"``; some recipes depend on it); ``net_cfg`` / ``base_weights``
    the base network (network-based methods); ``schedule`` a TrainConfig whose schedule fields
    (max_epochs, patience, factor, min_rel_improvement, seed) replace the method's defaults before
    ``params`` are applied -- the sweep passes the grid's calibrate-stage schedule there. The
    learning rate and batch size always come from the method's recipe unless ``params`` set them.
    """

    name: ClassVar[str]
    uses: ClassVar[str]
    has_lr: ClassVar[bool] = False
    DEFAULTS: ClassVar[Mapping[str, Any]]
    #: Which split of the fold's training pool the method fits on (calib.stages): ``"calib"``
    #: for a post hoc fit on held-out subjects (every map of the base output, fine-tuning),
    #: ``"train"`` for a retraining of the network itself (MC dropout), which trains on the base
    #: model's own training subjects and stops on ``val`` as the base model does.
    fit_split: ClassVar[str] = "calib"
    #: True where the L2 penalty of the network (TrainConfig.weight_decay) applies: methods that
    #: retrain U-Net layers, as the public code's Keras model carries its regulariser with it.
    uses_weight_decay: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a concrete method: its recipe is the one source of these
            recipe = RECIPES[cls.name]
            cls.uses, cls.has_lr, cls.DEFAULTS = recipe.uses, recipe.has_lr, recipe.defaults

    def __init__(self, params: Mapping[str, Any] | None = None, *, weights: str = "CE",
                 net_cfg=None, base_weights: Path | None = None,
                 schedule: TrainConfig | None = None):
        self.params = resolve(self.name, params, weights, schedule)
        self.weights = weights
        # Set by the protocol and the network, not by the method's recipe: the epoch kept
        # (best or last) and the network's L2 penalty.
        self.restore_best = True if schedule is None else bool(schedule.restore_best)
        self.weight_decay = (float(schedule.weight_decay)
                             if schedule is not None and self.uses_weight_decay else 0.0)
        self.net_cfg = net_cfg
        self.base_weights = None if base_weights is None else Path(base_weights)

    # ---- training ---------------------------------------------------------------------------
    def train_config(self) -> TrainConfig:
        """The optimisation settings this method trains with (resolved parameters)."""
        return TrainConfig(**{k: self.params[k] for k in METHOD_TRAIN_KEYS if k in self.params},
                           weight_decay=self.weight_decay, restore_best=self.restore_best)

    @abc.abstractmethod
    def fit(self, train: SubjectSet, val: SubjectSet, device: torch.device,
            callbacks: Sequence[Callable[[EpochResult], None]] = (),
            checkpoint_path: Path | None = None) -> FitResult:
        """Fit on ``train`` with early stopping on ``val``; resumes from ``checkpoint_path``."""

    # ---- prediction -------------------------------------------------------------------------
    @abc.abstractmethod
    def _predict_prob(self, subject: SubjectRef, device: torch.device) -> np.ndarray:
        """Foreground probability (X, Y, Z) of one subject (mask applied by the caller)."""

    def predict_proba(self, subject: SubjectRef, device: torch.device | str = "cpu") -> np.ndarray:
        """Calibrated foreground probability, float32 (X, Y, Z) in [0, 1]; 0 outside the mask."""
        prob = np.asarray(self._predict_prob(subject, torch.device(device)), dtype=np.float32)
        return np.where(subject.mask, prob, np.float32(0.0)).astype(np.float32, copy=False)

    def describe(self) -> dict[str, float | str]:
        """Learned scalars worth logging (e.g. Platt's weight and bias, and what fitted them);
        empty by default."""
        return {}

    # ---- state ------------------------------------------------------------------------------
    @abc.abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The learned state (CPU tensors)."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def save(self, path: Path) -> Path:
        """Write name, parameters, base-weight name, network config and state atomically."""
        path = Path(path)
        payload = {
            "format": SAVE_FORMAT, "method": self.name, "params": dict(self.params),
            "weights": self.weights,
            "net_cfg": None if self.net_cfg is None else dataclasses.asdict(self.net_cfg),
            "state": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        atomic_save(payload, path)
        return path


def read_saved(path: Path) -> dict:
    """The payload written by :meth:`CalibrationMethod.save`; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MethodError(f"{path}: no saved calibration method there")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise MethodError(f"{path}: cannot read a saved calibration method ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != SAVE_FORMAT:
        raise MethodError(f"{path}: not a saved calibration method (format {SAVE_FORMAT})")
    return payload


def no_autocast(device: torch.device):
    """Disable autocast: calibrators have a handful of weights, and bf16 logits (8-bit mantissa,
    0.06 steps at |z| = 10) would blur exactly what they learn."""
    return torch.autocast(device_type=device.type, enabled=False)
