"""The cases an ``--input`` names, and applying a model to them one case at a time.

An input is one case or a folder of cases, by what the model reads:

* a U-Net model: a **subject folder** (BraTS ``<id>/<id>_flair.nii.gz`` ..., ISLES ``case_<n>/``),
  or a **dataset folder** holding subject folders (flat, or BraTS ``HGG/`` / ``LGG/``): each of
  them, found as ``calib.data`` finds a dataset's subjects;
* a calibrator of another network's predictions: a **prediction file** (``<case>.nii[.gz]`` or
  nnU-Net's ``<case>.npz``), or a **folder of them** -- what nnU-Net's predict writes: every
  ``<case>.npz`` when there is one (the ``<case>.nii.gz`` beside each is then nnU-Net's argmax
  segmentation, not a prediction), else every ``<case>.nii[.gz]``; hidden files are skipped. A mask
  is one NIfTI for every case, or a folder of ``<case>.nii[.gz]`` masks, one per case.

:func:`apply_cases` applies the model to each case in turn and yields a :class:`CaseOutcome`
per case: a bad case (unreadable, wrong grid, missing mask, a case id met twice) is its error,
naming the file, and the next case is still done; every case's files appear complete or not at
all (:func:`calib.apply.apply.write_outputs`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from calib.data.layouts import SUPPORTED_DATASETS, discover, is_nifti, natural_key, nifti_stem
from calib.data.predictions import prediction_format

from .apply import ApplyResult, apply_model
from .inputs import prediction_case_id
from .model import FittedModel


@dataclass(frozen=True)
class CaseInput:
    """One case: its subject folder or prediction file, and (external predictions) its mask file
    (None: the whole volume). ``error``: why it cannot be applied, known before reading it."""

    path: Path
    mask: Path | None = None
    error: str | None = None

    @property
    def case_id(self) -> str:
        return prediction_case_id(self.path) if self.path.suffix == ".npz" or is_nifti(self.path) else self.path.name


@dataclass
class CaseOutcome:
    """What became of one case: its :class:`ApplyResult`, or the error (naming the file) instead."""

    case: CaseInput
    result: ApplyResult | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.result is not None


def _visible(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: natural_key(p.name))


def prediction_files(folder: Path) -> list[Path]:
    """The predictions in ``folder`` (module doc), in natural order of their case ids."""
    folder = Path(folder)
    nnunet = prediction_format(folder) == "nnunet"
    return [p for p in _visible(folder) if p.is_file() and (p.suffix == ".npz" if nnunet else is_nifti(p))]


def subject_folders(folder: Path, dataset: str) -> list[Path]:
    """The subject folders in a dataset folder, or ``[folder]`` when it is one subject's folder."""
    folder = Path(folder)
    if dataset not in SUPPORTED_DATASETS:
        return [folder]  # prepare_subject names the model's dataset that has no layout
    found = discover(dataset, folder).all  # listings only; a subject folder holds no subject folders
    return [s.directory for s in found] or [folder]


def _mask_for(mask: Path | None, case_id: str) -> tuple[Path | None, str | None]:
    if mask is None or not Path(mask).is_dir():
        return mask, None
    for name in (f"{case_id}.nii.gz", f"{case_id}.nii"):
        if (Path(mask) / name).is_file():
            return Path(mask) / name, None
    return None, f"{Path(mask) / (case_id + '.nii.gz')}: mask missing (the mask folder has none for case {case_id})"


def find_cases(model: FittedModel, paths: Sequence[Path], mask: Path | None = None) -> list[CaseInput]:
    """Every case the ``paths`` name for ``model`` (module doc), in order, each once.

    Listings only, nothing is read. A folder holding no case, and a case id already met (its
    outputs would overwrite the first one's), are cases with their ``error`` set, so they are
    reported with the others.
    """
    cases: list[CaseInput] = []
    seen: dict[str, Path] = {}
    for path in map(Path, paths):
        if not path.is_dir():
            found = [path]  # a file, or a missing path: prepare_input names it
        elif model.inputs == "images":
            found = subject_folders(path, model.dataset)
        else:
            found = prediction_files(path)
            if not found:
                cases.append(CaseInput(path, error=f"{path}: no prediction in this folder (expected "
                                                   "<case>.npz from nnU-Net's --save_probabilities, or "
                                                   "<case>.nii.gz probability/logit maps)"))
                continue
        for case_path in found:
            case = CaseInput(case_path)
            cid = case.case_id
            if cid in seen:
                cases.append(CaseInput(case_path, error=f"{case_path}: case {cid} also given as {seen[cid]}; "
                                                        "its outputs would overwrite that case's"))
                continue
            seen[cid] = case_path
            case_mask, error = (None, None) if model.inputs == "images" else _mask_for(mask, cid)
            cases.append(CaseInput(case_path, case_mask, error))
    return cases


def apply_cases(model: FittedModel, cases: Sequence[CaseInput], out_dir: Path,
                device: str = "cpu") -> Iterator[CaseOutcome]:
    """Apply ``model`` to each case in turn (:func:`calib.apply.apply.apply_model`), one outcome
    per case; a bad input (DataError / ApplyError / MethodError: a ValueError naming the file)
    is that case's error, and the next case is still done."""
    for case in cases:
        if case.error is not None:
            yield CaseOutcome(case, error=case.error)
            continue
        try:
            yield CaseOutcome(case, apply_model(model, case.path, out_dir, device=device, mask=case.mask))
        except ValueError as exc:  # DataError, ApplyError, MethodError: a bad input, named
            yield CaseOutcome(case, error=str(exc))
