"""What every bench script shares: the machine it ran on, the U-Net training step timer, and the
JSON tail (``--json``: the last line is one JSON object, what tests and ``--throughput`` read).

Imported by the scripts as ``bench._common`` (each puts the repository root on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import time


def machine() -> str:
    """This machine in one line: architecture, CPUs this process may use, Python."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{platform.machine()}, {os.cpu_count()} cores ({cpus} usable), "
            f"{platform.python_implementation()} {platform.python_version()}")


def device_name(device) -> str:
    """The torch ``device`` a bench timed: the GPU's name, or the CPU with torch's thread count."""
    import torch  # only the torch benches call this; bench/metrics.py runs without torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {machine()}, {torch.get_num_threads()} torch threads"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(net, device, shape, batch: int, steps: int, warmup: int, bf16: bool) -> float:
    """Seconds per training step of ``net`` (mean of ``steps`` after ``warmup``).

    One step = forward + masked BCE + backward + Adam update on a random batch of ``batch``
    volumes of ``shape``, as calib.training.fit runs it (bf16 autocast when ``bf16``; the input
    channels-last on CUDA).
    """
    import torch

    from calib.losses import bce_loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, net.cfg.in_channels, *shape, generator=g).to(device)
    y = (torch.rand(batch, *shape, generator=g) < 0.1).to(device)
    m = torch.ones(batch, *shape, dtype=torch.bool, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    net.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = bce_loss(net(x, m), y, m)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def json_tail(result: dict, enabled: bool) -> None:
    """Print ``result`` as the last line (``--json``)."""
    if enabled:
        print(json.dumps(result), flush=True)
