"""Reading NIfTI files: the one reader of calib.data (check, preprocess, predictions) and calib.apply.

A file is opened without a memory map (a file changed under a map kills the process with SIGBUS
instead of raising) and, where its voxels are wanted, read whole: reading every voxel is the only
way to find a gzip stream or file cut short. Each failure is a :class:`~calib.data.errors.Problem`
of a stable kind naming the file -- ``unreadable`` (no NIfTI header nibabel can open),
``bad_dimensions``, ``truncated`` (header fine, voxel data cut short) -- appended to the caller's
list, so a check reports every problem of a dataset at once; :func:`load_volume` and
:func:`read_grid` raise the same problem as a DataError for callers that read one file.

A grid is a :class:`VoxelGrid`: shape and voxel-to-world (RAS mm, nibabel's convention) affine,
with the axis flips/permutation to RAS voxel order. Two grids are compared by
:func:`compare_grids`, either voxel for voxel (a subject's images and label, which preprocessing
stacks: same shape, same affine) or in any axis order (another network's prediction and its
label: the same voxels in space).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from .errors import AFFINE_MISMATCH, BAD_DIMENSIONS, SHAPE_MISMATCH, TRUNCATED, UNREADABLE, DataError, Problem

# Header affines written by different tools for one grid differ by float32 round-off only.
AFFINE_ATOL = 1e-3
_RAS = axcodes2ornt("RAS")


@dataclass(frozen=True)
class VoxelGrid:
    """A voxel grid (shape, voxel -> RAS mm affine) and the axis flips/permutation to RAS order."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @classmethod
    def of(cls, img) -> "VoxelGrid":
        """The grid of a nibabel image (its first three axes)."""
        return cls(tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=np.float64))

    @property
    def ornt(self) -> np.ndarray:
        return io_orientation(self.affine)

    @property
    def ras_shape(self) -> tuple[int, int, int]:
        out = [0, 0, 0]
        for axis, (target, _) in enumerate(self.ornt):
            out[int(target)] = self.shape[axis]
        return tuple(out)

    @property
    def ras_affine(self) -> np.ndarray:
        return self.affine @ inv_ornt_aff(self.ornt, self.shape)

    def to_ras(self, array: np.ndarray) -> np.ndarray:
        """``array`` (X, Y, Z, ...) on this grid, flipped/permuted into RAS order (no resampling)."""
        return apply_orientation(array, self.ornt)

    def from_ras(self, array: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_ras`: an array in RAS order back on this grid's voxel axes."""
        return apply_orientation(array, ornt_transform(_RAS, self.ornt))

    def same_space(self, other: "VoxelGrid") -> bool:
        """True when both grids cover the same voxels in space (in any axis order)."""
        return self.ras_shape == other.ras_shape and np.allclose(
            self.ras_affine, other.ras_affine, rtol=0.0, atol=AFFINE_ATOL)

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "affine": np.asarray(self.affine, dtype=float).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "VoxelGrid":
        return cls(tuple(int(s) for s in d["shape"]), np.asarray(d["affine"], dtype=np.float64))


@dataclass(frozen=True)
class Volume:
    """One NIfTI file read whole: ``data`` as stored (any dimensionality), its ``grid`` (first three
    axes) and ``header`` (qform/sform codes, units: what an output on this grid copies)."""

    path: Path
    data: np.ndarray
    grid: VoxelGrid
    header: nib.Nifti1Header


def open_image(path: Path, subject: str, problems: list[Problem]):
    """The nibabel image of ``path`` (header read, voxels not yet); None with an ``unreadable``
    problem appended when it is no NIfTI nibabel can open."""
    try:
        return nib.load(str(path), mmap=False)
    except Exception as exc:  # nibabel raises many types for bad headers; all mean "unreadable"
        problems.append(Problem(subject, str(path), UNREADABLE, f"cannot open as NIfTI: {exc}"))
        return None


def read_volume(path: Path, subject: str, problems: list[Problem],
                ndims: tuple[int, ...] | None = None) -> Volume | None:
    """Open and fully read one file; None with its problem appended when it cannot be read or
    (with ``ndims``) has another number of dimensions (checked before the voxels are read)."""
    img = open_image(path, subject, problems)
    if img is None:
        return None
    if ndims is not None and len(img.shape) not in ndims:
        want = " or ".join(f"{n}D" for n in ndims)
        problems.append(Problem(subject, str(path), BAD_DIMENSIONS, f"expected {want}, got shape {img.shape}"))
        return None
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # zlib, EOF, short reads: the voxel data is cut short or corrupt
        problems.append(Problem(subject, str(path), TRUNCATED, f"voxel data cannot be read: {exc}"))
        return None
    return Volume(Path(path), data, VoxelGrid.of(img), img.header)


def _raise(problems: list[Problem]) -> None:
    if problems:
        raise DataError(str(problems[0]), problems)


def load_volume(path: Path, ndims: tuple[int, ...] | None = None) -> Volume:
    """:func:`read_volume` of one file, its problem raised as a DataError naming the file."""
    problems: list[Problem] = []
    volume = read_volume(path, "", problems, ndims)
    _raise(problems)
    return volume


def read_grid(path: Path) -> tuple[VoxelGrid, nib.Nifti1Header]:
    """The grid and header of ``path`` from its header alone; a DataError naming the file when it
    cannot be opened."""
    problems: list[Problem] = []
    img = open_image(path, "", problems)
    _raise(problems)
    return VoxelGrid.of(img), img.header


def compare_grids(ref: VoxelGrid, ref_path: Path, other: VoxelGrid, other_path: Path, subject: str,
                  problems: list[Problem], any_axis_order: bool = False) -> bool:
    """Do ``other`` and ``ref`` cover the same voxels? Appends a ``shape_mismatch`` or
    ``affine_mismatch`` problem about ``other_path`` if not.

    ``any_axis_order`` False: the same shape and affine, voxel for voxel; True: the same voxels
    in space once both are put in RAS order (:meth:`VoxelGrid.same_space`).
    """
    name = Path(ref_path).name
    order = " in RAS order" if any_axis_order else ""
    ref_shape, other_shape = (ref.ras_shape, other.ras_shape) if any_axis_order else (ref.shape, other.shape)
    if ref_shape != other_shape:
        problems.append(Problem(subject, str(other_path), SHAPE_MISMATCH,
                                f"grid {other.shape} differs from {name} {ref.shape}"))
        return False
    a, b = (ref.ras_affine, other.ras_affine) if any_axis_order else (ref.affine, other.affine)
    if not np.allclose(a, b, rtol=0.0, atol=AFFINE_ATOL):
        diff = float(np.abs(a - b).max())
        problems.append(Problem(subject, str(other_path), AFFINE_MISMATCH,
                                f"affine differs from {name} (max abs difference {diff:g}{order})"))
        return False
    return True
