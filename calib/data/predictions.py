"""Another network's predictions as a dataset: discover, check and import them into the caches.

A predictions dataset is three folders (the ``kind: predictions`` dataset of a grid)::

    predictions/<case>.nii.gz    probability or logit map, 3-D (X, Y, Z) or 4-D (X, Y, Z, C)
      -- or nnU-Net v2's --save_probabilities output --
    predictions/<case>.npz       ``probabilities`` (C, z, y, x) + <case>.pkl properties (calib.data.nnunet)
    labels/<case>.nii.gz         the reference segmentation, on the prediction's grid
    masks/<case>.nii.gz          optional: where calibration is fitted and scored (default: the
                                 whole volume); inside = value > ``mask_threshold`` (default 0),
                                 so a FLAIR or CT image with its threshold works as well as a 0/1 mask

The foreground probability is binary as in the study: one channel as is; two channels, the
second (class 1); more, the union of the ``foreground`` classes (sum of their probabilities, or
for logits ``logsumexp(z_fg) - logsumexp(z_bg)``), the label's foreground then being the voxels
whose label is one of them (default: label > 0). A probability exactly 0 or 1 becomes the logit
of the nearest value the input's float type tells from it (float16: 2**-11, else 2**-24), since
the calibrators work on logits.

:func:`import_predictions` turns such a dataset into the two caches the logit-based calibrators
read, so Platt, temperature and auxiliary run on it unchanged: ``<out>/<name>-<hash16>/`` with
``meta.json`` and ``<case>.npz`` (``label``, ``mask`` and an ``image`` of zero channels -- the
preprocessed-cache contract, ``calib.data.load_subject``), and ``logits/`` (``calib.data.logit_cache``).
Every case is put in RAS voxel order (nibabel's closest canonical orientation, no resampling:
the calibrators see the network's own grid) and padded at the far ends to the largest case so
that slices batch (padding outside the mask; logits edge-replicated, which is what the auxiliary
conv's replicate padding sees at a volume border anyway). ``meta.json`` keeps each case's source
grid, so a calibrated map can be written back onto it (:class:`VoxelGrid`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from calib import atomic_io
from .cache import cache_dir_for, cache_key, cache_writer, is_complete
from .errors import (
    BAD_DIMENSIONS,
    EMPTY_DATASET,
    EMPTY_MASK,
    LABEL_VALUES,
    MISSING_MODALITY,
    NONFINITE,
    PROB_RANGE,
    UNREADABLE,
    CheckReport,
    DataError,
    Problem,
    error_from_problems,
)
from .layouts import is_nifti, natural_key, nifti_stem
from .logit_cache import write_index, write_subject_logits
from .nifti import VoxelGrid, compare_grids, read_grid, read_volume
from .nnunet import read_nnunet_probabilities

log = logging.getLogger(__name__)

KIND = "predictions"
VALUES = ("probability", "logit")
FORMATS = ("nifti", "nnunet")
FORMAT_VERSION = 1
LOGITS_DIRNAME = "logits"
#: Probabilities may overshoot [0, 1] by float16 rounding (a sum of softmax channels); beyond
#: this it is a problem of the data, not of rounding.
PROB_TOLERANCE = 1e-3


# ---- configuration -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PredictionsConfig:
    """Where a predictions dataset lives and how to read it (module doc); :meth:`make` validates."""

    predictions: Path
    labels: Path
    values: str = "probability"
    masks: Path | None = None
    mask_threshold: float = 0.0
    foreground: tuple[int, ...] | None = None

    @classmethod
    def make(cls, predictions, labels, values: str = "probability", masks=None,
             mask_threshold: float = 0.0, foreground: Sequence[int] | None = None) -> "PredictionsConfig":
        """Validated config; a bad value or a missing folder is a DataError naming it."""
        if values not in VALUES:
            raise DataError(f"values {values!r} unknown; valid choices: {', '.join(VALUES)}")
        for flag, folder in (("predictions", predictions), ("labels", labels), ("masks", masks)):
            if folder is not None and not Path(folder).is_dir():
                raise DataError(f"{flag} folder {folder} is not a directory")
        try:
            mask_threshold = float(mask_threshold)
        except (TypeError, ValueError):
            raise DataError(f"mask_threshold must be a number, got {mask_threshold!r}") from None
        if foreground is not None:
            try:
                foreground = tuple(sorted({int(c) for c in foreground}))
            except (TypeError, ValueError):
                raise DataError(f"foreground must be a list of class labels, got {foreground!r}") from None
            if not foreground or min(foreground) < 1:
                raise DataError(f"foreground must list class labels >= 1 (0 is background), got {list(foreground)}")
        return cls(Path(predictions), Path(labels), values, None if masks is None else Path(masks),
                   mask_threshold, foreground)

    def rule(self) -> dict:
        """What changes an imported case besides its files (keys the cache with their fingerprint)."""
        return {"kind": KIND, "values": self.values, "foreground": list(self.foreground or []),
                "mask": "whole volume" if self.masks is None else f"mask image > {self.mask_threshold:g}",
                "orientation": "RAS (closest canonical, no resampling)",
                "padding": "far ends, to the largest case", "format_version": FORMAT_VERSION}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(predictions=str(self.predictions), labels=str(self.labels),
                 masks=None if self.masks is None else str(self.masks),
                 foreground=None if self.foreground is None else list(self.foreground))
        return d


# ---- discovery -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaseFiles:
    """The files of one case; a file the case lacks is None (then it is not ``complete``)."""

    case_id: str
    fmt: str  # "nifti" | "nnunet"
    prediction: Path | None
    label: Path | None
    mask: Path | None = None
    properties: Path | None = None  # nnU-Net's <case>.pkl
    needs_mask: bool = False

    @property
    def complete(self) -> bool:
        return (self.prediction is not None and self.label is not None
                and (self.fmt != "nnunet" or self.properties is not None)
                and (not self.needs_mask or self.mask is not None))

    def loaded_files(self) -> list[Path]:
        return [p for p in (self.prediction, self.properties, self.label, self.mask) if p is not None]


def _niftis(folder: Path) -> dict[str, Path]:
    """``{case: path}`` of the NIfTI files of a folder (hidden files skipped)."""
    return {nifti_stem(p): p for p in sorted(folder.iterdir())
            if p.is_file() and is_nifti(p) and not p.name.startswith(".")}


def prediction_format(folder: Path) -> str:
    """``"nnunet"`` when the folder holds ``.npz`` files (nnU-Net also writes its argmax
    segmentation ``<case>.nii.gz`` beside each, which is then not a prediction), else ``"nifti"``."""
    return "nnunet" if any(p.suffix == ".npz" for p in Path(folder).iterdir() if p.is_file()) else "nifti"


def discover_predictions(config: PredictionsConfig) -> tuple[list[CaseFiles], list[Problem]]:
    """Every case found in the predictions or labels folder, and the missing files.

    A case is a prediction file (``<case>.nii[.gz]``, or ``<case>.npz`` + ``<case>.pkl``) and a
    label of the same name; a prediction without its label, a label without its prediction, an
    ``.npz`` without its ``.pkl`` and (with a masks folder) a case without a mask are each a
    ``missing_modality`` problem. Listings only; no file is read.
    """
    fmt = prediction_format(config.predictions)
    if fmt == "nnunet":
        preds = {p.stem: p for p in sorted(config.predictions.glob("*.npz")) if not p.name.startswith(".")}
    else:
        preds = _niftis(config.predictions)
    labels = _niftis(config.labels)
    masks = _niftis(config.masks) if config.masks is not None else {}
    problems: list[Problem] = []
    cases: list[CaseFiles] = []
    for cid in sorted(set(preds) | set(labels), key=natural_key):
        pred, label = preds.get(cid), labels.get(cid)
        pkl = None
        if pred is None:
            want = config.predictions / (f"{cid}.npz" if fmt == "nnunet" else f"{cid}.nii.gz")
            problems.append(Problem(cid, str(want), MISSING_MODALITY, "prediction missing (the label has no prediction)"))
        elif fmt == "nnunet":
            pkl = pred.with_suffix(".pkl")
            if not pkl.is_file():
                problems.append(Problem(cid, str(pkl), MISSING_MODALITY,
                                        "nnU-Net properties missing (written beside <case>.npz by --save_probabilities)"))
                pkl = None
        if label is None:
            problems.append(Problem(cid, str(config.labels / f"{cid}.nii.gz"), MISSING_MODALITY, "label missing"))
        mask = masks.get(cid)
        if config.masks is not None and mask is None:
            problems.append(Problem(cid, str(config.masks / f"{cid}.nii.gz"), MISSING_MODALITY, "mask missing"))
        cases.append(CaseFiles(cid, fmt, pred, label, mask, pkl, needs_mask=config.masks is not None))
    if not cases:
        problems.insert(0, Problem("", str(config.predictions), EMPTY_DATASET,
                                   "no prediction found; expected <case>.nii.gz maps or nnU-Net's <case>.npz + <case>.pkl"))
    return cases, problems


# ---- reading one case ----------------------------------------------------------------------------

def _channels_first(data: np.ndarray, path: Path, case: str, problems: list[Problem]) -> np.ndarray | None:
    """A NIfTI prediction as (C, X, Y, Z): 3-D is one channel, 4-D (X, Y, Z, C) and the NIfTI
    vector form (X, Y, Z, 1, C) have their channels last."""
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    if data.ndim == 3:
        return data[None]
    if data.ndim == 4:
        return np.moveaxis(data, 3, 0)
    problems.append(Problem(case, str(path), BAD_DIMENSIONS,
                            f"expected a 3-D map or 4-D (X, Y, Z, classes), got shape {data.shape}"))
    return None


def _logit_eps(dtype: np.dtype) -> float:
    """Distance from 0 and 1 at which a probability of this float type is clipped (module doc)."""
    return float(np.finfo(np.float16).epsneg) if dtype == np.float16 else float(np.finfo(np.float32).epsneg)


def foreground_logit(channels: np.ndarray, values: str, foreground: Sequence[int] | None,
                     where: str, case: str, problems: list[Problem]) -> np.ndarray | None:
    """The foreground logit (X, Y, Z) float32 from a prediction's channels (C, X, Y, Z).

    Appends a problem (and returns None) for NaN/inf, probabilities outside [0, 1] (beyond
    :data:`PROB_TOLERANCE`), or a channel count the ``foreground`` rule cannot serve.
    """
    n_bad = int(channels.size - np.count_nonzero(np.isfinite(channels))) if channels.dtype.kind == "f" else 0
    if n_bad:
        problems.append(Problem(case, where, NONFINITE, f"{n_bad} NaN/inf voxel(s)"))
        return None
    n = channels.shape[0]
    if foreground is None:
        if n > 2:
            problems.append(Problem(case, where, BAD_DIMENSIONS,
                                    f"{n} classes: say which are foreground (foreground: [labels...])"))
            return None
        fg = [n - 1]
    else:
        fg = list(foreground) if n > 1 else [0]
        if n > 1 and max(fg) >= n:
            problems.append(Problem(case, where, BAD_DIMENSIONS,
                                    f"foreground class {max(fg)} but the prediction has {n} channels (0..{n - 1})"))
            return None
    if values == "probability":
        lo, hi = float(channels.min()), float(channels.max())
        if lo < -PROB_TOLERANCE or hi > 1 + PROB_TOLERANCE:
            problems.append(Problem(case, where, PROB_RANGE, f"values span [{lo:g}, {hi:g}], not in [0, 1]"
                                    " (are these logits? set values: logit)"))
            return None
        p = channels[fg].astype(np.float64).sum(axis=0)
        eps = _logit_eps(channels.dtype)
        p = np.clip(p, eps, 1.0 - eps)
        return (np.log(p) - np.log1p(-p)).astype(np.float32)
    z = channels.astype(np.float64)
    if n == 1:
        return z[0].astype(np.float32)
    from scipy.special import logsumexp

    bg = [c for c in range(n) if c not in fg]
    return (logsumexp(z[fg], axis=0) - logsumexp(z[bg], axis=0)).astype(np.float32)


def read_prediction(files: CaseFiles, values: str, foreground: Sequence[int] | None,
                    problems: list[Problem]) -> tuple[np.ndarray, VoxelGrid] | None:
    """(foreground logit on the prediction's own grid, that grid); None with problems appended."""
    case, path = files.case_id, files.prediction
    if files.fmt == "nnunet":
        if values != "probability":
            problems.append(Problem(case, str(path), PROB_RANGE,
                                    "nnU-Net's .npz holds probabilities: set values: probability"))
            return None
        try:
            channels, affine = read_nnunet_probabilities(path, files.properties)
        except DataError as exc:  # its problem names the file (the .npz or the .pkl) once
            problems.extend(Problem(case, p.path, p.kind, p.message) for p in exc.problems)
            if not exc.problems:
                problems.append(Problem(case, str(path), UNREADABLE, str(exc)))
            return None
        grid = VoxelGrid(tuple(int(s) for s in channels.shape[1:]), affine)
    else:
        volume = read_volume(path, case, problems)
        if volume is None:
            return None
        grid = volume.grid
        channels = _channels_first(volume.data, path, case, problems)
        if channels is None:
            return None
    logit = foreground_logit(channels, values, foreground, str(path), case, problems)
    return None if logit is None else (logit, grid)


@dataclass
class PredictionCase:
    """One case in RAS voxel order: ``logits`` float32, ``label`` uint8 {0, 1}, ``mask`` bool, all
    (X, Y, Z); ``grid`` the prediction's source grid (:meth:`VoxelGrid.from_ras` undoes the order)."""

    case_id: str
    logits: np.ndarray
    label: np.ndarray
    mask: np.ndarray
    grid: VoxelGrid


def _label_foreground(data: np.ndarray, foreground, case: str, path: Path, problems: list[Problem]):
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            problems.append(Problem(case, str(path), NONFINITE, f"{int(data.size - finite.sum())} NaN/inf voxel(s)"))
            return None
    values = np.unique(data)
    bad = [v for v in values.tolist() if v < 0 or v != int(v)]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:8])
        problems.append(Problem(case, str(path), LABEL_VALUES, f"label values {{{shown}}} are not class labels (integers >= 0)"))
        return None
    return (np.isin(data, foreground) if foreground else data > 0).astype(np.uint8)


def load_case(files: CaseFiles, config: PredictionsConfig) -> tuple[PredictionCase | None, list[Problem]]:
    """Read and check one case (module doc); ``(case, [])`` or ``(None, problems)``."""
    problems: list[Problem] = []
    cid = files.case_id
    if not files.complete:
        return None, problems  # its missing files are discovery problems
    pred = read_prediction(files, config.values, config.foreground, problems)
    label = read_volume(files.label, cid, problems, ndims=(3,))
    mask = read_volume(files.mask, cid, problems, ndims=(3,)) if files.mask is not None else None
    if pred is None or label is None or (files.mask is not None and mask is None):
        return None, problems
    logit, grid = pred
    # any axis order: the prediction and its label need only cover the same voxels in space
    if not compare_grids(label.grid, files.label, grid, files.prediction, cid, problems, any_axis_order=True):
        return None, problems
    fg = _label_foreground(label.data, config.foreground, cid, files.label, problems)
    if mask is not None:
        if not compare_grids(label.grid, files.label, mask.grid, files.mask, cid, problems, any_axis_order=True):
            return None, problems
        inside = mask.grid.to_ras(np.asarray(mask.data) > config.mask_threshold)
    else:
        inside = np.ones(grid.ras_shape, dtype=bool)
    if fg is None:
        return None, problems
    if not inside.any():
        problems.append(Problem(cid, str(files.mask), EMPTY_MASK, f"no voxel > {config.mask_threshold:g}"))
        return None, problems
    case = PredictionCase(cid, np.ascontiguousarray(grid.to_ras(logit)),
                          np.ascontiguousarray(label.grid.to_ras(fg)), np.ascontiguousarray(inside), grid)
    return case, problems


def check_predictions(config: PredictionsConfig) -> CheckReport:
    """Every problem of a predictions dataset (missing case, grid mismatch with its label,
    probabilities outside [0, 1], NaN, unreadable files), each naming its file."""
    cases, problems = discover_predictions(config)
    report = CheckReport(dataset=KIND, root=str(config.predictions), subjects=[c.case_id for c in cases],
                         problems=list(problems))
    for files in cases:
        report.problems.extend(load_case(files, config)[1])
    return report


# ---- import into the caches ----------------------------------------------------------------------

def logits_dir(cache_dir: Path) -> Path:
    """The logit cache (calib.logits) inside an imported predictions cache folder."""
    return Path(cache_dir) / LOGITS_DIRNAME


def _fingerprint(config: PredictionsConfig, cases: list[CaseFiles]) -> list[list]:
    rows = []
    for case in cases:
        for path in case.loaded_files():
            st = path.stat()
            rows.append([path.parent.name + "/" + path.name, st.st_size, st.st_mtime_ns])
    return rows


def _header_ras_shape(path: Path) -> tuple[int, int, int]:
    return read_grid(path)[0].ras_shape


def _pad_to(array: np.ndarray, shape: Sequence[int], mode: str) -> np.ndarray:
    pad = [(0, int(t) - int(s)) for s, t in zip(array.shape, shape)]
    return np.pad(array, pad, mode=mode) if any(p[1] for p in pad) else array


def is_imported(cache_dir: Path, key: str | None = None) -> bool:
    """True when ``cache_dir`` is a complete imported predictions cache (with hash ``key``)."""
    return is_complete(cache_dir, key) and (logits_dir(cache_dir) / "index.json").is_file()


def import_predictions(config: PredictionsConfig, out: Path, name: str) -> Path:
    """Import every case into ``<out>/<name>-<hash16>/`` (module doc) and return that folder.

    The hash covers :meth:`PredictionsConfig.rule` and the files' identity (name, size, mtime):
    a repeat call finds the folder complete and does nothing; a changed file gets a new folder.
    Any problem :func:`check_predictions` would report raises one DataError listing them and
    leaves nothing in ``out`` (the folder appears in one rename once complete).
    """
    cases, problems = discover_predictions(config)
    if problems:
        raise error_from_problems(problems, f"predictions {config.predictions}")
    key = cache_key(config.rule(), _fingerprint(config, cases))
    target = cache_dir_for(Path(out), name, key)
    if is_imported(target, key):
        log.info("cache hit: %s already holds %d imported cases; nothing to do", target, len(cases))
        return target
    # One shape for every case (slice batches need it): the largest RAS extent per axis.
    shape = tuple(int(s) for s in np.max([_header_ras_shape(c.label) for c in cases], axis=0))
    with cache_writer(target, key, complete=is_imported) as tmp:
        infos, errors = {}, []
        for files in cases:
            case, found = load_case(files, config)
            if case is None:
                errors.extend(found)
                continue
            label = _pad_to(case.label, shape, "constant")
            mask = _pad_to(case.mask, shape, "constant")
            logits = _pad_to(case.logits, shape, "edge")
            atomic_io.save_npz(tmp / f"{case.case_id}.npz", image=np.zeros((0, *shape), np.float32),
                               label=label, mask=mask)
            write_subject_logits(logits_dir(tmp), case.case_id, logits, label, mask)
            infos[case.case_id] = {
                "prediction": str(files.prediction), "label": str(files.label),
                "mask": None if files.mask is None else str(files.mask), "format": files.fmt,
                "source_grid": case.grid.to_dict(), "ras_shape": list(case.grid.ras_shape),
                "ras_affine": case.grid.ras_affine.tolist(),
                "label_voxels": int(case.label[case.mask].sum()), "mask_voxels": int(case.mask.sum()),
            }
        if errors:
            raise error_from_problems(errors, f"predictions {config.predictions}")
        ids = [c.case_id for c in cases]
        write_index(logits_dir(tmp), ids, shape, {"predictions_hash": key})
        atomic_io.write_json(tmp / "meta.json", {
            "config": config.rule(), "hash": key, "channels": [], "subjects": ids, "shape": list(shape),
            "kind": KIND, "source": config.to_dict(), "subject_info": infos, "has_true_prob": False,
        })
    log.info("imported %d cases of %s into %s", len(cases), config.predictions, target)
    return target
