"""Tiny phantoms and grid files: a few fast trials (one dataset, 2 folds, a tiny net) for the
sweep, tracking and integration tests."""

from __future__ import annotations

from pathlib import Path

import yaml

#: 1 mm phantoms -> 2 mm cache of 18 x 18 x 12 (a multiple of the 2-level tiny net's 3).
PHANTOM = {"subjects": 6, "seed": 0, "shape": [36, 36, 24]}
ISLES_PHANTOM = {"subjects": 6, "seed": 0, "shape": [36, 36, 6]}


def tiny_grid(path: Path, data_root: Path, cache: Path, **changes) -> Path:
    """Write a grid of a few fast trials (one dataset, 2 folds, tiny net) with ``changes``
    merged into the top level; returns its path."""
    grid = {
        "name": "tiny",
        "seed": 0,
        "protocol": "honest",
        "work_dir": str(path.parent / "work"),
        "datasets": {"brats18": {"phantom": PHANTOM}},
        "data": {"root": str(data_root), "cache": str(cache)},
        "preprocessing": {"spacing": 2.0, "shape": [18, 18, 12]},
        "folds": {"n_folds": 2, "seed": 0},
        "network": {"preset": "tiny", "levels": 2, "base": 2},
        "weights": ["CE"],
        "training": {"pretrain": {"lr": 1.0e-2, "max_epochs": 2, "batch_size": 2},
                     "base": {"lr": 1.0e-2, "max_epochs": 2, "batch_size": 2},
                     "calibrate": {"max_epochs": 2}},
        "methods": {"platt": {}, "finetune": {"lr": {"CE": 1.0e-4, "CE-SD": 1.0e-3, "SD": 1.0e-3}}},
        "resources": {"pretrain": {"cpu": 1}, "base": {"cpu": 1}, "calibrate": {"cpu": 1}},
        "execution": {"max_failures": 1},
    }
    grid.update(changes)
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def long_base_grid(path: Path, data_root: Path, cache: Path, epochs: int, **changes) -> Path:
    """:func:`tiny_grid` with SD base models of ``epochs`` epochs (no early stop, no plateau:
    long enough to be caught mid-training) and their Platt calibrations."""
    return tiny_grid(path, data_root, cache, **{
        "weights": ["SD"], "methods": {"platt": {}},
        "training": {"pretrain": {"lr": 1e-2, "max_epochs": 2, "batch_size": 2},
                     "base": {"lr": 1e-2, "max_epochs": epochs, "batch_size": 2,
                              "early_stop_patience": epochs, "lr_patience": epochs},
                     "calibrate": {"max_epochs": 2}},
        **changes})
