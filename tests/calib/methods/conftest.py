"""Fixtures of the method tests.

Synthetic phantom logits: a smooth true logit field (Gaussian-smoothed noise, std 2) inside an
ellipsoidal mask; labels Bernoulli(sigmoid(true logit)); the cached "base logits" are
``scale * true logit``: scale 1 is a perfectly calibrated base model, scale 4 an overconfident one.
Built with numpy in milliseconds, no U-Net involved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.special import expit

from calib.logits import write_index, write_subject_logits

SHAPE = (32, 32, 24)


def write_phantom_logits(out: Path, n_subjects: int, scale: float, seed: int = 0,
                         shape: tuple[int, int, int] = SHAPE) -> tuple[list[str], dict[str, np.ndarray]]:
    """Write ``n_subjects`` into the logit cache ``out``; returns their ids and true probabilities."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    mask = (grid ** 2).sum(0) < 0.9
    ids, true = [], {}
    for i in range(n_subjects):
        field = gaussian_filter(rng.standard_normal(shape), 3)
        field *= 2.0 / field.std()
        prob = expit(field)
        label = (rng.random(shape) < prob).astype(np.uint8)
        sid = f"phantom{i:03d}"
        write_subject_logits(out, sid, scale * field, label, mask)
        ids.append(sid)
        true[sid] = prob.astype(np.float32)
    write_index(out, ids, shape, {"scale": scale, "seed": seed})
    return ids, true


@pytest.fixture(autouse=True)
def _one_thread():
    # two CPU cores are shared by the whole test run
    torch.set_num_threads(1)


@pytest.fixture
def phantom_logits(tmp_path):
    """``phantom_logits(n, scale, seed)`` -> (logits_dir, ids, true probabilities)."""
    def make(n_subjects: int, scale: float, seed: int = 0):
        out = tmp_path / f"logits_x{scale}_s{seed}"
        ids, true = write_phantom_logits(out, n_subjects, scale, seed)
        return out, ids, true
    return make


IMAGE_SHAPE = (18, 18, 9)
CHANNELS = 2


def write_tiny_cache(out: Path, n_subjects: int, seed: int = 0,
                     shape: tuple[int, int, int] = IMAGE_SHAPE) -> list[str]:
    """A preprocessed cache in the cache layout of docs/architecture.md (``<id>.npz`` + ``meta.json``), written directly:
    image channels are noisy copies of a smooth lesion field, so a net can learn something."""
    import json

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    mask = (grid ** 2).sum(0) < 1.2
    ids = []
    for i in range(n_subjects):
        field = gaussian_filter(rng.standard_normal(shape), 2)
        field *= 2.0 / field.std()
        prob = expit(3 * field - 1)
        label = (rng.random(shape) < prob).astype(np.uint8) * mask
        image = np.stack([field + 0.3 * rng.standard_normal(shape) for _ in range(CHANNELS)])
        sid = f"tiny{i:03d}"
        np.savez(out / f"{sid}.npz", image=(image * mask).astype(np.float32),
                 label=label.astype(np.uint8), mask=mask, true_prob=(prob * mask).astype(np.float32))
        ids.append(sid)
    (out / "meta.json").write_text(json.dumps({"config": {"shape": list(shape)}, "hash": "test",
                                               "channels": [f"c{c}" for c in range(CHANNELS)],
                                               "subjects": ids}))
    return ids


@pytest.fixture
def tiny_cache(tmp_path):
    """(cache_dir, subject ids) of 4 tiny preprocessed subjects of IMAGE_SHAPE, CHANNELS channels."""
    ids = write_tiny_cache(tmp_path / "cache", 4)
    return tmp_path / "cache", ids
