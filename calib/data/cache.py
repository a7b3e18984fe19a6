"""The preprocessed cache: its key, its folder, and reading subjects back.

A cache folder ``<out>/<dataset>-<key[:16]>/`` holds ``<subject_id>.npz`` and ``meta.json``
(DESIGN.md contract). The key is a SHA-256 over the preprocessing config and the identity of every
source file read (path relative to the root, size, modification time), so a changed config or a
changed source file gets a new folder and never mixes with an old one. The folder appears in one
rename after every file in it is complete, so a folder that exists with ``meta.json`` is whole.

Since cache format 2 (``preprocess.FORMAT_VERSION``) the ``.npz`` members are *stored*, not
deflated (:func:`write_subject`): a paper-size BraTS subject is ~24 MB on disk instead of ~3 MB,
but each array is a plain ``.npy`` at a fixed offset of the file, so :func:`map_subject` can
memory-map it and a training epoch copies pages from the OS cache instead of inflating ~5 GB of
zlib per fold. ``np.load`` still reads both formats, so :func:`load_subject` is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import atomic
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

    Uncompressed so that :func:`map_subject` can memory-map every member; the file is complete
    or absent (temp file beside it, fsync, rename), as every file of the cache.
    """
    with atomic.atomic_open(Path(path), "wb") as handle:
        np.savez(handle, **arrays)


# A zip local file header: signature, then 22 bytes, then the name and extra-field lengths.
_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"


def _map_member(path: Path, fh, info: zipfile.ZipInfo, file_size: int) -> np.ndarray:
    """A read-only memory map of the stored ``.npy`` member ``info`` of the open zip ``fh``."""
    fh.seek(info.header_offset)
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
    if signature != _LOCAL_SIGNATURE:
        raise ValueError(f"member {info.filename}: no local header at offset {info.header_offset}")
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    fh.seek(start)
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(fh)
    if dtype.hasobject:
        raise ValueError(f"member {info.filename}: object arrays are never cached")
    offset = fh.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + nbytes > min(start + info.file_size, file_size):
        raise ValueError(f"member {info.filename}: {nbytes} data bytes do not fit in the file")
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def map_subject(cache_dir: Path, subject_id: str) -> dict[str, np.ndarray]:
    """The arrays of ``<cache_dir>/<subject_id>.npz`` by name, memory-mapped read-only.

    Stored members (cache format 2, :func:`write_subject`) are mapped without being read: the
    pages come from the OS cache when they are used. Deflated members (format 1 caches) are
    read whole. Shapes and dtypes are those of :class:`Subject`. Raises DataError for an
    unknown id (as :func:`load_subject`), a missing array, or a file that is truncated or not an
    ``.npz`` (naming the file). Unlike ``np.load``, mapped members are not CRC-checked: the
    atomic writer guarantees a file is whole, and a truncation is still caught here because the
    zip's directory sits at its end.
    """
    path = Path(cache_dir) / f"{subject_id}.npz"
    if not path.is_file():
        load_subject(cache_dir, subject_id)  # raises the DataError that lists known ids
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            members = {info.filename[:-4]: info for info in zf.infolist() if info.filename.endswith(".npy")}
            missing = [k for k in SUBJECT_ARRAYS if k not in members]
            if missing:
                raise DataError(f"{path} lacks array(s) {', '.join(missing)}")
            arrays = {}
            for name, info in members.items():
                if info.compress_type == zipfile.ZIP_STORED:
                    arrays[name] = _map_member(path, fh, info, file_size)
                else:  # a format-1 (compressed) cache: correct, only slower
                    with zf.open(info) as member:
                        arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
            return arrays
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: unreadable cached subject {subject_id!r} ({exc})") from exc
