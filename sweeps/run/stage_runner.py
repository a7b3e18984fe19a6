"""The one place the sweep calls the science: a TrialSpec -> a calib.stages function call.

Everything a stage needs is in the trial spec (its TrainConfig, split settings, network and
method parameters), the prepared dataset (cache folder and folds) and the upstream artifacts the trial downloaded, so the
call is the same on any node. Tests swap this function for a fake through the trial context.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from calib.data.predictions import logits_dir
from calib.methods.recipes import RECIPES
from calib.vocabulary import ALL_CALIB_SUBJECTS, BASE, PRETRAIN
from sweeps.plan.trials import TrialSpec
from tracking import schema

if TYPE_CHECKING:
    from calib.stages import StageResult

#: Upstream artifacts each stage needs: artifact paths in the upstream run (tracking.schema).
WEIGHTS_ARTIFACT = schema.WEIGHTS_FILE
LOGITS_ARTIFACT = schema.LOGITS_DIR
LOGITS_SHIFT_ARTIFACT = schema.LOGITS_SHIFT_DIR  # the base's logits under each test-time shift


def upstream_needs(spec: TrialSpec) -> tuple[str, ...]:
    """Which upstream artifacts ``spec`` reads: base weights and/or the exported base logits."""
    if spec.upstream is None or spec.external:
        return ()  # an import's logits are in its prepared cache, on the shared volume
    if spec.stage == BASE:
        return (WEIGHTS_ARTIFACT,)
    if RECIPES[spec.method].uses != "logits":
        return (WEIGHTS_ARTIFACT,)
    return (LOGITS_ARTIFACT, LOGITS_SHIFT_ARTIFACT) if spec.config["data"].get("shift") else (LOGITS_ARTIFACT,)


def run_stage(spec: TrialSpec, data: Mapping, work_dir: Path, upstream: Mapping[str, Path],
              device, callbacks: Sequence[Callable]) -> "StageResult":
    """Run the stage of ``spec`` in ``work_dir`` (:func:`run_one_stage`), then -- with test-time
    shifts in ``data`` (``PreparedData.shifts``) -- score its base or calibrate model on each
    (calib.shift_eval: ``per_subject_shift.csv``, the base's ``logits_shift/``). A calibrator
    fitted on a ``calib_subjects`` subset is scored in-distribution only: the report's shift
    table reads the calibrators fitted on all calibration subjects, and the subsets would
    multiply the scoring for nothing it shows."""
    result = run_one_stage(spec, data, work_dir, upstream, device, callbacks)
    subset = spec.calib_subjects not in (None, ALL_CALIB_SUBJECTS)
    if not data.get("shifts") or spec.external or spec.stage == PRETRAIN or subset:
        return result
    from calib.shift_eval import score_shifts  # torch: in the worker, as the stage's own import

    return score_shifts(result, spec.stage, data["shifts"], spec.net, spec.fold, work_dir, device,
                        upstream.get(LOGITS_SHIFT_ARTIFACT))


def run_one_stage(spec: TrialSpec, data: Mapping, work_dir: Path, upstream: Mapping[str, Path],
                  device, callbacks: Sequence[Callable]) -> "StageResult":
    """Run the stage of ``spec`` in ``work_dir`` (resuming from ``work_dir/checkpoint.pt``).

    ``data``: :meth:`PreparedData.to_dict` of the trial's dataset; ``upstream``: local paths of
    the artifacts :func:`upstream_needs` named. The stage trains with ``spec.train`` on the split
    ``spec.split`` describes; calibrate trials take their LR from ``spec.params``.
    """
    # The science (torch, MONAI: seconds to import) loads in the worker that runs a trial; the
    # driver imports this module to plan (upstream_needs) and never runs a stage.
    from calib.stages import make_split, run_base, run_calibrate, run_imported, run_pretrain
    from calib.subsets import calib_subset

    s = spec.split
    folds = {int(k): list(v) for k, v in data["folds"].items()}
    split = make_split(Path(data["cache_dir"]), folds, spec.fold, protocol=s.protocol, seed=s.seed,
                       val_fraction=s.val_fraction, calib_fraction=s.calib_fraction)
    if spec.calib_subjects is not None:  # the calibrators fit on the first n of a seeded order
        split = calib_subset(split, spec.calib_subjects, s.seed, spec.dataset)
    if spec.external:  # another network's predictions: their logits are the prepared cache's
        logits = logits_dir(data["cache_dir"])
        if spec.stage == BASE:
            return run_imported(split, logits, work_dir)
        return run_calibrate(spec.method, spec.params, spec.weights, None, spec.train, split,
                             base_weights=None, base_logits=logits, work_dir=work_dir, device=device,
                             callbacks=callbacks)
    if spec.stage == PRETRAIN:
        return run_pretrain(spec.net, spec.train, split, work_dir, device, callbacks)
    if spec.stage == BASE:
        return run_base(spec.weights, spec.net, spec.train, split, work_dir, device,
                        init_weights=upstream.get(WEIGHTS_ARTIFACT), callbacks=callbacks,
                        loss_params=spec.params or None)
    return run_calibrate(spec.method, spec.params, spec.weights, spec.net, spec.train, split,
                         base_weights=upstream.get(WEIGHTS_ARTIFACT),
                         base_logits=upstream.get(LOGITS_ARTIFACT), work_dir=work_dir,
                         device=device, callbacks=callbacks)
