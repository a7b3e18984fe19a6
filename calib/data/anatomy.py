"""Brain anatomy of the phantoms: the MNI152 2009 template, warped differently for every subject.

The template is the ICBM 2009a nonlinear symmetric MNI152 average (Fonov et al., NeuroImage 2011)
as nilearn ships it inside its wheel (``nilearn/datasets/data``, 1 mm, 197x233x189): the
skull-stripped T1 (its nonzero voxels are the brain mask, 1.89 L) and the grey- and white-matter
probability maps. The files are read straight from the installed package (no network, no import of
nilearn itself, which pulls in scikit-learn); ``load_template`` reads them once per process.

Per subject (``random_warp``): world mm of the output grid -> template mm through a small affine
(rotation, anisotropic size, shift) plus a smooth random displacement field (Gaussian bumps on a
~32 mm lattice, 3 mm rms), so that ventricles, sulci and the brain outline differ between subjects
while staying anatomically plausible (the field's gradient is about 0.1, far from folding).
``sample_anatomy`` resamples GM, WM and a signed distance to the brain surface onto the grid
(trilinear, scipy.ndimage); CSF is what lies inside the brain but is neither GM nor WM (sulci,
ventricles, cisterns).

Size: averaging registered brains makes the MNI152 brain larger than an individual's, so it is
scaled by ``SIZE_FACTOR`` = 0.92 (linear): the mean brain mask is then about 1.45 L, a typical
adult intracranial volume, with a subject spread of about +-10 % in volume. A grid too small to
hold a brain of that size gets a proportionally smaller brain (``fit_scale``) at the same voxel
size, so that tiny test grids still hold a whole brain.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .errors import DataError
from .synth import LatticeField, axis_coords, random_rotation, world_axes

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
NILEARN_PIN = "nilearn==0.14.1"
SIZE_FACTOR = 0.92  # individual / MNI152 brain, linear (see the module docstring)
SIZE_SPREAD = 0.035  # subject sd of log linear size: about +-10 % in volume
SIZE_MARGIN = 1.10  # the largest subject brain (+2 sd, +3 % on an axis) over the mean size
# The template stops at the bottom of the cerebellum (z = -72 mm); padding below it leaves room
# for the skull under it. Elsewhere the template has >= 25 mm around the brain.
PAD_BELOW = 24
SDIST_CLIP_MM = 40.0  # the signed distance is only needed near the brain


def template_dir() -> Path:
    """The folder of the installed nilearn wheel that holds the MNI152 files (without importing it)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise DataError(f"phantoms need the MNI152 template shipped with nilearn: pip install {NILEARN_PIN}")
    folder = Path(spec.origin).parent / "datasets" / "data"
    for name in TEMPLATE_FILES.values():
        if not (folder / name).is_file():
            raise DataError(f"MNI152 template file {folder / name} is missing from the nilearn install; "
                            f"reinstall {NILEARN_PIN}")
    return folder


@dataclass(frozen=True)
class Template:
    """The template's fields on its 1 mm grid (float32), with the brain's bounding box."""

    gm: np.ndarray  # grey-matter fraction, 0 outside the brain
    wm: np.ndarray  # white-matter fraction; gm + wm <= 1
    sdist: np.ndarray  # signed distance to the brain surface (mm), < 0 inside, clipped +-40
    affine: np.ndarray  # voxel -> MNI mm, RAS, 1 mm
    centre: np.ndarray  # MNI mm: centre of the brain's bounding box
    extent: np.ndarray  # mm: size of the brain's bounding box along x, y, z
    brain_ml: float  # volume of the brain mask


def _read(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(str(folder / TEMPLATE_FILES[name])))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    return data / data.max(), img.affine  # nilearn's loaders rescale to a maximum of 1 the same way


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Read and prepare the template once per process (about 1.5 s)."""
    folder = template_dir()
    t1, affine = _read(folder, "t1")
    gm, _ = _read(folder, "gm")
    wm, _ = _read(folder, "wm")
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise DataError(f"MNI152 template in {folder} is not on a 1 mm RAS grid: affine {affine.tolist()}")
    pad = ((0, 0), (0, 0), (PAD_BELOW, 0))
    brain = np.pad(ndimage.binary_fill_holes(t1 > 0), pad)
    # The tissue maps are blurrier than the skull-stripped mask: keep them inside it, gm + wm <= 1.
    gm, wm = np.pad(gm, pad) * brain, np.pad(wm, pad) * brain
    total = np.maximum(gm + wm, 1.0)
    gm, wm = gm / total, wm / total
    idx = np.argwhere(brain)
    lo, hi = idx.min(0), idx.max(0)
    # Inside distances on the brain's bounding box only (half the voxels, the slow part).
    box = tuple(slice(max(int(a) - 1, 0), int(b) + 2) for a, b in zip(lo, hi))
    inside = np.zeros(brain.shape, dtype=np.float64)
    inside[box] = ndimage.distance_transform_edt(brain[box])
    outside = ndimage.distance_transform_edt(~brain)
    # Voxel centres are half a voxel from the surface between an inside and an outside voxel.
    sdist = np.where(brain, 0.5 - inside, outside - 0.5).clip(-SDIST_CLIP_MM, SDIST_CLIP_MM)
    affine = affine.copy()
    affine[2, 3] -= PAD_BELOW
    centre_vox = (lo + hi) / 2.0
    return Template(
        gm=gm.astype(np.float32), wm=wm.astype(np.float32), sdist=sdist.astype(np.float32), affine=affine,
        centre=affine[:3, :3] @ centre_vox + affine[:3, 3], extent=(hi - lo + 1).astype(float),
        brain_ml=float(brain.sum()) / 1000.0,
    )


@functools.lru_cache(maxsize=4)
def _blurred(sigma_vox: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = load_template()
    return tuple(ndimage.gaussian_filter(a, sigma_vox, mode="nearest").astype(np.float32)
                 for a in (t.gm, t.wm, t.sdist))


def template_fields(scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gm, wm, sdist) to sample at about ``scale`` output mm per template mm.

    Below a scale of about 0.7 the output voxel spans several template voxels: the fields are
    first smoothed (Gaussian, the width that turns a 1 mm voxel into a 1/scale mm one) so that a
    small brain is an image of the template at that resolution rather than an aliased sampling.
    """
    t = load_template()
    if scale >= 0.7:
        return t.gm, t.wm, t.sdist
    # FWHM of 1/scale voxels, in voxels; rounded so that the subjects of one grid share it.
    sigma = round(0.42 * math.sqrt(1.0 / scale**2 - 1.0), 1)
    return _blurred(sigma)


def fit_scale(fov_mm: np.ndarray, need_mm: np.ndarray) -> float:
    """Largest scale <= 1 at which ``need_mm`` (the anatomy's size at scale 1) fits ``fov_mm``."""
    return float(min(1.0, np.min(np.asarray(fov_mm, float) / np.asarray(need_mm, float))))


@dataclass(frozen=True)
class Warp:
    """World mm of a subject's grid -> template mm: ``m = p0 + linear @ (x - x0) + u(x)``."""

    x0: np.ndarray  # world mm that maps to ...
    p0: np.ndarray  # ... this template point (mm)
    linear: np.ndarray  # 3x3: rotation and inverse size
    displacement: LatticeField  # three fields (template mm per unit) in world mm
    displacement_mm: float  # rms of the displacement (template mm)
    scale: float  # world mm per template mm (mean over axes)
    fit: float  # the grid's shrink factor (``fit_scale``), the same for all its subjects

    def world_to_template(self, x: np.ndarray) -> np.ndarray:
        """Affine part only (no displacement) for points ``x`` (..., 3)."""
        return self.p0 + (np.asarray(x, float) - self.x0) @ self.linear.T

    def template_to_world(self, m: np.ndarray) -> np.ndarray:
        """Inverse of the affine part for points ``m`` (..., 3)."""
        return self.x0 + (np.asarray(m, float) - self.p0) @ np.linalg.inv(self.linear).T


def random_warp(
    rng: np.random.Generator,
    x0: np.ndarray,
    p0: np.ndarray,
    fit: float,
    max_rotation_deg: tuple[float, float, float],
    displacement_mm: float = 3.0,
    lattice_mm: float = 32.0,
) -> Warp:
    """One subject's warp: size ``fit`` * SIZE_FACTOR * lognormal spread, anisotropy +-3 %,
    rotation within +-``max_rotation_deg`` about x, y, z, and a smooth displacement of
    ``displacement_mm`` rms varying over ``lattice_mm`` (both template mm)."""
    size = fit * SIZE_FACTOR * math.exp(float(np.clip(rng.normal(0.0, SIZE_SPREAD), -2 * SIZE_SPREAD, 2 * SIZE_SPREAD)))
    sizes = size * np.exp(rng.uniform(-0.03, 0.03, 3))
    rotation = random_rotation(rng, max_rotation_deg)
    linear = np.diag(1.0 / sizes) @ rotation.T  # world -> template: rotate back, then undo the size
    t = load_template()
    half = 0.5 * t.extent * size + 3 * lattice_mm * size  # the brain and a margin, world mm
    field = LatticeField(rng, x0, half, lattice_mm * size, n_fields=3)
    return Warp(np.asarray(x0, float), np.asarray(p0, float), linear, field, displacement_mm,
                float(np.exp(np.mean(np.log(sizes)))), float(fit))


@dataclass
class Anatomy:
    """One subject's anatomy on ``region`` of its grid (float32 arrays of the region's shape)."""

    region: tuple[slice, slice, slice]
    brain: np.ndarray  # 1 inside the brain mask, else 0
    gm: np.ndarray  # tissue fractions, gm + wm + csf = brain
    wm: np.ndarray
    csf: np.ndarray
    sdist: np.ndarray  # signed distance to the brain surface, template mm (< 0 inside)
    template_mm: np.ndarray  # (3, ...) template position of every voxel, for lesions
    scale: float  # world mm per template mm


def brain_region(warp: Warp, affine: np.ndarray, shape: tuple[int, int, int], margin_mm: float
                 ) -> tuple[slice, slice, slice]:
    """Slices of the grid that hold the brain's bounding box grown by ``margin_mm`` (template mm)."""
    t = load_template()
    grow = 0.5 * t.extent + margin_mm + 4.0 * warp.displacement_mm
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * grow + t.centre
    world = warp.template_to_world(corners)
    ijk = (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    lo = np.clip(np.floor(ijk.min(0)).astype(int), 0, shape)
    hi = np.clip(np.ceil(ijk.max(0)).astype(int) + 1, 0, shape)
    return tuple(slice(int(a), int(max(a, b))) for a, b in zip(lo, hi))


def sample_anatomy(warp: Warp, affine: np.ndarray, shape: tuple[int, int, int],
                   region: tuple[slice, slice, slice] | None = None) -> Anatomy:
    """Resample the template through ``warp`` onto ``region`` (default: all) of the grid."""
    region = region or tuple(slice(0, n) for n in shape)
    t = load_template()
    # Template voxel of every output voxel: affine in the index (broadcast, no meshgrid) plus the
    # displacement, which is separable in the grid's axes (LatticeField.on_grid).
    axes = world_axes(affine)
    coords = axis_coords(affine, region)
    to_vox = np.linalg.inv(t.affine)
    lin = to_vox[:3, :3] @ warp.linear
    offset = to_vox[:3, :3] @ (warp.p0 - warp.linear @ warp.x0) + to_vox[:3, 3]
    disp = warp.displacement.on_grid(affine, region) * np.float32(warp.displacement_mm)
    sub = tuple(len(c) for c in coords)
    vox = np.empty((3, *sub), dtype=np.float32)
    for c in range(3):
        v = np.full(sub, offset[c], dtype=np.float32)
        for a, w in enumerate(axes):
            view = [1, 1, 1]
            view[a] = -1
            v += (np.float32(lin[c, w]) * coords[a]).reshape(view)
        vox[c] = v + disp[c]
    gm_t, wm_t, sd_t = template_fields(warp.fit * SIZE_FACTOR)

    def sample(field: np.ndarray, at: np.ndarray, outside: float) -> np.ndarray:
        return ndimage.map_coordinates(field, at, order=1, prefilter=False, mode="constant",
                                       cval=outside, output=np.float32)

    sdist = sample(sd_t, vox, SDIST_CLIP_MM)
    inside = sdist < 0
    brain = inside.astype(np.float32)
    # The tissue maps only inside the brain (about half of the region): the costly part.
    at = vox[:, inside]
    gm, wm = np.zeros(sub, dtype=np.float32), np.zeros(sub, dtype=np.float32)
    gm[inside] = sample(gm_t, at, 0.0)
    wm[inside] = sample(wm_t, at, 0.0)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    vox += t.affine[:3, 3].astype(np.float32).reshape(3, 1, 1, 1)  # 1 mm template: voxel -> mm
    return Anatomy(region, brain, gm, wm, csf, sdist, vox, warp.scale)


def pick_site(
    rng: np.random.Generator,
    anatomy: Anatomy,
    hemisphere: str | None,
    abs_x_mm: tuple[float, float],
    min_depth_mm: float,
    z_min_mm: float = -math.inf,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """A random template point (mm) of the subject's brain for a lesion centre.

    Candidates: voxels of mostly tissue (GM + WM > 0.8), at least ``min_depth_mm`` inside the brain,
    with template |x| in ``abs_x_mm`` on the side of ``hemisphere`` ('left': the patient's left,
    template x < 0; None: either, drawn at random), above ``z_min_mm`` and in ``allowed`` (a mask of
    the region). Where none qualifies, the depth and then the lateral range are relaxed, so that
    tiny grids still get a lesion on the asked side.
    """
    side = {"left": -1.0, "right": 1.0}.get(hemisphere or "", float(rng.choice([-1.0, 1.0])))
    x, z = anatomy.template_mm[0], anatomy.template_mm[2]
    base = (anatomy.gm + anatomy.wm > 0.8) & (side * x > 0) & (z > z_min_mm)
    if allowed is not None:
        base &= allowed
    lateral = (np.abs(x) >= abs_x_mm[0]) & (np.abs(x) <= abs_x_mm[1])
    for candidates in (base & lateral & (anatomy.sdist < -min_depth_mm), base & lateral,
                       base & (anatomy.sdist < -min_depth_mm), base, (anatomy.brain > 0) & (side * x > 0)):
        flat = np.flatnonzero(candidates)
        if flat.size:
            pick = np.unravel_index(flat[int(rng.integers(flat.size))], candidates.shape)
            return anatomy.template_mm[(slice(None), *pick)].astype(float)
    raise DataError("phantom grid holds no brain voxel for a lesion; choose a larger shape")


def box_around(anatomy: Anatomy, centre: np.ndarray, radius_mm: float) -> tuple[slice, slice, slice]:
    """Slices of the anatomy's region whose voxels lie within ``radius_mm`` (template mm, per axis)
    of ``centre``: where a lesion must be evaluated (empty slices when it misses the region)."""
    near = np.ones(anatomy.brain.shape, dtype=bool)
    for c in range(3):
        near &= np.abs(anatomy.template_mm[c] - np.float32(centre[c])) <= radius_mm
    box = []
    for axis in range(3):
        hit = np.flatnonzero(near.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0))
    return tuple(box)
