"""Base-logit cache: each subject's logits written once, then served as batches of z-slices.

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
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

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


@contextmanager
def _atomic_open(path: Path, mode: str) -> Iterator[IO]:
    """A temporary file beside ``path`` that replaces it on clean exit (removed on error).

    Not ``calib.data.atomic``: importing calib.data pulls in nibabel and MONAI readers.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` via a temporary file in the same directory + os.replace."""
    with _atomic_open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def logit_path(logits_dir: Path, subject_id: str) -> Path:
    return Path(logits_dir) / f"{subject_id}.logit.npy"


def target_path(logits_dir: Path, subject_id: str) -> Path:
    return Path(logits_dir) / f"{subject_id}.target.npy"


def _existing_paths(logits_dir: Path, subject_id: str) -> tuple[Path, Path]:
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
    _atomic_save_npy(logit_path(logits_dir, subject_id), z_major)
    _atomic_save_npy(target_path(logits_dir, subject_id), np.ascontiguousarray(target.transpose(2, 0, 1)))


def write_index(logits_dir: Path, subject_ids: Sequence[str], shape: Sequence[int],
                source: dict[str, Any] | None = None) -> Path:
    """Write ``index.json`` (last, atomically): the cache is complete once it exists."""
    path = Path(logits_dir) / INDEX_NAME
    payload = {"format": FORMAT_VERSION, "shape": [int(s) for s in shape],
               "subjects": list(subject_ids), "source": source or {}}
    with _atomic_open(path, "w") as fh:
        fh.write(json.dumps(payload, indent=2, sort_keys=True))
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
    lp, tp = _existing_paths(logits_dir, subject_id)
    logits = np.load(lp, mmap_mode="r" if mmap else None, allow_pickle=False)
    target = np.load(tp, allow_pickle=False)
    if logits.shape != target.shape or logits.ndim != 3:
        raise LogitCacheError(f"subject {subject_id!r}: {lp.name} {logits.shape} and {tp.name} "
                              f"{target.shape} disagree")
    target = target.transpose(1, 2, 0)
    mask = target != OUTSIDE_MASK
    label = np.where(mask, target, 0).astype(np.uint8)
    return LogitVolume(subject_id, logits.transpose(1, 2, 0), label, mask)


@torch.no_grad()
def export_logits(model: torch.nn.Module, cache_dir: Path, subject_ids: Sequence[str],
                  out_dir: Path, device: torch.device, source: dict[str, Any] | None = None,
                  reuse: bool = True) -> Path:
    """Run ``model`` once per subject of the preprocessed cache and write its logits.

    ``model(image (1, C, X, Y, Z), mask=(1, 1, X, Y, Z)) -> logits (1, 1, X, Y, Z)``; it runs in
    eval mode without gradients. ``source`` (e.g. the base weights' digest) goes into the index;
    with ``reuse`` an existing complete cache with the same subjects and source is kept as is,
    so a restarted base stage does not export twice. Returns ``out_dir``.
    """
    from calib.data import load_subject  # calib.data imports heavy readers; import on use

    out_dir = Path(out_dir)
    source = dict(source or {})
    if reuse and (out_dir / INDEX_NAME).is_file():
        try:
            index = read_index(out_dir)
        except LogitCacheError:
            index = None
        if index and index.get("subjects") == list(subject_ids) and index.get("source") == source and all(
                logit_path(out_dir, s).is_file() and target_path(out_dir, s).is_file()
                for s in subject_ids):
            return out_dir
    (out_dir / INDEX_NAME).unlink(missing_ok=True)  # incomplete until the index is rewritten
    was_training = model.training
    model.to(device).eval()
    shape = None
    try:
        for sid in subject_ids:
            subj = load_subject(Path(cache_dir), sid)
            image = torch.from_numpy(np.ascontiguousarray(subj.image))[None].to(device)
            mask = torch.from_numpy(np.ascontiguousarray(subj.mask))[None, None].to(device)
            logits = model(image.float(), mask=mask)[0, 0].float().cpu().numpy()
            write_subject_logits(out_dir, sid, logits, subj.label, subj.mask)
            if shape is None:
                shape = logits.shape
            elif logits.shape != shape:
                raise LogitCacheError(f"subject {sid!r}: shape {logits.shape} differs from {shape} "
                                      "of the other subjects; slice batches need one shape")
    finally:
        model.train(was_training)
    write_index(out_dir, subject_ids, shape or (0, 0, 0), source)
    return out_dir


class _Cache:
    """Memory-mapped logits and targets of a set of subjects (z-major), checked for one shape."""

    def __init__(self, logits_dir: Path, subject_ids: Sequence[str]):
        if not subject_ids:
            raise LogitCacheError(f"{logits_dir}: no subjects given for the slice loader")
        self.logits_dir = Path(logits_dir)
        self.subject_ids = tuple(subject_ids)
        self.logits: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        for sid in self.subject_ids:
            lp, tp = _existing_paths(self.logits_dir, sid)
            self.logits.append(np.load(lp, mmap_mode="r", allow_pickle=False))
            self.targets.append(np.load(tp, mmap_mode="r", allow_pickle=False))
        shapes = {a.shape for a in self.logits} | {t.shape for t in self.targets}
        if len(shapes) != 1:
            raise LogitCacheError(f"{self.logits_dir}: subjects have different shapes {sorted(shapes)}; "
                                  "batches need one shape")
        self.shape_zxy = self.logits[0].shape


def _to_batch(logits: np.ndarray, target: np.ndarray) -> dict[str, torch.Tensor]:
    """Tensors of one batch; ``target`` must be C-contiguous, ``logits`` may be any view (one copy)."""
    mask = target != OUTSIDE_MASK
    return {
        "logits": torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)).unsqueeze(1),
        "label": torch.from_numpy((target == 1).astype(np.float32)).unsqueeze(1),
        "mask": torch.from_numpy(mask).unsqueeze(1),
    }


class _CacheBatches:
    """State shared by the loaders: the cache, batch size and the seeded per-epoch order."""

    def __init__(self, logits_dir: Path, subject_ids: Sequence[str], batch_size: int,
                 shuffle: bool, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._cache = _Cache(logits_dir, subject_ids)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)

    def _order(self, n: int, epoch: int) -> np.ndarray:
        """Indices 0..n-1, permuted from ``(seed, epoch)`` when shuffling."""
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(n)

    def _n_items(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return -(-self._n_items() // self.batch_size)


class SliceBatches(_CacheBatches):
    """Batches of z-slices from a logit cache: ``batches(epoch)`` yields dicts of tensors.

    Each batch is ``{"logits": (B, 1, X, Y) float32, "label": (B, 1, X, Y) float32 in {0, 1},
    "mask": (B, 1, X, Y) bool}`` on the CPU, ``B <= batch_size`` (64 in the paper). Only slices
    holding at least one mask voxel are served (the others carry no loss). With ``shuffle`` the
    slice order is a permutation drawn from ``(seed, epoch)``: the same epoch always gives the same
    batches, so a run resumed from a checkpoint sees what an uninterrupted one would have seen.
    """

    def __init__(self, logits_dir: Path, subject_ids: Sequence[str], batch_size: int = 64,
                 shuffle: bool = True, seed: int = 0):
        super().__init__(logits_dir, subject_ids, batch_size, shuffle, seed)
        pairs = []
        for s, target in enumerate(self._cache.targets):
            z_with_mask = np.flatnonzero((target != OUTSIDE_MASK).any(axis=(1, 2)))
            pairs.append(np.stack([np.full_like(z_with_mask, s), z_with_mask], axis=1))
        self._slices = np.concatenate(pairs, axis=0)
        if len(self._slices) == 0:
            ids = list(subject_ids)
            shown = ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")
            raise LogitCacheError(f"{logits_dir}: no subject of {len(ids)} ({shown}) has a non-empty mask")

    @property
    def n_slices(self) -> int:
        return len(self._slices)

    def _n_items(self) -> int:
        return self.n_slices

    def __call__(self, epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        order = self._slices[self._order(self.n_slices, epoch)]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            logits = np.stack([self._cache.logits[s][z] for s, z in chunk])
            target = np.stack([self._cache.targets[s][z] for s, z in chunk])
            yield _to_batch(logits, target)


class VolumeLogitBatches(_CacheBatches):
    """Whole-volume batches from a logit cache (for 3-D calibrators).

    Yields ``{"logits": (B, 1, X, Y, Z) float32, "label": ..., "mask": ...}``; shuffling of the
    subject order as in :class:`SliceBatches`.
    """

    def __init__(self, logits_dir: Path, subject_ids: Sequence[str], batch_size: int = 2,
                 shuffle: bool = True, seed: int = 0):
        super().__init__(logits_dir, subject_ids, batch_size, shuffle, seed)

    def _n_items(self) -> int:
        return len(self._cache.subject_ids)

    def __call__(self, epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        order = self._order(self._n_items(), epoch)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            logits = np.stack([self._cache.logits[s] for s in chunk]).transpose(0, 2, 3, 1)
            target = np.stack([self._cache.targets[s] for s in chunk]).transpose(0, 2, 3, 1)
            yield _to_batch(logits, np.ascontiguousarray(target))  # _to_batch copies the logits once
