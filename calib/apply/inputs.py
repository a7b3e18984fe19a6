"""New cases as a model sees them, and the way back to each input's own grid.

Two kinds of input:

* a **subject folder** in the BraTS 2018 / ISLES 2018 layout (the label may be absent: a new
  patient). It is checked and preprocessed exactly as ``calib.data preprocess`` does with the
  trial's preprocessing config (``transforms.build_pipeline``: RAS, resampling, mask,
  normalisation, centre crop/pad). Going back is one resampling in world coordinates from the
  model grid (its affine after crop/pad) onto the first channel's grid (FLAIR / CT): MONAI's
  SpatialResample, trilinear, zero outside the model grid -- which undoes orientation,
  resampling and crop/pad together; voxels the crop cut off get probability 0;
* **another network's prediction**: ``<case>.nii[.gz]`` (probability or logit, 3-D or 4-D with
  classes last) or nnU-Net's ``<case>.npz`` + ``<case>.pkl``, read as ``calib.data.predictions``
  imports them (foreground union, RAS order, no resampling); going back is the inverse axis
  flip/permutation onto the file's grid (for nnU-Net: the grid of the segmentation nnU-Net wrote
  beside, i.e. of the original image, when it is there; else the grid the properties describe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from calib.data.check import check_subject
from calib.data.errors import MISSING_MODALITY, DataError, Problem
from calib.data.layouts import SUPPORTED_DATASETS, SubjectFiles, discover, get_layout, is_nifti, nifti_stem
from calib.data.nifti import VoxelGrid, read_grid, read_volume
from calib.data.predictions import CaseFiles, read_prediction

from .model import ApplyError


@dataclass
class PreparedCase:
    """One input on the model grid, and how to put a model-grid map back on the input's grid.

    ``image`` (C, X, Y, Z) or ``logits`` (X, Y, Z), ``mask`` bool (X, Y, Z); ``restore(array)``
    -> the array on the input's grid, whose ``shape`` and ``affine`` an output NIfTI carries
    (``header``: the input file's, so qform/sform codes survive).
    """

    case_id: str
    mask: np.ndarray
    restore: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header | None
    source: Path
    image: np.ndarray | None = None
    logits: np.ndarray | None = None


def _outside_grid(model_affine: np.ndarray, model_shape, ref_affine: np.ndarray, ref_shape) -> np.ndarray:
    """Bool (ref_shape): voxel centres of the reference grid outside the model grid's extent
    (more than half a model voxel beyond its outermost voxel centres)."""
    to_model = np.linalg.solve(model_affine, ref_affine)
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in ref_shape], indexing="ij"), -1)
    u = ijk @ to_model[:3, :3].T + to_model[:3, 3]
    n = np.asarray(model_shape, dtype=np.float64)
    return np.any((u < -0.5) | (u > n - 0.5), axis=-1)


def input_error(problems: Sequence[Problem], what: str) -> DataError:
    """One DataError for the problems of one input, each file named once: ``<file>: <why>`` for a
    single problem, else ``<what>: N problems`` and one such line per problem."""
    lines = [f"{p.path}: {p.message}" if p.path else p.message for p in problems]
    if len(lines) == 1:
        return DataError(lines[0], problems)
    return DataError(f"{what}: {len(lines)} problems:\n  " + "\n  ".join(lines), problems)


# ---- subject folders -----------------------------------------------------------------------------

def find_subject(folder: Path, dataset: str) -> SubjectFiles:
    """The files of the subject in ``folder`` (its label may be missing); DataError naming the
    missing or bad files."""
    folder = Path(folder)
    if dataset not in SUPPORTED_DATASETS:
        raise ApplyError(f"{folder}: the model was fitted on {dataset!r}, which has no subject-folder "
                         f"layout ({', '.join(SUPPORTED_DATASETS)} do)")
    disc = discover(dataset, folder.parent)
    mine = [s for s in disc.all if s.directory.resolve() == folder.resolve()]
    if not mine:
        raise DataError(f"{folder}: not a {dataset} subject folder (expected "
                        + ("<id>/<id>_{flair,t1,t1ce,t2}.nii.gz)" if dataset == "brats18" else
                           "case_<n>/SMIR.Brain.XX.O.<kind>.<num>/...nii)"))
    files = mine[0]
    label_name = get_layout(dataset).label_name  # a new case has no label: that is no problem here
    problems = [p for p in disc.problems if p.subject == files.subject_id
                and not (p.kind == MISSING_MODALITY and p.message.startswith(f"{label_name} "))]
    if problems:
        raise input_error(problems, f"subject {folder}")
    return files


def prepare_subject(folder: Path, dataset: str, spacing: float, shape: Sequence[int],
                    normalisation: str = "subject") -> PreparedCase:
    """Check and preprocess one subject folder with the trial's preprocessing (module doc)."""
    from calib.data.preprocess import PreprocessConfig
    from calib.data.transforms import build_pipeline
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample
    import torch

    files = find_subject(folder, dataset)
    problems = check_subject(files, dataset, include_ignored=False)
    if problems:
        raise input_error(problems, f"subject {folder}")
    config = PreprocessConfig.make(dataset, spacing, shape, normalisation)
    pipeline = build_pipeline(config.spacing, config.shape, config.mask_threshold, False,
                              config.orientation, fixed=config.fixed_statistics(), with_label=False)
    try:
        d = pipeline({"image": [str(p) for p in files.images]})
    except Exception as exc:  # MONAI wraps errors; name the subject
        raise DataError(f"subject {folder}: preprocessing failed: {exc}") from exc
    mask = np.asarray(d["mask"][0]) > 0.5
    if not mask.any():
        raise input_error([Problem(files.subject_id, str(files.images[0]), "empty_mask",
                                   f"no voxel of {config.mask_channel} > {config.mask_threshold:g}")],
                          f"subject {folder}")
    model_affine = torch.as_tensor(np.asarray(d["image"].affine, dtype=np.float64))
    ref_grid, ref_header = read_grid(files.images[0])
    ref_affine, ref_shape = ref_grid.affine, ref_grid.shape

    outside = _outside_grid(np.asarray(model_affine), mask.shape, ref_affine, ref_shape)

    def restore(array: np.ndarray) -> np.ndarray:
        src = MetaTensor(torch.as_tensor(np.asarray(array, dtype=np.float32))[None], affine=model_affine)
        # border padding within half a model voxel of its outermost centres (a voxel is a box, as
        # the forward resampling has it), 0 beyond: where the crop cut the input off
        out = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)(
            src, dst_affine=torch.as_tensor(ref_affine), spatial_size=ref_shape)
        return np.where(outside, np.float32(0.0), np.asarray(out[0], dtype=np.float32))

    return PreparedCase(files.subject_id, mask, restore, ref_shape, ref_affine, ref_header,
                        files.images[0], image=np.ascontiguousarray(np.asarray(d["image"], dtype=np.float32)))


# ---- external predictions ------------------------------------------------------------------------

def prediction_case_id(path: Path) -> str:
    path = Path(path)
    return path.stem if path.suffix == ".npz" else nifti_stem(path)


def _output_grid(path: Path, grid: VoxelGrid) -> tuple[VoxelGrid, nib.Nifti1Header | None]:
    """The grid to write on: the NIfTI's own; for nnU-Net, the segmentation beside when it is
    there and in the same space (the original image's grid), else the properties' grid."""
    if path.suffix != ".npz":
        return grid, read_grid(path)[1]
    for seg in (path.with_suffix(".nii.gz"), path.with_suffix(".nii")):
        if seg.is_file():
            try:
                seg_grid, header = read_grid(seg)
            except DataError:  # a broken segmentation beside: the properties' grid still holds
                continue
            if seg_grid.same_space(grid):
                return seg_grid, header
    return grid, None


def prepare_prediction(path: Path, values: str = "probability", foreground: Sequence[int] | None = None,
                       mask: Path | None = None, mask_threshold: float = 0.0) -> PreparedCase:
    """Read another network's prediction (module doc); the mask defaults to the whole volume."""
    path = Path(path)
    if not path.is_file():
        raise ApplyError(f"{path}: no such file")
    if not (is_nifti(path) or path.suffix == ".npz"):
        raise ApplyError(f"{path}: expected a <case>.nii.gz probability/logit map or nnU-Net's <case>.npz")
    cid = prediction_case_id(path)
    fmt = "nnunet" if path.suffix == ".npz" else "nifti"
    files = CaseFiles(cid, fmt, path, None, properties=path.with_suffix(".pkl") if fmt == "nnunet" else None)
    problems: list[Problem] = []
    read = read_prediction(files, values, foreground, problems)
    if read is None:
        raise input_error(problems, f"prediction {path}")
    logit, grid = read
    inside = np.ones(grid.ras_shape, dtype=bool)
    if mask is not None:
        problems = []
        volume = read_volume(Path(mask), cid, problems, ndims=(3,))
        if volume is None:
            raise input_error(problems, f"mask {mask}")
        if not volume.grid.same_space(grid):
            raise DataError(f"{mask}: the mask's grid {volume.grid.shape} does not match the prediction "
                            f"{path.name} {grid.shape}")
        inside = volume.grid.to_ras(np.asarray(volume.data) > mask_threshold)
    target, header = _output_grid(path, grid)
    return PreparedCase(cid, np.ascontiguousarray(inside), lambda a: target.from_ras(np.asarray(a, dtype=np.float32)),
                        target.shape, target.affine, header, path,
                        logits=np.ascontiguousarray(grid.to_ras(logit)))
