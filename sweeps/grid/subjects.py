"""The grid key ``calib_subjects`` (issue 22, point 1): how many calibration subjects each
covered method is fitted on (docs/architecture.md, "Grid file").

* ``calib_subjects: [1, 2, 4, all]``: positive integers and/or ``all`` (every subject of the
  fold's calib split); the covered methods are the grid's logit-based ones (their recipe reads
  the base logits: cheap to refit).
* ``calib_subjects: {sizes: [1, 2, all], methods: [platt, finetune]}``: ``methods`` replaces that
  default set (widens it to network-based methods, or narrows it).

Only under ``protocol: honest``. Torch-free: a size against the split sizes is the plan's check
(sweeps.plan.subjects), or the trial's where the subject count is known only then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from calib.methods.recipes import RECIPES
from calib.vocabulary import ALL_CALIB_SUBJECTS, PROTOCOLS
from sweeps.grid.checks import GridProblem, closest, names

KEY = "calib_subjects"
FORM_KEYS = ("sizes", "methods")


@dataclass(frozen=True)
class CalibSubjects:
    """The sizes (ints ascending, then ``all``) and the methods they apply to (None: the grid's
    logit-based methods, resolved by :func:`resolve_methods`)."""

    sizes: tuple[int | str, ...]
    methods: tuple[str, ...] | None = None

    def covers(self, method: str) -> bool:
        return self.methods is not None and method in self.methods

    def to_dict(self) -> dict:
        return {"sizes": list(self.sizes), "methods": None if self.methods is None else list(self.methods)}


def _size(value: Any) -> int | str:
    if value == ALL_CALIB_SUBJECTS:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise GridProblem(f"a size is a positive integer or {ALL_CALIB_SUBJECTS!r}, got {value!r}", "sizes")
    if value < 1:
        raise GridProblem(f"a size must be >= 1, got {value}", "sizes")
    return value


def parse_calib_subjects(value: Any) -> CalibSubjects | None:
    """The key's list or mapping form (module doc) as a :class:`CalibSubjects`; None stays None."""
    if value is None:
        return None
    methods = None
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in FORM_KEYS]
        if unknown:
            raise GridProblem(f"unknown key{closest(str(unknown[0]), FORM_KEYS)}; valid keys: "
                              f"{', '.join(FORM_KEYS)}", unknown[0])
        if "sizes" not in value:
            raise GridProblem("is required", "sizes")
        if value.get("methods") is not None:
            methods = value["methods"]
            if isinstance(methods, str):
                methods = [methods]
            if not isinstance(methods, Sequence) or not methods:
                raise GridProblem(f"must be a non-empty list of methods, got {methods!r}", "methods")
            methods = tuple(methods)
        value = value["sizes"]
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise GridProblem(f"must be a non-empty list of sizes (positive integers and/or "
                          f"{ALL_CALIB_SUBJECTS!r}), got {value!r}")
    sizes = [_size(v) for v in value]
    if len(set(sizes)) != len(sizes):
        raise GridProblem(f"lists a size twice: {list(value)}", "sizes")
    if ALL_CALIB_SUBJECTS not in sizes:
        raise GridProblem(f"must include {ALL_CALIB_SUBJECTS!r}: the trial on every calib subject is "
                          f"the one the headline and the tables use, got {list(value)}", "sizes")
    ints = sorted(s for s in sizes if s != ALL_CALIB_SUBJECTS)
    return CalibSubjects((*ints, ALL_CALIB_SUBJECTS), methods)


def resolve_methods(cs: CalibSubjects, protocol: str, grid_methods: Sequence[str]) -> CalibSubjects:
    """``cs`` with its methods checked against the grid's (or defaulted to its logit-based ones);
    raises a GridProblem naming ``calib_subjects`` for another protocol than honest or a method
    the grid does not run."""
    if protocol != PROTOCOLS[0]:
        raise GridProblem(f"{KEY} fits on subsets of the calib split, which only protocol "
                          f"{PROTOCOLS[0]!r} has; protocol is {protocol!r}", KEY)
    if cs.methods is None:
        logit = tuple(m for m in grid_methods if RECIPES[m].uses == "logits")
        if not logit:
            raise GridProblem(f"the grid has no logit-based method to cover; name them with "
                              f"{KEY}.methods (the grid's: {', '.join(grid_methods)})", KEY)
        return replace(cs, methods=logit)
    try:
        return replace(cs, methods=names(list(cs.methods), tuple(grid_methods), "method of the grid"))
    except GridProblem as exc:
        raise GridProblem(exc.message, f"{KEY}.methods") from None
