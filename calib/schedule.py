"""The optimisation settings of one training (:class:`TrainConfig`), without torch.

calib.training's loop trains with them; the sweep builds and checks them when it reads a grid,
which must not load torch (``sweeps.config.load_grid``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training stage (defaults as the paper)."""

    lr: float
    max_epochs: int
    lr_factor: float = 0.1
    lr_patience: int = 3
    early_stop_patience: int = 6
    min_rel_improvement: float = 1e-4
    seed: int = 0
    batch_size: int = 1
    #: L2 penalty on the trained conv/linear kernels (parameters with >= 2 dims), as Keras'
    #: ``kernel_regularizer=l2(weight_decay)``: the loss gains ``weight_decay * sum(w ** 2)``.
    #: The paper's public code uses 1e-5 on the BraTS net and none on ISLES.
    weight_decay: float = 0.0
    #: Keep the weights of the best validation epoch (True) or of the last epoch run (False, as
    #: the paper's public code, which predicts with its end-of-training weights).
    restore_best: bool = True

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if self.max_epochs < 1:
            raise ValueError(f"TrainConfig.max_epochs must be >= 1, got {self.max_epochs!r}")
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"TrainConfig.lr_factor must be in (0, 1), got {self.lr_factor!r}")
        if self.lr_patience < 0 or self.early_stop_patience < 1:
            raise ValueError("TrainConfig.lr_patience must be >= 0 and early_stop_patience >= 1, got "
                             f"{self.lr_patience!r}, {self.early_stop_patience!r}")
        if self.min_rel_improvement < 0:
            raise ValueError(f"TrainConfig.min_rel_improvement must be >= 0, got {self.min_rel_improvement!r}")
        if self.batch_size < 1:
            raise ValueError(f"TrainConfig.batch_size must be >= 1, got {self.batch_size!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"TrainConfig.weight_decay must be a number >= 0, got {self.weight_decay!r}")
