"""Every writer of a shared folder survives a concurrent writer of the same content (issue 24.1):
two real processes started together on the same empty target both succeed, return the same
folder and see the same bytes, and no temporary folder is left beside it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # the children import race_writers by name

from race_writers import run_together, tree_digest  # noqa: E402

from calib.data import write_phantoms  # noqa: E402
from calib.data.cache import write_subject  # noqa: E402
from calib.data.predictions_phantom import write_prediction_phantoms  # noqa: E402


def _assert_agree(results, parent: Path) -> Path:
    for status, what, _, _ in results:
        assert status == "ok", what
    # the race happened: one rename put its folder in place, the other met it and kept it
    assert sorted(placed for *_, placed in results) == [[False], [True]]
    targets = {what for _, what, _, _ in results}
    digests = {digest for _, _, digest, _ in results}
    assert len(targets) == 1 and len(digests) == 1, results
    target = Path(targets.pop())
    assert tree_digest(target) == digests.pop()
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
    assert leftovers == []
    return target


def test_two_phantom_writers(tmp_path):
    target = _assert_agree(run_together("phantoms", {"out": str(tmp_path / "brats18")}), tmp_path)
    assert (target / ".calib-phantom.json").is_file()


def test_two_sweep_data_preps_writing_phantoms(tmp_path):
    target = _assert_agree(run_together("data_prep", {"out": str(tmp_path / "brats18")}), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brats18"]  # no marker file beside it
    assert any(target.rglob("*_seg.nii.gz"))


def test_two_predictions_imports(tmp_path):
    write_prediction_phantoms(tmp_path / "ext", 2, base_shape=(10, 10, 8))
    out = tmp_path / "cache"
    _assert_agree(run_together("import", {"root": str(tmp_path / "ext"), "out": str(out)}), out)


def test_two_logit_exports(tmp_path):
    cache = tmp_path / "pre"
    cache.mkdir()
    rng = np.random.default_rng(0)
    ids = ["a", "b"]
    for sid in ids:
        write_subject(cache / f"{sid}.npz", image=rng.standard_normal((1, 6, 5, 4)).astype(np.float32),
                      label=(rng.random((6, 5, 4)) > 0.5).astype(np.uint8), mask=np.ones((6, 5, 4), bool))
    out = tmp_path / "stage" / "logits"
    target = _assert_agree(run_together("logits", {"cache": str(cache), "ids": ids, "out": str(out)}),
                           out.parent)
    assert (target / "index.json").is_file()


def test_two_preprocessing_runs(tmp_path):
    root = tmp_path / "brats18"
    write_phantoms("brats18", root, 2, seed=0, shape=(24, 24, 16))
    out = tmp_path / "cache"
    _assert_agree(run_together("preprocess", {"root": str(root), "out": str(out)}), out)
