"""A plan's trials: :class:`TrialSpec` (one trial, named by its key) and :class:`Plan` (all of
a grid's, in dependency order). sweeps.plan.expand builds them.

A trial's key is the SHA-256 of everything that changes its result (:func:`trial_key`, the
payload ``TrialSpec.config``), so a relaunch of the same grid finds its finished trials
(docs/architecture.md, "Trials and keys").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from calib.schedule import TrainConfig
from calib.vocabulary import CALIBRATE, EXTERNAL_WEIGHTS, PRETRAIN
from sweeps.grid import GridConfig, Resources, SplitSettings

if TYPE_CHECKING:
    from calib.nets import UNetConfig

KEY_VERSION = 1
KEY_LENGTH = 20  # hex digits (80 bits): no collision in any realistic experiment, still readable


def trial_key(payload: dict) -> str:
    """Stable hash of a JSON-able payload (sorted keys, ``repr``-exact floats)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


@dataclass(frozen=True)
class TrialSpec:
    """One trial: what to run, its key, its upstream trial and its resources.

    ``config`` is the payload the key hashes (logged as the trial's resolved config); ``train``
    (the stage's TrainConfig; None for scoring another network's predictions), ``split`` and
    ``net`` (None for another network's predictions) are the typed settings the stage runs with,
    built from the same grid values. For a trial
    whose LR an Optuna search picks, ``lr`` is None until the searcher fills it (``with_lr``) and
    ``search_group`` names the trials that share one search (dataset, weights, fold, method).
    """

    key: str
    stage: str
    dataset: str
    weights: str
    method: str
    fold: int
    lr: float | None
    params: dict
    upstream: str | None
    wave: int
    resources: Resources
    config: dict
    train: TrainConfig | None = None
    split: SplitSettings = field(default_factory=SplitSettings)
    net: UNetConfig | None = None
    search: str = "grid"
    sample: int | None = None
    search_group: str | None = None
    #: calibrate trials of a ``calib_subjects`` grid: how many calib subjects it fits on (an int
    #: or ``all``; sweeps.plan.subjects); None: the whole calib split, as without the key
    calib_subjects: int | str | None = None

    @property
    def label(self) -> str:
        """``calibrate brats18/CE/mc_decoder lr=0.001 fold 2`` (``... calib_subjects=4 fold 2``
        for a trial on 4 calib subjects)."""
        what = "/".join(x for x in (self.dataset, self.weights if self.stage != PRETRAIN else "",
                                   self.method if self.stage == CALIBRATE else "") if x)
        lr = f" lr={self.lr:g}" if self.lr is not None else (
            f" lr=optuna#{self.sample}" if self.search == "optuna" else "")
        subjects = "" if self.calib_subjects is None else f" calib_subjects={self.calib_subjects}"
        return f"{self.stage} {what}{lr}{subjects} fold {self.fold}"

    @property
    def lr_tag(self) -> str:
        """``calib.lr``: the LR as text, empty when the method has none."""
        return "" if self.lr is None else f"{self.lr:g}"

    def with_lr(self, lr: float) -> "TrialSpec":
        """This trial with the LR a searcher chose (the key, fixed at planning, is unchanged)."""
        lr = float(lr)
        return dataclasses.replace(self, lr=lr, params=dict(self.params, lr=lr),
                                   config=dict(self.config, lr=lr))

    @property
    def external(self) -> bool:
        """A trial on another network's predictions (a ``kind: predictions`` dataset)."""
        return self.weights == EXTERNAL_WEIGHTS

    def to_dict(self) -> dict:
        """JSON-able, for Ray Tune's trial configs; :meth:`from_dict` reads it back."""
        d = dataclasses.asdict(self)
        d["resources"] = {"cpu": self.resources.cpu, "gpu": self.resources.gpu}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrialSpec":
        d = dict(d)
        d["resources"] = Resources(**d["resources"])
        d["split"] = SplitSettings(**d["split"])
        if d.get("train") is not None:
            d["train"] = TrainConfig(**d["train"])
        if d.get("net") is not None:
            d["net"] = unet_config(d["net"])
        return cls(**d)


@dataclass(frozen=True)
class Plan:
    """All trials of a grid, in dependency order."""

    grid: GridConfig
    trials: tuple[TrialSpec, ...]
    by_key: dict[str, TrialSpec] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.by_key.update({t.key: t for t in self.trials})
        if len(self.by_key) != len(self.trials):
            dup = [k for k, n in Counter(t.key for t in self.trials).items() if n > 1]
            raise ValueError(f"two trials share key {dup[0]}: the grid repeats a point")

    def counts(self) -> Counter:
        """Trials per (stage, method)."""
        return Counter((t.stage, t.method) for t in self.trials)

    def downstream_of(self, keys: Iterable[str]) -> set[str]:
        """Keys of every trial that depends, directly or not, on one of ``keys``."""
        bad = set(keys)
        out: set[str] = set()
        for t in self.trials:  # dependency order: an upstream comes before its dependants
            if t.upstream in bad or t.upstream in out:
                out.add(t.key)
        return out


def unet_config(d: dict) -> "UNetConfig":
    """A calib.nets.UNetConfig from its ``dataclasses.asdict`` form (lists back to tuples)."""
    # calib.nets imports torch: deferred to where a network is planned or run, never to read a grid
    from calib.nets import UNetConfig

    return UNetConfig(**{**d, "features": tuple(tuple(level) for level in d["features"])})
