"""nnU-Net v2's ``--save_probabilities`` output: ``<case>.npz`` + ``<case>.pkl``, read without nnU-Net.

What nnU-Net writes (``nnunetv2/inference/export_prediction.py``, read for this module): after
resampling back to the original spacing, reverting the crop and reverting ``transpose_forward``,
``np.savez_compressed(<case>.npz, probabilities=P)`` with ``P`` of shape ``(C, a, b, c)`` -- one
channel per class (softmax) or per region (sigmoid) -- in the *image reader's* array order, and
``<case>.pkl`` holding the reader's properties. The readers (``nnunetv2/imageio/``) all return
arrays in SimpleITK's order, the reverse of the NIfTI voxel axes (i, j, k):

* ``SimpleITKIO``: ``sitk.GetArrayFromImage`` = ``[k, j, i]`` of the file; the properties keep
  ``sitk_stuff`` = ``spacing``, ``origin``, ``direction`` in ITK's LPS world;
* ``SimpleITKIOWithReorient``: the same, of the image reoriented with ``DICOMOrient`` (its
  geometry is what ``sitk_stuff`` holds);
* ``NibabelIO``: ``get_fdata().transpose(2, 1, 0)``; properties ``nibabel_stuff.original_affine``;
* ``NibabelIOWithReorient``: the same of the image reoriented to RAS; ``nibabel_stuff`` also
  holds ``reoriented_affine``, the affine of the array that was saved.

So ``P.transpose(0, 3, 2, 1)`` is in NIfTI voxel order (i, j, k) of the grid whose voxel-to-world
affine (RAS, nibabel's convention) :func:`affine_from_properties` builds from the properties.

The ``.pkl`` is read with an unpickler that admits only the builtins and numpy types such a
properties dict holds, so a foreign pickle cannot run code.
"""

from __future__ import annotations

import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UNREADABLE, DataError, Problem

PROBABILITIES_KEY = "probabilities"
# ITK's world is LPS; nibabel's affines map to RAS: negate x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# What a properties pickle of nnU-Net's readers may contain: plain containers and numbers plus
# numpy arrays / scalars (the module moved from numpy.core to numpy._core in numpy 2).
_ALLOWED_GLOBALS = {
    ("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float",
                                    "complex", "str", "bytes", "bool", "slice", "range")
} | {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
     ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


def _unreadable(path: Path, why: str) -> DataError:
    """``<path>: <why>``, with the ``unreadable`` problem behind it (so that a caller listing
    problems names the file once)."""
    return DataError(f"{path}: {why}", [Problem("", str(path), UNREADABLE, why)])


def _reason(exc: BaseException, path: Path) -> str:
    """The exception's text without the path (the message names the file once, in front)."""
    text = getattr(exc, "strerror", None) if isinstance(exc, OSError) else None
    text = text or str(exc) or type(exc).__name__
    return text.replace(f"'{path}'", "the file").replace(str(path), "the file")


class _PropertiesUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`_ALLOWED_GLOBALS` (numpy dtypes by class name)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a plain properties value")


def read_properties(path: Path) -> dict:
    """The properties dict nnU-Net wrote beside a prediction (``<case>.pkl``); DataError naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            props = _PropertiesUnpickler(fh).load()
    except FileNotFoundError:
        raise _unreadable(path, f"nnU-Net properties file missing (nnU-Net writes <case>.pkl "
                        "beside <case>.npz with --save_probabilities)") from None
    except Exception as exc:  # noqa: BLE001 - any failure here means "not nnU-Net's properties"
        raise _unreadable(path, f"cannot read nnU-Net properties ({_reason(exc, path)})") from None
    if not isinstance(props, dict):
        raise _unreadable(path, f"expected nnU-Net's properties dict, got {type(props).__name__}")
    return props


def affine_from_properties(props: dict, where: Path) -> np.ndarray:
    """Voxel (i, j, k) -> world RAS mm affine of the saved probabilities' grid (module doc)."""
    nib_stuff = props.get("nibabel_stuff")
    if isinstance(nib_stuff, dict):
        key = "reoriented_affine" if "reoriented_affine" in nib_stuff else "original_affine"
        if key in nib_stuff:
            affine = np.asarray(nib_stuff[key], dtype=np.float64)
            if affine.shape == (4, 4):
                return affine
    sitk = props.get("sitk_stuff")
    if isinstance(sitk, dict) and {"spacing", "origin", "direction"} <= set(sitk):
        spacing = np.asarray(sitk["spacing"], dtype=np.float64)
        if spacing.shape != (3,):
            raise _unreadable(where, f"a {spacing.size}-D nnU-Net prediction; only 3-D volumes are supported")
        direction = np.asarray(sitk["direction"], dtype=np.float64).reshape(3, 3)
        affine = np.eye(4)
        affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
        affine[:3, 3] = _LPS_TO_RAS @ np.asarray(sitk["origin"], dtype=np.float64)
        return affine
    raise _unreadable(where, f"properties hold neither 'sitk_stuff' (spacing, origin, direction) nor "
                    "'nibabel_stuff' (an affine): cannot place the prediction in space")


def read_nnunet_probabilities(npz_path: Path, pkl_path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities (C, i, j, k) float32, affine (4, 4))`` of one nnU-Net prediction.

    ``pkl_path`` defaults to ``<case>.pkl`` beside ``npz_path``. The array is in NIfTI voxel order
    of the grid ``affine`` describes, so it overlays the case's label NIfTI once both are put in
    one orientation. Errors are DataErrors naming the file.
    """
    npz_path = Path(npz_path)
    pkl_path = Path(pkl_path) if pkl_path is not None else npz_path.with_suffix(".pkl")
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            if PROBABILITIES_KEY not in npz.files:
                raise _unreadable(npz_path, f"no {PROBABILITIES_KEY!r} array (has {', '.join(npz.files) or 'none'}); "
                                "is this nnU-Net's --save_probabilities output?")
            probs = np.asarray(npz[PROBABILITIES_KEY])
    except DataError:
        raise
    except (EOFError, zipfile.BadZipFile, zlib.error) as exc:  # the archive or a member ends early
        raise _unreadable(npz_path, f"unreadable nnU-Net prediction: cut short or not an .npz archive "
                                    f"({_reason(exc, npz_path)})") from None
    except (OSError, ValueError) as exc:
        raise _unreadable(npz_path, f"unreadable nnU-Net prediction ({_reason(exc, npz_path)})") from None
    if probs.ndim != 4:
        raise _unreadable(npz_path, f"{PROBABILITIES_KEY} has shape {probs.shape}; expected "
                        "(classes, z, y, x) of a 3-D case")
    affine = affine_from_properties(read_properties(pkl_path), pkl_path)
    return np.ascontiguousarray(probs.transpose(0, 3, 2, 1), dtype=np.float32), affine


def write_nnunet_probabilities(npz_path: Path, probs_ijk: np.ndarray, affine: np.ndarray,
                               reader: str = "SimpleITKIO") -> None:
    """Write ``probs_ijk`` (C, i, j, k) as nnU-Net would (``.npz`` + ``.pkl``) -- for tests and
    examples: the array in SimpleITK order, the properties of ``reader`` (``SimpleITKIO`` or
    ``NibabelIO``)."""
    npz_path = Path(npz_path)
    np.savez_compressed(npz_path, **{PROBABILITIES_KEY: np.asarray(probs_ijk).transpose(0, 3, 2, 1)})
    affine = np.asarray(affine, dtype=np.float64)
    shape_zyx = list(np.asarray(probs_ijk).shape[1:][::-1])
    if reader == "SimpleITKIO":
        zooms = np.linalg.norm(affine[:3, :3], axis=0)
        lps = _LPS_TO_RAS @ affine[:3, :3]
        props = {"sitk_stuff": {"spacing": tuple(float(z) for z in zooms),
                                "origin": tuple(float(o) for o in _LPS_TO_RAS @ affine[:3, 3]),
                                "direction": tuple(float(d) for d in (lps / zooms).ravel())},
                 "spacing": [float(z) for z in zooms[::-1]]}
    elif reader == "NibabelIO":
        props = {"nibabel_stuff": {"original_affine": affine},
                 "spacing": [float(z) for z in np.linalg.norm(affine[:3, :3], axis=0)[::-1]]}
    else:
        raise ValueError(f"unknown reader {reader!r}; valid: SimpleITKIO, NibabelIO")
    props.update(shape_before_cropping=shape_zyx, bbox_used_for_cropping=[[0, s] for s in shape_zyx],
                 shape_after_cropping_and_before_resampling=shape_zyx)
    with open(npz_path.with_suffix(".pkl"), "wb") as fh:
        pickle.dump(props, fh)
