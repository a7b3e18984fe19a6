"""The value checks of a grid file: each raises a :class:`GridProblem` (a message about a key,
relative to where it was found) that the schema and the loader turn into one :class:`GridError`
line naming the file, the dotted key and the valid choices."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from calib.methods.params import closest

__all__ = ["GridError", "GridProblem", "choice", "closest", "listed", "mapping_keys", "mapping_keys_at",
           "names", "number", "three_ints"]


class GridError(ValueError):
    """A grid problem; the message is one line naming the file, the key and the valid choices."""


class GridProblem(ValueError):
    """Raised inside the schema: ``message`` about ``key``, relative to where it was found."""

    def __init__(self, message: str, key: Any = ""):
        super().__init__(message)
        self.message, self.key = message, key


# ---- value checks (each raises a GridProblem with today's one-line wording) ----------------------

def number(value: Any, *, positive: bool = False, integer: bool = False,
           minimum: float | None = None) -> float | int:
    """``value`` as a float (or int), checked; numeric strings are accepted."""
    # YAML 1.1 reads 1e-4 (no dot) as a string: accept numeric strings rather than surprise.
    if isinstance(value, str):
        try:
            value = float(value) if not integer else int(value)
        except ValueError:
            raise GridProblem(f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GridProblem(f"must be a number, got {value!r}")
    if integer and int(value) != value:
        raise GridProblem(f"must be an integer, got {value!r}")
    if positive and value <= 0:
        raise GridProblem(f"must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise GridProblem(f"must be >= {minimum:g}, got {value!r}")
    return int(value) if integer else float(value)


def choice(value: Any, choices: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise GridProblem(f"unknown {what} {value!r}{closest(str(value), choices)}; "
                          f"valid choices: {', '.join(choices)}")
    return value


def names(value: Any, choices: Sequence[str], what: str) -> tuple[str, ...]:
    """A non-empty list (or one name) of distinct ``choices``."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not value:
        raise GridProblem(f"must be a non-empty list of {what}s; valid choices: {', '.join(choices)}")
    out = tuple(choice(v, choices, what) for v in value)
    if len(set(out)) != len(out):
        raise GridProblem(f"lists a {what} twice: {list(out)}")
    return out


def mapping_keys(value: Any, allowed: Sequence[str] | None) -> dict:
    """``value`` as a dict whose keys are all ``allowed`` (None: any key); None reads as empty."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise GridProblem(f"must be a mapping, got {type(value).__name__}")
    for k in value if allowed is not None else ():
        if k not in allowed:
            raise GridProblem(f"unknown key{closest(k, allowed)}; valid keys: {', '.join(allowed)}", key=k)
    return dict(value)


def listed(value: Any) -> list:
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]


def three_ints(value: Any) -> tuple[int, int, int]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
        raise GridProblem(f"must be three integers [X, Y, Z], got {value!r}")
    return tuple(number(v, integer=True, positive=True) for v in value)


def mapping_keys_at(key: str, value: Mapping, allowed: Sequence[str]) -> None:
    """:func:`mapping_keys` for a section whose valid keys depend on the rest of the grid."""
    try:
        mapping_keys(value, tuple(allowed))
    except GridProblem as exc:
        raise GridProblem(exc.message, ".".join(str(k) for k in (key, exc.key) if k != "")) from None
