"""ECE throughput: calib.metrics.ece against a plain numpy three-bincount reference.

Both run on the same voxels in one process, interleaved, best of ``--repeats``; the reported
figure is the ratio ``ece_speedup_vs_numpy`` (reference seconds / ours), so it holds on a noisy
machine. The two must agree: identical bin counts and positive counts, ECE equal to 1e-12 (the
confidence sums differ only in float64 summation order). 1 % of the voxels are bin-edge values
and their float32 neighbours, so the agreement covers the ties. With a CUDA device the same
check runs on CUDA tensors (counts and ECE) and its time is reported beside. ``--json``: the last
line is one JSON object.

    python bench/metrics.py [--json] [--voxels 20000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import json_tail, machine  # noqa: E402
from calib.metrics import ece, reliability_bins  # noqa: E402


def numpy_reference(p: np.ndarray, y: np.ndarray, m: np.ndarray, n_bins: int = 20):
    """The paper's recipe in plain numpy: mask, float64 bin index, three bincounts."""
    pp = p[m].astype(np.float64)
    yy = y[m]
    idx = np.minimum(np.floor(pp * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf = np.bincount(idx, weights=pp, minlength=n_bins)
    pos = np.bincount(idx, weights=yy, minlength=n_bins)
    nz = count > 0
    acc, cf = pos[nz] / count[nz], conf[nz] / count[nz]
    value = float(np.sum(count[nz] / count[nz].sum() * np.abs(acc - cf)))
    return value, count, pos


def edge_values(n_bins: int = 20) -> np.ndarray:
    """Every float32 bin edge k/n (rounded to float32) with its two float32 neighbours, in [0, 1]:
    the values where a binning that is not exact goes wrong."""
    vals = []
    for k in range(n_bins + 1):
        v = np.float32(k / n_bins)
        vals += [np.nextafter(v, np.float32(0)), v, np.nextafter(v, np.float32(2))]
    vals = np.array(vals, np.float32)
    return vals[(vals >= 0) & (vals <= 1)]


def make_data(voxels: int, seed: int):
    """Segmentation-like data: most probabilities near 0, labels drawn from them, a 60 % mask;
    1 % of the voxels sit on or next to a bin edge (:func:`edge_values`, p = 0 and p = 1 among
    them), so that the comparison with the reference covers the ties."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(-4.0, 4.0, voxels).astype(np.float32)
    p = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    ties = rng.random(voxels) < 0.01
    p[ties] = rng.choice(edge_values(), int(ties.sum()))
    y = (rng.random(voxels, dtype=np.float32) < p).astype(np.uint8)
    m = rng.random(voxels, dtype=np.float32) < 0.6
    return p, y, m


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--voxels", type=int, default=20_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.voxels < 1 or args.repeats < 1:
        ap.error("--voxels and --repeats must be positive")

    p, y, m = make_data(args.voxels, args.seed)
    ref_s, ours_s = float("inf"), float("inf")
    for _ in range(args.repeats):  # interleaved so both see the same machine load
        t, (ref_value, ref_count, ref_pos) = best_time(lambda: numpy_reference(p, y, m), 1)
        ref_s = min(ref_s, t)
        t, ours_value = best_time(lambda: ece(p, y, m), 1)
        ours_s = min(ours_s, t)

    count, _, pos = reliability_bins(p, y, m)
    assert count.tolist() == ref_count.tolist(), "bin counts differ from the reference"
    assert pos.tolist() == ref_pos.astype(np.int64).tolist(), "positive counts differ from the reference"
    diff = abs(ours_value - ref_value)
    assert diff <= 1e-12, f"ECE differs from the reference by {diff}"

    result = {
        "voxels": args.voxels,
        "masked_voxels": int(m.sum()),
        "ece": ours_value,
        "ece_abs_diff_vs_numpy": diff,
        "ece_seconds": ours_s,
        "numpy_reference_seconds": ref_s,
        "ece_speedup_vs_numpy": ref_s / ours_s,
        "machine": f"{machine()}, numpy {np.__version__}",
    }
    try:
        import torch

        if torch.cuda.is_available():
            dev = torch.device("cuda")
            tp, ty, tm = (torch.from_numpy(a).to(dev) for a in (p, y, m))
            ece(tp, ty, tm)  # warm-up
            torch.cuda.synchronize()
            cuda_s, cuda_value = best_time(lambda: ece(tp, ty, tm), args.repeats)
            cuda_count, _, cuda_pos = reliability_bins(tp, ty, tm)
            assert cuda_count.tolist() == ref_count.tolist(), "CUDA bin counts differ from the reference"
            assert cuda_pos.tolist() == ref_pos.astype(np.int64).tolist(), \
                "CUDA positive counts differ from the reference"
            assert abs(cuda_value - ref_value) <= 1e-12, "CUDA ECE differs from the reference"
            result.update(ece_cuda_seconds=cuda_s, ece_cuda_speedup_vs_numpy=ref_s / cuda_s,
                          cuda_device=torch.cuda.get_device_name(dev))
    except ImportError:
        pass

    print(f"ECE over {args.voxels:,} voxels ({result['masked_voxels']:,} in the mask), best of {args.repeats}")
    print(f"  {'numpy three-bincount reference':34s} {ref_s * 1000:9.1f} ms")
    print(f"  {'calib.metrics.ece':34s} {ours_s * 1000:9.1f} ms   x{result['ece_speedup_vs_numpy']:.2f}")
    if "ece_cuda_seconds" in result:
        print(f"  {'calib.metrics.ece (CUDA tensors)':34s} {result['ece_cuda_seconds'] * 1000:9.1f} ms   "
              f"x{result['ece_cuda_speedup_vs_numpy']:.2f}")
    print(f"  ECE {ours_value:.10f}, |difference| {diff:.1e}; {result['machine']}")
    json_tail(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
