"""Cost of the calibration methods: cached logits for Platt, a cached prefix for MC dropout.

Measured side by side in one run, on the same subjects and the same network:

* ``platt_cached_speedup`` -- Platt scaling fitted on the base stage's cached logits (float16
  files, batches of 64 z-slices) against the same fit (same module, schedule, slice order) whose
  loader recomputes the U-Net forward of every training and validation subject each epoch
  (target >= 20x). ``platt_cached_speedup_incl_export`` charges the one-time export to the
  cached fit as well.
* ``mc_decoder_prefix_speedup`` / ``mc_center_prefix_speedup`` -- 20-sample MC inference of one
  subject with the deterministic prefix run once against the whole net run 20 times, same
  dropout masks (outputs asserted equal; target >= 1.3x).
* ``dropout_site_speedup`` -- one MC-dropout site (``calib.nets.unet.DropoutSite``, rate 0.5) on
  a decoder-sized activation, its uniform-draw mask against ``torch.nn.functional.dropout``'s
  Bernoulli sampling on the CPU (kept fraction and scale asserted alike).

Each figure is a ratio of process CPU seconds (min over repeats, one torch thread), so that a
burst of foreign load on a shared machine does not tilt it; the wall-time ratios are reported
beside them. Subjects are synthetic smooth images (the cost does not depend on their content);
the network is the paper's BraTS U-Net unless ``--net tiny``. ``python bench/methods.py [--json]``; with
``--json`` the last line is one JSON object of the figures and the settings they came from.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import json_tail, machine  # noqa: E402
from calib.data.batches import SliceBatches  # noqa: E402
from calib.logits import write_subject_logits  # noqa: E402
from calib.methods import build_method  # noqa: E402
from calib.methods.mc_dropout import mc_probability  # noqa: E402
from calib.nets import UNet3D, UNetConfig, count_parameters  # noqa: E402
from calib.nets.unet import DropoutSite  # noqa: E402
from calib.training import fit  # noqa: E402


class Timer:
    """Wall and CPU seconds of a block. The figures are CPU-time ratios: on a machine shared with
    other jobs, a burst of foreign load stretches wall time but not this process's CPU time
    (run with one torch thread, so that CPU time is compute, not spin-waiting threads)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def make_subjects(n: int, shape: tuple[int, int, int], channels: int, seed: int):
    """Smooth random images, an ellipsoidal mask and a thresholded label per subject."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    mask = (grid ** 2).sum(0) < 0.9
    subjects = []
    for _ in range(n):
        image = np.stack([gaussian_filter(rng.standard_normal(shape), 2) for _ in range(channels)])
        image = (image / image.std()).astype(np.float32) * mask
        label = (gaussian_filter(rng.standard_normal(shape), 3) > 0.05).astype(np.uint8) * mask
        subjects.append((image, label.astype(np.uint8), mask))
    return subjects


@torch.no_grad()
def net_logits(net: UNet3D, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return net(torch.from_numpy(image)[None], mask=torch.from_numpy(mask)[None, None])[0, 0].numpy()


class RecomputedSliceBatches(SliceBatches):
    """The strawman: the same slices in the same order, but every epoch starts by recomputing the
    U-Net forward of each subject (as a calibration fit without a logit cache must)."""

    def __init__(self, net, subjects, logits_dir, ids, **kw):
        super().__init__(logits_dir, ids, **kw)
        self._net, self._subjects = net, subjects

    def __call__(self, epoch=0):
        self._cache.logits = [
            np.ascontiguousarray(net_logits(self._net, img, m).astype(np.float16).transpose(2, 0, 1))
            for img, _, m in self._subjects]
        return super().__call__(epoch)


def bench_platt(net, subjects, n_train, epochs, repeats, workdir: Path) -> dict:
    ids = [f"s{i}" for i in range(len(subjects))]
    net_logits(net, *subjects[0][::2])  # warm-up of the first forward's one-time set-up
    with Timer() as export:
        for sid, (img, lab, m) in zip(ids, subjects):
            write_subject_logits(workdir, sid, net_logits(net, img, m), lab, m)
    tr, va = ids[:n_train], ids[n_train:]
    loaders = {
        "cached": (SliceBatches(workdir, tr, 64, shuffle=True, seed=0),
                   SliceBatches(workdir, va, 64, shuffle=False)),
        "recomputed": (RecomputedSliceBatches(net, subjects[:n_train], workdir, tr, batch_size=64, seed=0),
                       RecomputedSliceBatches(net, subjects[n_train:], workdir, va, batch_size=64,
                                              shuffle=False)),
    }

    def run(variant: str, n_epochs: int) -> tuple[Timer, tuple[float, float]]:
        # a fixed number of epochs for both variants (no early stop)
        method = build_method("platt", {"max_epochs": n_epochs, "early_stop_patience": n_epochs + 1})
        train, val = loaders[variant]
        with Timer() as t:
            fit(method.module, method._loss, train, lambda: val(0), method.train_config(),
                torch.device("cpu"))
        return t, method.weight_bias

    run("cached", 1)  # warm-up: torch's first optimiser step costs ~1 s of one-time set-up
    runs = {"cached": [], "recomputed": []}
    for _ in range(repeats):
        runs["recomputed"].append(run("recomputed", epochs))
        for _ in range(3):  # the cached fit takes well under a second: more tries against noise
            runs["cached"].append(run("cached", epochs))
    (w_cached, w_recomputed) = runs["cached"][0][1], runs["recomputed"][0][1]
    assert np.allclose(w_cached, w_recomputed, atol=1e-4), (w_cached, w_recomputed)
    cpu = {v: min(t.cpu for t, _ in r) for v, r in runs.items()}
    wall = {v: min(t.wall for t, _ in r) for v, r in runs.items()}
    return {"platt_cached_fit_cpu_s": cpu["cached"], "platt_recomputed_fit_cpu_s": cpu["recomputed"],
            "logit_export_cpu_s": export.cpu,
            "platt_cached_speedup": cpu["recomputed"] / cpu["cached"],
            "platt_cached_speedup_incl_export": cpu["recomputed"] / (cpu["cached"] + export.cpu),
            "platt_cached_wall_speedup": wall["recomputed"] / wall["cached"]}


def bench_mc(net, subject, setting: str, samples: int, repeats: int) -> dict:
    image, _, mask = subject
    x, m = torch.from_numpy(image)[None], torch.from_numpy(mask)[None, None]
    net.set_dropout(setting)
    net.eval()
    runs = {True: [], False: []}
    outputs = {}
    for _ in range(repeats):  # alternate the variants so that machine noise hits both alike
        for cached in (True, False):
            with Timer() as t:
                outputs[cached] = mc_probability(net, x, m, samples, seed=0, cache_prefix=cached)
            runs[cached].append(t)
    net.set_dropout(None)
    diff = float((outputs[True] - outputs[False]).abs().max())
    assert diff < 1e-5, f"{setting}: cached and uncached MC outputs differ by {diff}"
    cpu = {k: min(t.cpu for t in r) for k, r in runs.items()}
    wall = {k: min(t.wall for t in r) for k, r in runs.items()}
    return {f"mc_{setting}_cached_cpu_s": cpu[True], f"mc_{setting}_uncached_cpu_s": cpu[False],
            f"mc_{setting}_max_abs_diff": diff,
            f"mc_{setting}_prefix_speedup": cpu[False] / cpu[True],
            f"mc_{setting}_prefix_wall_speedup": wall[False] / wall[True]}


def bench_dropout_site(shape: tuple[int, int, int], channels: int, repeats: int) -> dict:
    site = DropoutSite(0.5)
    site.active = True
    x = torch.randn(1, channels, *shape)
    runs = {"site": [], "F.dropout": []}
    calls = 20
    for _ in range(repeats):  # alternate the variants so that machine noise hits both alike
        for name, f in (("site", site), ("F.dropout", lambda t: torch.nn.functional.dropout(t, 0.5, True))):
            with Timer() as t:
                for _ in range(calls):
                    y = f(x)
            runs[name].append(t)
            kept = float((y != 0).float().mean())
            assert abs(kept - 0.5) < 0.01 and torch.allclose(y[y != 0], 2 * x[y != 0]), name
    cpu = {k: min(t.cpu for t in r) / calls for k, r in runs.items()}
    return {"dropout_site_cpu_ms": 1e3 * cpu["site"], "dropout_functional_cpu_ms": 1e3 * cpu["F.dropout"],
            "dropout_site_speedup": cpu["F.dropout"] / cpu["site"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="last line: one JSON object of the figures")
    ap.add_argument("--net", choices=("paper", "tiny"), default="paper")
    ap.add_argument("--shape", type=int, nargs=3, default=(54, 54, 54), metavar=("X", "Y", "Z"),
                    help="volume size (multiples of 27 avoid padding in the paper net)")
    ap.add_argument("--subjects", type=int, default=6, help="Platt: subjects (2 of them validate)")
    ap.add_argument("--epochs", type=int, default=3, help="Platt: epochs of both fits")
    ap.add_argument("--samples", type=int, default=20, help="MC samples")
    ap.add_argument("--repeats", type=int, default=2, help="timings per variant (min kept)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: CPU time measures compute only)")
    args = ap.parse_args(argv)
    if args.subjects < 3:
        ap.error("--subjects must be >= 3")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = UNetConfig.paper("brats18") if args.net == "paper" else UNetConfig.tiny(4)
    net = UNet3D(cfg).eval()
    shape = tuple(args.shape)
    subjects = make_subjects(args.subjects, shape, cfg.in_channels, seed=0)
    figures = {"device": "cpu", "machine": machine(),
               "torch_threads": args.threads, "net": args.net, "parameters": count_parameters(net),
               "shape": list(shape), "subjects": args.subjects, "platt_epochs": args.epochs,
               "mc_samples": args.samples, "timing": "min over repeats of process CPU seconds"}
    with tempfile.TemporaryDirectory() as tmp:
        figures.update(bench_platt(net, subjects, args.subjects - 2, args.epochs, args.repeats, Path(tmp)))
    for setting in ("decoder", "center"):
        figures.update(bench_mc(net, subjects[0], setting, args.samples, args.repeats))
    figures.update(bench_dropout_site(shape, cfg.features[0][1], max(args.repeats, 3)))

    print(f"calibration-method costs: {args.net} U-Net ({figures['parameters']:,} parameters), "
          f"{args.subjects} subjects of {shape}, {args.threads} CPU threads")
    print(f"{'figure':<36}{'value':>12}")
    for key, value in figures.items():
        if isinstance(value, float):
            print(f"{key:<36}{value:>12.3f}")
    for key, target in (("platt_cached_speedup", 20), ("mc_decoder_prefix_speedup", 1.3),
                        ("mc_center_prefix_speedup", 1.3)):
        verdict = "meets" if figures[key] >= target else "misses"
        print(f"{key} = {figures[key]:.2f}x {verdict} the target >= {target}x")
    json_tail(figures, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
