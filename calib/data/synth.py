"""Geometry helpers of the phantom generator: grids, smooth random fields, soft lesion shapes.

Every structure is a function of a position in millimetres, never of an array index, so one
subject can be written on any grid (any axis order, flip, spacing or slab) and the anatomy stays
where the affine says it is. World coordinates are RAS+ (the NIfTI/nibabel convention): +x points
to the patient's Right, +y Anterior, +z Superior; the patient's left hemisphere is at smaller x.
Coordinate arrays are channel first, (3, *shape), so that each axis is one contiguous array.

Labels are random: ``p*`` (the lesion probability) is a smooth map, and each voxel's label is
``1[U(x) < p*(x)]`` with ``U(x)`` uniform on [0, 1] at every voxel, so ``p*`` is the exact
probability behind every label. ``U`` is either independent per voxel (``iid``: speckled labels)
or :func:`correlated_uniform`, a smooth field with the same uniform marginals (``correlated``:
a boundary drawn a little further in or out over a stretch, as annotators disagree).
:func:`label_frequency_bins` checks the contract on labels and p* (phantom or cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from calib.vocabulary import LABEL_NOISES

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


def world_axes(affine: np.ndarray) -> list[int]:
    """The world axis (0 = x, 1 = y, 2 = z) each stored axis of an axis-aligned grid runs along."""
    mat = np.asarray(affine, dtype=float)[:3, :3]
    axes = [int(np.argmax(np.abs(mat[:, a]))) for a in range(3)]
    if sorted(axes) != [0, 1, 2] or np.count_nonzero(np.abs(mat) > 1e-9) != 3:
        raise ValueError(f"the grid is not axis-aligned (affine {mat.tolist()})")
    return axes


def axis_coords(affine: np.ndarray, region: tuple[slice, slice, slice]) -> list[np.ndarray]:
    """World coordinate (mm) of the voxel centres along each stored axis of an axis-aligned grid,
    restricted to ``region``; the world axis of stored axis ``a`` is ``world_axes(affine)[a]``."""
    axes = world_axes(affine)
    return [
        (affine[w, a] * np.arange(s.start, s.stop) + affine[w, 3]).astype(np.float32)
        for a, (w, s) in enumerate(zip(axes, region))
    ]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, float32, without overflow warnings."""
    return (0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float32)))).astype(np.float32)


class LatticeField:
    """Smooth random fields in world mm: Gaussian bumps on a regular lattice, i.i.d. N(0, 1) weights.

    ``spacing`` (mm) is both the lattice step and the bumps' standard deviation, so the field
    varies over a few ``spacing``. The weights of each point are normalised, so every point of the
    field is N(0, 1). On an axis-aligned grid the field is a product of three small per-axis
    matrices with the lattice weights (a few matrix products, no per-voxel exponentials).
    """

    def __init__(self, rng: np.random.Generator, centre: np.ndarray, half_extent: np.ndarray,
                 spacing: float, n_fields: int = 1):
        self.spacing = float(spacing)
        counts = [int(math.ceil(float(h) / self.spacing)) + 1 for h in half_extent]
        self.nodes = [float(c) + self.spacing * np.arange(-k, k + 1) for c, k in zip(centre, counts)]
        self.weights = rng.standard_normal((n_fields, *(len(n) for n in self.nodes))).astype(np.float32)

    def _basis(self, coords: np.ndarray, world_axis: int) -> np.ndarray:
        d = (coords[:, None] - self.nodes[world_axis][None, :]) / self.spacing
        w = np.exp(-0.5 * d * d)
        return (w / np.sqrt(np.maximum((w * w).sum(1, keepdims=True), 1e-30))).astype(np.float32)

    def on_grid(self, affine: np.ndarray, region: tuple[slice, slice, slice]) -> np.ndarray:
        """The fields on the voxels of ``region`` of the grid: float32 (n_fields, *region shape)."""
        axes = world_axes(affine)
        b0, b1, b2 = (self._basis(c, w) for c, w in zip(axis_coords(affine, region), axes))
        weights = self.weights.transpose(0, *(1 + np.array(axes)))  # lattice axes in stored order
        n, la, lb, lc = weights.shape
        out = np.empty((n, b0.shape[0], b1.shape[0], b2.shape[0]), dtype=np.float32)
        for f in range(n):
            t = (b0 @ weights[f].reshape(la, lb * lc)).reshape(-1, lb, lc)  # (i, b, c)
            t = np.einsum("ibc,jb->ijc", t, b1, optimize=True)  # (i, j, c)
            out[f] = (t.reshape(-1, lc) @ b2.T).reshape(out.shape[1:])
        return out


class WaveField:
    """A random smooth field: a sum of plane cosine waves, roughly unit standard deviation."""

    def __init__(self, rng: np.random.Generator, wavelength_mm: tuple[float, float], n_waves: int = 6):
        directions = rng.normal(size=(n_waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(*wavelength_mm, size=n_waves)
        self.k = (2 * np.pi * directions / wavelengths[:, None]).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, size=n_waves).astype(np.float32)
        self.scale = np.float32(np.sqrt(2.0 / n_waves))

    def __call__(self, xyz: np.ndarray) -> np.ndarray:
        """The field at positions ``xyz`` (3, ...) mm."""
        out = np.zeros(xyz.shape[1:], dtype=np.float32)
        for k, phase in zip(self.k, self.phase):
            out += np.cos(k[0] * xyz[0] + k[1] * xyz[1] + k[2] * xyz[2] + phase)
        return out * self.scale


def random_rotation(rng: np.random.Generator, max_deg: tuple[float, float, float]) -> np.ndarray:
    """Rotation about x, then y, then z by angles uniform in +-``max_deg`` (degrees)."""
    ax, ay, az = np.deg2rad([rng.uniform(-m, m) for m in max_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def uniform_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation drawn uniformly (Haar) from SO(3)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


@dataclass
class Lesion:
    """An irregular ellipsoidal blob in template mm; ``distance`` is < 1 inside, 1 on its boundary."""

    centre: np.ndarray  # mm
    radii: np.ndarray  # semi-axes (mm)
    rotation: np.ndarray  # 3x3, columns = the blob's axes
    wobble: WaveField  # irregular outline: +-12 % of the radius

    @property
    def mean_radius(self) -> float:
        return float(np.mean(self.radii))

    def reach(self, scale: float = 1.0) -> float:
        """Radius (mm) of a ball around ``centre`` outside which ``distance`` > ``scale``."""
        wobble_max = float(self.wobble.scale) * len(self.wobble.k)  # |sum of cosines| bound
        return scale * float(np.max(self.radii)) / max(1.0 - 0.12 * wobble_max, 0.3)

    def distance(self, xyz: np.ndarray) -> np.ndarray:
        """Normalised ellipsoidal distance at positions ``xyz`` (3, ...) mm."""
        rel = [xyz[i] - np.float32(self.centre[i]) for i in range(3)]
        d2 = np.zeros(xyz.shape[1:], dtype=np.float32)
        for j in range(3):  # coordinate along the blob's axis j, in units of its radius
            r = self.rotation[:, j] / self.radii[j]
            local = rel[0] * np.float32(r[0]) + rel[1] * np.float32(r[1]) + rel[2] * np.float32(r[2])
            d2 += local * local
        return np.sqrt(d2) * (1.0 + 0.12 * self.wobble(xyz))


def combine(probabilities: list[np.ndarray]) -> np.ndarray:
    """Probability that at least one of independent lesions covers the voxel."""
    out = np.ones_like(probabilities[0])
    for p in probabilities:
        out *= 1.0 - p
    return (1.0 - out).astype(np.float32)


# Correlation length of the correlated U (mm): twice the BraTS-like p* band (0.1 to 0.9 over
# 4.4 mm), so a stretch of boundary moves in or out as one, and below a lesion's radius, so the
# parts of one outline move apart; chosen from these two scales, not fitted to any result.
LABEL_CORRELATION_MM = 8.0


@dataclass(frozen=True)
class LabelNoise:
    """How ``U`` of the labels ``1[U < p*]`` is drawn: ``mode`` in :data:`LABEL_NOISES`; ``rng``
    the label stream of a subject (``correlated`` only)."""

    mode: str = "iid"
    rng: np.random.Generator | None = None
    length_mm: float = LABEL_CORRELATION_MM


def draw_labels(rng: np.random.Generator, p: np.ndarray, affine: np.ndarray,
                noise: LabelNoise | None) -> np.ndarray:
    """Labels ``U < p`` (bool, ``p``'s shape, on the grid of ``affine``): the label contract.

    ``rng``: the subject's stream, which draws the iid ``U`` in both modes (``phantom`` says why);
    ``noise`` None or ``iid`` keeps it, ``correlated`` replaces it by :func:`correlated_uniform`
    drawn from ``noise.rng``.
    """
    u = rng.random(p.shape, dtype=np.float32)
    if noise is not None and noise.mode == "correlated":
        spacing = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
        u = correlated_uniform(noise.rng, p.shape, spacing, noise.length_mm)
    return u < p


def correlated_uniform(rng: np.random.Generator, shape: tuple[int, ...], spacing_mm: np.ndarray,
                       length_mm: float, truncate: float = 4.0) -> np.ndarray:
    """A smooth random field, exactly uniform on [0, 1] at every voxel: ``U = Phi(G)``.

    ``G`` is white N(0, 1) noise correlated (valid part only, so every voxel sees the whole
    kernel) with a Gaussian kernel of standard deviation ``length_mm / sqrt(2)`` along each
    axis (voxel sizes ``spacing_mm``, one per stored axis), divided by the kernel's L2 norm: a
    weighted sum of i.i.d. normals whose squared weights sum to 1, so ``G(x)`` is exactly
    N(0, 1) and its correlation between points ``d`` mm apart is ``exp(-d^2 / (2 length_mm^2))``
    (on grids fine against the length; coarser axes, e.g. thick slabs, sample the kernel at their
    voxel centres). ``Phi`` is the normal CDF, so ``P(U(x) < p) = p`` at every voxel.
    ``truncate``: kernel half-width in standard deviations. Returns float32 ``shape``.
    """
    from scipy import ndimage, special

    sd = float(length_mm) / math.sqrt(2.0) / np.asarray(spacing_mm, dtype=np.float64)
    radii = [int(math.ceil(truncate * s)) for s in sd]
    field = rng.standard_normal(tuple(n + 2 * r for n, r in zip(shape, radii)), dtype=np.float32)
    norm = 1.0
    for axis, (s, r) in enumerate(zip(sd, radii)):
        k = np.arange(-r, r + 1, dtype=np.float64)
        weights = np.exp(-0.5 * (k / s) ** 2)
        norm *= float(np.sum(weights * weights))
        field = ndimage.correlate1d(field, weights.astype(np.float32), axis=axis, mode="constant")
        field = field[(slice(None),) * axis + (slice(r, field.shape[axis] - r),)]  # the valid part
    return special.ndtr(field / np.float32(math.sqrt(norm))).astype(np.float32)


def label_frequency_bins(true_prob: np.ndarray, label: np.ndarray, draws: np.ndarray | None = None,
                         n_bins: int = 10, confidence: float = 0.999, min_voxels: int = 200) -> list[dict]:
    """Is ``p*`` the probability of the labels? The label-1 fraction per bin of ``p*``.

    ``true_prob``, ``label``: the voxels to check (e.g. inside the mask), flat or any shape.
    ``draws``: an id per voxel of the draw it holds (e.g. subject and ``transforms.source_voxels``
    for a cache, where nearest resampling copies one draw onto several voxels); each draw then
    counts once, as the binomial interval assumes independent draws. One row per equal-width bin
    with at least ``min_voxels`` voxels: ``bin``, ``voxels``, ``n`` (draws), ``fraction`` (of
    label 1 among the draws), ``mean_p`` (their mean p*), ``low`` / ``high`` (the two-sided
    ``confidence`` binomial interval of the fraction around ``mean_p``, ``scipy.stats.binom``;
    with unequal p* in a bin the count's variance is below the binomial's, so the interval is
    conservative), ``inside`` and ``z`` ((fraction - mean_p) / binomial standard error).
    """
    from scipy import stats

    p = np.asarray(true_prob, dtype=np.float64).ravel()
    y = np.asarray(label).ravel() > 0
    if draws is not None:
        _, first = np.unique(np.asarray(draws).reshape(len(p), -1), axis=0, return_index=True)
        once = np.zeros(len(p), dtype=bool)
        once[first] = True
    else:
        once = np.ones(len(p), dtype=bool)
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    rows = []
    for b in range(n_bins):
        in_bin = bins == b
        voxels = int(in_bin.sum())
        if voxels < min_voxels:
            continue
        sel = in_bin & once
        n, mean_p, ones = int(sel.sum()), float(p[sel].mean()), int(y[sel].sum())
        low, high = stats.binom.interval(confidence, n, mean_p)
        se = math.sqrt(max(mean_p * (1 - mean_p), 1e-12) / n)
        rows.append({"bin": b, "voxels": voxels, "n": n, "fraction": ones / n, "mean_p": mean_p,
                     "low": low / n, "high": high / n, "inside": bool(low <= ones <= high),
                     "z": (ones / n - mean_p) / se})
    return rows
