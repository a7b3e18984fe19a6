"""The MONAI preprocessing pipeline (``build_pipeline``) and three dictionary transforms that the
stock set lacks:

- ``HeadMaskd``: brain/head mask from a threshold on one channel, as a resamplable image.
- ``ExtentSpacingd``: resample to isotropic spacing on a grid that spans the voxels' full extent.
- ``MaskedNormalized``: per-channel z-score with statistics taken inside a mask.
- ``FixedNormalized``: per-channel fixed shift and scale (the paper's public code).

A phantom's ``true_prob`` is resampled exactly as its label, with ``nearest``: each cached label
voxel is a copy of one source voxel's draw, so the probability of that copy is that very source
voxel's p*, and only a nearest copy of p* says so voxel by voxel. Bilinear p* would mix in the
neighbours' p*, whose draws the label never saw: on ISLES slabs one 4-8 mm slice's draw is copied
onto two to four 2 mm slices while p* was interpolated between slabs: on 3 ISLES-like phantoms
(real grid, seed 0) the voxels of cached p* in [0.4, 0.5) were labelled 1 in 51.6 % of cases at a
mean p* of 44.8 % (n = 1722), and BraTS-like ones at 2 mm failed the same check (issue 20). Drawing the labels anew on the working grid would also be exact, but then the cached
label would no longer be the stored one resampled, as it is for the real datasets, and
preprocessing would have to know how the phantom drew its labels. The price of nearest: p* is as
blocky as the label along thick slabs, which is what the label's probability is.
``source_voxels`` says which source voxel each cached voxel copies (checks of this contract).
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import (
    AsDiscreted,
    Compose,
    LoadImaged,
    MapTransform,
    NormalizeIntensity,
    Orientationd,
    ResizeWithPadOrCropd,
    SpatialResample,
)

from .preprocess import TRUE_PROB_INTERP  # "nearest", as the label (module doc)

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # (start, end) of each axis: +x runs L -> R


class HeadMaskd(MapTransform):
    """Add ``mask_key``: channel ``channel`` of ``source_key`` > ``threshold``, keeping the affine."""

    def __init__(self, source_key: str, mask_key: str, channel: int = 0, threshold: float = 0.0):
        super().__init__([source_key])
        self.source_key, self.mask_key = source_key, mask_key
        self.channel, self.threshold = channel, threshold

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        src = d[self.source_key]
        # Float 0/1 so that it can be resampled; slicing a MetaTensor keeps its affine.
        d[self.mask_key] = (src[self.channel : self.channel + 1] > self.threshold).to(torch.float32)
        return d


def extent_grid(affine: np.ndarray, shape: Sequence[int], spacing: float) -> tuple[np.ndarray, tuple[int, ...]]:
    """Output affine and shape for resampling a grid to ``spacing`` mm, axis directions kept.

    Each input voxel is a box (a 5 mm slice covers 5 mm), so the output spans n * t mm along an
    axis of n voxels of size t, centred on the input grid. Both grids then cover the same volume
    of tissue; MONAI's Spacing spans voxel centres only, (n - 1) * t, which drops half a slice
    at each end: a third of a 3-slice ISLES slab.
    """
    affine = np.asarray(affine, dtype=np.float64)
    n = np.asarray(shape, dtype=np.float64)
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    out_shape = np.maximum(1, np.round(n * sizes / spacing)).astype(int)
    out = np.eye(4)
    out[:3, :3] = affine[:3, :3] / sizes * spacing
    centre = affine[:3, :3] @ ((n - 1) / 2) + affine[:3, 3]
    out[:3, 3] = centre - out[:3, :3] @ ((out_shape - 1) / 2)
    return out, tuple(int(s) for s in out_shape)


class ExtentSpacingd(MapTransform):
    """Resample ``keys`` onto the ``extent_grid`` of the first key (MONAI SpatialResample).

    ``modes`` per key ("bilinear" for images, "nearest" for labels/masks). Outside the outermost
    voxel centres (up to half a voxel) values repeat the edge voxel ("border" padding), which is
    what a thick slice means.
    """

    def __init__(self, keys: Sequence[str], spacing: float, modes: Sequence[str]):
        super().__init__(keys)
        self.spacing = float(spacing)
        self.modes = dict(zip(self.keys, modes))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        ref = d[self.keys[0]]
        dst_affine, shape = extent_grid(np.asarray(ref.affine), ref.shape[1:], self.spacing)
        for key in self.key_iterator(d):
            resample = SpatialResample(mode=self.modes[key], padding_mode="border", dtype=torch.float32)
            d[key] = resample(d[key], dst_affine=torch.as_tensor(dst_affine), spatial_size=shape)
        return d


class MaskedNormalized(MapTransform):
    """Z-score each channel of ``keys`` with the mean/std of the voxels where ``mask_key`` is set,
    then set everything outside the mask to 0 (MONAI's NormalizeIntensity does the arithmetic).

    MONAI's own ``nonzero=True`` takes statistics over non-zero voxels, which is the brain for
    skull-stripped MR but not the head of a CT, and leaves zeros inside the brain unnormalised.
    """

    def __init__(self, keys: str | Sequence[str], mask_key: str):
        super().__init__(keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        inside = d[self.mask_key][0] > 0.5
        for key in self.key_iterator(d):
            img = d[key]
            if not inside.any():  # no statistics to take; the caller refuses an empty mask
                d[key] = img * 0
                continue
            values = img[:, inside].to(torch.float64)
            means = values.mean(dim=1).tolist()
            stds = values.std(dim=1, unbiased=False).tolist()  # a 0 std is taken as 1 by MONAI
            img = NormalizeIntensity(subtrahend=means, divisor=stds, channel_wise=True)(img)
            d[key] = img * inside.to(img.dtype)
        return d


class FixedNormalized(MapTransform):
    """``(x - shift[c]) / scale[c]`` for each channel ``c`` of ``keys``, everywhere in the grid.

    The paper's public code normalises this way with dataset-wide statistics per modality; it
    does not zero the outside of the mask (the padding added later is 0).
    """

    def __init__(self, keys: str | Sequence[str], shifts: Sequence[float], scales: Sequence[float]):
        super().__init__(keys)
        self.transform = NormalizeIntensity(subtrahend=list(shifts), divisor=list(scales),
                                            channel_wise=True)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


def build_pipeline(
    spacing: float,
    shape: Sequence[int],
    mask_threshold: float,
    with_true_prob: bool,
    orientation: str = "RAS",
    fixed: tuple[Sequence[float], Sequence[float]] | None = None,
    with_label: bool = True,
) -> Compose:
    """The per-subject pipeline of ``calib.data.preprocess`` (see its docstring for the steps).

    Input: ``{"image": [channel paths], "label": path, "true_prob": path}``; output MetaTensors
    ``image`` (C,X,Y,Z), ``label``, ``mask``, ``true_prob`` (1,X,Y,Z) on the ``shape`` grid.
    ``fixed``: (shifts, scales) per channel for the fixed normalisation, None for the per-subject
    z-score inside the mask. ``with_label=False``: a new case without a label (``calib.apply``),
    the same steps otherwise.
    """
    normalise = (MaskedNormalized("image", "mask") if fixed is None
                 else FixedNormalized("image", fixed[0], fixed[1]))
    extra = ["true_prob"] if with_true_prob else []
    label = ["label"] if with_label else []
    keys = ["image", *label, "mask", *extra]
    # true_prob nearest like the label: the p* of the source voxel whose draw the label copies.
    modes = ["bilinear", *(["nearest"] if with_label else []), "nearest",
             *([TRUE_PROB_INTERP] if with_true_prob else [])]
    return Compose(
        [
            LoadImaged(["image", *label, *extra], reader="NibabelReader", image_only=True,
                       dtype=np.float32, ensure_channel_first=True),
            HeadMaskd("image", "mask", channel=0, threshold=mask_threshold),
            # NibabelReader affines are RAS+ world; these labels are nibabel's axis convention.
            Orientationd(keys, axcodes=orientation, labels=_RAS_LABELS),
            ExtentSpacingd(keys, spacing, modes),
            *([AsDiscreted("label", threshold=0.5)] if with_label else []),  # whole tumour / lesion: label > 0
            normalise,
            ResizeWithPadOrCropd(keys, spatial_size=tuple(shape), mode="constant"),
        ]
    )


def source_voxels(affine: np.ndarray, shape: Sequence[int], spacing: float, out_shape: Sequence[int],
                  orientation: str = "RAS") -> np.ndarray:
    """Which source voxel each voxel of the cached grid copies under ``nearest`` resampling.

    ``affine``, ``shape``: the stored (source) grid of a subject, as nibabel reads it;
    ``spacing`` (mm) and ``out_shape``: the cache's. Returns int64 ``out_shape``: the flat
    (C-order) index into the stored array of the voxel the cached label and true_prob copy, -1
    in the padding. The same spatial steps as ``build_pipeline`` (orientation, ``ExtentSpacingd``,
    centre crop/pad) run on an image of voxel numbers, so copies of one draw can be told apart
    from independent draws (``synth.label_frequency_bins``).
    """
    from monai.data import MetaTensor

    n = int(np.prod(shape))
    if n >= 2**24:  # voxel numbers must be exact in float32, the resampler's dtype
        raise ValueError(f"source grid {tuple(shape)} has too many voxels to number in float32")
    numbers = MetaTensor(torch.arange(1, n + 1, dtype=torch.float32).reshape(1, *shape),
                         affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)))
    steps = Compose([Orientationd(["i"], axcodes=orientation, labels=_RAS_LABELS),
                     ExtentSpacingd(["i"], spacing, ["nearest"]),
                     ResizeWithPadOrCropd(["i"], spatial_size=tuple(out_shape), mode="constant")])
    out = steps({"i": numbers})["i"][0]
    return np.rint(np.asarray(out)).astype(np.int64) - 1
