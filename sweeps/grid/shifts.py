"""``datasets.<name>.shift``: test-time shifts of a dataset's test subjects (docs/architecture.md,
"Grid file"), each scored beside the unshifted test set by the same fitted models.

* a phantom dataset's shift renders the same subjects differently (calib.data.shifts): ``{<name>:
  {contrast: 0.7}, <name2>: {noise: 2.0, bias_field: 0}}`` (ISLES-like: ``{slab_mm: 8}`` too);
  written on first use into
  ``<data root's parent>/shifts/<name>/<dataset>`` (with ``folds.only``, only the test subjects of
  those folds, beside it: sweeps.run.data_prep.prepare_shifts);
* a real dataset's shift is another data root in the same layout (another site, LGG vs HGG):
  ``{<name>: {data_root: /path}}``; every subject there is a test subject of every fold.

Torch-free: the section, its checks, and the resolved :class:`DatasetShift` the sweep reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator

from calib.vocabulary import NO_SHIFT, PHANTOM_SHIFT_FIELDS, PHANTOM_SHIFTS
from sweeps.grid.checks import GridProblem, mapping_keys, number

#: The data-root field of a real dataset's shift.
DATA_ROOT = "data_root"
SHIFT_KEYS = (*PHANTOM_SHIFT_FIELDS, DATA_ROOT)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _factor(value: Any) -> float | None:
    return None if value is None else number(value, minimum=0)


def check_shifts(value: Any) -> dict[str, dict]:
    """``{name: {field: value}}`` checked: names of letters, digits, ``_``, ``-`` (not ``none``),
    fields of :data:`SHIFT_KEYS`, phantom factors >= 0, at least one field each."""
    shifts = mapping_keys(value, None)
    out = {}
    for name, fields in shifts.items():
        if not (isinstance(name, str) and _NAME.fullmatch(name)) or name == NO_SHIFT:
            raise GridProblem(f"a shift needs a name of letters, digits, '_', '-' (not {NO_SHIFT!r}), "
                              f"got {name!r}", name)
        try:
            fields = mapping_keys(fields, SHIFT_KEYS)
        except GridProblem as exc:
            raise GridProblem(exc.message, f"{name}.{exc.key}" if exc.key != "" else name) from None
        if not fields:
            raise GridProblem(f"names no change; valid keys: {', '.join(SHIFT_KEYS)}", name)
        checked = {}
        for k, v in fields.items():
            if k == DATA_ROOT:
                if not v:
                    raise GridProblem("must be a folder in the dataset's layout", f"{name}.{k}")
                checked[k] = v
                continue
            try:
                checked[k] = number(v, positive=True) if k == "slab_mm" else _factor(v)
            except GridProblem as exc:
                raise GridProblem(exc.message, f"{name}.{k}") from None
        out[name] = checked
    return out


ShiftMap = Annotated[dict[str, dict[str, Any]], BeforeValidator(check_shifts)]


def check_kind(shifts: dict[str, dict], dataset: str, phantom: bool) -> None:
    """A phantom's shifts render (fields of :data:`PHANTOM_SHIFTS` of ``dataset``), a real
    dataset's shift is a ``data_root``: anything else is one GridProblem naming the key."""
    for name, fields in shifts.items():
        for k in fields:
            if phantom and k == DATA_ROOT:
                raise GridProblem(f"a phantom's shift is rendered, not read: use "
                                  f"{', '.join(PHANTOM_SHIFTS[dataset])} (data_root is for real datasets)",
                                  f"{name}.{k}")
            if not phantom and k != DATA_ROOT:
                raise GridProblem(f"{k!r} is a phantom shift; a real dataset's shift is another data "
                                  f"root in the same layout: {{{DATA_ROOT}: DIR}}", f"{name}.{k}")
            if phantom and k not in PHANTOM_SHIFTS[dataset]:
                raise GridProblem(f"{dataset} phantoms cannot shift {k!r}; valid choices: "
                                  f"{', '.join(PHANTOM_SHIFTS[dataset])}", f"{name}.{k}")
        if not phantom and DATA_ROOT not in fields:
            raise GridProblem(f"a real dataset's shift needs {DATA_ROOT}", name)


@dataclass(frozen=True)
class DatasetShift:
    """One resolved shift of a dataset: its name, where its raw data lives, and -- for phantoms --
    the rendering factors (calib.data.shifts.ImageShift's fields); ``render`` empty: real data."""

    name: str
    root: Path | None
    render: tuple[tuple[str, float], ...] = ()

    @property
    def phantom(self) -> bool:
        return bool(self.render)

    @property
    def paired(self) -> bool:
        """The same subjects as the dataset (phantoms): the fold's test ids are scored there."""
        return self.phantom

    def fields(self) -> dict[str, Any]:
        """The grid's fields of this shift (the resolved grid's YAML)."""
        return dict(self.render) if self.phantom else {DATA_ROOT: None if self.root is None else str(self.root)}

    def key_payload(self) -> dict[str, Any]:
        """What goes into the trial keys: the rendering, or that it is another data root (paths
        are not in the keys, as the dataset's own root is not)."""
        return dict(self.render) if self.phantom else {DATA_ROOT: True}


def phantom_shift_root(dataset_root: Path, shift: str, dataset: str) -> Path:
    """Where a phantom dataset's shift is written: ``<root's parent>/shifts/<shift>/<dataset>``."""
    return Path(dataset_root).parent / "shifts" / shift / dataset
