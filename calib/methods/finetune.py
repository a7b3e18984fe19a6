"""Fine-tuning of the last layer (Rousseau et al. 2021).

Every weight of the base U-Net is frozen except the final 1x1x1 conv that produces the logit;
that layer is retrained with CE on batches of 2 whole volumes, Adam with an initial LR of 1e-4
for CE base weights and 1e-3 for soft-Dice-based weights (CE-SD, SD), then the usual plateau
schedule and early stopping (the recipe: calib.methods.recipes).
"""

from __future__ import annotations

from torch import nn

from calib.methods.network_based import NetworkMethod


class FineTuneLastLayer(NetworkMethod):
    """Retrain ``net.last_layer()`` with CE; ``lr`` defaults by base weights, ``batch_size`` 2."""

    name = "finetune"

    def trained_parameters(self) -> list[nn.Parameter]:
        return list(self.net.last_layer().parameters())

    def loss_name(self) -> str:
        return self.params["loss"]
