"""Problems found in a dataset, the report that lists them, and the one error type of calib.data.

Every problem names the subject and the file (or folder) it is about, so that a researcher can go
straight to the culprit. ``kind`` is one of the ``KINDS`` below; tests and tools match on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Kinds of problem, each a stable machine-readable name.
EMPTY_DATASET = "empty_dataset"  # no subject found under the root
MISSING_MODALITY = "missing_modality"  # an expected image or label file is absent
EXTRA_MODALITY = "extra_modality"  # an image file the layout does not know (or a second copy)
DUPLICATE_SUBJECT = "duplicate_subject"  # the same subject id twice (e.g. in HGG and LGG)
UNREADABLE = "unreadable"  # not a NIfTI file nibabel can open (bad or empty header)
TRUNCATED = "truncated"  # header fine, voxel data cut short or corrupt
BAD_DIMENSIONS = "bad_dimensions"  # e.g. a 4D file where a 3D volume is expected
SHAPE_MISMATCH = "shape_mismatch"  # an image's grid differs from the label's
AFFINE_MISMATCH = "affine_mismatch"  # same grid size, different position/orientation/spacing
LABEL_VALUES = "label_values"  # label values outside the dataset's label set
NONFINITE = "nonfinite"  # NaN or inf voxels
PROB_RANGE = "prob_range"  # a true-probability map with values outside [0, 1]
EMPTY_MASK = "empty_mask"  # preprocessing only: the brain/head mask has no voxel

KINDS = (
    EMPTY_DATASET,
    MISSING_MODALITY,
    EXTRA_MODALITY,
    DUPLICATE_SUBJECT,
    UNREADABLE,
    TRUNCATED,
    BAD_DIMENSIONS,
    SHAPE_MISMATCH,
    AFFINE_MISMATCH,
    LABEL_VALUES,
    NONFINITE,
    PROB_RANGE,
    EMPTY_MASK,
)


@dataclass(frozen=True)
class Problem:
    """One problem: which subject (``""`` for dataset-wide ones), which path, what kind, and why."""

    subject: str
    path: str
    kind: str
    message: str

    def __str__(self) -> str:
        who = f"{self.subject}: " if self.subject else ""
        return f"[{self.kind}] {who}{self.path}: {self.message}"


@dataclass
class CheckReport:
    """Result of ``check_dataset``: the subjects found and every problem, in discovery order."""

    dataset: str
    root: str
    subjects: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        """JSON-ready form: ``{dataset, root, ok, n_subjects, subjects, n_problems, problems}``."""
        return {
            "dataset": self.dataset,
            "root": self.root,
            "ok": self.ok,
            "n_subjects": len(self.subjects),
            "subjects": list(self.subjects),
            "n_problems": len(self.problems),
            "problems": [asdict(p) for p in self.problems],
        }


class DataError(ValueError):
    """Bad input data or arguments; the message names the file, subject or key at fault.

    ``problems`` holds the structured problems behind the error when there are any.
    """

    def __init__(self, message: str, problems: tuple[Problem, ...] | list[Problem] = ()):
        super().__init__(message)
        self.problems = tuple(problems)

    def __reduce__(self):  # keep problems when the error crosses a process boundary
        return (type(self), (self.args[0], self.problems))

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(p.kind for p in self.problems)


def error_from_problems(problems: list[Problem], what: str, limit: int = 10) -> DataError:
    """One DataError listing up to ``limit`` problems (one per line) and how many more there are."""
    lines = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more problem(s)")
    noun = "problem" if len(problems) == 1 else "problems"
    return DataError(f"{what}: {len(problems)} {noun}:\n  " + "\n  ".join(lines), problems)


