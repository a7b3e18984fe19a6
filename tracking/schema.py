"""Names of the MLflow run schema (docs/architecture.md, "MLflow run schema"): tags, metrics, artifacts.

Every writer and reader of the sweep's runs uses these constants, so the schema lives in one place.
The names of the files a stage writes are calib's (calib.stage_files, which cannot import this
module); the artifacts that carry them refer to those.
"""

from __future__ import annotations

from calib.stage_files import LOGITS_DIRNAME, LOGITS_SHIFT_DIRNAME, WEIGHTS_NAME

# ---- tags ----------------------------------------------------------------------------------------
ROLE = "calib.role"
ROLE_SWEEP = "sweep"  # one parent run per launch
ROLE_TRIAL = "trial"  # one child run per trial

STAGE = "calib.stage"  # pretrain | base | calibrate
DATASET = "calib.dataset"
WEIGHTS = "calib.weights"  # CE | CE-SD | SD
METHOD = "calib.method"  # pretrain | base | platt | auxiliary | finetune | mc_decoder | mc_center
FOLD = "calib.fold"  # integer as text
LR = "calib.lr"  # text; empty when the method has no learning-rate axis
TRIAL_KEY = "calib.trial_key"  # stable hash of everything that changes the trial's result
UPSTREAM_KEY = "calib.upstream_key"  # trial key of the run whose artifacts this trial read
PROTOCOL = "calib.protocol"  # honest | paper
SEARCH = "calib.search"  # optuna, when an Optuna search chose the LR
ERROR = "calib.error"  # why a trial failed (one line)
RESUMED_EPOCH = "calib.resumed_epoch"  # the checkpoint epoch a retried / resumed trial went on from
NODE_ID = "calib.node_id"  # the Ray node the trial ran on (its last attempt)
NODE_IP = "calib.node_ip"  # that node's IP address
FIT_SPLIT = "calib.fit_split"  # the split the stage fitted on: train | calib (calib.stages)
DEGENERATE = "calib.degenerate"  # base stage: why the guard found the model collapsed (calib.guard)
# calibrate stage: why the fitted calibrator's test output is constant over the mask (calib.guard)
CONSTANT_OUTPUT = "calib.constant_output"
# calibrate stage of a grid with calib_subjects: the calib subjects it fitted on, an int as text or
# "all" (sweeps.plan.subjects); absent: the whole calib split, the key unset
CALIB_SUBJECTS = "calib.calib_subjects"

GRID = "calib.grid"  # on the sweep run: grid name
RESUMED = "calib.resumed"  # on the sweep run: "true" for a --resume launch

PARENT_RUN_ID = "mlflow.parentRunId"
GIT_COMMIT = "mlflow.source.git.commit"

# ---- metrics -------------------------------------------------------------------------------------
TRAIN_LOSS = "train_loss"  # per epoch, step = epoch (from 0)
VAL_LOSS = "val_loss"
EPOCH_LR = "lr"  # the optimizer's learning rate at each epoch (plateau schedule)
DICE_MEAN = "dice_mean"
ECE_MEAN = "ece_mean"  # a fraction, not %
BEST_VAL_LOSS = "best_val_loss"
N_SUBJECTS = "n_subjects"
COMPUTE_SECONDS = "compute_seconds"  # training + evaluation time of the trial, all attempts
FINAL_METRICS = (DICE_MEAN, ECE_MEAN, BEST_VAL_LOSS, N_SUBJECTS, COMPUTE_SECONDS)
PEAK_RSS_MB = "peak_rss_mb"  # peak resident memory of the worker process during the trial, MiB
SECONDS_PER_EPOCH = "seconds_per_epoch"  # compute seconds / epochs run
# The predictor scored on the fold's val subjects exactly as on test (held-out model selection,
# tracking.report.headline); fractions, means over the val subjects.
VAL_DICE_MEAN = "val_dice_mean"
VAL_ECE_MEAN = "val_ece_mean"
VAL_NLL_MEAN = "val_nll_mean"
VAL_BRIER_MEAN = "val_brier_mean"
VAL_METRICS = (VAL_DICE_MEAN, VAL_ECE_MEAN, VAL_NLL_MEAN, VAL_BRIER_MEAN)
GUARD_FOREGROUND_FRACTION = "guard_foreground_fraction"  # base: predicted fg / mask, val subjects
GUARD_MEDIAN_ABS_LOGIT = "guard_median_abs_logit"  # base: median |logit| in the mask, val subjects
N_CALIB_SUBJECTS = "n_calib_subjects"  # calibrate runs tagged calib.calib_subjects: subjects fitted on

# On the sweep run: the launch's totals -- trials per outcome (tracking.runs.TrialOutcome), times.
TRIALS_PLANNED = "trials_planned"
TRIALS_FINISHED = "trials_finished"
TRIALS_FAILED = "trials_failed"
TRIALS_SKIPPED = "trials_skipped"
TRIALS_DONE_BEFORE = "trials_done_before"
TRIALS_ELSEWHERE = "trials_elsewhere"
WALL_SECONDS = "wall_seconds"  # the launch's wall time; its COMPUTE_SECONDS: its trials' (not done-before)

# ---- artifacts -----------------------------------------------------------------------------------
PER_SUBJECT = "per_subject.csv"  # subject_id, fold, dice, ece, ...
VAL_PER_SUBJECT = "val_per_subject.csv"  # the same columns, on the fold's val subjects
PER_SUBJECT_SHIFT = "per_subject_shift.csv"  # shift, then the same columns: test subjects per shift
RELIABILITY_BINS = "reliability_bins.csv"  # subject_id, bin, count, conf_sum, pos_sum
WEIGHTS_DIR = "weights"  # the stage's model file (base weights; fitted calibration method)
WEIGHTS_FILE = f"{WEIGHTS_DIR}/{WEIGHTS_NAME}"  # a U-Net stage's model, read by its dependants
LOGITS_DIR = LOGITS_DIRNAME  # base stage: every subject's exported logits, read by calibrate trials
LOGITS_SHIFT_DIR = LOGITS_SHIFT_DIRNAME  # base stage: <shift>/ logits of each shift's test subjects
TRIAL_CONFIG = "trial_config.json"  # the resolved trial config (what the trial key hashes)
SPLITS = "splits.json"  # subject ids of train, val, calib and test of the trial's fold
PREVIEW = "preview.npz"  # one axial slice of the first test subject (calib.preview), for figures
GRID_FILE = "grid.yaml"  # on the sweep run: the resolved grid

PER_SUBJECT_COLUMNS = ("subject_id", "fold", "dice", "ece")
RELIABILITY_COLUMNS = ("subject_id", "bin", "count", "conf_sum", "pos_sum")

# ---- the launch lease (on the sweep run) and trial claims ----------------------------------------
HEARTBEAT = "calib.heartbeat"  # unix time (s) of the driver's last heartbeat, refreshed by a thread
LEASE_TIMEOUT = "calib.lease_timeout_s"  # after this many seconds without a heartbeat: a dead launch
DRIVER_HOST = "calib.driver_host"  # host name of the launch's driver
DRIVER_PID = "calib.driver_pid"
DRIVER_MACHINE = "calib.driver_machine"  # boot id + pid namespace: where DRIVER_PID means something
DRIVER_STARTED = "calib.driver_started"  # the driver process's start (clock ticks since boot)
WORKER_PID = "calib.worker_pid"  # on a trial run: the Ray worker process of its last attempt


def shift_metric(shift: str, metric: str) -> str:
    """The final metric of ``metric`` (``dice``, ``ece``, ``true_ece``) under test-time ``shift``."""
    return f"shift_{shift}_{metric}_mean"
