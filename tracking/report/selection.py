"""Learning-rate selection per dataset × weights × method, and pooling of the selected folds.

The rule (recorded in report.md):

* Candidates are the distinct ``calib.lr`` values of a group (a grid's 1e-3/1e-4/1e-5 or the
  continuous values of an Optuna search); a method without a learning rate has one candidate, "".
* Grid case — some candidates ran on every fold of the group: only those compete (a candidate
  missing a fold is left out, with a warning). The criterion is ``val_loss``: the mean over folds
  of the runs' ``best_val_loss`` (lower wins, the paper's rule); ``ece`` / ``dice``: the mean over
  the pooled subjects of the candidate's per-subject ECE (lower wins) / Dice (higher wins). Ties go
  to the smaller learning rate. ``lr_selected`` is the chosen ``calib.lr`` text.
* Per-fold case — no candidate ran on every fold (an Optuna search run separately per fold): each
  fold keeps its own best run by the same criterion, computed on that fold alone, and
  ``lr_selected`` reads ``fold0=<lr>;fold1=<lr>;…``.

Selecting by ``ece`` or ``dice`` looks at the held-out subjects the tables report on, so it is
optimistic; ``val_loss`` uses only validation data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tracking.report.errors import ReportError, WarningLog
from tracking.report.fetch import TrialRecord

SELECT_BY = ("val_loss", "ece", "dice")
VAL_LOSS_METRIC = "best_val_loss"


@dataclass(frozen=True)
class Candidate:
    """One learning rate of a group: the folds it ran on and its criterion value (NaN if unused)."""

    lr: str
    folds: tuple[int, ...]
    criterion: float
    selected: bool


@dataclass(frozen=True, eq=False)
class Selection:
    """The runs kept for one dataset × weights × method (one per fold) and how they were chosen."""

    dataset: str
    weights: str
    method: str
    lr_selected: str
    mode: str  # "single" (one candidate), "grid" or "per_fold"
    runs: tuple[TrialRecord, ...]
    candidates: tuple[Candidate, ...]
    select_by: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.dataset, self.weights, self.method)


def _lr_order(lr: str) -> float:
    try:
        return float(lr)
    except ValueError:
        return math.inf


class _Criterion:
    """Criterion values of runs and run sets, read lazily (per-subject files only when needed)."""

    def __init__(self, select_by: str, per_subject: Callable[[TrialRecord], pd.DataFrame]) -> None:
        if select_by not in SELECT_BY:
            raise ReportError(f"select_by {select_by!r} unknown; valid: {', '.join(SELECT_BY)}")
        self.select_by = select_by
        self.sign = -1.0 if select_by == "dice" else 1.0  # minimise sign * value
        self._per_subject = per_subject

    def of(self, runs: Sequence[TrialRecord]) -> float:
        if self.select_by == "val_loss":
            values = []
            for run in runs:
                if VAL_LOSS_METRIC not in run.metrics:
                    raise ReportError(f"{run.describe()} has no metric {VAL_LOSS_METRIC}, needed to "
                                      "select its learning rate; try --select-by ece or dice")
                values.append(run.metrics[VAL_LOSS_METRIC])
            return float(np.mean(values))
        pooled = pd.concat([self._per_subject(r)[self.select_by] for r in runs])
        return float(pooled.mean())  # NaN-skipping, subjects pooled over the folds


def select_runs(runs: Sequence[TrialRecord], select_by: str,
                per_subject: Callable[[TrialRecord], pd.DataFrame],
                warn: WarningLog | None = None) -> list[Selection]:
    """Choose, per dataset × weights × method, the learning rate (module doc) and its fold runs."""
    warn = warn or WarningLog()
    crit = _Criterion(select_by, per_subject)
    groups: dict[tuple[str, str, str], list[TrialRecord]] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.weights, run.method), []).append(run)
    return [_select_group(key, grp, crit, warn) for key, grp in sorted(groups.items())]


def _select_group(key, group: list[TrialRecord], crit: _Criterion, warn: WarningLog) -> Selection:
    dataset, weights, method = key
    by_lr: dict[str, dict[int, TrialRecord]] = {}
    for run in group:
        folds = by_lr.setdefault(run.lr, {})
        if run.fold in folds:  # two trial keys for one cell: the schema promises one
            raise ReportError(f"{dataset}/{weights}/{method} lr {run.lr or '(none)'} fold {run.fold} "
                              f"has two FINISHED runs with different trial keys: "
                              f"{folds[run.fold].run_id} and {run.run_id}")
        folds[run.fold] = run
    all_folds = sorted({r.fold for r in group})
    lrs = sorted(by_lr, key=lambda lr: (_lr_order(lr), lr))
    name = f"{dataset}/{weights}/{method}"

    def pick(options: list[tuple[str, float]]) -> str:
        # smallest sign*criterion, ties to the smaller LR (options are in LR order, sort is stable)
        finite = [o for o in options if not math.isnan(o[1])]
        if not finite:
            raise ReportError(f"{name}: the {crit.select_by} criterion is NaN for every "
                              f"learning rate ({', '.join(lr for lr, _ in options)})")
        return min(finite, key=lambda o: crit.sign * o[1])[0]

    if len(lrs) == 1:
        lr = lrs[0]
        runs = tuple(by_lr[lr][f] for f in all_folds)
        cand = (Candidate(lr, tuple(all_folds), math.nan, True),)
        return Selection(dataset, weights, method, lr, "single", runs, cand, crit.select_by)

    complete = [lr for lr in lrs if set(by_lr[lr]) == set(all_folds)]
    if complete:
        for lr in lrs:
            if lr not in complete:
                lacking = sorted(set(all_folds) - set(by_lr[lr]))
                warn.warn(f"{name}: lr {lr} lacks fold(s) {', '.join(map(str, lacking))} and is "
                          "left out of the learning-rate selection")
        scores = {lr: crit.of([by_lr[lr][f] for f in all_folds]) for lr in complete}
        best = pick([(lr, scores[lr]) for lr in complete])
        cands = tuple(Candidate(lr, tuple(sorted(by_lr[lr])), scores.get(lr, math.nan), lr == best)
                      for lr in lrs)
        runs = tuple(by_lr[best][f] for f in all_folds)
        return Selection(dataset, weights, method, best, "grid", runs, cands, crit.select_by)

    # No learning rate ran on every fold: each fold keeps its own best run.
    chosen: dict[int, str] = {}
    scores: dict[tuple[str, int], float] = {}
    for f in all_folds:
        opts = [(lr, crit.of([by_lr[lr][f]])) for lr in lrs if f in by_lr[lr]]
        scores.update({(lr, f): s for lr, s in opts})
        chosen[f] = pick(opts)
    cands = tuple(Candidate(lr, tuple(sorted(by_lr[lr])),
                            float(np.mean([scores[(lr, f)] for f in by_lr[lr]])),
                            any(chosen[f] == lr for f in by_lr[lr]))
                  for lr in lrs)
    runs = tuple(by_lr[chosen[f]][f] for f in all_folds)
    label = ";".join(f"fold{f}={chosen[f]}" for f in all_folds)
    return Selection(dataset, weights, method, label, "per_fold", runs, cands, crit.select_by)


def pool_subjects(selection: Selection, frames: Sequence[pd.DataFrame], what: str) -> pd.DataFrame:
    """Concatenate the selected runs' per-subject rows (one frame per run, same order as
    ``selection.runs``); a subject found in two runs is an error naming both runs."""
    seen: dict[str, str] = {}
    for run, df in zip(selection.runs, frames, strict=True):
        for sid in pd.unique(df["subject_id"]):
            if sid in seen and seen[sid] != run.run_id:
                raise ReportError(f"subject {sid} appears in the {what} of two selected runs of "
                                  f"{selection.dataset}/{selection.weights}/{selection.method}: "
                                  f"{seen[sid]} and {run.run_id}; each subject must be tested once")
            seen[sid] = run.run_id
    return pd.concat(frames, ignore_index=True)
