"""Phantom datasets in the exact on-disk layout of BraTS 2018 and ISLES 2018.

The loaders under test are the real ones: a phantom root is read exactly like a real one. Beside
each label lies the per-voxel probability the label was drawn from (a file the real datasets do not
have; see ``layouts``), so that later stages can measure true calibration error.

BraTS-like subjects: skull-stripped brain (background exactly 0, so FLAIR > 0 is the brain),
FLAIR/T1/T1ce/T2 with modality-specific contrast of grey matter, white matter, ventricles and
tumour (oedema bright on FLAIR/T2, enhancing ring on T1ce, necrotic core dark on T1/T1ce), seg
labels {0, 1, 2, 4} (whole tumour = label > 0). 1 mm isotropic, int16 images, stored in the
orientation of the real BraTS files: affine diag(-1, -1, 1) with origin (0, Y-1, 0), i.e. LPS
(array axis 0 runs towards the patient's Left, axis 1 towards Posterior), as the released files
(240x240x155, origin (0, 239, 0)) are.

ISLES-like subjects: a CT slab of 2..``shape[2]`` thick slices (4-8 mm) with ~0.8-1 mm in-plane
pixels, air at about -1000 HU, skull, scalp and brain (the head region is CT > -23 HU, the public
code's threshold), a subtle hypodense infarct; CBF/CBV/MTT/Tmax maps (0 outside the brain) with a
hypoperfused region larger than the infarct core, a short 4D perfusion series, and the OT label.
Stored LPS as ITK writes axial scans. Lower contrast, more noise and broader label uncertainty
(softer p*, at most 0.9 inside) than the BraTS-like phantoms, as ISLES is harder in the paper.

Default grids are small so that a dozen subjects take seconds: BraTS 96x96x64 (use ``shape``
240 240 155 for the real size), ISLES 96x96 in-plane with up to 22 slices (real: 256x256). The
head scales with the field of view. Each subject has its own random stream seeded by
(seed, dataset, index), so subject k is the same whatever ``n_subjects`` is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import DataError
from .layouts import (
    BRATS_LABEL,
    BRATS_MODALITIES,
    BRATS_TRUE_PROB,
    ISLES_4D,
    ISLES_CHANNELS,
    ISLES_FOLDER,
    ISLES_LABEL,
    ISLES_TRUE_PROB,
    SUPPORTED_DATASETS,
    brats_path,
    get_layout,
    isles_path,
)
from .synth import Head, SmoothField, combine, grid_affine, place_lesion, sigmoid, world_coords

log = logging.getLogger(__name__)

# A hidden file at the dataset root records how the phantoms were made, so that the same command
# run again is a no-op (e.g. `make demo` twice). Loaders and `check` never look at it.
RECIPE_NAME = ".calib-phantom.json"
PHANTOM_VERSION = 1  # bump when the generator changes what a seed produces
DEFAULT_SHAPES = {"brats18": (96, 96, 64), "isles18": (96, 96, 22)}
DEFAULT_AXCODES = {"brats18": "LPS", "isles18": "LPS"}
ISLES_FRAMES = 8  # time points of the phantom 4D perfusion series (real ones have ~40)


@dataclass
class PhantomSubject:
    """One synthesized subject: arrays in stored order, all on one grid (``affine``)."""

    subject_id: str
    affine: np.ndarray
    images: dict[str, np.ndarray]  # kind -> array, layout channel order
    label: np.ndarray
    true_prob: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. the ISLES 4D series
    group: str = ""
    zooms_extra: tuple[float, ...] = ()  # pixdim beyond the spatial ones for ``extra`` (time step)


def _save(array: np.ndarray, affine: np.ndarray, path: Path, time_step: float | None = None) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if time_step is not None:
        zooms = list(img.header.get_zooms())
        zooms[3] = time_step
        img.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    return rng.normal(0.0, sigma, size=shape).astype(np.float32)


# ------------------------------------------------------------------------------------ BraTS-like
# Tissue means per modality (arbitrary MR units): csf, gm, wm, and the tumour compartments.
_BRATS_TISSUE = {
    "flair": {"csf": 90, "gm": 380, "wm": 300, "edema": 720, "ring": 640, "core": 520},
    "t1": {"csf": 160, "gm": 430, "wm": 610, "edema": 420, "ring": 470, "core": 240},
    "t1ce": {"csf": 170, "gm": 450, "wm": 630, "edema": 450, "ring": 1150, "core": 250},
    "t2": {"csf": 950, "gm": 390, "wm": 260, "edema": 820, "ring": 700, "core": 980},
}
_BRATS_NOISE = 18.0


def synth_brats(
    rng: np.random.Generator, subject_id: str, shape: tuple[int, int, int], axcodes: str, hemisphere: str | None
) -> PhantomSubject:
    """One BraTS-like subject at 1 mm on a grid of ``shape`` voxels along world x, y, z."""
    extent = np.array(shape, dtype=float)
    # Grid centre of the real files: voxel (X-1)/2, (Y-1)/2, (Z-1)/2 under diag(-1,-1,1), (0,Y-1,0).
    centre = np.array([-(extent[0] - 1) / 2, (extent[1] - 1) / 2, (extent[2] - 1) / 2])
    affine, stored = grid_affine(axcodes, np.ones(3), shape, centre)
    xyz = world_coords(affine, stored)
    head = Head(
        centre=centre + rng.uniform(-0.03, 0.03, 3) * extent,
        radii=np.array([0.29, 0.35, 0.36]) * extent * rng.uniform(0.92, 1.04, 3),
        surface=SmoothField(rng, (30.0, 80.0)),
    )
    t = head.tissues(xyz)
    group = "HGG" if rng.random() < 0.75 else "LGG"
    lesion = place_lesion(rng, head, (0.3, 0.5), hemisphere)
    p_true = lesion.probability(xyz, edge_mm=1.0, p_max=0.98) * t["brain"]
    d = lesion.distance(xyz)
    whole = rng.random(p_true.shape, dtype=np.float32) < p_true
    # Compartments by depth inside the tumour: necrotic core, enhancing ring (HGG only), oedema.
    core_w = sigmoid(((0.35 if group == "HGG" else 0.5) - d) / 0.04)
    ring_w = (sigmoid((0.6 - d) / 0.04) - core_w) if group == "HGG" else np.zeros_like(d)
    edema_w = 1.0 - core_w - ring_w
    seg = np.zeros(p_true.shape, dtype=np.uint8)
    seg[whole] = 2
    seg[whole & (ring_w > 0.5)] = 4
    seg[whole & (core_w > 0.5)] = 1
    bias = np.exp(0.08 * SmoothField(rng, (120.0, 300.0))(xyz))
    images = {}
    for modality in BRATS_MODALITIES:
        mean = _BRATS_TISSUE[modality]
        tissue = t["csf"] * mean["csf"] + t["gm"] * mean["gm"] + t["wm"] * mean["wm"]
        tumour = core_w * mean["core"] + ring_w * mean["ring"] + edema_w * mean["edema"]
        texture = 1.0 + 0.04 * SmoothField(rng, (4.0, 12.0))(xyz)  # tissue heterogeneity
        signal = ((1.0 - p_true) * tissue + p_true * tumour) * texture * bias
        signal = signal + _noise(rng, signal.shape, _BRATS_NOISE)
        # Skull-stripped like the real data: exactly 0 outside the brain, >= 1 inside.
        images[modality] = np.where(t["brain"] > 0, np.clip(np.rint(signal), 1, 32000), 0).astype(np.int16)
    return PhantomSubject(subject_id, affine, images, seg, p_true.astype(np.float32), group=group)


# ------------------------------------------------------------------------------------ ISLES-like
def synth_isles(
    rng: np.random.Generator, subject_id: str, shape: tuple[int, int, int], axcodes: str, hemisphere: str | None
) -> PhantomSubject:
    """One ISLES-like subject: ``shape`` = in-plane size x, y and the maximum slice count."""
    nx, ny, max_slices = shape
    pixel = rng.uniform(0.8, 1.0)
    fov = np.array([nx, ny]) * pixel
    radii = np.array([0.30 * fov[0], 0.36 * fov[1], 0.30 * fov[0]]) * rng.uniform(0.92, 1.04, 3)
    head = Head(
        centre=np.array([*(rng.uniform(-0.02, 0.02, 2) * fov), 0.0]),
        radii=radii,
        surface=SmoothField(rng, (30.0, 80.0)),
    )
    thickness = rng.uniform(4.0, 8.0)
    n_max = max(2, min(max_slices, int(1.6 * radii[2] / thickness)))
    n_slices = int(rng.integers(2, n_max + 1))
    slab_z = head.centre[2] + rng.uniform(-0.25, 0.25) * radii[2]
    affine, stored = grid_affine(
        axcodes, np.array([pixel, pixel, thickness]), (nx, ny, n_slices), np.array([0.0, 0.0, slab_z])
    )
    xyz = world_coords(affine, stored)
    t = head.tissues(xyz)
    half = 0.35 * n_slices * thickness
    lesions = [
        place_lesion(rng, head, (0.15, 0.35), hemisphere, z_range=(slab_z - half, slab_z + half),
                     min_radius_mm=0.6 * thickness)
        for _ in range(int(rng.integers(1, 3)))
    ]
    brain = t["brain"]
    p_true = combine([les.probability(xyz, edge_mm=2.0, p_max=0.9) for les in lesions]) * brain
    # Hypoperfusion (Tmax, MTT, CBF) reaches beyond the infarct core, as in acute stroke.
    p_wide = combine([les.probability(xyz, edge_mm=3.0, p_max=1.0, scale=1.5) for les in lesions]) * brain
    ot = (rng.random(p_true.shape, dtype=np.float32) < p_true).astype(np.uint8)

    rho = t["rho"]
    skull = ((rho >= 1.02) & (rho < 1.12)).astype(np.float32)
    scalp = ((rho >= 1.12) & (rho < 1.17)).astype(np.float32)
    gap = ((rho >= 1.0) & (rho < 1.02)).astype(np.float32)  # CSF between brain and skull
    air = 1.0 - brain - skull - scalp - gap
    bone = 1000.0 + 150.0 * SmoothField(rng, (10.0, 40.0))(xyz)
    brain_hu = t["csf"] * 8.0 + t["gm"] * 36.0 + t["wm"] * 27.0 - 5.0 * p_true
    ct = air * -1000.0 + skull * bone + scalp * 30.0 + gap * 8.0 + brain_hu + _noise(rng, rho.shape, 4.0)
    ct = np.rint(ct).astype(np.int16)

    regional = 1.0 + 0.15 * SmoothField(rng, (40.0, 120.0))(xyz)
    cbf = (t["wm"] * 25 + t["gm"] * 55 + t["csf"] * 8) * regional * (1 - 0.45 * p_true) * (1 - 0.15 * p_wide)
    cbv = (t["wm"] * 2.2 + t["gm"] * 4.0 + t["csf"] * 0.8) * regional * (1 - 0.35 * p_true)
    mtt = t["wm"] * 4.6 + t["gm"] * 4.0 + t["csf"] * 6.0 + 2.5 * p_wide
    tmax = t["wm"] * 1.2 + t["gm"] * 0.9 + t["csf"] * 2.5 + 3.0 * p_wide + 1.0 * p_true
    maps = {
        "CT_CBF": cbf + _noise(rng, rho.shape, 9.0),
        "CT_CBV": cbv + _noise(rng, rho.shape, 0.8),
        "CT_MTT": mtt + _noise(rng, rho.shape, 1.2),
        "CT_Tmax": tmax + _noise(rng, rho.shape, 1.8),
    }
    images = {"CT": ct}
    for kind in ISLES_CHANNELS[1:]:
        images[kind] = (np.clip(maps[kind], 0.0, None) * (brain > 0)).astype(np.float32)

    # 4D series: contrast bolus (gamma variate) arriving later where Tmax is long.
    times = np.arange(ISLES_FRAMES, dtype=np.float32) * 2.0
    arrival = 3.0 + images["CT_Tmax"]
    lag = np.clip(times - arrival[..., None], 0.0, None)
    bolus = (lag / 4.0) ** 2 * np.exp(-lag / 2.0)
    enhancement = 10.0 * (images["CT_CBV"] * brain)[..., None] * bolus
    pwi = np.rint(ct[..., None].astype(np.float32) + enhancement).astype(np.int16)
    return PhantomSubject(
        subject_id, affine, images, ot, p_true.astype(np.float32), extra={ISLES_4D: pwi}, zooms_extra=(2.0,)
    )


# ---------------------------------------------------------------------------------------- writer
def _write_brats(subject: PhantomSubject, root: Path) -> None:
    folder = root / subject.group / subject.subject_id
    for kind, array in subject.images.items():
        _save(array, subject.affine, brats_path(folder, subject.subject_id, kind))
    _save(subject.label, subject.affine, brats_path(folder, subject.subject_id, BRATS_LABEL))
    _save(subject.true_prob, subject.affine, brats_path(folder, subject.subject_id, BRATS_TRUE_PROB))


def _write_isles(subject: PhantomSubject, root: Path, index: int) -> None:
    folder = root / ISLES_FOLDER / subject.subject_id
    # SMIR object numbers are unique per file in the real data; keep them unique here too.
    kinds = [*subject.images, ISLES_LABEL, ISLES_4D, ISLES_TRUE_PROB]
    num = {kind: 345000 + 10 * index + k for k, kind in enumerate(kinds)}
    for kind, array in subject.images.items():
        _save(array, subject.affine, isles_path(folder, kind, num[kind]))
    _save(subject.label, subject.affine, isles_path(folder, ISLES_LABEL, num[ISLES_LABEL]))
    _save(subject.extra[ISLES_4D], subject.affine, isles_path(folder, ISLES_4D, num[ISLES_4D]),
          time_step=subject.zooms_extra[0])
    _save(subject.true_prob, subject.affine, isles_path(folder, ISLES_TRUE_PROB, num[ISLES_TRUE_PROB]))


def _read_recipe(out: Path) -> dict | None:
    try:
        return json.loads((out / RECIPE_NAME).read_text())
    except (OSError, ValueError):
        return None


def subject_ids(dataset: str, n_subjects: int) -> list[str]:
    """Phantom subject ids, in the style of the real ones."""
    if dataset == "brats18":
        return [f"Brats18_PHM_{i + 1:03d}_1" for i in range(n_subjects)]
    return [f"case_{i + 1}" for i in range(n_subjects)]


def write_phantoms(
    dataset: str,
    out: Path,
    n_subjects: int,
    seed: int,
    shape: tuple[int, int, int] | None = None,
    *,
    axcodes: str | None = None,
    hemisphere: str | None = None,
) -> list[str]:
    """Write ``n_subjects`` phantom subjects of ``dataset`` under ``out`` in the real layout.

    ``shape``: BraTS grid (x, y, z) at 1 mm; ISLES in-plane (x, y) and the maximum slice count.
    ``axcodes`` (e.g. "RAS", "PIL") overrides the stored orientation; ``hemisphere`` ("left" or
    "right") puts every lesion in that hemisphere of the patient (tests of orientation handling).
    The dataset appears at ``out`` in one rename, so a crash leaves no half-written dataset;
    ``out`` must be new or empty, or hold the phantoms of the very same call (then nothing is
    written). Returns the subject ids.
    """
    get_layout(dataset)  # an unknown name is a DataError listing the choices
    if n_subjects < 1:
        raise DataError(f"n_subjects must be at least 1, got {n_subjects}")
    shape = tuple(int(s) for s in (shape or DEFAULT_SHAPES[dataset]))
    minimum = (16, 16, 16) if dataset == "brats18" else (16, 16, 2)
    if len(shape) != 3 or any(s < m for s, m in zip(shape, minimum)):
        raise DataError(f"phantom shape {shape} for {dataset}: need three sizes of at least {minimum}")
    if hemisphere not in (None, "left", "right"):
        raise DataError(f"hemisphere must be 'left', 'right' or None, got {hemisphere!r}")
    axcodes = (axcodes or DEFAULT_AXCODES[dataset]).upper()
    try:
        grid_affine(axcodes, np.ones(3), (2, 2, 2), np.zeros(3))
    except ValueError as exc:
        raise DataError(str(exc)) from None
    out = Path(out)
    ids = subject_ids(dataset, n_subjects)
    recipe = {"dataset": dataset, "n_subjects": n_subjects, "seed": seed, "shape": list(shape),
              "axcodes": axcodes, "hemisphere": hemisphere, "version": PHANTOM_VERSION}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if _read_recipe(out) == recipe:  # the same phantoms are already there: nothing to do
            log.info("phantom dataset already at %s; nothing to do", out)
            return ids
        raise DataError(
            f"phantom output {out} exists and is not an empty folder (nor the same phantoms); choose a new one"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        code = SUPPORTED_DATASETS.index(dataset)
        for index, sid in enumerate(ids):
            rng = np.random.default_rng([seed, code, index])
            if dataset == "brats18":
                _write_brats(synth_brats(rng, sid, shape, axcodes, hemisphere), tmp)
            else:
                _write_isles(synth_isles(rng, sid, shape, axcodes, hemisphere), tmp, index)
        (tmp / RECIPE_NAME).write_text(json.dumps(recipe, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a dataset folder is normally readable
        os.replace(tmp, out)  # replaces an empty folder atomically on POSIX
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ids
