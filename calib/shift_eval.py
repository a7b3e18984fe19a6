"""Does calibration survive a shift? A fitted stage scored on the test subjects of each test-time
shift (docs/architecture.md, "Trial CSVs"), its model and calibrator unchanged.

A shift is a preprocessed cache of shifted subjects (the sweep prepares it: calib.data.shifts for
phantoms, another data root for real data). ``paired`` shifts hold the dataset's own subjects
(phantoms: the same anatomy, p* and labels, other images), so a fold's test ids are scored there;
an unpaired one (another site) is scored on every subject it holds, in every fold.

* base stage (:func:`score_shifts` with ``stage="base"``): the trained U-Net's logits of each
  shift's test subjects are exported to ``work_dir/logits_shift/<shift>/`` (calib.logits, as
  ``logits/``), and the network is scored there as on the test fold;
* calibrate stage: the fitted method (``method.pt``, calib.methods.load_method) predicts on each
  shift's test subjects -- a logit-based method from the base's ``logits_shift/<shift>/``, a
  network-based one from the shifted images.

The rows go to ``per_subject_shift.csv`` (:data:`SHIFT_COLUMN` first, ``none`` for the
in-distribution test rows, then the columns of per_subject.csv), a separate file so that every
reader of per_subject.csv is unchanged; :func:`calib.shift_rows.shift_means` gives the means the sweep logs as
``shift_<name>_<metric>_mean``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd
import torch

from calib.data.cache import read_meta
from calib.evaluate import evaluate_subjects
from calib.logits import export_logits
from calib.methods import SubjectSet, load_method
from calib.methods.network_based import load_weights, unet_probability
from calib.nets import UNet3D, UNetConfig
from calib.shift_rows import SHIFT_COLUMN
from calib.stage_files import LOGITS_SHIFT_DIRNAME
from calib.stages import StageError, StageResult
from calib.vocabulary import BASE, NO_SHIFT

@dataclass(frozen=True)
class ShiftSet:
    """One shift's preprocessed cache; ``paired``: it holds the dataset's own subject ids."""

    name: str
    cache_dir: Path
    paired: bool

    def subject_ids(self, test_ids) -> tuple[str, ...]:
        """The subjects scored under this shift: the fold's test ids (paired), else all of its own."""
        if self.paired:
            held = set(read_meta(self.cache_dir)["subjects"])
            missing = [s for s in test_ids if s not in held]
            if missing:
                raise StageError(f"shift {self.name!r}: cache {self.cache_dir} lacks test subject(s) "
                                 f"{', '.join(missing[:5])}")
            return tuple(test_ids)
        return tuple(read_meta(self.cache_dir)["subjects"])


def shift_sets(shifts: Mapping[str, Mapping]) -> tuple[ShiftSet, ...]:
    """``PreparedData.to_dict()["shifts"]`` (name -> ``{"cache_dir", "paired"}``) as ShiftSets."""
    return tuple(ShiftSet(n, Path(v["cache_dir"]), bool(v["paired"])) for n, v in shifts.items())


@dataclass
class ShiftedStageResult(StageResult):
    """A StageResult with the stage's rows under each shift (``per_subject_shift.csv``)."""

    shift_per_subject: pd.DataFrame | None = None


def score_shifts(result: StageResult, stage: str, shifts: Mapping[str, Mapping], net_cfg: UNetConfig | None,
                 fold: int, work_dir: Path, device: torch.device,
                 base_logits_shift: Path | None = None) -> ShiftedStageResult:
    """``result`` of a base or calibrate stage, scored on each shift's test subjects (module doc).

    ``result.weights``: the base U-Net (``weights.pt``, built with ``net_cfg``) or the fitted
    method (``method.pt``); ``base_logits_shift``: the base run's ``logits_shift/`` folder (a
    logit-based calibrator needs it). The base stage's shifted logits go to
    ``extra_artifacts["logits_shift"]``.
    """
    device = torch.device(device)
    test_ids = tuple(result.splits["test"])
    sets = shift_sets(shifts)
    extra = dict(result.extra_artifacts)
    frames = [result.per_subject.assign(**{SHIFT_COLUMN: NO_SHIFT})]
    if stage == BASE:
        model = UNet3D(net_cfg)
        load_weights(model, Path(result.weights))
        root = Path(work_dir) / LOGITS_SHIFT_DIRNAME
        for s in sets:
            ids = s.subject_ids(test_ids)
            export_logits(model, s.cache_dir, ids, root / s.name, device, source={"shift": s.name})
            rows, _ = evaluate_subjects(lambda r: unet_probability(model, r, device),
                                        SubjectSet(ids, cache_dir=s.cache_dir), fold)
            frames.append(rows.assign(**{SHIFT_COLUMN: s.name}))
        model.cpu()
        extra[LOGITS_SHIFT_DIRNAME] = root
    else:
        method = load_method(Path(result.weights))
        for s in sets:
            logits = None
            if method.uses == "logits":
                if base_logits_shift is None or not (Path(base_logits_shift) / s.name).is_dir():
                    raise StageError(f"method {method.name!r} under shift {s.name!r}: the base run's "
                                     f"{LOGITS_SHIFT_DIRNAME}/{s.name} is required")
                logits = Path(base_logits_shift) / s.name
            ids = s.subject_ids(test_ids)
            rows, _ = evaluate_subjects(lambda r: method.predict_proba(r, device),
                                        SubjectSet(ids, cache_dir=s.cache_dir, logits_dir=logits), fold)
            frames.append(rows.assign(**{SHIFT_COLUMN: s.name}))
    frame = pd.concat(frames, ignore_index=True)
    frame = frame[[SHIFT_COLUMN, *[c for c in frame.columns if c != SHIFT_COLUMN]]]
    values = {f.name: getattr(result, f.name) for f in fields(result)}
    return ShiftedStageResult(**{**values, "extra_artifacts": extra}, shift_per_subject=frame)
