"""Two real processes writing one shared folder at once (tests/calib/test_concurrent_writers.py).

Each child (multiprocessing, spawn: a fresh interpreter as a second launch would be) runs one
writer on the same target. ``atomic_io.publish_folder`` is wrapped to wait on a barrier, so both
children have filled their temporary folder before either renames it: the second rename then
meets the first's folder (ENOTEMPTY), the race the issue saw, every time rather than by luck.
"""

from __future__ import annotations

import hashlib
import traceback
from multiprocessing import get_context
from pathlib import Path
from threading import BrokenBarrierError

TIMEOUT_S = 300


def tree_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes under ``folder``."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _echo():
    """A deterministic 'network' for the logit export: twice the first channel."""
    import torch

    class Echo(torch.nn.Module):
        def forward(self, image, mask=None):
            return image[:, :1] * 2.0

    return Echo()


def _write(writer: str, args: dict) -> Path:
    if writer == "phantoms":
        from calib.data import write_phantoms

        write_phantoms("brats18", Path(args["out"]), 1, seed=3, shape=(16, 16, 16))
        return Path(args["out"])
    if writer == "data_prep":
        from sweeps.grid import DatasetSpec, PhantomSpec
        from sweeps.run.data_prep import ensure_phantoms

        # one subject, below a grid file's minimum: built unchecked, as the sweep's own writer sees it
        ensure_phantoms(DatasetSpec("brats18", Path(args["out"]),
                                    PhantomSpec.model_construct(subjects=1, seed=3, shape=(16, 16, 16))))
        return Path(args["out"])
    if writer == "preprocess":
        from calib.data import preprocess_dataset

        return preprocess_dataset("brats18", Path(args["root"]), Path(args["out"]), spacing=4.0,
                                  shape=(8, 8, 8), workers=1, progress=False)
    if writer == "import":
        from calib.data.predictions import PredictionsConfig, import_predictions

        root = Path(args["root"])
        config = PredictionsConfig.make(root / "predictions", root / "labels", masks=root / "masks")
        return import_predictions(config, Path(args["out"]), "ext")
    if writer == "logits":
        import torch

        from calib.logits import export_logits

        return export_logits(_echo(), Path(args["cache"]), args["ids"], Path(args["out"]),
                             torch.device("cpu"), source={"weights": "echo"})
    raise ValueError(f"unknown writer {writer!r}")


def _child(writer: str, args: dict, barrier, results, index: int) -> None:
    from calib import atomic_io

    publish = atomic_io.publish_folder
    placed = []

    def publish_together(*a, **kw):
        try:
            barrier.wait()
        except BrokenBarrierError:  # the other child failed before publishing: go on alone
            pass
        placed.append(publish(*a, **kw))
        return placed[-1]

    atomic_io.publish_folder = publish_together
    try:
        target = _write(writer, args)
        results.put((index, "ok", str(target), tree_digest(target), placed))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((index, "error", traceback.format_exc(), "", placed))


def run_together(writer: str, args: dict, n: int = 2) -> list[tuple[str, str, str, list[bool]]]:
    """Start ``n`` children on one writer and target at once; their (status, target or
    traceback, digest, what each publish returned: True put in place, False found the other's),
    in child order."""
    ctx = get_context("spawn")
    barrier = ctx.Barrier(n, timeout=TIMEOUT_S / 2)
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(writer, args, barrier, results, i)) for i in range(n)]
    for p in procs:
        p.start()
    got = dict()
    for _ in procs:
        index, status, what, digest, placed = results.get(timeout=TIMEOUT_S)
        got[index] = (status, what, digest, placed)
    for p in procs:
        p.join(timeout=60)
    return [got[i] for i in range(n)]
