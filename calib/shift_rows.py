"""The rows of ``per_subject_shift.csv`` (calib.shift_eval writes them): their ``shift`` column and
the per-shift means the sweep logs. Pandas only, so the driver can import it without torch."""

from __future__ import annotations

import pandas as pd

from calib.vocabulary import NO_SHIFT

SHIFT_COLUMN = "shift"  # first column; ``none`` (calib.vocabulary.NO_SHIFT) for in-distribution rows
#: The per-subject columns logged per shift as ``shift_<name>_<column>_mean``.
SHIFT_METRICS = ("dice", "ece", "true_ece")


def shift_means(frame: pd.DataFrame) -> dict[tuple[str, str], float]:
    """``(shift, metric) -> mean`` (fractions) over the rows of each shift in ``per_subject_shift.csv``
    (not ``none``), for the :data:`SHIFT_METRICS` the rows have (the sweep logs them as
    ``shift_<name>_<metric>_mean``)."""
    out = {}
    for name, rows in frame[frame[SHIFT_COLUMN] != NO_SHIFT].groupby(SHIFT_COLUMN, sort=True):
        for col in SHIFT_METRICS:
            if col in rows.columns:
                values = pd.to_numeric(rows[col], errors="coerce")
                if values.notna().any():
                    out[(str(name), col)] = float(values.mean())
    return out
