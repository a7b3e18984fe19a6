"""On-disk layouts of BraTS 2018 and ISLES 2018 as distributed, and subject discovery.

BraTS 2018 (MICCAI_BraTS_2018_Data_Training)::

    <root>/{HGG,LGG}/<id>/<id>_{flair,t1,t1ce,t2,seg}.nii.gz

A root without HGG/LGG folders is read as one flat folder of subject folders (a single group, or
the later BraTS releases' layout). ISLES 2018 (ISLES2018_Training)::

    <root>/TRAINING/case_<n>/SMIR.Brain.XX.O.<kind>.<num>/SMIR.Brain.XX.O.<kind>.<num>.nii

with kind in CT, CT_CBF, CT_CBV, CT_MTT, CT_Tmax, CT_4DPWI, OT. The 4D perfusion series
(CT_4DPWI) is optional and never loaded. A root without TRAINING is read as a folder of case_<n>
folders; a SMIR file lying directly in the case folder (no per-file folder) is accepted too.

Phantoms add one file per subject that the real datasets do not have, the per-voxel probability
that generated the label: ``<id>_trueprob.nii.gz`` (BraTS) and ``SMIR.Brain.XX.O.TrueProb.<num>``
(ISLES). Discovery recognises it (never "extra"), and preprocessing carries it through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..vocabulary import BRATS18, DATASETS, ISLES18

from .errors import (
    DUPLICATE_SUBJECT,
    EMPTY_DATASET,
    EXTRA_MODALITY,
    MISSING_MODALITY,
    DataError,
    Problem,
)

SUPPORTED_DATASETS = DATASETS

BRATS_GROUPS = ("HGG", "LGG")
BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
BRATS_LABEL = "seg"
BRATS_TRUE_PROB = "trueprob"
BRATS_LABEL_VALUES = frozenset({0, 1, 2, 4})

ISLES_FOLDER = "TRAINING"
ISLES_CHANNELS = ("CT", "CT_CBF", "CT_CBV", "CT_MTT", "CT_Tmax")
ISLES_LABEL = "OT"
ISLES_4D = "CT_4DPWI"
ISLES_TRUE_PROB = "TrueProb"
ISLES_LABEL_VALUES = frozenset({0, 1})
SMIR_PREFIX = "SMIR.Brain.XX.O."
_SMIR_RE = re.compile(r"^SMIR\.Brain\.XX\.O\.(?P<kind>[A-Za-z0-9_]+)\.(?P<num>\d+)$")
_CASE_RE = re.compile(r"^case_\d+$")


@dataclass(frozen=True)
class Layout:
    """What a dataset's subjects hold: channel names (npz channel order) and the label set."""

    name: str
    channels: tuple[str, ...]
    label_name: str
    label_values: frozenset[int]


LAYOUTS = {
    BRATS18: Layout(BRATS18, BRATS_MODALITIES, BRATS_LABEL, BRATS_LABEL_VALUES),
    ISLES18: Layout(ISLES18, ISLES_CHANNELS, ISLES_LABEL, ISLES_LABEL_VALUES),
}


def get_layout(dataset: str) -> Layout:
    """The layout of ``dataset``; an unknown name is a DataError listing the valid choices."""
    try:
        return LAYOUTS[dataset]
    except KeyError:
        raise DataError(
            f"unknown dataset {dataset!r}; choose one of {', '.join(SUPPORTED_DATASETS)}"
        ) from None


@dataclass(frozen=True)
class SubjectFiles:
    """The files of one subject. ``images`` is in the layout's channel order; a file the subject
    lacks is None there (or ``label is None``), and such a subject is not ``complete``."""

    subject_id: str
    directory: Path
    images: tuple[Path | None, ...]
    label: Path | None
    true_prob: Path | None = None
    ignored: tuple[Path, ...] = ()  # present, checked by `check`, never loaded (ISLES 4D)
    group: str = ""  # BraTS HGG/LGG, "" otherwise

    @property
    def complete(self) -> bool:
        return self.label is not None and all(p is not None for p in self.images)

    def loaded_files(self) -> list[Path]:
        """Every file preprocessing reads: images, label, then the true-probability map."""
        return [p for p in (*self.images, self.label, self.true_prob) if p is not None]


@dataclass
class Discovery:
    """Every subject folder found (complete or not) and the layout-level problems."""

    all: list[SubjectFiles] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def subjects(self) -> list[SubjectFiles]:
        """The complete subjects only."""
        return [s for s in self.all if s.complete]

    @property
    def found(self) -> list[str]:
        return [s.subject_id for s in self.all]


def natural_key(text: str) -> tuple:
    """Sort key that orders case_2 before case_10."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def is_nifti(path: Path) -> bool:
    return path.name.endswith(".nii") or path.name.endswith(".nii.gz")


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _keep_first(by_kind: dict[str, Path], kind: str, path: Path, sid: str, problems: list[Problem],
                what: str) -> None:
    """Record ``path`` as the subject's ``kind`` file; a second one is an EXTRA_MODALITY problem."""
    if kind in by_kind:
        problems.append(Problem(sid, str(path), EXTRA_MODALITY, f"second {what} beside {by_kind[kind].name}"))
    else:
        by_kind[kind] = path


def _missing_kinds(layout: Layout, by_kind: dict[str, Path]) -> list[str]:
    """The layout's channels and label that ``by_kind`` lacks, in layout order."""
    return [k for k in (*layout.channels, layout.label_name) if k not in by_kind]


def _subject_files(layout: Layout, sid: str, directory: Path, by_kind: dict[str, Path],
                   true_prob_kind: str, **extra) -> SubjectFiles:
    """The SubjectFiles of one subject from its files by kind (absent kinds are None)."""
    return SubjectFiles(
        subject_id=sid,
        directory=directory,
        images=tuple(by_kind.get(k) for k in layout.channels),
        label=by_kind.get(layout.label_name),
        true_prob=by_kind.get(true_prob_kind),
        **extra,
    )


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: natural_key(p.name),
    )


def discover(dataset: str, root: Path) -> Discovery:
    """Find the subjects of ``dataset`` under ``root`` and the layout-level problems.

    Reads directory listings only (no file contents). Subjects missing a required file are in
    ``all``/``found`` but not in ``subjects``. Raises DataError when ``root`` is not a directory.
    """
    get_layout(dataset)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a directory")
    disc = _discover_brats(root) if dataset == "brats18" else _discover_isles(root)
    disc.all.sort(key=lambda s: natural_key(s.subject_id))  # HGG and LGG interleaved by id
    if not disc.found:
        expected = (
            f"{root}/{{HGG,LGG}}/<id>/<id>_flair.nii.gz"
            if dataset == "brats18"
            else f"{root}/{ISLES_FOLDER}/case_<n>/{SMIR_PREFIX}CT.<num>/{SMIR_PREFIX}CT.<num>.nii"
        )
        disc.problems.insert(
            0, Problem("", str(root), EMPTY_DATASET, f"no {dataset} subject found; expected {expected}")
        )
    return disc


def detect_dataset(root: Path) -> str:
    """Tell BraTS from ISLES by the layout under ``root`` (folder and file names only).

    BraTS: HGG/LGG folders or ``<id>/<id>_flair.nii.gz``; ISLES: a TRAINING folder or
    ``case_<n>`` folders. Raises DataError when neither or both match.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a directory")
    brats = any((root / g).is_dir() for g in BRATS_GROUPS) or any(root.glob("*/*_flair.nii*"))
    isles = (root / ISLES_FOLDER).is_dir() or any(_CASE_RE.match(d.name) for d in _visible_dirs(root))
    if brats == isles:
        raise DataError(
            f"cannot tell the dataset of {root} from its layout; pass --dataset "
            f"({', '.join(SUPPORTED_DATASETS)})"
        )
    return BRATS18 if brats else ISLES18


# --------------------------------------------------------------------------------------- BraTS
def brats_path(subject_dir: Path, subject_id: str, kind: str) -> Path:
    """``<dir>/<id>_<kind>.nii.gz`` for kind in flair, t1, t1ce, t2, seg, trueprob."""
    return subject_dir / f"{subject_id}_{kind}.nii.gz"


def _discover_brats(root: Path) -> Discovery:
    disc = Discovery()
    layout = LAYOUTS["brats18"]
    known = (*BRATS_MODALITIES, BRATS_LABEL, BRATS_TRUE_PROB)
    groups = [g for g in BRATS_GROUPS if (root / g).is_dir()]
    if groups:
        candidates = [(g, d) for g in groups for d in _visible_dirs(root / g)]
    else:  # flat layout: the subject folders sit directly under the root
        candidates = [("", d) for d in _visible_dirs(root)]
    seen: dict[str, Path] = {}
    for group, subject_dir in candidates:
        sid = subject_dir.name
        niftis = sorted(p for p in subject_dir.iterdir() if p.is_file() and is_nifti(p))
        if not niftis:
            continue  # not a subject folder (e.g. a stray folder without images)
        if sid in seen:
            disc.problems.append(
                Problem(sid, str(subject_dir), DUPLICATE_SUBJECT, f"subject id also used by {seen[sid]}")
            )
            continue
        seen[sid] = subject_dir
        by_kind: dict[str, Path] = {}
        for path in niftis:
            stem = nifti_stem(path)
            kind = stem[len(sid) + 1 :] if stem.startswith(sid + "_") else None
            if kind not in known:
                disc.problems.append(
                    Problem(
                        sid,
                        str(path),
                        EXTRA_MODALITY,
                        f"not one of the expected files {sid}_{{{','.join(known[:-1])}}}.nii.gz",
                    )
                )
            else:
                _keep_first(by_kind, kind, path, sid, disc.problems, f"{kind} file")
        for kind in _missing_kinds(layout, by_kind):
            disc.problems.append(
                Problem(sid, str(brats_path(subject_dir, sid, kind)), MISSING_MODALITY, f"{kind} file missing")
            )
        disc.all.append(_subject_files(layout, sid, subject_dir, by_kind, BRATS_TRUE_PROB, group=group))
    return disc


# --------------------------------------------------------------------------------------- ISLES
def isles_path(case_dir: Path, kind: str, num: int) -> Path:
    """``<case>/SMIR.Brain.XX.O.<kind>.<num>/SMIR.Brain.XX.O.<kind>.<num>.nii``."""
    name = f"{SMIR_PREFIX}{kind}.{num}"
    return case_dir / name / f"{name}.nii"


def _isles_entry(entry: Path) -> tuple[str | None, Path | None, str | None]:
    """(kind, nifti file, problem message) for one entry of a case folder; kind None = not SMIR."""
    if entry.is_dir():
        match = _SMIR_RE.match(entry.name)
        if not match:
            return None, None, None
        for suffix in (".nii", ".nii.gz"):
            candidate = entry / f"{entry.name}{suffix}"
            if candidate.is_file():
                return match["kind"], candidate, None
        return match["kind"], None, f"folder holds no {entry.name}.nii"
    if entry.is_file() and is_nifti(entry):
        match = _SMIR_RE.match(nifti_stem(entry))
        return (match["kind"] if match else None), entry, None
    return None, None, None


def _discover_isles(root: Path) -> Discovery:
    disc = Discovery()
    layout = LAYOUTS[ISLES18]
    base = root / ISLES_FOLDER if (root / ISLES_FOLDER).is_dir() else root
    known = (*ISLES_CHANNELS, ISLES_LABEL, ISLES_4D, ISLES_TRUE_PROB)
    for case_dir in _visible_dirs(base):
        if not _CASE_RE.match(case_dir.name):
            continue
        sid = case_dir.name
        by_kind: dict[str, Path] = {}
        empty_kinds: set[str] = set()
        for entry in sorted(case_dir.iterdir(), key=lambda p: natural_key(p.name)):
            if entry.name.startswith("."):
                continue
            kind, path, problem = _isles_entry(entry)
            if kind is None:
                if path is not None or (entry.is_dir() and any(is_nifti(p) for p in entry.iterdir())):
                    disc.problems.append(
                        Problem(sid, str(entry), EXTRA_MODALITY, f"not a {SMIR_PREFIX}<kind>.<num> entry")
                    )
                continue
            if kind not in known:
                disc.problems.append(
                    Problem(sid, str(entry), EXTRA_MODALITY, f"unknown kind {kind!r}; known: {', '.join(known)}")
                )
            elif problem is not None:
                empty_kinds.add(kind)
                disc.problems.append(Problem(sid, str(entry), MISSING_MODALITY, problem))
            else:
                _keep_first(by_kind, kind, path, sid, disc.problems, kind)
        for kind in _missing_kinds(layout, by_kind):
            if kind in empty_kinds:
                continue  # already reported as an empty SMIR folder
            disc.problems.append(
                Problem(sid, str(case_dir / f"{SMIR_PREFIX}{kind}.<num>"), MISSING_MODALITY, f"{kind} missing")
            )
        ignored = (by_kind[ISLES_4D],) if ISLES_4D in by_kind else ()
        disc.all.append(_subject_files(layout, sid, case_dir, by_kind, ISLES_TRUE_PROB, ignored=ignored))
    return disc
