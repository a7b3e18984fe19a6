"""Test-time shifts of the phantoms: the same subjects rendered with another image, p* unchanged.

A shift (:class:`ImageShift`) is a named, documented change of how the phantom generator
(``calib.data.phantom``) renders a subject's *images* only. The subject's random stream is drawn
exactly as without the shift (same seed, same draws in the same order), so the anatomy, the
lesion, p* and the labels drawn from it are bit-identical to the unshifted phantom; only the
arithmetic that turns the drawn quantities into intensities changes. The identity shift (every
factor 1) renders bit-identical images: an unshifted phantom is today's.

Fields (each a factor; 1 = as drawn):

* ``contrast`` c: per image, the noise-free signal (after gain and bias field, before noise) is
  scaled about its mean over the brain (BraTS: each MR sequence; ISLES: the CT's brain tissue and
  each perfusion map inside the brain): ``m + c (s - m)``; the noise is unchanged, so the
  contrast-to-noise ratio is c times the drawn one. c = 0 leaves a flat brain plus noise. A
  per-subject z-score (the default preprocessing) removes a plain linear rescaling of the whole
  image, not this change of contrast against the noise.
* ``noise`` f: the drawn noise standard deviation of every image is multiplied by f (the same
  standard-normal draws, scaled): the residual image - noise-free signal is f times the drawn one.
* ``bias_field`` b (BraTS-like only): the drawn strength of the smooth multiplicative bias field
  (``exp(k B(x))``, ``k`` uniform in 0.04..0.12, ``B`` a unit lattice field) becomes ``b k``; b = 0
  removes it. The ISLES-like CT has no bias field (HU are absolute), so the field is refused there.
* ``slab_mm`` (ISLES-like only): the slab is re-rendered on slices of ``slab_mm`` instead of the
  drawn 4-8 mm, covering the same height (``round(n t / slab_mm)`` slices, at least 2; possibly
  more than the grid's maximum slice count). What stays the same: in-plane pixels and field of
  view, the slab's centre and tilt, the subject's warp of the template (anatomy), the lesions
  (sites picked on the drawn grid, sizes, shapes) and so p* as a function of position, evaluated
  at the new voxel centres as on any grid. What is new: the labels are drawn afresh on the new
  voxels (``1[U < p*]``, the same contract), and every later draw of the subject's stream (skull
  thickness field, perfusion severity and regional field, noise) is taken at other stream
  positions, so they are those of another draw of the same distributions. Combined with the
  other fields it applies them too.

The shift is part of the phantom recipe (``.calib-phantom.json``), so a folder of shifted
phantoms is never taken for the unshifted ones nor for another shift.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from calib.vocabulary import PHANTOM_SHIFT_FIELDS as SHIFT_FIELDS
from calib.vocabulary import PHANTOM_SHIFTS as SHIFTABLE

from .errors import DataError


@dataclass(frozen=True)
class ImageShift:
    """How a phantom's images are rendered differently (module doc); every factor >= 0."""

    contrast: float = 1.0
    noise: float = 1.0
    bias_field: float = 1.0
    slab_mm: float | None = None  # ISLES-like: slice thickness (mm) of the re-rendered slab

    @classmethod
    def of(cls, value: "ImageShift | Mapping | None", dataset: str | None = None) -> "ImageShift":
        """``value`` as an ImageShift: None is the identity; a mapping names fields of
        :data:`SHIFT_FIELDS` (for ``dataset``, those of :data:`SHIFTABLE`). Raises DataError
        naming a bad field or value and the valid choices."""
        if value is None:
            return cls()
        if isinstance(value, ImageShift):
            value = asdict(value)
        allowed = SHIFTABLE.get(dataset, SHIFT_FIELDS) if dataset else SHIFT_FIELDS
        out = {}
        for k, v in dict(value).items():
            if k not in allowed:
                raise DataError(f"unknown phantom shift field {k!r}"
                                f"{f' for {dataset}' if dataset else ''}; valid choices: {', '.join(allowed)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise DataError(f"phantom shift field {k!r} must be a number >= 0, got {v!r}")
            if k == "slab_mm" and v <= 0:
                raise DataError(f"phantom shift field 'slab_mm' must be > 0 (mm), got {v!r}")
            out[k] = float(v)
        return cls(**out)

    @property
    def identity(self) -> bool:
        return self == ImageShift()

    def recipe(self) -> dict:
        """The fields that differ from the identity (what goes into the phantom recipe)."""
        defaults = asdict(ImageShift())
        return {k: v for k, v in asdict(self).items() if v != defaults[k]}

    def bias_strength(self, strength: float) -> float:
        """The bias field's strength as rendered: ``bias_field`` x the drawn one."""
        return strength if self.bias_field == 1.0 else strength * self.bias_field

    def noise_sd(self, sd):
        """The noise standard deviation as rendered: ``noise`` x the drawn one (same type)."""
        return sd if self.noise == 1.0 else type(sd)(sd * self.noise)

    def contrast_about_mean(self, signal: np.ndarray, inside: np.ndarray | None = None) -> np.ndarray:
        """``m + contrast (signal - m)``, ``m`` the mean of ``signal`` over ``inside`` (all its
        voxels when None); values outside ``inside`` are kept. The identity returns ``signal``."""
        if self.contrast == 1.0:
            return signal
        signal = np.asarray(signal)
        dtype = signal.dtype if signal.dtype.kind == "f" else np.dtype(np.float32)
        region = signal if inside is None else signal[inside]
        m = dtype.type(region.mean(dtype=np.float64))
        scaled = (m + dtype.type(self.contrast) * (signal.astype(dtype) - m)).astype(dtype)
        return scaled if inside is None else np.where(inside, scaled, signal).astype(dtype)
