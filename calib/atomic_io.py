"""Atomic files and folders: every writer of the project goes through here.

A file is written to a temporary file in its own folder, flushed and fsynced, then renamed over
the target (``os.replace``), and the folder is fsynced where the platform allows it: a reader sees
the old file or the complete new one, never a partial write, even if the process (or the machine)
dies half-way. A folder is filled as a temporary sibling, then renamed into place the same way.
Leftovers of a crash are hidden ``.<name>.tmp-*`` entries, never read as valid.

Plain ``os``/``tempfile`` only (no torch, no nibabel): ``calib.data``, ``calib.logits``, the
sweep and the report all import it.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np


def fsync_dir(folder: Path) -> None:
    """fsync ``folder`` so that a rename inside it survives a crash; a no-op where the platform
    cannot open a folder (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder: the rename is still atomic
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(target: Path, suffix: str = "") -> Path:
    """A new, empty file beside ``target`` (created exclusively, with the permissions ``open``
    would give it -- not mkstemp's private 0600)."""
    while True:
        tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_paths(paths: Sequence[Path], suffix: str = "") -> Iterator[list[Path]]:
    """Temporary paths beside each of ``paths`` for writers that want a file name; on clean exit
    every one is fsynced, then each is renamed over its target -- all complete before any is
    renamed. On error they are removed and the targets left as they were.

    ``suffix`` ends each temporary name, for writers that go by the extension (``.nii.gz``).
    """
    targets = [Path(p) for p in paths]
    tmps: list[Path] = []
    try:
        for target in targets:
            tmps.append(_temp_path(target, suffix))
        yield list(tmps)
        for tmp in tmps:
            _fsync_file(tmp)
        for tmp, target in zip(tmps, targets):
            os.replace(tmp, target)
        for folder in {t.parent for t in targets}:
            fsync_dir(folder)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], Any], suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then put it in place atomically;
    ``path``."""
    path = Path(path)
    with atomic_paths([path], suffix) as (tmp,):
        write(tmp)
    return path


@contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on clean exit it is flushed, fsynced and renamed
    over ``path`` (removed on error)."""
    with atomic_paths([Path(path)]) as (tmp,):
        with open(tmp, mode) as handle:
            yield handle


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; ``path``."""
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: Path, obj: object) -> Path:
    """Write ``obj`` as indented, key-sorted JSON with a final newline, atomically; ``path``."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed``, atomically. The padded background compresses ~100x and loads as
    fast as the uncompressed file."""
    with atomic_open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` (no pickles), atomically."""
    with atomic_open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


# ---- folders -------------------------------------------------------------------------------------

class FolderConflict(FileExistsError):
    """A folder's target already holds something other than what this writer made; the
    message names the target and what each side holds."""


def temp_folder(target: Path) -> Path:
    """A new, empty hidden sibling folder of ``target`` to fill before :func:`publish_folder`."""
    target = Path(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def remove_folder(target: Path) -> None:
    """Remove the folder ``target`` (a stale or damaged result) so that it vanishes at once: it is
    renamed to a hidden sibling first, then deleted. A target that is already gone is no error
    (another writer removed it first)."""
    target = Path(target)
    aside = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _lost_race(exc: OSError) -> bool:
    """The rename failed because ``target`` is a non-empty folder (or a file) now."""
    return exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)


def publish_folder(tmp: Path, target: Path, same: Callable[[Path], bool] | None = None,
                   conflict: Callable[[Path], str] | None = None) -> bool:
    """Rename the filled folder ``tmp`` to ``target`` atomically; True when it was put in place.

    A ``target`` that is absent or an empty folder is replaced in one rename. When it is not --
    there before, or written meanwhile by a concurrent writer (the rename fails with ENOTEMPTY /
    EEXIST) -- ``same(target)`` decides: True, the other writer's folder holds this result, so it
    is kept, ``tmp`` is removed and False returned; False (or no ``same``), a FolderConflict is
    raised (``tmp`` removed, ``target`` untouched) whose message is ``conflict(target)`` where
    given (say what each side holds), else one naming the target. The folder is made readable
    (``mkdtemp`` makes it private), as a data folder normally is.
    """
    tmp, target = Path(tmp), Path(target)
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, target)  # replaces an empty folder atomically on POSIX, fails on any other
    except OSError as exc:
        if not _lost_race(exc):
            raise
        if same is not None and same(target):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        shutil.rmtree(tmp, ignore_errors=True)
        message = conflict(target) if conflict is not None else (
            f"{target} already exists with other content than this writer made; remove it or "
            "choose another folder")
        raise FolderConflict(message) from None
    fsync_dir(target.parent)
    return True


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; the folders it created, deepest first."""
    created = []
    probe = Path(folder)
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _remove_if_empty(folders: Sequence[Path]) -> None:
    for folder in folders:  # deepest first; a folder another writer filled meanwhile stays
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def atomic_folder(target: Path, same: Callable[[Path], bool] | None = None,
                  conflict: Callable[[Path], str] | None = None) -> Iterator[Path]:
    """A temporary sibling folder of ``target`` to fill; on clean exit :func:`publish_folder`
    puts it in place (``same``, ``conflict``: as there). On any error the temporary folder is
    removed, ``target`` is untouched, and the parent folders this call created are removed again
    where still empty, so a failed writer leaves nothing behind. The one way every writer of a
    shared folder of the project (phantoms, preprocessed cache, imported predictions, logit
    cache) publishes it."""
    target = Path(target)
    created = _make_parents(target.parent)
    try:
        tmp = temp_folder(target)
    except BaseException:
        _remove_if_empty(created)
        raise
    try:
        yield tmp
        publish_folder(tmp, target, same, conflict)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_if_empty(created)
        raise


def move_into_place(src: Path, target: Path) -> Path:
    """Rename ``src`` (a file or folder) to ``target``; when a concurrent writer put the same
    thing there first the rename may fail, and its copy stands. Any other error is raised."""
    try:
        os.replace(src, target)
    except OSError:
        if not Path(target).exists():  # not a lost race: a real error
            raise
    fsync_dir(Path(target).parent)
    return Path(target)
