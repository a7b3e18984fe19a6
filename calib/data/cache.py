"""The preprocessed cache: its key, its folder, and reading subjects back.

A cache folder ``<out>/<dataset>-<key[:16]>/`` holds ``<subject_id>.npz`` and ``meta.json``
(DESIGN.md contract). The key is a SHA-256 over the preprocessing config and the identity of every
source file read (path relative to the root, size, modification time), so a changed config or a
changed source file gets a new folder and never mixes with an old one. The folder appears in one
rename after every file in it is complete, so a folder that exists with ``meta.json`` is whole.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .layouts import SubjectFiles

META_NAME = "meta.json"
META_KEYS = ("config", "hash", "channels", "subjects")


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
            missing = [k for k in ("image", "label", "mask") if k not in npz.files]
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
