"""``calib.apply --input DIR``: a folder of predictions (what nnU-Net's predict writes) or a dataset
folder of subjects is applied case by case -- one output per case, each equal to applying the
model to that case alone; a bad case is named, the others are still written, exit 1 at the end."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from calib.apply import apply_model, find_cases, load_fitted
from calib.apply.cases import apply_cases

PY = [sys.executable, "-m", "calib.apply"]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*PY, *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("fmt", ["nnunet", "nifti"])
def test_a_folder_of_predictions_gives_one_output_per_case(external_models, tmp_path, fmt):
    ext = external_models[fmt]
    preds = tmp_path / "predictions"
    shutil.copytree(ext["data"] / "predictions", preds)
    (preds / "plans.json").write_text("{}")  # nnU-Net writes its plans and dataset.json beside
    (preds / ".hidden.nii.gz").write_bytes(b"")
    model = load_fitted(ext["model"])
    cases = find_cases(model, [preds])
    # nnU-Net: the .npz are the cases, the argmax <case>.nii.gz beside them are not
    assert [c.case_id for c in cases] == ext["ids"]
    assert {c.path.suffix for c in cases} == ({".npz"} if fmt == "nnunet" else {".gz"})

    res = _cli("--model-dir", ext["model"], "--input", preds, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [f"{cid}_prob.nii.gz" for cid in ext["ids"]]
    assert res.stdout.strip().splitlines()[-1].startswith(f"applied {len(ext['ids'])} of {len(ext['ids'])} case(s)")
    assert "cases" in res.stderr  # the progress bar (tqdm) or the counted lines
    for cid, case in zip(ext["ids"], cases):  # each as if applied alone
        alone = apply_model(model, case.path, tmp_path / "alone")
        np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "out" / f"{cid}_prob.nii.gz")).dataobj),
                                      np.asarray(nib.load(str(alone.files["prob"])).dataobj))


def test_a_bad_case_is_named_and_the_others_are_written(external_models, tmp_path):
    ext = external_models["nnunet"]
    preds = tmp_path / "predictions"
    shutil.copytree(ext["data"] / "predictions", preds)
    bad = preds / f"{ext['ids'][1]}.npz"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated
    (preds / f"{ext['ids'][2]}.pkl").unlink()  # properties missing
    res = _cli("--model-dir", ext["model"], "--input", preds, "--out", tmp_path / "out", "--no-progress")
    assert res.returncode == 1
    good = [ext["ids"][0], ext["ids"][3]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{c}_prob.nii.gz" for c in good]
    assert f"error: {ext['ids'][1]}: {bad}: unreadable nnU-Net prediction" in res.stderr
    assert str(bad) in res.stderr and res.stderr.count(str(bad)) == 1  # named once
    assert f"{preds / ext['ids'][2]}.pkl: nnU-Net properties file missing" in res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("applied 2 of 4 case(s)") and f"2 failed: {ext['ids'][1]}, {ext['ids'][2]}" in last


def test_masks_from_a_folder_one_per_case(external_models, tmp_path):
    ext = external_models["nifti"]
    masks = tmp_path / "masks"
    shutil.copytree(ext["data"] / "masks", masks)
    missing = ext["ids"][0]
    (masks / f"{missing}.nii.gz").unlink()
    model = load_fitted(ext["model"])
    cases = find_cases(model, [ext["data"] / "predictions"], mask=masks)
    outcomes = {o.case.case_id: o for o in apply_cases(model, cases, tmp_path / "out")}
    assert not outcomes[missing].ok and "mask missing" in outcomes[missing].error
    for cid in ext["ids"][1:]:
        assert outcomes[cid].ok
        inside = np.asarray(nib.load(str(masks / f"{cid}.nii.gz")).dataobj) > 0
        prob = np.asarray(nib.load(str(outcomes[cid].result.files["prob"])).dataobj)
        assert (prob[~inside] == 0).all() and (prob[inside] > 0).all()


def test_a_case_given_twice_is_refused_not_overwritten(external_models, tmp_path):
    ext = external_models["nifti"]
    other = tmp_path / "again"
    other.mkdir()
    shutil.copy(ext["data"] / "predictions" / f"{ext['ids'][0]}.nii.gz", other)
    model = load_fitted(ext["model"])
    cases = find_cases(model, [ext["data"] / "predictions", other, tmp_path / "nothing-here.nii.gz"])
    assert len(cases) == len(ext["ids"]) + 2
    dup = cases[len(ext["ids"])]
    assert dup.error is not None and "also given as" in dup.error
    outcomes = list(apply_cases(model, cases, tmp_path / "out"))
    assert [o.ok for o in outcomes] == [True] * len(ext["ids"]) + [False, False]
    assert "nothing-here.nii.gz: no such file" in outcomes[-1].error


def test_an_empty_folder_is_one_named_error(external_models, tmp_path):
    (tmp_path / "empty").mkdir()
    res = _cli("--model-dir", external_models["nifti"]["model"], "--input", tmp_path / "empty", "--out", tmp_path / "o")
    assert res.returncode == 1 and f"{tmp_path / 'empty'}: no prediction in this folder" in res.stderr
    assert not (tmp_path / "o").exists()


def test_a_dataset_folder_applies_each_subject(unet_model, tmp_path):
    root = tmp_path / "brats18"
    shutil.copytree(unet_model["root"], root)
    model = load_fitted(unet_model["model"])
    subjects = [c.path for c in find_cases(model, [root])]
    assert len(subjects) == 3 and all(p.parent.parent == root for p in subjects)  # HGG/ and LGG/
    # a subject folder is still one case
    assert [c.path for c in find_cases(model, [subjects[0]])] == [subjects[0]]
    broken = subjects[1] / f"{subjects[1].name}_t2.nii.gz"
    broken.write_bytes(broken.read_bytes()[:300])

    res = _cli("--model-dir", unet_model["model"], "--input", root, "--out", tmp_path / "out", "--no-progress")
    assert res.returncode == 1
    assert str(broken) in res.stderr and f"error: {subjects[1].name}: " in res.stderr
    for subject in (subjects[0], subjects[2]):
        out = tmp_path / "out" / f"{subject.name}_prob.nii.gz"
        alone = apply_model(model, subject, tmp_path / "alone")
        np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj),
                                      np.asarray(nib.load(str(alone.files["prob"])).dataobj))
    assert not (tmp_path / "out" / f"{subjects[1].name}_prob.nii.gz").exists()
    assert "applied 2 of 3 case(s)" in res.stdout


def test_calib_apply_names_tracking_apply_for_a_run_or_a_model(tmp_path):
    for flag, value in (("--run", "0123abcd"), ("--model", "models:/x@best")):
        res = _cli(flag, value, "--input", tmp_path / "a", "--out", tmp_path / "o")
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
        assert f"python -m tracking.apply {flag} {value} --input" in res.stderr
    assert not (tmp_path / "o").exists()


def test_calib_never_imports_tracking_mlflow_or_ray():
    """The dependency rule (docs/architecture.md): calib is the ground floor; no import of
    tracking, sweeps, mlflow or ray anywhere under calib/, lazy ones included."""
    import ast

    root = Path(__file__).resolve().parents[3] / "calib"
    banned = {"tracking", "sweeps", "mlflow", "ray"}
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.relative_to(root.parent)}:{node.lineno} {n}" for n in names if n.split(".")[0] in banned]
    assert found == []


def test_without_tqdm_each_case_is_a_counted_line(external_models, tmp_path, capsys, monkeypatch):
    from calib.apply import cli

    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    ext = external_models["nifti"]
    rc = cli.main(["--model-dir", str(ext["model"]), "--input", str(ext["data"] / "predictions"),
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 0
    n = len(ext["ids"])
    assert [line for line in err.splitlines() if line.startswith("[")] == [
        f"[{i}/{n}] {cid}: ok" for i, cid in enumerate(ext["ids"], 1)]
