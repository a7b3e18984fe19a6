"""Shared phantom datasets for the calib.data tests: written once per session, copied before
any test changes them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from calib.data import write_phantoms

# Small grids: BraTS 48x48x32 at 1 mm, ISLES 48x48 in-plane with up to 6 thick slices.
SMALL_SHAPES = {"brats18": (48, 48, 32), "isles18": (48, 48, 6)}
N_SMALL = 3


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)  # 2 cores shared by everyone


@pytest.fixture(scope="session")
def phantom_roots(tmp_path_factory) -> dict[str, Path]:
    """Read-only phantom roots, one per dataset (3 subjects, seed 0). Copy before changing."""
    base = tmp_path_factory.mktemp("phantoms")
    roots = {}
    for dataset, shape in SMALL_SHAPES.items():
        roots[dataset] = base / dataset
        write_phantoms(dataset, roots[dataset], N_SMALL, seed=0, shape=shape)
    return roots


@pytest.fixture
def copy_root(phantom_roots, tmp_path):
    """Return a fresh, writable copy of the phantom root of a dataset."""

    def _copy(dataset: str) -> Path:
        dst = tmp_path / f"{dataset}-copy"
        shutil.copytree(phantom_roots[dataset], dst)
        return dst

    return _copy
