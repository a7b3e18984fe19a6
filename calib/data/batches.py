"""The training batch loaders: whole preprocessed volumes (image, label, mask) for U-Net training
and fine-tuning (:class:`VolumeBatches`), and z-slices or volumes of the base stage's logit cache
(:mod:`calib.logits`) for the logit-based calibrators (:class:`SliceBatches`,
:class:`VolumeLogitBatches`). Every loader draws an epoch's order from ``(seed, epoch)``
(:func:`epoch_order`), so a run resumed from a checkpoint sees what an uninterrupted one would.

Each volume batch is assembled by reading the subjects' uncompressed arrays (cache format 2,
``cache.stored_arrays``) from the OS page cache straight into the batch tensors -- one copy, no
inflating -- by a ``torch.utils.data.DataLoader``: in ``workers`` worker processes that keep up to two batches
each ready ahead of the training thread, or in the training thread itself when ``workers=0``.
With ``pin_memory`` the batches come in page-locked memory, so the ``non_blocking`` copy of
``calib.training`` overlaps the device's work. ``bench/dataloader.py`` measures the throughput
against a training step of the paper's U-Net.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .logit_cache import OUTSIDE_MASK, LogitCacheError, subject_paths

#: Environment variable that sets the default number of loader worker processes.
WORKERS_ENV = "CALIB_LOADER_WORKERS"


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Loader processes when none are asked for: ``$CALIB_LOADER_WORKERS``, else
    ``min(2, usable CPUs)`` when CUDA is available and 0 without it.

    Why 0 on CPU (measured with ``bench/dataloader.py`` on the 2-core VM): there the training
    step is the bottleneck by thousands (paper BraTS net, batch 2: ~80 s per step, while the
    training thread reads 27-52 volumes/s), a trial owns only its torch threads' cores (one on a
    2-core machine with 1-CPU trials), and 2 worker processes were *slower* (9-16 volumes/s):
    handing a 48 MB batch to the training process through shared memory costs more there than
    reading it. On CUDA the training thread waits on the device (each step ends in a sync), so
    two workers read the next batches meanwhile and the pinned copy overlaps the step (not
    measured yet: no GPU was lent).
    """
    env = os.environ.get(WORKERS_ENV, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"${WORKERS_ENV} must be a whole number >= 0, got {env!r}")
        return value
    return min(2, _usable_cpus()) if torch.cuda.is_available() else 0


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Indices 0..n-1 of one epoch: permuted from ``(seed, epoch)`` when shuffling."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


class _EpochOrder(Sampler):
    """Index lists of one epoch's batches: a permutation from ``(seed, epoch)`` when shuffled.

    Iterated in the training process, so the order does not depend on the workers.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, epoch: int):
        self.n, self.batch_size, self.shuffle, self.seed, self.epoch = n, batch_size, shuffle, seed, epoch

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n, self.shuffle, self.seed, self.epoch)
        for start in range(0, self.n, self.batch_size):
            yield order[start:start + self.batch_size].tolist()


class _VolumeDataset(Dataset):
    """``dataset[list of indices]`` -> one assembled batch dict (picklable: paths and ids only).

    The batch tensors are allocated where they must end up, so each voxel is copied once here:
    in a worker process in shared memory (else pickling them to the training process copies
    them again), in the training process page-locked when ``pin`` (then the DataLoader's
    ``pin_memory`` has nothing left to copy).
    """

    def __init__(self, cache_dir: Path, subject_ids: tuple[str, ...], pin: bool = False):
        self.cache_dir, self.subject_ids, self.pin = cache_dir, subject_ids, pin

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if get_worker_info() is not None:
            return torch.empty(shape, dtype=dtype).share_memory_()
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def __len__(self) -> int:
        return len(self.subject_ids)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        from .cache import stored_arrays

        names = [self.subject_ids[i] for i in indices]
        subjects = [stored_arrays(self.cache_dir, sid) for sid in names]
        shapes = {s["image"].shape for s in subjects}
        if len(shapes) != 1:
            raise ValueError(f"subjects {names} have different shapes {sorted(shapes)}; "
                             "a batch needs one shape (preprocess them to one shape)")
        b, (c, *spatial) = len(subjects), shapes.pop()
        image = self._empty((b, c, *spatial), torch.float32)
        label = self._empty((b, 1, *spatial), torch.float32)
        mask = self._empty((b, 1, *spatial), torch.bool)
        for i, s in enumerate(subjects):  # the tensors' numpy views are filled in place
            s["image"].read_into(image[i].numpy())
            np.greater(s["label"].read(), 0, out=label[i, 0].numpy(), casting="unsafe")
            s["mask"].read_into(mask[i, 0].numpy())
        return {"image": image, "label": label, "mask": mask}


def _as_is(batch):
    return batch


class VolumeBatches:
    """``batches(epoch)`` yields ``{"image": (B, C, X, Y, Z) float32, "label": (B, 1, X, Y, Z)
    float32 in {0, 1}, "mask": (B, 1, X, Y, Z) bool}`` from a preprocessed cache directory.

    ``B <= batch_size`` (2 volumes in the paper's fine-tuning). With ``shuffle`` the subject order
    is a permutation drawn from ``(seed, epoch)``, so a resumed run sees the same batches; the
    workers do not change the order or the content. Calling the object is ``batches``.

    ``workers``: loader processes (None: :func:`default_workers`); ``pin_memory`` (None or True:
    when CUDA is available) returns page-locked batches for asynchronous copies to the device.
    Workers are started per epoch and end with it, so an abandoned loader leaves no process.
    """

    def __init__(self, cache_dir: Path, subject_ids: Sequence[str], batch_size: int = 2,
                 shuffle: bool = True, seed: int = 0, workers: int | None = None,
                 pin_memory: bool | None = None):
        if not subject_ids:
            raise ValueError(f"{cache_dir}: no subjects given for the volume loader")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        workers = default_workers() if workers is None else int(workers)
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.cache_dir = Path(cache_dir)
        self.subject_ids = tuple(subject_ids)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.workers = workers
        # Page-locked memory only helps a copy to a CUDA device (and needs one to exist).
        self.pin_memory = torch.cuda.is_available() and (pin_memory is None or bool(pin_memory))

    def __len__(self) -> int:
        return -(-len(self.subject_ids) // self.batch_size)

    def batches(self, epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``epoch`` (0-based), in the order ``(seed, epoch)`` gives."""
        order = _EpochOrder(len(self.subject_ids), self.batch_size, self.shuffle, self.seed, epoch)
        loader = DataLoader(_VolumeDataset(self.cache_dir, self.subject_ids, self.pin_memory), batch_size=None,
                            sampler=order, collate_fn=_as_is, num_workers=self.workers,
                            pin_memory=self.pin_memory)
        return iter(loader)

    __call__ = batches


# ---- batches of the logit cache (calib.logits) ---------------------------------------------------

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
            lp, tp = subject_paths(self.logits_dir, sid)
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
        return epoch_order(n, self.shuffle, self.seed, epoch)

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
