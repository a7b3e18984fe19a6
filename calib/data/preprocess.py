"""Preprocess a dataset root into the cache: MONAI transforms, checked inputs, parallel, atomic.

Per subject (``transforms.build_pipeline``), with MONAI dictionary transforms:

1. LoadImaged (nibabel) — the modalities stacked as channels (layout order), the label, and
   the true-probability map when the subject has one; channel first.
2. HeadMaskd — brain mask = FLAIR > 0 (BraTS, skull-stripped) or head region = CT > -23 HU
   (ISLES; the threshold of the paper's public code), computed on the source grid.
3. Orientationd to RAS (nibabel convention: +x towards the patient's Right).
4. ExtentSpacingd to ``spacing`` mm isotropic (MONAI SpatialResample): images bilinear, label,
   mask and true_prob nearest (so that the cached p* is the probability of the cached label voxel
   by voxel; ``transforms`` says why), on a grid spanning the voxels' full extent so that lesion
   volumes survive (see ``transforms.extent_grid``). ISLES slabs have 4-8 mm slices; resampling
   along z to 2 mm is what the paper did.
5. AsDiscreted: whole tumour / lesion = label > 0.
6. Normalisation (``normalisation``): ``subject`` (default) — MaskedNormalized, a z-score per
   channel with mean and std taken inside the mask, 0 outside; ``fixed`` — FixedNormalized, the
   paper's public code: one dataset-wide shift and scale per modality (:data:`FIXED_NORMALISATION`),
   ``(x - shift) / scale`` everywhere in the grid.
7. ResizeWithPadOrCropd — centre crop / zero pad to ``shape``.

Each subject is first checked with ``check.check_subject`` (the 4D ISLES series, never loaded, is
skipped); any problem aborts the run with a DataError naming the file, and nothing is written to
the cache. See ``cache`` for the key and the folder layout.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from tqdm import tqdm

from calib import atomic_io
from .cache import cache_dir_for, cache_key, cache_writer, is_complete, source_fingerprint, write_subject
from .check import check_subject
from .errors import EMPTY_MASK, DataError, Problem, error_from_problems
from .layouts import SubjectFiles, discover, get_layout
from .nifti import open_image
from ..vocabulary import NORMALISATIONS

log = logging.getLogger(__name__)

# 2: subjects are written uncompressed so that training memory-maps them (cache.write_subject);
# the version is part of the cache key, so a format-1 (compressed) folder is never taken for one.
FORMAT_VERSION = 2
# Head region of an ISLES CT: the public code of the paper thresholds the CT at -23 HU.
ISLES_HEAD_THRESHOLD_HU = -23.0
DEFAULT_SPACING = 2.0
DEFAULT_SHAPE = (136, 136, 82)
# A phantom's p* is resampled as its label (``transforms`` says why); in a phantom cache's key.
TRUE_PROB_INTERP = "nearest"
_NORMALISATION_TEXT = {"subject": "zscore per channel inside mask, 0 outside",
                       "fixed": "fixed shift/scale per modality (public code)"}
#: ``(shift, scale)`` per modality of the paper's public code (AxelJanRousseau/
#: PostTrainCalibration, my_utils/my_dataloader.py: BratsDataset / Isles18Dataset), dataset-wide
#: statistics of the 2 mm volumes of the training data; facts of that code, not fitted here.
FIXED_NORMALISATION = {
    "brats18": {"flair": (420.884688397679, 1320.6450427506038),
                "t1": (568.7868683246469, 1160.6822019612432),
                "t1ce": (639.4882077323609, 1181.144425870453),
                "t2": (629.919352934067, 1363.6117673325714)},
    "isles18": {"CT": (145.4089064728558, 186.9740130523932),
                "CT_Tmax": (2.8753392425245097, 4.634348718250107),
                "CT_MTT": (5.538641988928408, 5.2019667021425295),
                "CT_CBF": (179.03296070754575, 293.8784533196274),
                "CT_CBV": (25.937894045251678, 42.502019634374086)},
}


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that changes a preprocessed subject; its JSON form keys the cache."""

    dataset: str
    spacing: float = DEFAULT_SPACING
    shape: tuple[int, int, int] = DEFAULT_SHAPE
    orientation: str = "RAS"
    mask_channel: str = ""
    mask_threshold: float = 0.0
    image_interp: str = "bilinear"
    label_interp: str = "nearest"
    grid: str = "full voxel extent, centred"
    normalization: str = "zscore per channel inside mask, 0 outside"
    label_rule: str = "label > 0"
    format_version: int = FORMAT_VERSION

    @classmethod
    def make(cls, dataset: str, spacing: float = DEFAULT_SPACING, shape: Sequence[int] = DEFAULT_SHAPE,
             normalisation: str = "subject"):
        """Validated config with the dataset's mask rule; bad values raise DataError."""
        layout = get_layout(dataset)
        if normalisation not in NORMALISATIONS:
            raise DataError(f"unknown normalisation {normalisation!r}; valid choices: "
                            f"{', '.join(NORMALISATIONS)}")
        if normalisation == "fixed" and dataset not in FIXED_NORMALISATION:
            raise DataError(f"normalisation 'fixed' has no statistics for dataset {dataset!r}; "
                            f"it has: {', '.join(FIXED_NORMALISATION)}")
        try:
            spacing = float(spacing)
        except (TypeError, ValueError):
            raise DataError(f"spacing must be a positive number of mm, got {spacing!r}") from None
        if not (np.isfinite(spacing) and spacing > 0):
            raise DataError(f"spacing must be a positive number of mm, got {spacing!r}")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or any(s < 1 for s in shape):
            raise DataError(f"shape must be three positive voxel counts X Y Z, got {shape}")
        threshold = 0.0 if dataset == "brats18" else ISLES_HEAD_THRESHOLD_HU
        # the default keeps its old text, so that caches written before the option still hit
        return cls(dataset, spacing, shape, mask_channel=layout.channels[0], mask_threshold=threshold,
                   normalization=_NORMALISATION_TEXT[normalisation])

    @property
    def normalisation(self) -> str:
        """``"subject"`` or ``"fixed"`` (see the module doc)."""
        return next(k for k, v in _NORMALISATION_TEXT.items() if v == self.normalization)

    def fixed_statistics(self) -> tuple[list[float], list[float]] | None:
        """Shifts and scales per channel (layout order) for ``fixed``; None for ``subject``."""
        if self.normalisation != "fixed":
            return None
        table = FIXED_NORMALISATION[self.dataset]
        channels = get_layout(self.dataset).channels
        return [table[c][0] for c in channels], [table[c][1] for c in channels]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def process_subject(files: SubjectFiles, config: PreprocessConfig, out_dir: Path) -> dict:
    """Check, transform and write ``<out_dir>/<subject_id>.npz`` for one subject; return its info.

    Raises DataError (naming the subject and file) when the subject's files have problems or the
    mask is empty.
    """
    sid = files.subject_id
    problems = check_subject(files, config.dataset, include_ignored=False)
    if problems:
        raise error_from_problems(problems, f"subject {sid}")
    with_prob = files.true_prob is not None
    item = {"image": [str(p) for p in files.images], "label": str(files.label)}
    if with_prob:
        item["true_prob"] = str(files.true_prob)
    from .transforms import build_pipeline  # torch + MONAI: imported only when there is work

    pipeline = build_pipeline(config.spacing, config.shape, config.mask_threshold, with_prob,
                              config.orientation, fixed=config.fixed_statistics())
    try:
        d = pipeline(item)
    except Exception as exc:  # MONAI wraps errors; name the subject so the culprit is clear
        raise DataError(f"subject {sid}: preprocessing failed: {exc}") from exc
    mask = np.asarray(d["mask"][0]) > 0.5
    if not mask.any():
        problem = Problem(sid, str(files.images[0]), EMPTY_MASK,
                          f"no voxel of {config.mask_channel} > {config.mask_threshold:g} in the output grid")
        raise error_from_problems([problem], f"subject {sid}")
    arrays = {
        "image": np.ascontiguousarray(np.asarray(d["image"], dtype=np.float32)),
        "label": (np.asarray(d["label"][0]) > 0.5).astype(np.uint8),
        "mask": mask,
    }
    if with_prob:
        arrays["true_prob"] = np.clip(np.asarray(d["true_prob"][0], dtype=np.float32), 0.0, 1.0)
    write_subject(out_dir / f"{sid}.npz", **arrays)

    problems: list[Problem] = []  # the label passed check_subject: this read is for provenance
    src = open_image(files.label, sid, problems)
    if src is None:
        raise error_from_problems(problems, f"subject {sid}")
    lesion_src_mm3 = float(np.count_nonzero(np.asanyarray(src.dataobj)) * np.prod(src.header.get_zooms()[:3]))
    lesion_mm3 = float(arrays["label"].sum()) * config.spacing**3
    return {
        "group": files.group,
        "source_dir": str(files.directory),
        "source_shape": [int(s) for s in src.shape[:3]],
        "source_spacing": [float(z) for z in src.header.get_zooms()[:3]],
        "source_axcodes": "".join(nib.aff2axcodes(src.affine)),
        "affine": np.asarray(d["label"].affine, dtype=float).tolist(),
        "label_voxels": int(arrays["label"].sum()),
        "mask_voxels": int(mask.sum()),
        "lesion_mm3_source": lesion_src_mm3,
        "lesion_mm3": lesion_mm3,
        "has_true_prob": with_prob,
    }


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # parallelism comes from the processes


def _run_serial(subjects, config, tmp, bar) -> dict[str, dict]:
    infos: dict[str, dict] = {}
    for files in subjects:
        infos[files.subject_id] = process_subject(files, config, tmp)  # first error aborts
        bar.update()
    return infos


def _run_pool(subjects, config, tmp, bar, workers) -> dict[str, dict]:
    """Subjects in ``workers`` processes; on the first failure the rest are cancelled and one
    DataError lists the problems of every subject that failed."""
    infos: dict[str, dict] = {}
    errors: list[DataError] = []
    # Not plain fork: forking a process that has used torch's OpenMP pool can hang the child.
    # A forkserver is a fresh process that imports torch and MONAI once and then
    # forks each worker cheaply; it is reused by later pools of this process.
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "calib.data.transforms"])
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        futures = {pool.submit(process_subject, s, config, tmp): s.subject_id for s in subjects}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                exc = future.exception()
                if exc is None:
                    infos[futures[future]] = future.result()
                    bar.update()
                else:
                    errors.append(exc if isinstance(exc, DataError) else
                                  DataError(f"subject {futures[future]}: preprocessing failed: {exc}"))
            if errors:
                for future in pending:
                    future.cancel()
                wait(pending)  # let running subjects finish before their folder is removed
                break
    if errors:
        problems = [p for e in errors for p in e.problems]
        raise error_from_problems(problems, "preprocessing") if problems else errors[0]
    return infos


def preprocess_dataset(
    dataset: str,
    root: Path,
    out: Path,
    spacing: float = DEFAULT_SPACING,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    workers: int | None = None,
    progress: bool = True,
    normalisation: str = "subject",
) -> Path:
    """Preprocess every subject under ``root`` into ``<out>/<dataset>-<key16>/`` and return it.

    The folder holds ``<subject_id>.npz`` (``image`` float32 (C,X,Y,Z) RAS, ``label`` uint8,
    ``mask`` bool, and ``true_prob`` float32 for phantoms) and ``meta.json`` (``config``,
    ``hash``, ``channels``, ``subjects``, ``subject_info``). When that folder already exists
    complete, nothing is done (a cache hit, logged). ``workers``: processes (None: one per CPU,
    at most 8 and the number of subjects; 1: in this process). Any bad input raises DataError
    and leaves nothing in ``out``.
    """
    config = PreprocessConfig.make(dataset, spacing, shape, normalisation)
    if workers is not None and workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    root, out = Path(root), Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"cache output {out} exists and is not a folder")
    disc = discover(dataset, root)
    if disc.problems:
        raise error_from_problems(disc.problems, f"dataset {root}")
    subjects = disc.subjects
    keyed = config.to_dict()
    if any(s.true_prob is not None for s in subjects):
        # Phantom caches only (real data have no p*, their keys stay as they were): caches of
        # the bilinear p* (before this entry) are never taken for nearest ones.
        keyed["true_prob_interp"] = TRUE_PROB_INTERP
    key = cache_key(keyed, source_fingerprint(root, subjects))
    target = cache_dir_for(out, dataset, key)
    if is_complete(target, key):
        log.info("cache hit: %s already holds %d preprocessed subjects; nothing to do", target, len(subjects))
        return target

    with cache_writer(target, key) as tmp:
        n_workers = min(workers or min(os.cpu_count() or 1, 8), len(subjects))
        with tqdm(total=len(subjects), desc=f"preprocess {dataset}", unit="subject",
                  disable=not progress) as bar:
            if n_workers <= 1:
                infos = _run_serial(subjects, config, tmp, bar)
            else:
                infos = _run_pool(subjects, config, tmp, bar, n_workers)
        meta = {
            "config": keyed,
            "hash": key,
            "channels": list(get_layout(dataset).channels),
            "subjects": [s.subject_id for s in subjects],
            "subject_info": {s.subject_id: infos[s.subject_id] for s in subjects},
            "source_root": str(root.resolve()),
            "has_true_prob": all(s.true_prob is not None for s in subjects),
        }
        atomic_io.write_json(tmp / "meta.json", meta)
    log.info("preprocessed %d subjects into %s", len(subjects), target)
    return target
