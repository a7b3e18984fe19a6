"""The study's vocabulary: the names every room spells the same way, defined once.

Datasets, base weights, stages, protocols, normalisations, calibration methods and the keys of a
training schedule. Plain strings and tuples only: no torch, no numpy, so ``sweeps`` and
``tracking`` import it without loading the science (the registry of method classes,
:mod:`calib.methods.registry`, is checked against :data:`METHODS` by a test).
"""

from __future__ import annotations

# ---- datasets ------------------------------------------------------------------------------------

BRATS18 = "brats18"
ISLES18 = "isles18"
#: The datasets whose on-disk layout the study reads and whose U-Net the paper defines.
DATASETS = (BRATS18, ISLES18)
#: A grid dataset's kind: ``images``, one of :data:`DATASETS` the sweep trains U-Nets on;
#: ``predictions``, another network's predictions imported as they are.
IMAGES_KIND = "images"
PREDICTIONS_KIND = "predictions"
DATASET_KINDS = (IMAGES_KIND, PREDICTIONS_KIND)

# ---- base weights ----------------------------------------------------------------------------------

#: The paper's base weights: cross-entropy (CE), CE then soft Dice (CE-SD), soft Dice from
#: scratch (SD). CE and CE-SD continue from the CE pretraining; SD trains from scratch. A grid's
#: default ``weights``.
PAPER_WEIGHTS = ("CE", "CE-SD", "SD")
#: Base weights trained for calibration (beyond the paper; calib.losses), each like CE-SD: the CE
#: pretraining, then the loss -- focal loss, spatially varying label smoothing, CE + mL1-ACE.
TRAIN_TIME_WEIGHTS = ("focal", "svls", "ace")
#: Every base weights value, in report order.
BASE_WEIGHTS = PAPER_WEIGHTS + TRAIN_TIME_WEIGHTS
#: The base weights that continue from the CE pretraining (a grid with one of them pretrains).
PRETRAINED_WEIGHTS = ("CE", "CE-SD") + TRAIN_TIME_WEIGHTS
#: The weights label of another network's imported predictions (``kind: predictions``); only the
#: logit-based methods, whose recipe does not depend on the weights, are fitted on them.
EXTERNAL_WEIGHTS = "external"

# ---- stages and protocols --------------------------------------------------------------------------

PRETRAIN = "pretrain"
BASE = "base"
CALIBRATE = "calibrate"
#: The stages of a fold, in dependency order; a stage's trials carry its name as their method
#: (``pretrain``, ``base``) except calibrate's, which carry the calibration method's.
STAGES = (PRETRAIN, BASE, CALIBRATE)
#: Who fits on what within a fold (calib.stages): the default first.
PROTOCOLS = ("honest", "two_way", "paper")
#: Intensity normalisation of the preprocessing: z-score per subject, or the public code's fixed
#: shift/scale per modality.
NORMALISATIONS = ("subject", "fixed")

# ---- calibration methods -----------------------------------------------------------------------------

#: The paper's five methods, in its order.
PAPER_METHODS = ("platt", "auxiliary", "finetune", "mc_decoder", "mc_center")
#: The methods beyond the paper: temperature scaling, local temperature scaling, beta
#: calibration, histogram binning, isotonic regression, test-time flips.
BEYOND_PAPER_METHODS = ("temperature", "lts", "beta", "histogram_binning", "isotonic", "tta")
#: Every calibration method, in report order (the registry lists its classes in this order).
METHODS = PAPER_METHODS + BEYOND_PAPER_METHODS
#: What a method reads: the base stage's logit cache, or the preprocessed images and the base net.
USES = ("logits", "images")
#: The grid key ``calib_subjects``'s word for every subject of a fold's calib split (calib.subsets).
ALL_CALIB_SUBJECTS = "all"

# ---- training schedules --------------------------------------------------------------------------

#: The schedule a grid's ``training.calibrate`` may set, shared by every calibration method
#: (the LR and batch size are each method's recipe, or the method's LR axis).
CALIBRATION_SCHEDULE_KEYS = ("max_epochs", "lr_factor", "lr_patience", "early_stop_patience",
                             "min_rel_improvement")
#: What a grid's ``training.pretrain`` / ``training.base`` may set: the schedule plus the LR and
#: the batch size (fields of calib.schedule.TrainConfig).
TRAIN_SCHEDULE_KEYS = ("lr", *CALIBRATION_SCHEDULE_KEYS, "batch_size")
#: The fields of the calibrate stage's TrainConfig that replace a method's defaults: the
#: calibration schedule and the grid's seed.
METHOD_SCHEDULE_KEYS = (*CALIBRATION_SCHEDULE_KEYS, "seed")
#: A method's parameters that configure its own TrainConfig (calib.methods.base.train_config).
METHOD_TRAIN_KEYS = (*TRAIN_SCHEDULE_KEYS, "seed")
#: How a phantom's labels are drawn from p* (calib.data.synth): independently per voxel, or
#: through a spatially correlated uniform field (the same marginals).
LABEL_NOISES = ("iid", "correlated")
#: What a test-time shift of a phantom changes in its rendering (calib.data.shifts), per dataset;
#: a real dataset's shift is another data root in the same layout (grid key ``data_root``).
PHANTOM_SHIFTS = {"brats18": ("contrast", "noise", "bias_field"), "isles18": ("contrast", "noise", "slab_mm")}
PHANTOM_SHIFT_FIELDS = ("contrast", "noise", "bias_field", "slab_mm")
#: The ``shift`` of in-distribution rows (per_subject_shift.csv, the report's shift tables).
NO_SHIFT = "none"
