"""``training:`` of a grid file: one typed schedule per stage, and the TrainConfig each becomes.

A schedule keeps only the keys the grid set (in its order): they go into the trial key as
written, so a default that calib.schedule.TrainConfig fills in later changes no key. The
pretrain and base schedules become a :class:`calib.schedule.TrainConfig` as they are; the
calibrate schedule is the part every calibration method shares (calib.vocabulary
CALIBRATION_SCHEDULE_KEYS) -- each method's recipe brings its own LR and batch size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import PrivateAttr, model_validator

from calib.schedule import TrainConfig
from calib.vocabulary import CALIBRATION_SCHEDULE_KEYS, STAGES, TRAIN_SCHEDULE_KEYS
from sweeps.grid.checks import GridProblem
from sweeps.grid.sections import Count, Index, NonNegative, Positive, Section

#: The LR and epochs of a TrainConfig built from a schedule without them: the calibrate stage's
#: (every method takes its LR from its recipe or the trial's axis; calib.methods.recipes.resolve
#: reads only the schedule keys of the stage's TrainConfig) and a schedule being checked alone.
UNSET_LR, UNSET_MAX_EPOCHS = 1e-3, 1


def train_config(settings: Mapping[str, Any]) -> TrainConfig:
    """``settings`` (TrainConfig fields) as a TrainConfig, :data:`UNSET_LR` / ``UNSET_MAX_EPOCHS``
    where they do not say."""
    return TrainConfig(**{"lr": UNSET_LR, "max_epochs": UNSET_MAX_EPOCHS, **settings})


class Schedule(Section):
    """A stage's schedule: only the keys the grid sets (TrainConfig's defaults fill the rest)."""

    _order: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _remember_order(cls, value: Any, handler) -> "Schedule":
        model = handler(value)
        model._order = tuple(value) if isinstance(value, Mapping) else ()
        return model

    @model_validator(mode="after")
    def _train_config(self) -> "Schedule":
        try:  # the science's own checks (e.g. lr_factor < 1), reported against the stage's key
            train_config(self.given())
        except (TypeError, ValueError) as exc:
            raise GridProblem(str(exc)) from None
        return self

    def given(self) -> dict[str, Any]:
        """The keys the grid set, in its order."""
        return {k: getattr(self, k) for k in self._order}

    def __getitem__(self, key: str) -> Any:
        """A key the grid set (KeyError for one it left to the default); read-only."""
        if key not in self._order:
            raise KeyError(key)
        return getattr(self, key)

    def settings(self, seed: int, weight_decay: float = 0.0) -> dict[str, Any]:
        """What a trial of this stage trains with, as its key records it: the keys the grid set,
        the grid's seed, and the network's L2 penalty where there is one."""
        return {**self.given(), "seed": seed, **({"weight_decay": weight_decay} if weight_decay else {})}


class CalibrationSchedule(Schedule):
    """``training.calibrate``: :data:`calib.vocabulary.CALIBRATION_SCHEDULE_KEYS`."""

    @classmethod
    def allowed_keys(cls) -> tuple[str, ...]:
        return CALIBRATION_SCHEDULE_KEYS

    max_epochs: Count | None = None
    lr_factor: Positive | None = None
    lr_patience: Index | None = None
    early_stop_patience: Count | None = None
    min_rel_improvement: NonNegative | None = None


class TrainSchedule(CalibrationSchedule):
    """``training.pretrain`` / ``training.base``: :data:`calib.vocabulary.TRAIN_SCHEDULE_KEYS`."""

    lr: Positive | None = None
    batch_size: Count | None = None

    @classmethod
    def allowed_keys(cls) -> tuple[str, ...]:
        return TRAIN_SCHEDULE_KEYS


class TrainingSection(Section):
    """``training``: one schedule per stage; ``training[stage]`` reads one."""

    pretrain: TrainSchedule = TrainSchedule()
    base: TrainSchedule = TrainSchedule()
    calibrate: CalibrationSchedule = CalibrationSchedule()

    def __getitem__(self, stage: str) -> Schedule:
        if stage not in STAGES:
            raise KeyError(stage)
        return getattr(self, stage)
