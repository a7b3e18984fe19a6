"""`python -m calib.data`: help, exit codes, one-line errors, JSON report, cache folder on stdout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from calib.data import read_folds, read_meta
from calib.data.cli import main


def _module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calib.data", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [[], ["phantom"], ["check"], ["preprocess"], ["folds"]])
def test_help(command):
    result = _module(*command, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m calib.data")


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "required"),
        (["check", "--dataset", "brats2020", "--root", "."], "invalid choice: 'brats2020'"),
        (["check", "--dataset", "brats18", "--root", "/no/such/dir"], "--root /no/such/dir: no such directory"),
        (["phantom", "--dataset", "isles18", "--out", "x", "--subjects", "0"], "expected a positive integer"),
        (["preprocess", "--dataset", "brats18", "--root", ".", "--out", "x", "--spacing", "-2"], "positive number"),
        (["preprocess", "--dataset", "brats18", "--root", ".", "--out", "x", "--shape", "1", "2"], "expected 3"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    result = _module(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert result.stdout == ""


def test_phantom_check_cli(tmp_path, capsys):
    root = tmp_path / "isles"
    assert main(["phantom", "--dataset", "isles18", "--out", str(root), "--subjects", "2", "--seed", "1",
                 "--shape", "32", "32", "4"]) == 0
    assert "2 isles18 phantom subjects in" in capsys.readouterr().out
    assert main(["check", "--dataset", "isles18", "--root", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["subjects"] == ["case_1", "case_2"]
    # Break one file: exit 1, and the problem names it.
    ct = next(root.glob("TRAINING/case_2/SMIR.Brain.XX.O.CT.*/*.nii"))
    ct.write_bytes(b"")
    assert main(["check", "--dataset", "isles18", "--root", str(root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [(p["subject"], p["path"], p["kind"]) for p in report["problems"]] == [("case_2", str(ct), "unreadable")]
    assert main(["check", "--dataset", "isles18", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert str(ct) in out and "1 problem(s)" in out
    # Preprocess refuses the broken root with exit 1 and writes nothing.
    assert main(["preprocess", "--dataset", "isles18", "--root", str(root), "--out", str(tmp_path / "c"),
                 "--workers", "1", "--no-progress"]) == 1
    assert str(ct) in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_preprocess_and_folds_cli(phantom_roots, tmp_path, capsys):
    args = ["preprocess", "--dataset", "brats18", "--root", str(phantom_roots["brats18"]), "--out",
            str(tmp_path / "c"), "--shape", "24", "24", "16", "--spacing", "2.5", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    captured = capsys.readouterr()
    cache = captured.out.strip().splitlines()[-1]  # the cache folder is the last stdout line
    meta = read_meta(cache)
    assert meta["config"]["spacing"] == 2.5 and meta["config"]["shape"] == [24, 24, 16]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == cache and "cache hit" in captured.err
    assert main(["folds", "--cache", cache, "--folds", "3", "--seed", "2", "--out", str(tmp_path / "f.json")]) == 0
    folds = read_folds(tmp_path / "f.json", meta["subjects"])
    assert sorted(s for v in folds.values() for s in v) == sorted(meta["subjects"])


def test_dataset_detected_from_layout(phantom_roots, tmp_path, capsys):
    for dataset, root in phantom_roots.items():
        assert main(["check", "--root", str(root)]) == 0
        captured = capsys.readouterr()
        assert f"dataset: {dataset} (detected" in captured.err and "3 subject(s), OK" in captured.out
    (tmp_path / "neither").mkdir()
    result = _module("check", "--root", str(tmp_path / "neither"))
    assert result.returncode == 2 and "pass --dataset" in result.stderr
