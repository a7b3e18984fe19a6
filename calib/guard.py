"""The degenerate-model guard: is a trained base model collapsed?

A collapsed base model (every voxel background, every voxel foreground, or logits so large that
float32 probabilities are exactly 0 or 1) makes every calibration of it meaningless, and its
ECE and Dice would be averaged into the tables like any other model's. The guard looks at the
model's *validation* subjects (never the test fold) after the base stage; the sweep tags such a
model ``calib.degenerate`` and the report leaves it and its calibrations out of the tables,
naming them under each one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

#: Fraction of the mask predicted foreground (p >= 0.5) above which a model is "foreground almost
#: everywhere". Lesions cover a few per cent of the brain (BraTS whole tumour at most ~20 %, ISLES
#: infarcts less): a model that marks 90 % of it has stopped segmenting.
EVERYWHERE_FRACTION = 0.9
#: Median |logit| inside the mask above which the logits are saturated: beyond ln(float32 max)
#: ~ 88.7, exp(|z|) overflows in float32 and sigmoid(z) is exactly 0 or 1, so more than half of
#: the brain has no probability left to calibrate (the demo's collapsed ISLES model: 566-1198).
SATURATED_MEDIAN_ABS_LOGIT = 88.7


@dataclass(frozen=True)
class GuardReport:
    """What the guard saw on the validation subjects, and its verdict.

    ``foreground_fraction``: voxels with p >= 0.5 / mask voxels, pooled over subjects;
    ``label_fraction``: the same for the labels; ``median_abs_logit``: median |z| inside the masks;
    ``reason``: None for a usable model, else one line saying why it is degenerate.
    """

    n_subjects: int
    foreground_fraction: float
    label_fraction: float
    median_abs_logit: float
    reason: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def check_degenerate(cases: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> GuardReport:
    """Guard a model from its ``(logits, label, mask)`` arrays (each (X, Y, Z)) on validation subjects.

    Degenerate when, pooled over the subjects and inside the masks: no voxel is predicted
    foreground although the labels have some ("foreground nowhere"); at least
    :data:`EVERYWHERE_FRACTION` of the voxels are predicted foreground; or the median |logit|
    exceeds :data:`SATURATED_MEDIAN_ABS_LOGIT`. Raises ValueError when there is no voxel to look at.
    """
    n, predicted, positives, inside = 0, 0, 0, 0
    abs_logits = []
    for logits, label, mask in cases:
        m = np.asarray(mask, dtype=bool)
        z = np.asarray(logits, dtype=np.float32)[m]
        n += 1
        inside += int(m.sum())
        predicted += int(np.count_nonzero(z >= 0.0))  # p >= 0.5 exactly when z >= 0
        positives += int(np.count_nonzero(np.asarray(label)[m]))
        abs_logits.append(np.abs(z))
    if inside == 0:
        raise ValueError("the degenerate-model guard got no voxel inside a mask")
    fg, lab = predicted / inside, positives / inside
    median = float(np.median(np.concatenate(abs_logits)))
    reason = None
    if median > SATURATED_MEDIAN_ABS_LOGIT:
        reason = (f"saturated logits: median |logit| in the mask {median:.1f} > "
                  f"{SATURATED_MEDIAN_ABS_LOGIT} (float32 sigmoid is exactly 0 or 1)")
    elif fg >= EVERYWHERE_FRACTION:
        reason = (f"predicts foreground almost everywhere: {100 * fg:.1f} % of the mask "
                  f"(labels {100 * lab:.1f} %)")
    elif predicted == 0 and positives > 0:
        reason = f"predicts foreground nowhere (labels {100 * lab:.2f} % of the mask)"
    return GuardReport(n, fg, lab, median, reason)
