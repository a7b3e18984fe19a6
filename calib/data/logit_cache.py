"""The base-logit cache's files: writing, indexing and reading one subject's logits (numpy only).

The base stage writes the cache (``calib.logits.export_logits``), an import of another network's
predictions writes one too (``calib.data.predictions``), and the loaders of
:mod:`calib.data.batches` serve it as batches of z-slices. This module is the one place that knows
the files, below all three, so that none of them imports another to read the format.

Platt scaling, the auxiliary conv and temperature scaling learn one to a few hundred weights on top of the base
network's logits. Recomputing the U-Net forward every epoch would cost them orders of magnitude
more than the fit itself, so the base stage writes every subject's logits once (float16) and the
logit-based methods train on this cache only.

Layout of a cache directory::

    <dir>/<subject_id>.logit.npy    float16 (Z, X, Y)  base logits, z-slice-major
    <dir>/<subject_id>.target.npy   uint8   (Z, X, Y)  0 / 1 label inside the mask, 255 outside
    <dir>/index.json                {"format": 1, "shape": [X, Y, Z], "subjects": [...], "source": {...}}

Slices are stored z-major so that one z-slice is one contiguous block: batches of random slices
read from memory-mapped files touch only the pages they need. Arrays handed to callers are in the
project's (X, Y, Z) order (a transposed view; no copy).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calib import atomic_io

LOGIT_DTYPE = np.float16
OUTSIDE_MASK = 255  # target value of voxels outside the brain mask
INDEX_NAME = "index.json"
FORMAT_VERSION = 1
_FP16_MAX = float(np.finfo(np.float16).max)


class LogitCacheError(ValueError):
    """A logit cache is missing, incomplete or inconsistent; the message names the file/subject."""


@dataclass(frozen=True)
class LogitVolume:
    """One subject's cached base output, arrays in (X, Y, Z) order.

    ``logits`` is float16 (possibly a read-only memory map), ``label`` uint8 in {0, 1} (0 outside
    the mask), ``mask`` bool.
    """

    subject_id: str
    logits: np.ndarray
    label: np.ndarray
    mask: np.ndarray


def logit_path(logits_dir: Path, subject_id: str) -> Path:
    return Path(logits_dir) / f"{subject_id}.logit.npy"


def target_path(logits_dir: Path, subject_id: str) -> Path:
    return Path(logits_dir) / f"{subject_id}.target.npy"


def subject_paths(logits_dir: Path, subject_id: str) -> tuple[Path, Path]:
    """(logit path, target path) of one subject; a missing file is a LogitCacheError naming it."""
    paths = logit_path(logits_dir, subject_id), target_path(logits_dir, subject_id)
    for p in paths:
        if not p.is_file():
            raise LogitCacheError(f"subject {subject_id!r}: missing {p} in the logit cache")
    return paths


def write_subject_logits(logits_dir: Path, subject_id: str, logits: np.ndarray,
                         label: np.ndarray, mask: np.ndarray) -> None:
    """Write one subject's logits (X, Y, Z) with its label and mask into ``logits_dir``.

    Logits are stored as float16 (values beyond ±65504 are clipped; sigmoid is 0 or 1 there
    anyway). Each file is written atomically.
    """
    logits = np.asarray(logits)
    label = np.asarray(label)
    mask = np.asarray(mask, dtype=bool)
    if logits.ndim != 3 or label.shape != logits.shape or mask.shape != logits.shape:
        raise LogitCacheError(
            f"subject {subject_id!r}: logits, label and mask must be 3-D (X, Y, Z) of one shape; got "
            f"{logits.shape}, {label.shape}, {mask.shape}")
    if not np.all(np.isfinite(logits[mask])):
        raise LogitCacheError(f"subject {subject_id!r}: non-finite logits inside the mask")
    logits_dir = Path(logits_dir)
    logits_dir.mkdir(parents=True, exist_ok=True)
    z_major = np.ascontiguousarray(
        np.clip(logits, -_FP16_MAX, _FP16_MAX).astype(LOGIT_DTYPE).transpose(2, 0, 1))
    target = np.where(mask, (label > 0).astype(np.uint8), np.uint8(OUTSIDE_MASK)).astype(np.uint8)
    atomic_io.save_npy(logit_path(logits_dir, subject_id), z_major)
    atomic_io.save_npy(target_path(logits_dir, subject_id), np.ascontiguousarray(target.transpose(2, 0, 1)))


def write_index(logits_dir: Path, subject_ids: Sequence[str], shape: Sequence[int],
                source: dict[str, Any] | None = None) -> Path:
    """Write ``index.json`` (last, atomically): the cache is complete once it exists."""
    path = Path(logits_dir) / INDEX_NAME
    payload = {"format": FORMAT_VERSION, "shape": [int(s) for s in shape],
               "subjects": list(subject_ids), "source": source or {}}
    atomic_io.write_text(path, json.dumps(payload, indent=2, sort_keys=True))
    return path


def read_index(logits_dir: Path) -> dict[str, Any]:
    """Read ``index.json`` of a logit cache; a missing or foreign file is a LogitCacheError."""
    path = Path(logits_dir) / INDEX_NAME
    if not path.is_file():
        raise LogitCacheError(f"{path}: no logit-cache index (was the base stage's export completed?)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LogitCacheError(f"{path}: not valid JSON ({exc})") from exc
    if index.get("format") != FORMAT_VERSION:
        raise LogitCacheError(f"{path}: format {index.get('format')!r}, expected {FORMAT_VERSION}")
    return index


def load_logits(logits_dir: Path, subject_id: str, mmap: bool = True) -> LogitVolume:
    """One subject's cached logits, label and mask in (X, Y, Z) order.

    With ``mmap`` the logits stay a read-only memory map (float16); convert what you use.
    """
    lp, tp = subject_paths(logits_dir, subject_id)
    logits = np.load(lp, mmap_mode="r" if mmap else None, allow_pickle=False)
    target = np.load(tp, allow_pickle=False)
    if logits.shape != target.shape or logits.ndim != 3:
        raise LogitCacheError(f"subject {subject_id!r}: {lp.name} {logits.shape} and {tp.name} "
                              f"{target.shape} disagree")
    target = target.transpose(1, 2, 0)
    mask = target != OUTSIDE_MASK
    label = np.where(mask, target, 0).astype(np.uint8)
    return LogitVolume(subject_id, logits.transpose(1, 2, 0), label, mask)




def holds(logits_dir: Path, subject_ids: Sequence[str], source: dict[str, Any]) -> bool:
    """True when ``logits_dir`` is a complete cache of exactly ``subject_ids`` from ``source``
    (its index says so and every subject's two files are there)."""
    try:
        index = read_index(logits_dir)
    except LogitCacheError:
        return False
    return (index.get("subjects") == list(subject_ids) and index.get("source") == dict(source)
            and all(logit_path(logits_dir, s).is_file() and target_path(logits_dir, s).is_file()
                    for s in subject_ids))


def describe(logits_dir: Path) -> str:
    """What a logit cache folder holds, for messages: its subject count and source, or why not."""
    try:
        index = read_index(logits_dir)
    except LogitCacheError as exc:
        return f"no valid index ({exc})"
    return f"{len(index.get('subjects', []))} subject(s) from source {index.get('source')}"
