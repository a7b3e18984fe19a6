"""Phantom datasets in the exact on-disk layout of BraTS 2018 and ISLES 2018, on real anatomy.

The loaders under test are the real ones: a phantom root is read exactly like a real one. Beside
each label lies the per-voxel probability the label was drawn from (a file the real datasets do not
have; see ``layouts``), so that later stages can measure true calibration error. Every label voxel
is ``1[U < p*]`` with ``U`` uniform on [0, 1] at that voxel, so P(label = 1) = p* exactly; the
soft edge of p* is the aleatoric uncertainty. ``label_noise`` says how ``U`` varies in space:
``iid`` (default), independent per voxel (one Bernoulli(p*) draw each: speckled labels, holes and
islands); ``correlated``, ``synth.correlated_uniform`` with correlation length
``synth.LABEL_CORRELATION_MM``, so that a whole stretch of boundary lies a little further in or out,
as annotators disagree. The subject stream draws the iid ``U`` in both modes (so every image of a
seed is the same in both, and iid phantoms are those of version 2); the correlated field comes
from its own stream, seeded by (seed, dataset, index, 1).

Anatomy (``anatomy``): the MNI152 2009 brain (GM, WM and the brain mask; CSF is the rest of the
brain) warped differently for every subject by a small affine and a smooth displacement field, at
a typical adult size. Per subject the scanner gain, tissue contrasts, bias field and noise differ.

BraTS-like subjects: skull-stripped brain (background exactly 0, so FLAIR > 0 is the brain),
FLAIR/T1/T1ce/T2 synthesised from the tissue fractions with each sequence's relative contrast, a
glioma in the white matter of one hemisphere (oedema bright on FLAIR/T2 and spreading along white
matter, enhancing ring on T1ce in high-grade ones, necrotic core dark on T1/T1ce), seg labels
{0, 1, 2, 4} (whole tumour = label > 0). 1 mm isotropic, int16 images, stored in the orientation of
the real BraTS files: affine diag(-1, -1, 1) with origin (0, Y-1, 0), i.e. LPS (array axis 0 runs
towards the patient's Left, axis 1 towards Posterior), as the released files (240x240x155, origin
(0, 239, 0)) are.

ISLES-like subjects: a CT slab of 2..``shape[2]`` thick slices (4-8 mm) with ~0.8-1 mm in-plane
pixels, tilted like a head in the gantry, air at about -1000 HU, scalp, skull with diploe, a CSF
gap and brain (the head region is CT > -23 HU, the public code's threshold), a subtle hypodense
infarct (1 or 2) in the lateral territory; CBF/CBV/MTT/Tmax maps (0 outside the brain) with a
hypoperfused region larger than the infarct core, a short 4D perfusion series, and the OT label.
Stored LPS as ITK writes axial scans. Lower contrast, more noise and broader label uncertainty
(p* edge twice as wide, at most 0.9 inside) than the BraTS-like phantoms, as ISLES is harder in
the paper.

Default grids are the real ones: BraTS 240x240x155, ISLES 256x256 in-plane with up to 22 slices.
``shape`` sets another grid at the same voxel size; a grid too small for a whole adult brain gets
a proportionally smaller brain (``anatomy.fit_scale``), so that tests can use tiny grids. Each
subject has its own random stream seeded by (seed, dataset, index), so subject k is the same
whatever ``n_subjects`` is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calib import atomic_io

from .anatomy import (
    SIZE_FACTOR,
    SIZE_MARGIN,
    box_around,
    brain_region,
    fit_scale,
    load_template,
    pick_site,
    random_warp,
    sample_anatomy,
)
from .errors import DataError
from .layouts import BRATS_MODALITIES, ISLES_4D, ISLES_CHANNELS, SUPPORTED_DATASETS, get_layout
from .phantom_files import write_brats, write_isles
from .shifts import ImageShift
from .synth import (
    LABEL_CORRELATION_MM,
    LABEL_NOISES,
    LatticeField,
    LabelNoise,
    Lesion,
    WaveField,
    combine,
    draw_labels,
    grid_affine,
    sigmoid,
    uniform_rotation,
    world_axes,
)

log = logging.getLogger(__name__)

# A hidden file at the dataset root records how the phantoms were made, so that the same command
# run again is a no-op (e.g. `make demo` twice). Loaders and `check` never look at it.
RECIPE_NAME = ".calib-phantom.json"
PHANTOM_VERSION = 2  # bump when the generator changes what a seed produces
DEFAULT_SHAPES = {"brats18": (240, 240, 155), "isles18": (256, 256, 22)}  # the real grids
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


def _outline(rng: np.random.Generator, radius: float) -> WaveField:
    """A lesion's irregular outline: lobes of about its own size (waves of 1-2.5 radii), so that
    the outline is lobulated but the distance to it still grows steadily from the centre."""
    return WaveField(rng, (1.0 * radius, 2.5 * radius), 4)


# ------------------------------------------------------------------------------------ BraTS-like
# Tissue means per modality (arbitrary MR units, before a subject's gain): csf, gm, wm and the
# tumour compartments. Relative contrasts as in clinical scans: T1 WM > GM > CSF, T2 the reverse;
# FLAIR suppresses CSF, GM > WM, oedema brightest; T1ce is T1 with an enhancing ring; the
# necrotic core is dark on T1/T1ce and bright on T2.
_BRATS_TISSUE = {
    "flair": {"csf": 90, "gm": 380, "wm": 300, "edema": 720, "ring": 640, "core": 520},
    "t1": {"csf": 160, "gm": 430, "wm": 610, "edema": 420, "ring": 470, "core": 240},
    "t1ce": {"csf": 170, "gm": 450, "wm": 630, "edema": 450, "ring": 1150, "core": 250},
    "t2": {"csf": 950, "gm": 390, "wm": 260, "edema": 820, "ring": 700, "core": 980},
}
# p* at the tumour boundary: logistic in the distance to it, scale 1 mm (the band where p* runs
# from 0.1 to 0.9 is 4.4 mm wide, about the disagreement of BraTS raters at a boundary).
BRATS_EDGE_MM = 1.0
BRATS_P_MAX = 0.98
OEDEMA_WM_MM = 3.0  # oedema spreads along white matter: the boundary moves +-1.5 mm with WM


def synth_brats(
    rng: np.random.Generator, subject_id: str, shape: tuple[int, int, int], axcodes: str, hemisphere: str | None,
    noise: LabelNoise | None = None, shift: ImageShift | None = None,
) -> PhantomSubject:
    """One BraTS-like subject at 1 mm on a grid of ``shape`` voxels along world x, y, z;
    ``shift`` renders its images differently (calib.data.shifts), every draw unchanged."""
    shift = shift or ImageShift()
    extent = np.array(shape, dtype=float)
    # Grid centre of the real files: voxel (X-1)/2, (Y-1)/2, (Z-1)/2 under diag(-1,-1,1), (0,Y-1,0).
    centre = np.array([-(extent[0] - 1) / 2, (extent[1] - 1) / 2, (extent[2] - 1) / 2])
    affine, stored = grid_affine(axcodes, np.ones(3), shape, centre)
    tmpl = load_template()
    fit = fit_scale(extent, tmpl.extent * SIZE_FACTOR * SIZE_MARGIN)
    # BraTS volumes are registered to an atlas: the brain is centred and rotated by a few degrees.
    x0 = centre + rng.uniform(-0.015, 0.015, 3) * extent
    warp = random_warp(rng, x0, tmpl.centre, fit, (3.0, 3.0, 3.0))
    region = brain_region(warp, affine, stored, margin_mm=2.0)
    anat = sample_anatomy(warp, affine, stored, region)
    group = "HGG" if rng.random() < 0.75 else "LGG"

    # Glioma: supratentorial, centred in the white matter of one hemisphere; whole-tumour radius
    # 18-32 template mm (about 20-140 mL after scaling, the span of BraTS whole-tumour volumes).
    radius = rng.uniform(18.0, 32.0)
    site = pick_site(rng, anat, hemisphere, (12.0, 50.0), min_depth_mm=0.5 * radius, z_min_mm=-25.0)
    lesion = Lesion(site, radius * np.exp(rng.uniform(-0.2, 0.2, 3)), uniform_rotation(rng),
                    _outline(rng, radius))
    box = box_around(anat, site, lesion.reach() + 12 * BRATS_EDGE_MM / anat.scale)
    d = lesion.distance(anat.template_mm[(slice(None), *box)])
    mm_inside = (1.0 - d) * lesion.mean_radius * anat.scale + OEDEMA_WM_MM * (anat.wm[box] - 0.5)
    p_box = BRATS_P_MAX * sigmoid(mm_inside / BRATS_EDGE_MM) * anat.brain[box]
    whole = draw_labels(rng, p_box, affine, noise)
    # Compartments by depth inside the tumour: necrotic core, enhancing ring (HGG only), oedema.
    core_w = sigmoid(((0.45 if group == "HGG" else 0.6) - d) / 0.04)
    ring_w = (sigmoid((0.7 - d) / 0.04) - core_w) if group == "HGG" else np.zeros_like(d)
    edema_w = 1.0 - core_w - ring_w
    seg_box = np.zeros(p_box.shape, dtype=np.uint8)
    seg_box[whole] = 2
    seg_box[whole & (ring_w > 0.5)] = 4
    seg_box[whole & (core_w > 0.5)] = 1

    # Per subject and modality: scanner gain, tissue contrast, a smooth bias field, noise. Computed
    # on the brain's voxels only (flat arrays): outside it the images are 0.
    bias = LatticeField(rng, x0, 0.5 * extent, 60.0 * anat.scale, n_fields=len(BRATS_MODALITIES))
    inside = anat.brain > 0
    bias_in = bias.on_grid(affine, region)[:, inside]
    csf, gm, wm = anat.csf[inside], anat.gm[inside], anat.wm[inside]
    rank = np.full(inside.shape, -1, dtype=np.int64)  # position of each brain voxel in the flat arrays
    rank[inside] = np.arange(int(inside.sum()))
    in_box = inside[box]
    at = rank[box][in_box]  # the tumour box's brain voxels
    p_in, core_in, ring_in, edema_in = (w[in_box] for w in (p_box, core_w, ring_w, edema_w))
    images = {}
    for m, modality in enumerate(BRATS_MODALITIES):
        mean = {k: v * float(np.exp(rng.normal(0.0, 0.05 if k in ("csf", "gm", "wm") else 0.08)))
                for k, v in _BRATS_TISSUE[modality].items()}
        gain = float(np.exp(rng.normal(0.0, 0.25)))
        signal = csf * mean["csf"] + gm * mean["gm"] + wm * mean["wm"]
        tumour = core_in * mean["core"] + ring_in * mean["ring"] + edema_in * mean["edema"]
        signal[at] = (1.0 - p_in) * signal[at] + p_in * tumour
        signal *= gain * np.exp(shift.bias_strength(rng.uniform(0.04, 0.12)) * bias_in[m])
        signal = shift.contrast_about_mean(signal)
        # the draws in today's order: the standard normals, then their sd
        white = rng.standard_normal(signal.shape, dtype=np.float32)
        signal += white * np.float32(shift.noise_sd(rng.uniform(0.02, 0.045) * mean["wm"] * gain))
        # Skull-stripped like the real data: exactly 0 outside the brain, >= 1 inside.
        image = np.zeros(stored, dtype=np.int16)
        image[region][inside] = np.clip(np.rint(signal), 1, 32000).astype(np.int16)
        images[modality] = image
    p_true = np.zeros(stored, dtype=np.float32)
    seg = np.zeros(stored, dtype=np.uint8)
    p_true[region][box] = p_box
    seg[region][box] = seg_box
    return PhantomSubject(subject_id, affine, images, seg, p_true, group=group)


# ------------------------------------------------------------------------------------ ISLES-like
ISLES_EDGE_MM = 2.0  # twice the BraTS boundary: the DWI-drawn label is uncertain on a CT slab
ISLES_P_MAX = 0.9  # even the infarct's centre is not surely labelled (CT vs later DWI)
HEAD_SHELL_MM = 15.0  # CSF gap, skull and scalp around the brain (template mm)


def _head_ct(rng: np.random.Generator, anat, warp, affine, fov: np.ndarray, p_true: np.ndarray,
             shift: ImageShift) -> np.ndarray:
    """CT (HU) of the slab: brain tissue, a thin CSF gap, skull with diploe, scalp, air."""
    s = anat.sdist  # template mm outside the brain surface
    half = np.array([*fov, 60.0])
    thickness = LatticeField(rng, warp.x0, half, 50.0 * anat.scale).on_grid(affine, anat.region)[0]
    skull_mm = 6.5 * rng.uniform(0.85, 1.15) * (1.0 + 0.15 * thickness)
    gap = (s >= 0) & (s < 1.5)
    depth = (s - 1.5) / skull_mm  # 0 at the inner table, 1 at the outer one
    skull = (depth >= 0) & (depth < 1)
    scalp = (depth >= 1) & (s < 1.5 + skull_mm + 5.0)
    # Cortical tables ~1500 HU around a diploe of ~800 HU.
    bone = 800.0 + 700.0 * (2 * depth - 1) ** 2
    brain_hu = anat.csf * 8.0 + anat.gm * 37.0 + anat.wm * 27.0 - 5.0 * p_true  # early hypodensity
    brain_hu = shift.contrast_about_mean(brain_hu, anat.brain > 0)
    ct = np.where(anat.brain > 0, brain_hu, -1000.0)
    ct = np.where(gap, 8.0, ct)
    ct = np.where(skull, bone, ct)
    ct = np.where(scalp, 30.0, ct)
    white = rng.standard_normal(ct.shape, dtype=np.float32)
    ct = ct + white * np.float32(shift.noise_sd(rng.uniform(3.0, 5.0)))
    return np.rint(ct).astype(np.int16)


def synth_isles(
    rng: np.random.Generator, subject_id: str, shape: tuple[int, int, int], axcodes: str, hemisphere: str | None,
    noise: LabelNoise | None = None, shift: ImageShift | None = None,
) -> PhantomSubject:
    """One ISLES-like subject: ``shape`` = in-plane size x, y and the maximum slice count;
    ``shift`` renders its images differently (calib.data.shifts), every draw unchanged."""
    shift = shift or ImageShift()
    nx, ny, max_slices = shape
    pixel = rng.uniform(0.8, 1.0)
    fov = np.array([nx, ny]) * pixel
    tmpl = load_template()
    fit = fit_scale(fov, (tmpl.extent[:2] + 2 * HEAD_SHELL_MM) * SIZE_FACTOR * SIZE_MARGIN)
    thickness = rng.uniform(4.0, 8.0)
    # A perfusion slab covers at most ~60 % of the brain's height, around the basal ganglia.
    height = tmpl.extent[2] * SIZE_FACTOR * fit
    n_max = max(2, min(max_slices, int(0.6 * height / thickness)))
    n_slices = int(rng.integers(2, n_max + 1))
    half = 0.5 * n_slices * thickness / (SIZE_FACTOR * fit)  # template mm
    lo, hi = max(-5.0, -35.0 + half), min(35.0, 70.0 - half)
    z_level = rng.uniform(lo, hi) if lo < hi else 15.0
    affine, stored = grid_affine(axcodes, np.array([pixel, pixel, thickness]), (nx, ny, n_slices), np.zeros(3))
    x0 = np.array([*(rng.uniform(-0.02, 0.02, 2) * fov), 0.0])
    p0 = np.array([tmpl.centre[0], tmpl.centre[1], z_level])
    # Heads lie in the gantry with their own pitch: the scan plane is tilted by up to 10 degrees.
    warp = random_warp(rng, x0, p0, fit, (10.0, 3.0, 3.0))
    anat = sample_anatomy(warp, affine, stored)
    brain = anat.brain

    # Infarcts (1 or 2): in the lateral (middle cerebral artery) territory, 8-22 template mm
    # radius, at least 0.6 slice thick, centred away from the slab's first and last slice.
    allowed = np.ones(stored, dtype=bool)
    if n_slices >= 3:
        slab_axis = world_axes(affine).index(2)
        edge = [slice(None)] * 3
        for k in (0, n_slices - 1):
            edge[slab_axis] = k
            allowed[tuple(edge)] = False
    lesions = []
    for _ in range(int(rng.integers(1, 3))):
        radius = max(rng.uniform(8.0, 22.0), 0.6 * thickness / anat.scale)
        site = pick_site(rng, anat, hemisphere, (15.0, 60.0), min_depth_mm=5.0, allowed=allowed)
        lesions.append(Lesion(site, radius * np.exp(rng.uniform(-0.2, 0.2, 3)), uniform_rotation(rng),
                              _outline(rng, radius)))
    if shift.slab_mm is not None:  # the same head and lesions, resampled on slices of slab_mm
        n_slices = max(2, int(round(n_slices * thickness / shift.slab_mm)))
        affine, stored = grid_affine(axcodes, np.array([pixel, pixel, shift.slab_mm]), (nx, ny, n_slices),
                                     np.zeros(3))
        anat = sample_anatomy(warp, affine, stored)
        brain = anat.brain
    xyz = anat.template_mm
    dists = [les.distance(xyz) for les in lesions]
    p_true = combine([ISLES_P_MAX * sigmoid((1.0 - d) * les.mean_radius * anat.scale / ISLES_EDGE_MM)
                      for d, les in zip(dists, lesions)]) * brain
    # Hypoperfusion (Tmax, MTT, CBF) reaches beyond the infarct core, as in acute stroke.
    p_wide = combine([sigmoid((1.5 - d) * les.mean_radius * anat.scale / 3.0)
                      for d, les in zip(dists, lesions)]) * brain
    ot = draw_labels(rng, p_true, affine, noise).astype(np.uint8)
    ct = _head_ct(rng, anat, warp, affine, fov, p_true, shift)

    severity = rng.uniform(0.7, 1.2)  # how deep this stroke's perfusion deficit is
    field = LatticeField(rng, x0, np.array([*fov, 60.0]), 40.0 * anat.scale)
    regional = 1.0 + 0.15 * field.on_grid(affine, anat.region)[0]  # regional perfusion differences
    pw, pc = severity * p_wide, severity * p_true
    cbf = (anat.wm * 22 + anat.gm * 55 + anat.csf * 8) * regional * (1 - 0.45 * pc) * (1 - 0.15 * pw)
    cbv = (anat.wm * 2.2 + anat.gm * 4.0 + anat.csf * 0.8) * regional * (1 - 0.35 * pc)
    mtt = anat.wm * 4.6 + anat.gm * 4.0 + anat.csf * 6.0 + 2.5 * pw
    tmax = anat.wm * 1.2 + anat.gm * 0.9 + anat.csf * 2.5 + 4.5 * pw + 1.0 * pc
    maps = {"CT_CBF": (cbf, 9.0), "CT_CBV": (cbv, 0.8), "CT_MTT": (mtt, 1.2), "CT_Tmax": (tmax, 1.8)}
    images = {"CT": ct}
    for kind in ISLES_CHANNELS[1:]:
        value, noise = maps[kind]
        value = shift.contrast_about_mean(value, brain > 0)
        value = value + rng.standard_normal(value.shape, dtype=np.float32) * np.float32(shift.noise_sd(noise))
        images[kind] = (np.clip(value, 0.0, None) * (brain > 0)).astype(np.float32)

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


def _read_recipe(out: Path) -> dict | None:
    try:
        recipe = json.loads((out / RECIPE_NAME).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(recipe, dict) and recipe.get("version") == 2:
        recipe.setdefault("label_noise", "iid")  # written before the option: iid, as now
    return recipe


def _recipe_conflict(out: Path, recipe: dict) -> str:
    """Why ``out`` cannot take the phantoms of ``recipe``: what it holds, and what was asked."""
    have = _read_recipe(out)
    held = (f"phantoms of another recipe {json.dumps(have, sort_keys=True)}" if have is not None
            else f"no phantom recipe ({RECIPE_NAME}): other data")
    return (f"phantom output {out} exists and is not an empty folder (nor the same phantoms): it holds "
            f"{held}, this call writes {json.dumps(recipe, sort_keys=True)}; delete it or choose a new one")


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
    label_noise: str = "iid",
    shift: ImageShift | dict | None = None,
    only: Sequence[str] | None = None,
) -> list[str]:
    """Write ``n_subjects`` phantom subjects of ``dataset`` under ``out`` in the real layout.

    ``shape``: BraTS grid (x, y, z) at 1 mm; ISLES in-plane (x, y) and the maximum slice count
    (default: the real grids). A grid smaller than an adult brain holds a proportionally smaller
    one at the same voxel size; the MNI152 template is read from the nilearn wheel once per process.
    ``axcodes`` (e.g. "RAS", "PIL") overrides the stored orientation; ``hemisphere`` ("left" or
    "right") puts every lesion in that hemisphere of the patient (tests of orientation handling).
    ``label_noise``: ``iid`` or ``correlated`` (module doc); it is part of the recipe.
    ``shift``: an ImageShift or its fields (calib.data.shifts): the same subjects, p* and labels,
    their images rendered differently; a shift other than the identity is part of the recipe.
    ``only``: write just these subjects of the ``n_subjects`` (each drawn exactly as in the whole
    dataset, from its own index's seed; e.g. a shift needed only on the test subjects); a proper
    subset is part of the recipe as ``subjects``.
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
    if label_noise not in LABEL_NOISES:
        raise DataError(f"label_noise must be one of {', '.join(LABEL_NOISES)}, got {label_noise!r}")
    shift = ImageShift.of(shift, dataset)
    axcodes = (axcodes or DEFAULT_AXCODES[dataset]).upper()
    try:
        grid_affine(axcodes, np.ones(3), (2, 2, 2), np.zeros(3))
    except ValueError as exc:
        raise DataError(str(exc)) from None
    out = Path(out)
    ids = subject_ids(dataset, n_subjects)
    keep = set(ids) if only is None else set(only)
    if not keep or keep - set(ids):
        raise DataError(f"only: {sorted(keep - set(ids)) or 'no subject'} not among the {n_subjects} "
                        f"subjects of this recipe ({ids[0]} .. {ids[-1]})")
    written = [i for i in ids if i in keep]
    recipe = {"dataset": dataset, "n_subjects": n_subjects, "seed": seed, "shape": list(shape),
              "axcodes": axcodes, "hemisphere": hemisphere, "version": PHANTOM_VERSION,
              "label_noise": label_noise,
              **({"label_correlation_mm": LABEL_CORRELATION_MM} if label_noise == "correlated" else {}),
              **({"shift": shift.recipe()} if not shift.identity else {}),
              **({"subjects": sorted(keep)} if len(keep) < len(ids) else {})}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if _read_recipe(out) == recipe:  # the same phantoms are already there: nothing to do
            log.info("phantom dataset already at %s; nothing to do", out)
            return written
        raise DataError(_recipe_conflict(out, recipe))
    # A concurrent writer of the same phantoms may publish first: its folder is then used.
    try:
        with atomic_io.atomic_folder(out, same=lambda t: _read_recipe(t) == recipe,
                                     conflict=lambda t: _recipe_conflict(t, recipe)) as tmp:
            code = SUPPORTED_DATASETS.index(dataset)
            for index, sid in enumerate(ids):
                if sid not in keep:
                    continue
                rng = np.random.default_rng([seed, code, index])
                noise = LabelNoise(label_noise, np.random.default_rng([seed, code, index, 1]))
                if dataset == "brats18":
                    write_brats(synth_brats(rng, sid, shape, axcodes, hemisphere, noise, shift), tmp)
                else:
                    write_isles(synth_isles(rng, sid, shape, axcodes, hemisphere, noise, shift), tmp, index)
            (tmp / RECIPE_NAME).write_text(json.dumps(recipe, sort_keys=True) + "\n")
    except atomic_io.FolderConflict as exc:
        raise DataError(str(exc)) from None
    return written
