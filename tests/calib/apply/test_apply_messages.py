"""What calib.apply's messages name: the model by what the user gave (a ``models:/`` URI rather
than the temporary folder it was downloaded to), each bad file once; and a failed predictions
import leaves nothing behind."""

from __future__ import annotations

import shutil

import pytest

from calib.apply import ApplyError, apply_model, load_fitted, prepare_prediction
from calib.data import DataError
from calib.data.predictions import PredictionsConfig, import_predictions
from calib.data.predictions_phantom import write_prediction_phantoms

URI = "models:/calib-x-ext-CE@best"


@pytest.mark.parametrize("remove", ["method.pt", "trial_config.json"])
def test_a_broken_download_is_named_by_its_uri(external_models, tmp_path, remove):
    download = tmp_path / "calib-apply-tmp123" / "model"
    shutil.copytree(external_models["nifti"]["model"], download)
    (download / remove).unlink()
    with pytest.raises(ApplyError) as err:
        load_fitted(download, origin=URI)
    assert URI in str(err.value) and remove in str(err.value)
    assert str(tmp_path) not in str(err.value)
    with pytest.raises(ApplyError, match=str(download)):  # a folder of one's own: its path
        load_fitted(download)


def test_an_error_while_applying_names_the_uri(unet_model, external_models, tmp_path):
    download = tmp_path / "calib-apply-tmp456" / "model"
    shutil.copytree(unet_model["model"], download)
    model = load_fitted(download, origin=URI)
    assert model.describe().endswith(f"from {URI}")
    prediction = external_models["nifti"]["data"] / "predictions" / f"{external_models['nifti']['ids'][0]}.nii.gz"
    with pytest.raises(ApplyError) as err:  # a U-Net model given a prediction map
        apply_model(model, prediction, tmp_path / "out")
    assert URI in str(err.value) and "subject folder" in str(err.value)
    assert str(download) not in str(err.value)


@pytest.mark.parametrize("fmt", ["nnunet", "nifti"])
def test_a_truncated_prediction_is_named_once(external_models, tmp_path, fmt):
    ext = external_models[fmt]
    cid = ext["ids"][0]
    suffixes = (".npz", ".pkl") if fmt == "nnunet" else (".nii.gz",)
    for suffix in suffixes:
        shutil.copy(ext["data"] / "predictions" / f"{cid}{suffix}", tmp_path)
    path = tmp_path / f"{cid}{suffixes[0]}"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        prepare_prediction(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and message.count(str(path)) == 1
    assert ("cut short" in message) if fmt == "nnunet" else ("cannot be read" in message)


def test_a_failed_import_leaves_no_folder_behind(tmp_path):
    data = tmp_path / "ext"
    ids = write_prediction_phantoms(data, 3, seed=1, fmt="nnunet")
    bad = data / "predictions" / f"{ids[1]}.npz"  # found only when read, inside the cache writer
    bad.write_bytes(bad.read_bytes()[:300])
    work = tmp_path / "work"
    with pytest.raises(DataError, match=f"{ids[1]}.npz: unreadable nnU-Net prediction"):
        import_predictions(PredictionsConfig.make(data / "predictions", data / "labels"), work / "cache", "ext")
    assert not work.exists()
    work.mkdir()  # a work folder that was there stays, empty as it was
    with pytest.raises(DataError):
        import_predictions(PredictionsConfig.make(data / "predictions", data / "labels"), work / "cache", "ext")
    assert list(work.iterdir()) == []
