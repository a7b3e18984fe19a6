"""Fixtures of the sweep tests: tiny phantom data written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.grids import ISLES_PHANTOM, PHANTOM


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A data root holding brats18/ and isles18/ phantoms (written as the sweep would)."""
    from sweeps.grid import DatasetSpec, PhantomSpec
    from sweeps.run.data_prep import ensure_phantoms

    root = tmp_path_factory.mktemp("phantoms")
    for name, ph in (("brats18", PHANTOM), ("isles18", ISLES_PHANTOM)):
        ensure_phantoms(DatasetSpec(name, root / name, PhantomSpec(subjects=ph["subjects"], seed=ph["seed"],
                                                                   shape=tuple(ph["shape"]))))
    return root


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """A preprocessing cache shared by the tests (calib.data keys it by config and sources)."""
    return tmp_path_factory.mktemp("cache")
