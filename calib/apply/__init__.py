"""Apply a finished trial's fitted method to new cases (``python -m calib.apply``).

A base U-Net, a U-Net + calibrator, or a calibrator alone on another network's predictions,
read from a model folder (:mod:`calib.apply.model`), predicts on a new case prepared as the
trial's data was (:mod:`calib.apply.inputs`), and the calibrated foreground probability -- plus the
MC standard deviation where the method samples -- is written as NIfTI on the input's own grid
(:mod:`calib.apply.apply`). Nothing here imports MLflow: the command line fetches a run's or a
registered model's files through ``tracking.models`` and hands this package a folder.
"""

from calib.apply.apply import PROB_SUFFIX, STD_SUFFIX, ApplyResult, apply_many, apply_model, prepare_input
from calib.apply.inputs import PreparedCase, prepare_prediction, prepare_subject
from calib.apply.model import (
    BASE_WEIGHTS,
    METHOD_FILE,
    STAGE_WEIGHTS,
    TRIAL_CONFIG,
    ApplyError,
    FittedModel,
    Prediction,
    load_fitted,
)

__all__ = [
    "BASE_WEIGHTS", "METHOD_FILE", "PROB_SUFFIX", "STAGE_WEIGHTS", "STD_SUFFIX", "TRIAL_CONFIG",
    "ApplyError", "ApplyResult", "FittedModel", "Prediction", "PreparedCase", "apply_many",
    "apply_model", "load_fitted", "prepare_input", "prepare_prediction", "prepare_subject",
]
