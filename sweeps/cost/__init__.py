"""What a plan costs before it runs (docs/architecture.md, "Cost"): counted FLOPs per trial
(:mod:`~sweeps.cost.flops`), a device's effective FLOP/s from a named roofline or a measured
throughput file (:mod:`~sweeps.cost.devices`), trial durations (:mod:`~sweeps.cost.model`), the
list scheduler that packs them on N GPUs (:mod:`~sweeps.cost.schedule`) and the launch's
``--estimate`` (:mod:`~sweeps.cost.estimate`).

The package imports nothing itself: ``devices`` and ``schedule`` are torch-free (the command line
reads the device names), ``flops``, ``model`` and ``estimate`` import torch.
"""
