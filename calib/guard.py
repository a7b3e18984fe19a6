"""The degenerate-model guard: is a trained base model collapsed? And the constant-output check:
does a fitted calibrator map every voxel to one value?

A collapsed base model (every voxel background, every voxel foreground, or logits so large that
float32 probabilities are exactly 0 or 1) makes every calibration of it meaningless, and its
ECE and Dice would be averaged into the tables like any other model's. The guard looks at the
model's *validation* subjects (never the test fold) after the base stage; the sweep tags such a
model ``calib.degenerate`` and the report leaves it and its calibrations out of the tables,
naming them under each one.

A calibrator can collapse too: histogram binning whose quantile edges tie on a network's
float-floor probabilities outputs one value over the whole mask (Dice 0, a small ECE).
:func:`constant_output` looks at the calibrated *test* maps (what is scored) and the sweep tags
such a trial ``calib.constant_output``; the run still finishes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
#: A calibrated map is constant on a subject when its values inside the mask span at most this
#: (max - min). float32 resolves ~6e-8 near 1 and ~1e-45 near 0, so a spread of 1e-6 is no
#: ranking of the voxels, while any map that still orders them (a temperature, a histogram
#: binning with two or more occupied bins) spreads far more. Few distinct values are not flagged:
#: histogram binning legitimately outputs at most its number of bins.
CONSTANT_RANGE = 1e-6


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


def output_range(prob: np.ndarray, mask: np.ndarray) -> tuple[float, float] | None:
    """``(min, max)`` of ``prob`` inside ``mask`` (both (X, Y, Z)); None for an empty mask."""
    values = np.asarray(prob)[np.asarray(mask, dtype=bool)]
    if not values.size:
        return None
    return float(values.min()), float(values.max())


def constant_from_ranges(ranges: Sequence[tuple[float, float] | None]) -> str | None:
    """:func:`constant_output` from the per-subject ``(min, max)`` of :func:`output_range`."""
    seen = [r for r in ranges if r is not None]
    if not seen or any(hi - lo > CONSTANT_RANGE for lo, hi in seen):
        return None
    lo, hi = min(r[0] for r in seen), max(r[1] for r in seen)
    values = f"{lo:.4g}" if hi - lo <= CONSTANT_RANGE else f"{lo:.4g} to {hi:.4g} across subjects"
    return (f"constant output: on each of the {len(seen)} test subjects the calibrated probability "
            f"spans <= {CONSTANT_RANGE:g} inside the mask (p = {values}); it ranks no voxel")


def constant_output(probs: Iterable[np.ndarray], masks: Iterable[np.ndarray]) -> str | None:
    """Why a calibrator's output is constant over the mask, or None when it is not.

    ``probs`` and ``masks``: one (X, Y, Z) calibrated probability map and bool mask per test
    subject (iterables, consumed one subject at a time). Constant when on every subject with a
    non-empty mask ``max - min`` of the probabilities inside the mask is at most
    :data:`CONSTANT_RANGE` (the value may differ between subjects: it still ranks no voxel of
    any). None when no subject has a voxel in its mask.
    """
    return constant_from_ranges([output_range(p, m) for p, m in zip(probs, masks, strict=True)])
