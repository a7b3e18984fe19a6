"""Batches of whole preprocessed volumes (image, label, mask) for U-Net training and fine-tuning.

Each batch is assembled by reading the subjects' uncompressed arrays (cache format 2,
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

    Why 0 on CPU: there the training step is the bottleneck by far (paper BraTS net, batch 2:
    ~80 s per step on 2 cores, while one batch is read in tens of milliseconds,
    ``bench/dataloader.py``), and a trial owns as many cores as its torch threads (one on a 2-core
    machine with 1-CPU trials); a worker process would only take a core from the step. On CUDA the
    training thread waits on the device, so two workers prepare the next batches in the meantime.
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


class _EpochOrder(Sampler):
    """Index lists of one epoch's batches: a permutation from ``(seed, epoch)`` when shuffled.

    Iterated in the training process, so the order does not depend on the workers.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, epoch: int):
        self.n, self.batch_size, self.shuffle, self.seed, self.epoch = n, batch_size, shuffle, seed, epoch

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.arange(self.n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, int(self.epoch)]).permutation(order)
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

    ``workers``: loader processes (None: :func:`default_workers`); ``pin_memory`` (None: when
    CUDA is available) returns page-locked batches for asynchronous copies to the device.
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
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)

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
