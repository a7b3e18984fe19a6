"""Base-logit cache: each subject's logits written once by the base stage (:func:`export_logits`),
then served as batches of z-slices (the loaders: :mod:`calib.data.batches`).

Platt scaling, the auxiliary conv and temperature scaling learn one to a few hundred weights on
top of the base network's logits. Recomputing the U-Net forward every epoch would cost them
orders of magnitude more than the fit itself, so the base stage writes every subject's logits
once (float16) and the logit-based methods train on this cache only.

The files (layout, writing and reading one subject) are :mod:`calib.data.logit_cache`, below both
this module and the loaders; their names are re-exported here, so ``calib.logits`` stays the one
name to import the cache by. This module adds what needs torch and the preprocessed cache: the
export of a model's logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calib import atomic_io
from calib.data.cache import load_subject
from calib.data.logit_cache import (
    FORMAT_VERSION,
    INDEX_NAME,
    LOGIT_DTYPE,
    OUTSIDE_MASK,
    LogitCacheError,
    LogitVolume,
    describe,
    holds,
    load_logits,
    logit_path,
    read_index,
    subject_paths,
    target_path,
    write_index,
    write_subject_logits,
)

__all__ = [
    "FORMAT_VERSION", "INDEX_NAME", "LOGIT_DTYPE", "OUTSIDE_MASK", "LogitCacheError", "LogitVolume",
    "export_logits", "load_logits", "logit_path", "read_index", "subject_paths", "target_path",
    "write_index", "write_subject_logits",
]


@torch.no_grad()
def export_logits(model: torch.nn.Module, cache_dir: Path, subject_ids: Sequence[str],
                  out_dir: Path, device: torch.device, source: dict[str, Any] | None = None,
                  reuse: bool = True) -> Path:
    """Run ``model`` once per subject of the preprocessed cache and write its logits.

    ``model(image (1, C, X, Y, Z), mask=(1, 1, X, Y, Z)) -> logits (1, 1, X, Y, Z)``; it runs in
    eval mode without gradients. ``source`` (e.g. the base weights' digest) goes into the index;
    with ``reuse`` an existing complete cache with the same subjects and source is kept as is,
    so a restarted base stage does not export twice. Any other folder at ``out_dir`` is stale
    and replaced. The cache is filled as a temporary sibling and appears in one rename
    (``atomic_io.atomic_folder``): a concurrent export of the same subjects and source that
    finishes first is kept (this one dropped); one of another source is a LogitCacheError
    naming both. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    source = dict(source or {})
    ids = list(subject_ids)
    if reuse and holds(out_dir, ids, source):
        return out_dir
    if out_dir.exists():
        atomic_io.remove_folder(out_dir)  # stale: other weights, other subjects, or reuse=False
    was_training = model.training
    model.to(device).eval()
    shape = None
    try:
        with atomic_io.atomic_folder(
                out_dir, same=lambda t: holds(t, ids, source),
                conflict=lambda t: f"logit cache {t} was written meanwhile with {describe(t)}; this "
                                   f"export holds {len(ids)} subject(s) from source {source}") as tmp:
            for sid in ids:
                subj = load_subject(Path(cache_dir), sid)
                image = torch.from_numpy(np.ascontiguousarray(subj.image))[None].to(device)
                mask = torch.from_numpy(np.ascontiguousarray(subj.mask))[None, None].to(device)
                logits = model(image.float(), mask=mask)[0, 0].float().cpu().numpy()
                write_subject_logits(tmp, sid, logits, subj.label, subj.mask)
                if shape is None:
                    shape = logits.shape
                elif logits.shape != shape:
                    raise LogitCacheError(f"subject {sid!r}: shape {logits.shape} differs from {shape} "
                                          "of the other subjects; slice batches need one shape")
            write_index(tmp, ids, shape or (0, 0, 0), source)
    except atomic_io.FolderConflict as exc:
        raise LogitCacheError(str(exc)) from None
    finally:
        model.train(was_training)
    return out_dir
