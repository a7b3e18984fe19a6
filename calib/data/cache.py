"""The preprocessed cache: its key, its folder, and reading subjects back.

A cache folder ``<out>/<dataset>-<key[:16]>/`` holds ``<subject_id>.npz`` and ``meta.json``
(docs/architecture.md, "Preprocessed cache"). The key is a SHA-256 over the preprocessing config
and the identity of every source file read (path relative to the root, size, modification time),
so a changed config or a changed source file gets a new folder and never mixes with an old one.
The folder appears in one rename after every file in it is complete, so a folder that exists with
``meta.json`` is whole.

Since cache format 2 (``preprocess.FORMAT_VERSION``) the ``.npz`` members are *stored*, not
deflated (:func:`write_subject`): a paper-size BraTS subject is ~27 MB on disk instead of ~3 MB,
but each array is a plain ``.npy`` at a fixed offset of the file (:func:`stored_arrays`), so the
volume loader reads it from the OS page cache straight into its batch instead of inflating
~6 GB of zlib per fold and epoch. ``np.load`` reads both formats, so :func:`load_subject` is
unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calib import atomic_io
from .errors import DataError
from .layouts import SubjectFiles

META_NAME = "meta.json"
META_KEYS = ("config", "hash", "channels", "subjects")
SUBJECT_ARRAYS = ("image", "label", "mask")  # every cached subject has these; true_prob optional


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def config_hash(config: dict) -> str:
    """SHA-256 of the preprocessing config alone (canonical JSON)."""
    return _digest(config)


def source_fingerprint(root: Path, subjects: list[SubjectFiles]) -> list[list]:
    """``[relative path, size, mtime_ns]`` for every file preprocessing reads, in subject order."""
    rows = []
    for subject in subjects:
        for path in subject.loaded_files():
            st = path.stat()
            rows.append([str(path.relative_to(root)), st.st_size, st.st_mtime_ns])
    return rows


def cache_key(config: dict, fingerprint: list[list]) -> str:
    """The cache key: SHA-256 over the config and the source fingerprint."""
    return _digest({"config": config, "sources": fingerprint})


def cache_dir_for(out: Path, dataset: str, key: str) -> Path:
    return Path(out) / f"{dataset}-{key[:16]}"


def read_meta(cache_dir: Path) -> dict:
    """``meta.json`` of a cache folder: ``config``, ``hash``, ``channels``, ``subjects`` and more.

    Raises DataError when the folder holds no valid meta.json (not a finished cache folder).
    """
    path = Path(cache_dir) / META_NAME
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path} not found: {cache_dir} is not a preprocessed cache folder "
            "(make one with `python -m calib.data preprocess`)"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} cannot be read: {exc}") from None
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise DataError(f"{path} lacks key(s) {', '.join(missing)}")
    return meta


def is_complete(cache_dir: Path, key: str | None = None) -> bool:
    """True when ``cache_dir`` holds a meta.json (with hash ``key`` if given) and every npz."""
    try:
        meta = read_meta(cache_dir)
    except DataError:
        return False
    if key is not None and meta["hash"] != key:
        return False
    return all((Path(cache_dir) / f"{sid}.npz").is_file() for sid in meta["subjects"])


def _held_hash(cache_dir: Path) -> str:
    try:
        return f"hash {read_meta(cache_dir)['hash']}"
    except DataError:
        return "no valid meta.json"


@contextmanager
def cache_writer(target: Path, key: str,
                 complete: Callable[[Path, str], bool] = is_complete) -> Iterator[Path]:
    """A temporary folder to fill with the cache folder ``target`` of hash ``key``; on clean exit
    it is put in place in one rename (``atomic_io.atomic_folder``).

    A ``target`` there already but not ``complete(target, key)`` (files deleted by hand, a
    foreign folder) is removed first. When a concurrent run of the same inputs publishes first,
    its folder is kept and this one dropped; a folder of another hash appearing meanwhile is one
    DataError naming it and both hashes. On error nothing is left (nor the parents created).
    """
    target = Path(target)
    if target.exists() and not complete(target, key):
        atomic_io.remove_folder(target)  # damaged: replaced, as if absent
    try:
        with atomic_io.atomic_folder(
                target, same=lambda t: complete(t, key),
                conflict=lambda t: f"cache folder {t} was written meanwhile by another run with "
                                   f"{_held_hash(t)}, this run's is hash {key}; delete it and run again") as tmp:
            yield tmp
    except atomic_io.FolderConflict as exc:
        raise DataError(str(exc)) from None


@dataclass
class Subject:
    """One preprocessed subject, RAS voxel order on the cache grid.

    image: float32 (C, X, Y, Z), normalised per channel inside the mask, 0 outside;
    label: uint8 (X, Y, Z) in {0, 1}; mask: bool (X, Y, Z) brain (BraTS) / head (ISLES);
    true_prob: float32 (X, Y, Z) in [0, 1], the probability the label was drawn from
    (phantoms only, else None).
    """

    subject_id: str
    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray
    true_prob: np.ndarray | None = None


def load_subject(cache_dir: Path, subject_id: str) -> Subject:
    """Read ``<cache_dir>/<subject_id>.npz``; an unknown id is a DataError listing a few known ones."""
    path = Path(cache_dir) / f"{subject_id}.npz"
    if not path.is_file():
        known = sorted(p.stem for p in Path(cache_dir).glob("*.npz"))
        shown = ", ".join(known[:5]) + (" ..." if len(known) > 5 else "")
        raise DataError(f"subject {subject_id!r} not in cache {cache_dir} (has {len(known)}: {shown})")
    try:
        with np.load(path) as npz:
            missing = [k for k in SUBJECT_ARRAYS if k not in npz.files]
            if missing:
                raise DataError(f"{path} lacks array(s) {', '.join(missing)}")
            return Subject(
                subject_id=subject_id,
                image=npz["image"],
                label=npz["label"],
                mask=npz["mask"],
                true_prob=npz["true_prob"] if "true_prob" in npz.files else None,
            )
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # A truncated or overwritten cache file: name it, so the trial fails at once (no retry)
        # and the researcher knows which file to delete.
        raise DataError(f"{path}: unreadable cached subject {subject_id!r} ({exc})") from exc


def write_subject(path: Path, **arrays: np.ndarray) -> None:
    """Write one subject's arrays as an uncompressed ``.npz`` (``np.savez``), atomically.

    Uncompressed so that every member can be read raw at its offset (:func:`stored_arrays`); the
    file is complete
    or absent (temp file beside it, fsync, rename), as every file of the cache.
    """
    with atomic_io.atomic_open(Path(path), "wb") as handle:
        np.savez(handle, **arrays)


# A zip local file header: signature, then 22 bytes, then the name and extra-field lengths.
_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"


@dataclass(frozen=True)
class StoredArray:
    """Where one array of a cached subject lies: ``nbytes`` raw bytes at ``offset`` of ``path``.

    ``offset`` is None for a deflated member (format 1 caches), which is read whole via zipfile.
    """

    path: Path
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int | None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read_into(self, out: np.ndarray) -> None:
        """Fill ``out`` (C-contiguous, this shape; same dtype for a straight read) with the array.

        A stored float32 member is read with one ``readinto`` from the OS page cache straight
        into ``out`` -- no inflating, no temporary, no page faults of a memory map (which cost
        ~6x more than the copy itself on the 2-core VM, ``bench/dataloader.py``). Any other case
        reads the array and converts it into ``out`` (``np.copyto``, ``same_kind``).
        """
        if out.shape != self.shape:
            raise ValueError(f"{self.path}: {self.name} is {self.shape}, the buffer {out.shape}")
        if self.offset is None or self.fortran or out.dtype != self.dtype or not out.flags.c_contiguous:
            np.copyto(out, self.read(), casting="same_kind")
        else:
            self._read_raw(out)

    def _read_raw(self, out: np.ndarray) -> None:
        try:
            with open(self.path, "rb", buffering=0) as fh:
                fh.seek(self.offset)
                got = fh.readinto(memoryview(out).cast("B"))
        except OSError as exc:
            raise DataError(f"{self.path}: unreadable cached array {self.name!r} ({exc})") from exc
        if got != self.nbytes:
            raise DataError(f"{self.path}: truncated cached array {self.name!r} "
                            f"({got} of {self.nbytes} bytes)")

    def read(self) -> np.ndarray:
        """The array, read whole (a new array)."""
        if self.offset is None:
            try:
                with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.name}.npy") as member:
                    return np.lib.format.read_array(member, allow_pickle=False)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise DataError(f"{self.path}: unreadable cached array {self.name!r} ({exc})") from exc
        # A Fortran-order array is the C-order array of the reversed shape, transposed.
        out = np.empty(self.shape[::-1] if self.fortran else self.shape, self.dtype)
        self._read_raw(out)
        return out.T if self.fortran else out


def _read_npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from the ``.npy`` header at the position of ``fh``."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f".npy format {version} is not one the cache writes")
    if dtype.hasobject:
        raise ValueError("object arrays are never cached")
    return tuple(shape), bool(fortran), dtype


def _locate_member(path: Path, fh, info: zipfile.ZipInfo, file_size: int) -> StoredArray:
    """Offset, shape and dtype of the ``.npy`` member ``info`` of the open zip ``fh``."""
    fh.seek(info.header_offset)
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
    if signature != _LOCAL_SIGNATURE:
        raise ValueError(f"member {info.filename}: no local header at offset {info.header_offset}")
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    fh.seek(start)
    shape, fortran, dtype = _read_npy_header(fh)
    found = StoredArray(path, info.filename[:-4], shape, dtype, fortran, fh.tell())
    if found.offset + found.nbytes > min(start + info.file_size, file_size):
        raise ValueError(f"member {info.filename}: {found.nbytes} data bytes do not fit in the file")
    return found


def stored_arrays(cache_dir: Path, subject_id: str) -> dict[str, StoredArray]:
    """Where the arrays of ``<cache_dir>/<subject_id>.npz`` lie, by name; nothing is read yet.

    The loader reads them straight into its batch (:meth:`StoredArray.read_into`). Stored
    members (cache format 2, :func:`write_subject`) are located by their zip and ``.npy``
    headers; deflated ones (format 1) are read whole when asked for. Raises DataError for an
    unknown id (as :func:`load_subject`), a missing array, or a file that is truncated or not an
    ``.npz`` (naming the file). Unlike ``np.load``, raw reads skip the zip's CRC: the atomic
    writer guarantees a file is whole, and truncation is still caught -- the zip's directory
    sits at its end, and a short read is an error.
    """
    path = Path(cache_dir) / f"{subject_id}.npz"
    if not path.is_file():
        load_subject(cache_dir, subject_id)  # raises the DataError that lists known ids
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            arrays = {}
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                if info.compress_type == zipfile.ZIP_STORED:
                    arrays[info.filename[:-4]] = _locate_member(path, fh, info, file_size)
                else:  # a format-1 (compressed) cache: correct, only slower
                    with zf.open(info) as member:
                        shape, fortran, dtype = _read_npy_header(member)
                    arrays[info.filename[:-4]] = StoredArray(path, info.filename[:-4], shape, dtype,
                                                             fortran, None)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: unreadable cached subject {subject_id!r} ({exc})") from exc
    missing = [k for k in SUBJECT_ARRAYS if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks array(s) {', '.join(missing)}")
    return arrays
