"""Model folders for the calib.apply tests, made without MLflow and (but for one calibrator fit)
without training: a fitted temperature calibrator of phantom predictions (NIfTI and nnU-Net
formats), and a base-stage tiny U-Net at its seeded initial weights, which predicts something
deterministic on any BraTS subject -- enough to check which cases are found and where outputs go."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from calib.data import write_phantoms
from calib.data.predictions import PredictionsConfig, import_predictions, logits_dir
from calib.data.predictions_phantom import write_prediction_phantoms
from calib.methods import SubjectSet, build_method
from calib.methods.network_based import save_weights
from calib.nets import UNet3D, UNetConfig

N_CASES = 4
UNET_SPACING, UNET_SHAPE = 2.0, (12, 12, 8)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    torch.set_num_threads(1)  # the machine's cores are shared


def _external(base: Path, fmt: str) -> dict:
    data = base / "data"
    ids = write_prediction_phantoms(data, N_CASES, scale=3.0, seed=11, fmt=fmt, axcodes="LPS")
    cache = import_predictions(PredictionsConfig.make(data / "predictions", data / "labels"), base / "cache", "ext")
    calibrator = build_method("temperature", {"max_epochs": 10, "lr": 5e-2})
    calibrator.fit(SubjectSet(ids[:2], cache, logits_dir(cache)), SubjectSet(ids[2:3], cache, logits_dir(cache)),
                   torch.device("cpu"))
    model = base / "model"
    model.mkdir()
    calibrator.save(model / "method.pt")
    (model / "trial_config.json").write_text(json.dumps({
        "stage": "calibrate", "method": "temperature", "weights": "CE",
        "data": {"kind": "predictions", "dataset": "ext", "predictions": {"values": "probability"}}}))
    return {"data": data, "ids": ids, "model": model}


@pytest.fixture(scope="session")
def external_models(tmp_path_factory) -> dict[str, dict]:
    """Per format ("nnunet", "nifti"): ``data`` (predictions/, labels/, masks/), ``ids``, ``model``
    (a model folder). Read-only: copy ``data/predictions`` before changing a file."""
    return {fmt: _external(tmp_path_factory.mktemp(f"ext-{fmt}"), fmt) for fmt in ("nnunet", "nifti")}


@pytest.fixture(scope="session")
def unet_model(tmp_path_factory) -> dict:
    """``root``: a BraTS phantom dataset folder (3 subjects, LPS 1 mm); ``model``: a base-stage
    model folder of a tiny U-Net (seeded initial weights). Read-only: copy ``root`` to change it."""
    base = tmp_path_factory.mktemp("unet")
    root = base / "brats18"
    write_phantoms("brats18", root, 3, seed=2, shape=(24, 24, 16))
    cfg = UNetConfig.tiny(4, "brats18", levels=2, base=2)
    torch.manual_seed(0)
    model = base / "model"
    model.mkdir()
    save_weights(UNet3D(cfg), model / "weights.pt")
    (model / "trial_config.json").write_text(json.dumps({
        "stage": "base", "method": "base", "weights": "SD", "dataset": "brats18", "net": dataclasses.asdict(cfg),
        "data": {"dataset": "brats18", "preprocessing": {"spacing": UNET_SPACING, "shape": list(UNET_SHAPE)}}}))
    return {"root": root, "model": model}


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
