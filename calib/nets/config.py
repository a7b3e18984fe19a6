"""Configuration of the paper's U-Net (Eelbode/Bertels et al. 2020, as used by Rousseau et al. 2021).

The public code of the study (``my_utils/get_model.py`` in AxelJanRousseau/PostTrainCalibration)
builds, per dataset:

* 4 levels with subsampling factors 1, 3, 9, 27 (pooling by 3 at each level);
* encoder kernels (3,3,1) then (3,3,3) per level, (3,3,3) twice at the bottom;
  decoder kernels (3,3,3) then (3,3,1);
* encoder features per level ``(a, b)``: BraTS 20-40 / 40-80 / 80-160 / 160-160, ISLES half;
  the decoder block of a level mirrors it: ``(b, a)``;
* max pooling + instance normalisation (BraTS), average pooling without normalisation (ISLES);
* leaky ReLU (slope 0.01), trilinear upsampling, a final 1x1x1 conv giving one logit.
"""

from __future__ import annotations

from dataclasses import dataclass

from calib.vocabulary import BRATS18, DATASETS, ISLES18

POOLINGS = ("max", "avg")
NORMS = ("instance", "none")
#: The datasets the paper defines a U-Net for (every dataset of the study).
PAPER_DATASETS = DATASETS

_BRATS_FEATURES = ((20, 40), (40, 80), (80, 160), (160, 160))


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a :class:`calib.nets.UNet3D`.

    Attributes:
        in_channels: number of input modalities (BraTS 4, ISLES 5).
        features: encoder features ``(first conv, second conv)`` per level, top level first; the
            last entry is the bottom level. At least 2 levels.
        pooling: ``"max"`` or ``"avg"``, the down-sampling between levels.
        norm: ``"instance"`` (affine-free instance normalisation before each activation, as the
            paper's code) or ``"none"``.
        dropout_rate: rate of every MC-dropout site when a dropout setting is switched on.
        pool_factor: down-sampling factor per level (3 in the paper: 1, 3, 9, 27).
        negative_slope: leaky-ReLU slope (0.01 in the paper).
    """

    in_channels: int
    features: tuple[tuple[int, int], ...]
    pooling: str = "max"
    norm: str = "instance"
    dropout_rate: float = 0.5
    pool_factor: int = 3
    negative_slope: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.in_channels, int) or self.in_channels < 1:
            raise ValueError(f"UNetConfig.in_channels must be a positive int, got {self.in_channels!r}")
        feats = tuple(tuple(int(f) for f in level) for level in self.features)
        if len(feats) < 2 or any(len(level) != 2 or min(level) < 1 for level in feats):
            raise ValueError(
                "UNetConfig.features must hold >= 2 levels of (first, second) positive feature "
                f"counts, got {self.features!r}"
            )
        object.__setattr__(self, "features", feats)
        if self.pooling not in POOLINGS:
            raise ValueError(f"UNetConfig.pooling={self.pooling!r}; valid choices: {POOLINGS}")
        if self.norm not in NORMS:
            raise ValueError(f"UNetConfig.norm={self.norm!r}; valid choices: {NORMS}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"UNetConfig.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        if self.pool_factor < 2:
            raise ValueError(f"UNetConfig.pool_factor must be >= 2, got {self.pool_factor!r}")

    @property
    def levels(self) -> int:
        """Number of resolution levels (4 in the paper)."""
        return len(self.features)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes are padded up to a multiple of this (27 for the paper's net)."""
        return self.pool_factor ** (self.levels - 1)

    @classmethod
    def paper(cls, dataset: str) -> "UNetConfig":
        """The network of the paper for ``"brats18"`` or ``"isles18"``."""
        if dataset == BRATS18:
            return cls(in_channels=4, features=_BRATS_FEATURES, pooling="max", norm="instance")
        if dataset == ISLES18:
            half = tuple((a // 2, b // 2) for a, b in _BRATS_FEATURES)
            return cls(in_channels=5, features=half, pooling="avg", norm="none")
        raise ValueError(f"unknown dataset {dataset!r}; valid choices: {PAPER_DATASETS}")

    @classmethod
    def tiny(cls, in_channels: int, dataset: str = BRATS18, levels: int = 3,
             base: int = 4) -> "UNetConfig":
        """A small net with the paper's layout (pooling/norm of ``dataset``) for tests and demos.

        ``levels`` levels with ``base``, 2*``base``, ... features; fast on a CPU for 32^3 volumes.
        """
        if dataset not in PAPER_DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; valid choices: {PAPER_DATASETS}")
        if levels < 2:
            raise ValueError(f"UNetConfig.tiny needs levels >= 2, got {levels}")
        feats = [(base * 2**i, base * 2 ** (i + 1)) for i in range(levels - 1)]
        bottom = feats[-1][1]
        feats.append((bottom, bottom))
        paper = cls.paper(dataset)
        return cls(in_channels=in_channels, features=tuple(feats), pooling=paper.pooling,
                   norm=paper.norm)
