"""The paper's 3D U-Net (Eelbode/Bertels et al. 2020) with named MC-dropout sites."""

from calib.nets.config import NORMS, PAPER_DATASETS, POOLINGS, UNetConfig
from calib.nets.unet import (
    BACKGROUND_LOGIT,
    DROPOUT_SETTINGS,
    DropoutSite,
    PrefixState,
    UNet3D,
    count_parameters,
)

__all__ = [
    "BACKGROUND_LOGIT",
    "DROPOUT_SETTINGS",
    "DropoutSite",
    "NORMS",
    "PAPER_DATASETS",
    "POOLINGS",
    "PrefixState",
    "UNet3D",
    "UNetConfig",
    "count_parameters",
]
