"""The two planning benches run end to end and print their figures (tiny sizes; no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, *args, "--json"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dataloader_bench_reports_its_figures():
    r = _run("bench/dataloader.py", "--device", "cpu", "--subjects", "2", "--epoch-volumes", "4",
             "--repeats", "1", "--phantom-shape", "32", "32", "20", "--shape", "24", "24", "16",
             "--step-shape", "28", "8", "8", "--steps", "1", "--threads", "1")
    for key in ("loader_volumes_per_s", "loader_vs_step_ratio", "new_vs_old_loader_ratio", "step_volumes_per_s"):
        assert r[key] > 0, key
    assert r["loader_vs_step_ratio"] == r["loader_volumes_per_s"] / r["step_volumes_per_s"]
    assert r["step_extrapolated"] and r["default_workers"] == 0
    # The new format is stored uncompressed: larger on disk than the deflated format 1.
    sizes = r["cache_mb_per_subject"]
    assert sizes["format 2 (uncompressed)"] > sizes["format 1 (compressed)"]


def test_schedule_bench_simulates_the_paper_plan():
    r = _run("bench/schedule.py", "--gpus", "1", "8")
    assert r["trials"] == 490 and "defaults" in r["cost_source"]  # the paper grid, new methods too
    assert {(x["gpus"], x["policy"]) for x in r["results"]} == {(1, "waves"), (1, "graph"), (8, "waves"), (8, "graph")}
    for x in r["results"]:
        assert x["makespan_vs_critical_path"] >= 1.0 - 1e-9 and 0 < x["utilisation"] <= 1.0 + 1e-9
    assert r["graph_8gpu_makespan_vs_critical_path"] >= 1.0 - 1e-9
