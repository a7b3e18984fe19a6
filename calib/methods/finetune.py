"""Fine-tuning of the last layer (Rousseau et al. 2021).

Every weight of the base U-Net is frozen except the final 1x1x1 conv that produces the logit;
that layer is retrained with CE on batches of 2 whole volumes, Adam with an initial LR of 1e-4
for CE base weights and 1e-3 for soft-Dice-based weights (CE-SD, SD), then the usual plateau
schedule and early stopping (DESIGN.md "Facts").
"""

from __future__ import annotations

from torch import nn

from calib.methods.logit_based import CALIBRATION_SCHEDULE
from calib.methods.network_based import NetworkMethod

#: Initial learning rate of fine-tuning by base weights (the paper's recipe).
FINETUNE_LR = {"CE": 1e-4, "CE-SD": 1e-3, "SD": 1e-3}


class FineTuneLastLayer(NetworkMethod):
    """Retrain ``net.last_layer()`` with CE; ``lr`` defaults by base weights, ``batch_size`` 2."""

    name = "finetune"
    DEFAULTS = {**CALIBRATION_SCHEDULE, "lr": None, "batch_size": 2, "loss": "ce"}

    def __init__(self, params=None, **context):
        params = dict(params or {})
        if params.get("lr") is None:
            weights = context.get("weights", "CE")
            params["lr"] = FINETUNE_LR.get(weights, FINETUNE_LR["CE"])  # bad weights caught below
        super().__init__(params, **context)

    def trained_parameters(self) -> list[nn.Parameter]:
        return list(self.net.last_layer().parameters())

    def loss_name(self) -> str:
        return self.params["loss"]
