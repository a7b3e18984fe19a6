"""How fast a device runs the counted FLOPs: a named roofline, or a measured throughput file.

A :class:`Roofline` is a device's peak dense FLOP/s from its data sheet, in the precision the
trainer uses there (calib.training: bf16 autocast on CUDA, float32 on the CPU), times an assumed
utilisation: the fraction of the peak a 3D U-Net step reaches. The utilisation is an
assumption, not a measurement, and the estimate prints it: convolutions with few channels
(the paper's nets start at 4 -> 20) and the memory-bound layers between them (instance norm,
leaky ReLU, trilinear upsampling, pooling) keep a 3D U-Net far from the peak; nnU-Net-class 3D
U-Nets train at roughly a tenth of a data-centre GPU's bf16 peak, the figure used for the GPUs.

A measured file overrides the roofline: the last JSON line of ``python bench/unet.py --json`` run
on the target device (:func:`read_throughput`, the one reader), whose ``train_voxels_per_s`` of
the paper's net of ``dataset`` at ``shape`` becomes an effective FLOP/s through that net's
counted training-step FLOPs (sweeps.cost.model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: The study's volume shape (the paper's crop): bench/unet.py's CUDA default, and the shape a
#: throughput file is taken at when it does not say.
PAPER_SHAPE = (136, 136, 82)


class EstimateError(ValueError):
    """A throughput file or device that cannot be used; the message names it."""


@dataclass(frozen=True)
class Roofline:
    """One device: data-sheet peaks (dense, FLOP/s) and the assumed utilisation (module doc)."""

    name: str
    label: str
    bf16_flops: float
    fp32_flops: float
    precision: str  # the precision the trainer runs in there: "bf16" or "fp32"
    utilisation: float

    @property
    def peak_flops(self) -> float:
        return self.bf16_flops if self.precision == "bf16" else self.fp32_flops

    @property
    def effective_flops(self) -> float:
        """FLOP/s a U-Net step is assumed to reach: peak x utilisation."""
        return self.peak_flops * self.utilisation

    def describe(self) -> str:
        return (f"roofline {self.name} ({self.label}): peak dense bf16 {self.bf16_flops / 1e12:g} / "
                f"fp32 {self.fp32_flops / 1e12:g} TFLOP/s, trains in {self.precision}, assumed "
                f"utilisation {self.utilisation:.0%} -> {self.effective_flops / 1e12:.1f} TFLOP/s")


#: Data-sheet dense peaks (no sparsity). H100: SXM5; A100: SXM4 80 GB; L4: 24 GB PCIe; cpu: one
#: 32-core AVX-512 server socket (2 FMA units x 16 fp32 lanes x 2 FLOPs x 2.0 GHz x 32 cores,
#: bf16 as fp32: PyTorch runs the CPU step in float32). Every utilisation is 10 %: on the CPU,
#: ``bench/unet.py`` measured 22.6 GFLOP/s (counted) on a shared 2-vCPU AVX-512 machine of
#: 333 GFLOP/s nominal, 7 %, when this table was written.
DEVICES: dict[str, Roofline] = {r.name: r for r in (
    Roofline("h100", "NVIDIA H100 SXM5", 989e12, 67e12, "bf16", 0.10),
    Roofline("a100", "NVIDIA A100 SXM4 80 GB", 312e12, 19.5e12, "bf16", 0.10),
    Roofline("l4", "NVIDIA L4", 121e12, 30.3e12, "bf16", 0.10),
    Roofline("cpu", "one 32-core AVX-512 socket", 4.1e12, 4.1e12, "fp32", 0.10),
)}
DEFAULT_DEVICE = "h100"


def roofline(name: str) -> Roofline:
    """The roofline of device ``name`` (one of :data:`DEVICES`)."""
    try:
        return DEVICES[name]
    except KeyError:
        raise EstimateError(f"unknown device {name!r}; valid choices: {', '.join(DEVICES)}") from None


@dataclass(frozen=True)
class Measured:
    """One ``bench/unet.py --json`` result: the paper's ``dataset`` net trained at
    ``train_voxels_per_s`` on volumes of ``shape`` on ``device``."""

    path: Path
    dataset: str
    train_voxels_per_s: float
    shape: tuple[int, int, int]
    device: str
    precision: str

    def describe(self) -> str:
        return f"{self.path} ({self.dataset}, {self.device}, {self.precision})"


def read_throughput(path: Path) -> Measured:
    """The JSON object on the last line of a ``bench/unet.py --json`` output file.

    Raises EstimateError naming the file when it has none, or none with ``train_voxels_per_s``.
    """
    path = Path(path)
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        data = json.loads(lines[-1])
    except (OSError, IndexError, json.JSONDecodeError) as exc:
        raise EstimateError(f"{path}: not a `bench/unet.py --json` output ({exc})") from None
    rate = data.get("train_voxels_per_s") if isinstance(data, dict) else None
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise EstimateError(f"{path}: its last line has no train_voxels_per_s (write it with "
                            "`python bench/unet.py --json > FILE` on the target device)")
    shape = data.get("shape") or PAPER_SHAPE
    return Measured(path, str(data.get("dataset", "brats18")), float(rate),
                    tuple(int(s) for s in shape), str(data.get("device", "device not named")),
                    str(data.get("precision", "")))
