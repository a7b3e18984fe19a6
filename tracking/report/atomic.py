"""Atomic file writes: a temporary file in the target's folder, then os.replace.

A reader (or a crashed report) never sees a half-written table or figure.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    """Write ``frame`` without its index to ``path`` atomically."""
    return _atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_png(path: Path, fig: Figure, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG to ``path`` atomically."""
    return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
