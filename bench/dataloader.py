"""Volume-loader throughput against a training step of the paper's BraTS U-Net, side by side.

Writes ``--subjects`` BraTS phantoms in the real geometry (240x240x155 at 1 mm) and preprocesses
them with the real pipeline and cache writer to the paper's 136x136x82 at 2 mm (4 channels,
~24 MB of float32 per subject). Then, in one process, interleaved, best of ``--repeats``:

* ``old``: the loader this one replaced -- ``load_subject`` of a compressed ``.npz`` (format 1,
  written here with ``atomic_io.save_npz``) for every volume of every epoch, in the training thread
  (its 2 GiB memory budget kept ~37 % of a paper-size fold; this is its path for the rest);
* ``new``: ``calib.data.batches.VolumeBatches`` on the uncompressed format-2 cache (raw reads into the batch), with 0 and
  with 2 worker processes (workers start and end with each epoch, as in training); on CUDA the
  batches are pinned and copied to the device (``non_blocking``) inside the timing.

An epoch is ``--epoch-volumes`` volumes (the subjects repeated), so per-epoch costs weigh as in
a fold of many subjects; the pages are in the OS cache (a fold of 228 subjects is ~5.5 GB, held
by any training node's RAM after the first epoch). The training step is ``bench/unet.py``'s:
forward + BCE + backward + Adam, batch 2, bf16 on CUDA. On CPU it runs by default on a
68x68x41 crop (1/8 of the volume: a full-size CPU step takes ~80 s and ~15 GB) and is scaled to
volumes/s by voxel count (``step_extrapolated``); ``--step-shape 136 136 82`` measures the full
size.

Figures: ``loader_volumes_per_s`` (the default worker count of the device, ``default_workers``),
``loader_vs_step_ratio`` (that / training-step volumes per second), ``new_vs_old_loader_ratio``.
``--json``: the last line is one JSON object.

    python bench/dataloader.py [--json] [--device cpu|cuda] [--subjects 3] [--epoch-volumes 24]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import device_name, json_tail, time_steps  # noqa: E402  (the step bench/unet.py times)
from calib.data import load_subject, preprocess_dataset, read_meta, write_phantoms  # noqa: E402
from calib.atomic_io import save_npz, write_json  # noqa: E402
from calib.data.batches import VolumeBatches, default_workers  # noqa: E402
from calib.nets import UNet3D, UNetConfig  # noqa: E402


def old_loader_epoch(cache_dir: Path, ids: list[str], batch_size: int, seed: int, epoch: int):
    """The replaced loader's re-read path: every volume inflated from its .npz in this thread."""
    order = np.random.default_rng([seed, epoch]).permutation(len(ids))
    for start in range(0, len(order), batch_size):
        loaded = []
        for i in order[start:start + batch_size]:
            s = load_subject(cache_dir, ids[i])
            loaded.append((np.asarray(s.image, dtype=np.float32), np.asarray(s.label),
                           np.asarray(s.mask, dtype=bool)))
        yield {
            "image": torch.from_numpy(np.stack([a[0] for a in loaded])),
            "label": torch.from_numpy(np.stack([(a[1] > 0) for a in loaded]).astype(np.float32))[:, None],
            "mask": torch.from_numpy(np.stack([a[2] for a in loaded]))[:, None],
        }


def time_epoch(batches, device: torch.device) -> tuple[float, int]:
    """Seconds to draw (and on CUDA move to the device) every batch of one epoch; volumes seen."""
    t0 = time.perf_counter()
    n = 0
    for b in batches:
        if device.type == "cuda":
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        n += b["image"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, n


def write_caches(tmp: Path, n_subjects: int, phantom_shape, shape) -> tuple[Path, Path, list[str]]:
    """A format-2 cache from the real pipeline, and the same subjects in format 1 (compressed)."""
    write_phantoms("brats18", tmp / "raw", n_subjects, seed=0, shape=tuple(phantom_shape))
    new = preprocess_dataset("brats18", tmp / "raw", tmp / "cache", shape=tuple(shape), progress=False)
    meta = read_meta(new)
    old = tmp / "cache-format1"
    old.mkdir()
    for sid in meta["subjects"]:
        s = load_subject(new, sid)
        arrays = {"image": s.image, "label": s.label, "mask": s.mask}
        if s.true_prob is not None:
            arrays["true_prob"] = s.true_prob
        save_npz(old / f"{sid}.npz", **arrays)
    write_json(old / "meta.json", meta)
    return new, old, list(meta["subjects"])


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.glob("*.npz")) / 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--subjects", type=int, default=3, help="phantom subjects written (default 3)")
    ap.add_argument("--epoch-volumes", type=int, default=24, help="volumes per timed epoch (default 24)")
    ap.add_argument("--repeats", type=int, default=2, help="timed epochs per loader; the best counts")
    ap.add_argument("--batch", type=int, default=2, help="volumes per batch (paper: 2)")
    ap.add_argument("--phantom-shape", type=int, nargs=3, default=[240, 240, 155], metavar=("X", "Y", "Z"),
                    help="raw phantom grid at 1 mm (BraTS: 240 240 155)")
    ap.add_argument("--shape", type=int, nargs=3, default=[136, 136, 82], metavar=("X", "Y", "Z"),
                    help="preprocessed grid at 2 mm (paper: 136 136 82)")
    ap.add_argument("--step-shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                    help="grid of the timed training step (default: --shape on CUDA, 1/8 of it on CPU)")
    ap.add_argument("--steps", type=int, help="timed training steps (default 10 on CUDA, 2 on CPU)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    if min(args.subjects, args.epoch_volumes, args.repeats, args.batch, *args.shape) < 1:
        ap.error("--subjects, --epoch-volumes, --repeats, --batch and --shape must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    step_shape = tuple(args.step_shape) if args.step_shape else (
        shape if cuda else tuple(max(1, s // 2) for s in shape))
    steps = args.steps or (10 if cuda else 2)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    default_w = default_workers() if cuda else 0
    worker_counts = sorted({0, min(2, cpus), default_w})

    with tempfile.TemporaryDirectory(prefix="bench-dataloader-") as tmp:
        t0 = time.perf_counter()
        new_dir, old_dir, subjects = write_caches(Path(tmp), args.subjects, args.phantom_shape, shape)
        write_s = time.perf_counter() - t0
        ids = [subjects[i % len(subjects)] for i in range(args.epoch_volumes)]
        loaders = {"old (inflate .npz, training thread)":
                   lambda e: old_loader_epoch(old_dir, ids, args.batch, 0, e)}
        for w in worker_counts:
            vb = VolumeBatches(new_dir, ids, args.batch, shuffle=True, seed=0, workers=w, pin_memory=cuda)
            loaders[f"new (raw reads, {w} workers{', pinned' if cuda else ''})"] = vb.batches
        best = {name: float("inf") for name in loaders}
        for rep in range(args.repeats + 1):  # the first pass warms the page cache and is not timed
            for name, make in loaders.items():
                sec, n = time_epoch(make(rep), device)
                assert n == len(ids), (name, n)
                if rep:
                    best[name] = min(best[name], sec)
        rates = {name: len(ids) / sec for name, sec in best.items()}
        sizes = {"format 1 (compressed)": folder_mb(old_dir), "format 2 (uncompressed)": folder_mb(new_dir)}

    torch.manual_seed(0)
    net = UNet3D(UNetConfig.paper("brats18")).to(device)
    if cuda:
        net = net.to(memory_format=torch.channels_last_3d)
    step_s = time_steps(net, device, step_shape, args.batch, steps, 3 if cuda else 1, bf16=cuda)
    scale = float(np.prod(step_shape)) / float(np.prod(shape))  # volumes per step-volume
    step_volumes_per_s = args.batch * scale / step_s

    old_name = next(iter(loaders))
    new_name = next(n for n in loaders if n.startswith(f"new (raw reads, {default_w} workers"))
    result = {
        "device": device_name(device),
        "subjects": args.subjects, "epoch_volumes": args.epoch_volumes, "batch": args.batch,
        "shape": list(shape), "step_shape": list(step_shape), "steps": steps,
        "volume_mb": 4 * int(np.prod(shape)) * 4 / 1e6,
        "cache_mb_per_subject": {k: v / args.subjects for k, v in sizes.items()},
        "write_seconds": write_s,
        "loaders_volumes_per_s": rates,
        "default_workers": default_w,
        "step_seconds": step_s, "step_volumes_per_s": step_volumes_per_s,
        "step_extrapolated": step_shape != shape,
        "loader_volumes_per_s": rates[new_name],
        "loader_vs_step_ratio": rates[new_name] / step_volumes_per_s,
        "new_vs_old_loader_ratio": rates[new_name] / rates[old_name],
    }

    print(f"volume loader vs paper BraTS U-Net step on {result['device']}")
    print(f"  {args.subjects} phantom subjects -> {shape} x 4 channels ({result['volume_mb']:.1f} MB float32), "
          f"written in {write_s:.0f} s; epoch of {len(ids)} volumes, batch {args.batch}, best of {args.repeats}")
    for k, v in result["cache_mb_per_subject"].items():
        print(f"  cache {k:24s} {v:8.1f} MB per subject on disk")
    for name, rate in rates.items():
        print(f"  {name:42s} {rate:9.2f} volumes/s   x{rate / rates[old_name]:.1f} vs old")
    how = f"{step_shape} scaled by voxels" if result["step_extrapolated"] else f"{step_shape}"
    print(f"  {'training step (' + how + ')':42s} {step_volumes_per_s:9.3f} volumes/s   "
          f"({step_s:.3f} s per step of {args.batch})")
    print(f"  loader_vs_step_ratio {result['loader_vs_step_ratio']:.1f}   "
          f"new_vs_old_loader_ratio {result['new_vs_old_loader_ratio']:.1f}   (default workers: {default_w})")
    json_tail(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
