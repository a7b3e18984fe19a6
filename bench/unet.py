"""Training-step throughput of the paper's BraTS U-Net on the current device.

One step = forward + masked BCE + backward + Adam update, as calib.training.fit runs it (bf16
autocast and channels-last on CUDA only). Reports voxels/s of the input volume. On CUDA it also
times float32 steps side by side and reports ``bf16_speedup_vs_fp32``. CPU defaults stay short
(a 54^3 crop, batch 1, 2 timed steps); CUDA defaults use the paper's 136x136x82, batch 2.
``--json``: the last line is one JSON object.

    python bench/unet.py [--json] [--device cpu|cuda] [--shape X Y Z] [--batch N] [--steps N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import device_name, json_tail, time_steps  # noqa: E402
from calib.nets import UNet3D, UNetConfig, count_parameters  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dataset", default="brats18", choices=["brats18", "isles18"])
    ap.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"))
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    cuda = device.type == "cuda"
    shape = tuple(args.shape) if args.shape else ((136, 136, 82) if cuda else (54, 54, 54))
    batch = args.batch or (2 if cuda else 1)
    steps = args.steps or (10 if cuda else 2)
    warmup = 3 if cuda else 1
    if min(shape) < 1 or batch < 1 or steps < 1:
        ap.error("--shape, --batch and --steps must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    net = UNet3D(UNetConfig.paper(args.dataset)).to(device)
    if cuda:
        net = net.to(memory_format=torch.channels_last_3d)
    voxels = batch * shape[0] * shape[1] * shape[2]
    result = {
        "device": device_name(device),
        "dataset": args.dataset, "parameters": count_parameters(net), "shape": list(shape),
        "batch": batch, "steps": steps,
    }
    sec = time_steps(net, device, shape, batch, steps, warmup, bf16=cuda)
    result.update(step_seconds=sec, train_voxels_per_s=voxels / sec,
                  precision="bf16 autocast, channels-last" if cuda else "float32")
    if cuda:
        sec32 = time_steps(net, device, shape, batch, steps, warmup, bf16=False)
        result.update(fp32_step_seconds=sec32, fp32_train_voxels_per_s=voxels / sec32,
                      bf16_speedup_vs_fp32=sec32 / sec,
                      peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30)

    print(f"paper {args.dataset} U-Net ({result['parameters']:,} parameters) on {result['device']}")
    print(f"  input {batch} x {shape}, {steps} timed steps after {warmup} warm-up")
    print(f"  {result['precision']:30s} {sec:8.3f} s/step  {result['train_voxels_per_s']:12,.0f} voxels/s")
    if cuda:
        print(f"  {'float32':30s} {sec32:8.3f} s/step  {result['fp32_train_voxels_per_s']:12,.0f} voxels/s"
              f"   bf16 x{result['bf16_speedup_vs_fp32']:.2f}")
    json_tail(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
