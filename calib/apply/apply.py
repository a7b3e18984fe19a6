"""Apply a fitted model to one new case and write the result as NIfTI on the input's own grid
(its shape, affine, qform / sform codes and units); many cases: :mod:`calib.apply.cases`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import nibabel as nib
import numpy as np

from calib.atomic_io import atomic_paths

from .inputs import PreparedCase, prepare_prediction, prepare_subject
from .model import ApplyError, FittedModel, Prediction

PROB_SUFFIX = "_prob.nii.gz"
STD_SUFFIX = "_std.nii.gz"


@dataclass
class ApplyResult:
    """What :func:`apply_model` wrote (``files``: name -> path) and the maps on the model grid."""

    case_id: str
    files: dict[str, Path]
    prediction: Prediction
    case: PreparedCase = field(repr=False)


def prepare_input(model: FittedModel, path: Path, mask: Path | None = None) -> PreparedCase:
    """The input as ``model`` needs it: a subject folder for a U-Net model, a prediction map for
    a calibrator of external predictions; the other way round is an ApplyError saying which."""
    path = Path(path)
    if model.inputs == "images":
        if not path.is_dir():
            raise ApplyError(f"{path}: {model.describe()} runs a U-Net on images; give a "
                             f"{model.dataset} subject folder")
        prep = model.data.get("preprocessing") or {}
        if "spacing" not in prep or "shape" not in prep:
            raise ApplyError(f"{model.origin}: the trial config lacks data.preprocessing (spacing, shape)")
        return prepare_subject(path, model.dataset, prep["spacing"], prep["shape"],
                               prep.get("normalisation", "subject"))
    if path.is_dir():
        raise ApplyError(f"{path}: {model.describe()} calibrates another network's predictions; give "
                         "a <case>.nii.gz probability/logit map or nnU-Net's <case>.npz")
    rule = model.data.get("predictions") or {}
    return prepare_prediction(path, rule.get("values", "probability"), rule.get("foreground") or None,
                              mask, float(rule.get("mask_threshold", 0.0)))


def _nifti(array: np.ndarray, case: PreparedCase) -> nib.Nifti1Image:
    """A float32 NIfTI on the input's grid: its affine, with the reference header's qform / sform
    codes and xyzt units where there is one.

    nibabel, given an affine, writes it as sform code 2 ("aligned") and qform code 0: a viewer or
    registration tool would then read a scanner-space image (codes 1/1) as aligned to something
    else, or ignore its qform. So both are set again from the affine, each with the reference's code.
    """
    img = nib.Nifti1Image(np.asarray(array, dtype=np.float32), case.affine)
    img.set_data_dtype(np.float32)
    ref = case.header
    if ref is not None:
        img.header.set_xyzt_units(*ref.get_xyzt_units())
        qcode, scode = int(ref["qform_code"]), int(ref["sform_code"])
        if qcode or scode:  # both 0 (no space at all): keep nibabel's codes, or the affine is lost
            img.set_qform(case.affine, code=qcode)
            img.set_sform(case.affine, code=scode)
    return img


def write_outputs(out_dir: Path, case: PreparedCase, prediction: Prediction) -> dict[str, Path]:
    """``<out>/<case>_prob.nii.gz`` (and ``_std.nii.gz`` where the method samples), on the
    input's grid; every file is complete before any is renamed into place."""
    out_dir = Path(out_dir)
    maps = {"prob": prediction.prob}
    if prediction.std is not None:
        maps["std"] = prediction.std
    images = {}
    for name, array in maps.items():  # everything computed before anything is written
        restored = np.clip(case.restore(array), 0.0, 1.0 if name == "prob" else 0.5)
        if restored.shape != case.shape:
            raise ApplyError(f"{case.source}: restored map {restored.shape} does not match the input grid {case.shape}")
        images[name] = _nifti(restored, case)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = {"prob": PROB_SUFFIX, "std": STD_SUFFIX}
    written = {name: out_dir / f"{case.case_id}{suffix[name]}" for name in images}
    # nibabel goes by the extension: the temporary names end in .nii.gz too.
    with atomic_paths(list(written.values()), suffix=".nii.gz") as tmps:
        for img, tmp in zip(images.values(), tmps):
            nib.save(img, tmp)
    return written


def apply_model(model: FittedModel, path: Path, out_dir: Path, device: str = "cpu",
                mask: Path | None = None) -> ApplyResult:
    """Prepare ``path``, predict with ``model`` and write the calibrated probability (and the MC
    standard deviation) as NIfTI on the input's grid in ``out_dir``. Bad input raises before
    anything is written (a DataError or ApplyError naming the file)."""
    case = prepare_input(model, path, mask)
    prediction = model.predict(case.mask, image=case.image, logits=case.logits, device=device,
                               subject_id=case.case_id)
    return ApplyResult(case.case_id, write_outputs(out_dir, case, prediction), prediction, case)
