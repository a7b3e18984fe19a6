"""Batches of whole preprocessed volumes (image, label, mask) for U-Net training and fine-tuning."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

#: Subjects are kept in memory after their first load while the total stays under this many bytes
#: (the demo's and tests' volumes always fit; a paper-size fold of 228 BraTS subjects, ~5 GB of
#: float32 images, is re-read from the cache each epoch instead).
MEMORY_BUDGET_BYTES = 2 * 1024**3


class VolumeBatches:
    """``batches(epoch)`` yields ``{"image": (B, C, X, Y, Z) float32, "label": (B, 1, X, Y, Z)
    float32 in {0, 1}, "mask": (B, 1, X, Y, Z) bool}`` from a preprocessed cache directory.

    ``B <= batch_size`` (2 volumes in the paper's fine-tuning). With ``shuffle`` the subject order
    is a permutation drawn from ``(seed, epoch)``, so a resumed run sees the same batches.
    """

    def __init__(self, cache_dir: Path, subject_ids: Sequence[str], batch_size: int = 2,
                 shuffle: bool = True, seed: int = 0, memory_budget: int = MEMORY_BUDGET_BYTES):
        if not subject_ids:
            raise ValueError(f"{cache_dir}: no subjects given for the volume loader")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cache_dir = Path(cache_dir)
        self.subject_ids = tuple(subject_ids)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self._budget = memory_budget
        self._kept: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._kept_bytes = 0

    def __len__(self) -> int:
        return -(-len(self.subject_ids) // self.batch_size)

    def _load(self, sid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if sid in self._kept:
            return self._kept[sid]
        from calib.data import load_subject

        subj = load_subject(self.cache_dir, sid)
        arrays = (np.asarray(subj.image, dtype=np.float32), np.asarray(subj.label),
                  np.asarray(subj.mask, dtype=bool))
        size = sum(a.nbytes for a in arrays)
        if self._kept_bytes + size <= self._budget:
            self._kept[sid] = arrays
            self._kept_bytes += size
        return arrays

    def __call__(self, epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        order = np.arange(len(self.subject_ids))
        if self.shuffle:
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(order)
        for start in range(0, len(order), self.batch_size):
            loaded = [self._load(self.subject_ids[i]) for i in order[start:start + self.batch_size]]
            shapes = {a[0].shape for a in loaded}
            if len(shapes) != 1:
                names = [self.subject_ids[i] for i in order[start:start + self.batch_size]]
                raise ValueError(f"subjects {names} have different shapes {sorted(shapes)}; "
                                 "a batch needs one shape (preprocess them to one shape)")
            yield {
                "image": torch.from_numpy(np.stack([a[0] for a in loaded])),
                "label": torch.from_numpy(np.stack([(a[1] > 0) for a in loaded]).astype(np.float32))[:, None],
                "mask": torch.from_numpy(np.stack([a[2] for a in loaded]))[:, None],
            }
