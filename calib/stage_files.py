"""Names of the files a stage writes in its work dir (calib.stages), in one place.

Plain constants, no imports: the sweep (sweeps.trainable) and the MLflow schema (tracking.schema)
refer to these instead of spelling the names again.
"""

CHECKPOINT_NAME = "checkpoint.pt"  # written every epoch; a restarted stage resumes from it
WEIGHTS_NAME = "weights.pt"  # a U-Net stage's (pretrain, base) model
METHOD_NAME = "method.pt"  # a calibrate stage's fitted method
LOGITS_DIRNAME = "logits"  # the base stage's logit cache (calib.logits)
LOGITS_SHIFT_DIRNAME = "logits_shift"  # the base stage's logits of each test-time shift: <shift>/ (calib.shift_eval)
