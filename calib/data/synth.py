"""Analytic head, brain and lesion models evaluated at world coordinates (mm, RAS+ as in NIfTI).

Every structure is a function of the world position of a voxel centre, never of its array index,
so one subject can be written on any grid (any axis order, flip, spacing or slab) and the anatomy
stays where the affine says it is. RAS+ (the NIfTI/nibabel world convention): +x points to the
patient's Right, +y Anterior, +z Superior; the patient's left hemisphere is at smaller x.

Labels are random: ``p*`` (the lesion probability) is a smooth map, and each voxel's label is an
independent Bernoulli(p*) draw, so ``p*`` is the exact probability behind every label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_AXIS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def grid_affine(
    axcodes: str, spacing: np.ndarray, extent: tuple[int, int, int], centre: np.ndarray
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Voxel-to-world affine and stored array shape of a grid stored in ``axcodes`` order.

    ``extent`` and ``spacing`` are the voxel count and size along world x, y, z; ``axcodes`` says
    where each stored axis points (e.g. ``"LPS"``: axis 0 towards the patient's Left). The grid
    is centred on ``centre`` (mm).
    """
    axcodes = axcodes.upper()
    axes = [_AXIS.get(c, (None, 0.0))[0] for c in axcodes]
    if len(axcodes) != 3 or sorted(a for a in axes if a is not None) != [0, 1, 2]:
        raise ValueError(f"axcodes {axcodes!r} must name each of R/L, A/P, S/I once (e.g. 'LPS', 'RAS')")
    mat = np.zeros((3, 3))
    shape = []
    for i, code in enumerate(axcodes):
        j, sign = _AXIS[code]
        mat[j, i] = sign * float(spacing[j])
        shape.append(int(extent[j]))
    affine = np.eye(4)
    affine[:3, :3] = mat
    affine[:3, 3] = np.asarray(centre, dtype=float) - mat @ ((np.array(shape) - 1) / 2.0)
    return affine, (shape[0], shape[1], shape[2])


def world_coords(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """World position (mm) of every voxel centre: float32 array (*shape, 3)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    return ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)


class SmoothField:
    """A random smooth field: a sum of plane cosine waves, roughly unit standard deviation."""

    def __init__(self, rng: np.random.Generator, wavelength_mm: tuple[float, float], n_waves: int = 6):
        directions = rng.normal(size=(n_waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(*wavelength_mm, size=n_waves)
        self.k = (2 * np.pi * directions / wavelengths[:, None]).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, size=n_waves).astype(np.float32)
        self.scale = np.float32(np.sqrt(2.0 / n_waves))

    def __call__(self, xyz: np.ndarray) -> np.ndarray:
        out = np.zeros(xyz.shape[:-1], dtype=np.float32)
        for k, phase in zip(self.k, self.phase):
            out += np.cos(xyz @ k + phase)
        return out * self.scale


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, float32, without overflow warnings."""
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


@dataclass
class Head:
    """Brain ellipsoid with a wobbly surface, cortex, two ventricles, optional skull and scalp."""

    centre: np.ndarray  # mm
    radii: np.ndarray  # brain semi-axes along x, y, z (mm)
    surface: SmoothField

    def rho(self, xyz: np.ndarray) -> np.ndarray:
        """Normalised radius: < 1 inside the brain, 1 on its (irregular) surface."""
        r = np.linalg.norm((xyz - self.centre.astype(np.float32)) / self.radii.astype(np.float32), axis=-1)
        return r * (1.0 + 0.04 * self.surface(xyz))

    def tissues(self, xyz: np.ndarray) -> dict[str, np.ndarray]:
        """Fractions of csf, gm, wm in each voxel (summing to ``brain``) and the brain indicator."""
        rho = self.rho(xyz)
        brain = (rho < 1.0).astype(np.float32)
        c = self.centre.astype(np.float32)
        r = self.radii.astype(np.float32)
        ventricles = np.zeros(rho.shape, dtype=np.float32)
        for side in (-1.0, 1.0):  # two lateral ventricles either side of the midline
            vc = c + np.array([side * 0.13, 0.05, 0.12], dtype=np.float32) * r
            vr = np.array([0.09, 0.32, 0.16], dtype=np.float32) * r
            dv = np.linalg.norm((xyz - vc) / vr, axis=-1)
            ventricles = np.maximum(ventricles, sigmoid((1.0 - dv) * 8.0))
        cortex = sigmoid((rho - 0.84) * 60.0)  # the outer ~15 % of the brain is grey matter
        csf = brain * np.maximum(ventricles, sigmoid((rho - 0.97) * 150.0) * 0.6)
        gm = brain * (1.0 - csf) * cortex
        wm = brain - csf - gm
        return {"brain": brain, "csf": csf, "gm": gm, "wm": wm, "rho": rho}


@dataclass
class Lesion:
    """An irregular ellipsoidal blob; ``distance`` is < 1 inside, 1 on its boundary."""

    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray  # 3x3
    wobble: SmoothField

    def distance(self, xyz: np.ndarray) -> np.ndarray:
        local = (xyz - self.centre.astype(np.float32)) @ self.rotation.astype(np.float32)
        d = np.linalg.norm(local / self.radii.astype(np.float32), axis=-1)
        return d * (1.0 + 0.12 * self.wobble(xyz))

    def probability(self, xyz: np.ndarray, edge_mm: float, p_max: float, scale: float = 1.0) -> np.ndarray:
        """Soft lesion map: ``p_max`` inside, falling to 0 over about ``edge_mm`` at the boundary.

        ``scale`` > 1 grows the blob (e.g. the hypoperfused region around a stroke core).
        """
        # (scale - d) * radius is roughly the distance to the boundary in mm (positive inside).
        mm_inside = (scale - self.distance(xyz)) * float(np.mean(self.radii))
        return p_max * sigmoid(mm_inside / edge_mm)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def place_lesion(
    rng: np.random.Generator,
    head: Head,
    radius_frac: tuple[float, float],
    hemisphere: str | None,
    z_range: tuple[float, float] | None = None,
    min_radius_mm: float = 0.0,
) -> Lesion:
    """A lesion inside the brain, in the given hemisphere ('left' = smaller world x) or either.

    ``radius_frac`` scales the mean brain radius; ``z_range`` (mm) confines the centre, e.g. to an
    ISLES slab.
    """
    mean_r = float(np.mean(head.radii))
    radii = np.maximum(rng.uniform(*radius_frac) * mean_r * rng.uniform(0.75, 1.25, size=3), min_radius_mm)
    side = {"left": -1.0, "right": 1.0}.get(hemisphere or "", float(rng.choice([-1.0, 1.0])))
    offset = np.array(
        [side * rng.uniform(0.25, 0.5), rng.uniform(-0.4, 0.4), rng.uniform(-0.3, 0.3)]
    ) * head.radii
    centre = head.centre + offset
    if z_range is not None:
        centre[2] = rng.uniform(*z_range)
    return Lesion(centre, radii, random_rotation(rng), SmoothField(rng, (15.0, 40.0), 4))


def combine(probabilities: list[np.ndarray]) -> np.ndarray:
    """Probability that at least one of independent lesions covers the voxel."""
    out = np.ones_like(probabilities[0])
    for p in probabilities:
        out *= 1.0 - p
    return (1.0 - out).astype(np.float32)
