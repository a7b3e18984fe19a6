"""Apply a finished trial's fitted method to new cases (``python -m calib.apply --model-dir``).

A base U-Net, a U-Net + calibrator, or a calibrator alone on another network's predictions,
read from a model folder (:mod:`calib.apply.model`), predicts on a new case prepared as the
trial's data was (:mod:`calib.apply.inputs`), and the calibrated foreground probability -- plus the
MC standard deviation where the method samples -- is written as NIfTI on the input's own grid
(:mod:`calib.apply.apply`); a folder of cases is applied case by case (:mod:`calib.apply.cases`).

Nothing here imports MLflow or ``tracking`` (calib is the ground floor): a run's or a registered
model's files are fetched by ``python -m tracking.apply`` (``tracking/apply.py``), which hands
this package a folder and runs the same command line (:mod:`calib.apply.cli`).
"""

from calib.apply.apply import PROB_SUFFIX, STD_SUFFIX, ApplyResult, apply_model, prepare_input
from calib.apply.cases import CaseInput, CaseOutcome, apply_cases, find_cases
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
    "ApplyError", "ApplyResult", "CaseInput", "CaseOutcome", "FittedModel", "Prediction", "PreparedCase",
    "apply_cases", "apply_model", "find_cases", "load_fitted", "prepare_input", "prepare_prediction",
    "prepare_subject",
]
