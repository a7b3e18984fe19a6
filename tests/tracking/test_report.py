"""tracking.report against a real MLflow SQLite store of fabricated runs (see test_report_store.py)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_report_store import BRATS, ISLES_REF, build_store, near_zero_pairs, signed_ranks

from tracking.report import ReportError, ReportWarning
from tracking.report.__main__ import main
from tracking.report.analysis import CONTRACT_COLUMNS
from tracking.report.build import compute_report

P8, P15, P16 = 2 / 2**8, 2 / 2**15, 2 / 2**16  # every difference of one sign, exact test
NAN = math.nan


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    yield build_store(tmp_path_factory.mktemp("mlflow"))
    mp.undo()


@pytest.fixture(scope="module")
def computed(store):
    """The default report's data and the ReportWarnings it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = compute_report(store.experiment, store.uri)
    return data, [str(w.message) for w in caught if issubclass(w.category, ReportWarning)]


@pytest.fixture(scope="module")
def default(computed):
    return computed[0]


def _mean(values) -> float:
    return float(np.nanmean(values))


def expected_rows() -> list[tuple]:
    """The contract columns of results_long for the default report, worked out by hand."""
    def cell(weights, method, lr=""):
        dice, ece = BRATS[(weights, method, lr)]
        return _mean(dice), 100 * _mean(ece)

    d0, e0, _ = ISLES_REF
    jit = (np.arange(8) + 1) * 1e-5
    isles = {"base": (_mean(d0 - jit), 100 * _mean(e0)),
             "finetune": (_mean(d0 + 0.01), 100 * _mean(e0 - 0.01 + jit)),
             "mc_center": (_mean(d0 + 0.005 + jit), 100 * _mean(e0 - 0.005))}
    p_platt_dice = 0.0506591796875  # W+ = 30 of 136, n = 16, exact two-sided
    p_aux_dice = 0.0443115234375  # W+ = 29
    p_aux_ece = stats.wilcoxon(near_zero_pairs()).pvalue  # W+ = 72: far from significant
    return [
        # dataset, weights, method, lr, n, dice, ece%, p_dice, p_ece, dice_bold, ece_bold, pareto
        ("brats18", "CE", "base", "", 16, *cell("CE", "base"), P16, P16, False, False, False),
        ("brats18", "CE", "platt", "", 16, *cell("CE", "platt"), p_platt_dice, NAN, True, True, False),
        ("brats18", "CE", "auxiliary", "", 16, *cell("CE", "auxiliary"), p_aux_dice, p_aux_ece,
         False, True, False),
        ("brats18", "CE", "mc_decoder", "0.0001", 16, *cell("CE", "mc_decoder", "0.0001"), NAN, P16,
         True, False, False),
        ("brats18", "SD", "base", "", 16, *cell("SD", "base"), P16, P15, False, False, False),
        ("brats18", "SD", "platt", "", 15, *cell("SD", "platt"), P15, NAN, False, True, True),
        ("brats18", "SD", "mc_center", "0.0001", 16, *cell("SD", "mc_center", "0.0001"), NAN, P15,
         True, False, True),
        ("isles18", "CE", "base", "", 8, *isles["base"], P8, P8, False, False, False),
        ("isles18", "CE", "finetune", "0.0001", 8, *isles["finetune"], NAN, NAN, True, True, True),
        ("isles18", "CE", "mc_center", "fold0=0.00072;fold1=2.1e-05", 8, *isles["mc_center"], P8, P8,
         False, False, False),
    ]


def assert_results(df: pd.DataFrame, rows: list[tuple]) -> None:
    assert list(df.columns[: len(CONTRACT_COLUMNS)]) == list(CONTRACT_COLUMNS)
    assert len(df) == len(rows)
    for got, want in zip(df[list(CONTRACT_COLUMNS)].itertuples(index=False), rows):
        label = f"{want[:3]}"
        assert tuple(got[:4]) == want[:4], label
        assert int(got[4]) == want[4], label
        for g, w in zip(got[5:9], want[5:9]):
            assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, rel=1e-12, abs=1e-15), label
        assert [bool(x) for x in got[9:]] == list(want[9:]), label


def test_design_cross_check_with_scipy():
    """The hand-derived p-values the expected table relies on (near 0.05 on both sides)."""
    best = np.zeros(16)
    assert stats.wilcoxon(signed_ranks({16, 14}), best).pvalue == pytest.approx(0.0506591796875)
    assert stats.wilcoxon(signed_ranks({16, 13}), best).pvalue == pytest.approx(0.0443115234375)
    assert stats.wilcoxon(near_zero_pairs()).pvalue > 0.5


def test_results_long_exact(default):
    assert_results(default.results, expected_rows())
    r = default.results.set_index(["dataset", "weights", "method"])
    # extra columns: tests against the base model, protocol, rule, the p*-distance on phantoms (these
    # runs are old: their true_ce column is read as p_star_distance, and no true ECE is known)
    assert r.loc[("brats18", "CE", "platt"), "dice_p_vs_base"] == pytest.approx(P16)
    assert r.loc[("brats18", "SD", "platt"), "ece_p_vs_base"] == pytest.approx(P15)
    assert math.isnan(r.loc[("brats18", "CE", "base"), "dice_p_vs_base"])
    assert r.loc[("brats18", "CE", "platt"), "protocol"] == "honest"
    assert set(default.results["select_by"]) == {"val_loss"}
    assert set(default.results["p_adjust"]) == {"none"}
    assert math.isnan(r.loc[("brats18", "CE", "base"), "p_star_distance_pct_mean"])
    assert r.loc[("isles18", "CE", "finetune"), "p_star_distance_pct_mean"] == pytest.approx(
        100 * _mean(ISLES_REF[2] - 0.005))
    assert "true_ce_pct_mean" not in r.columns and "true_ece_pct_mean" not in r.columns
    # every mean has its bootstrap interval around it
    for stem in ("dice", "ece_pct", "p_star_distance_pct"):
        rows = r.dropna(subset=[f"{stem}_mean"])
        assert (rows[f"{stem}_ci_low"] <= rows[f"{stem}_mean"]).all()
        assert (rows[f"{stem}_mean"] <= rows[f"{stem}_ci_high"]).all()


def test_runs_used_and_left_out(default, store):
    t = default.trials
    assert t.scope == "experiment"
    assert t.log_run_id == store.sweep2  # the newest sweep run
    assert t.ignored_by_status == {"FAILED": 2}
    assert t.superseded == 1  # the stale FINISHED brats18/CE/base fold-1 run of sweep 1
    assert set(t.sweep_run_ids) == {store.sweep1, store.sweep2}
    assert all(r.stage in ("base", "calibrate") for r in t.runs)  # pretrain runs left out
    base_fold1 = [r for r in t.runs
                  if (r.dataset, r.weights, r.method, r.fold) == ("brats18", "CE", "base", 1)]
    assert [r.run_id for r in base_fold1] == [store.run_ids[("brats18", "CE", "base", "", 1)]]


def test_lr_selection_rule_and_warnings(default, computed):
    sel = {s.key: s for s in default.selections}
    mc = sel[("brats18", "SD", "mc_center")]
    assert mc.mode == "grid" and mc.lr_selected == "0.0001"
    cands = {c.lr: c for c in mc.candidates}
    assert cands["1e-05"].folds == (0,) and math.isnan(cands["1e-05"].criterion)  # left out
    assert cands["0.0001"].criterion == pytest.approx(0.30) and cands["0.0001"].selected
    assert sel[("brats18", "CE", "mc_decoder")].candidates[0].criterion == pytest.approx(0.21)
    optuna = sel[("isles18", "CE", "mc_center")]
    assert optuna.mode == "per_fold"
    assert [r.lr for r in optuna.runs] == ["0.00072", "2.1e-05"]
    assert sel[("brats18", "CE", "platt")].mode == "single"
    msgs = computed[1]
    assert msgs == default.warn.messages  # emitted as ReportWarning and kept for report.md
    assert any("lr 1e-05 lacks fold(s) 1" in m for m in msgs)
    assert any("platt lacks 1 subject(s)" in m and "s15" in m for m in msgs)
    assert any(m.startswith("trial brats18/CE/finetune fold 0 lr 0.0001") and "FAILED" in m
               for m in msgs)
    assert not any("brats18/CE/platt fold 0" in m for m in msgs)  # failed, then retried: no hole


@pytest.mark.parametrize("select_by, lr_ce, lr_sd", [("dice", "0.001", "0.001"),
                                                     ("ece", "0.0001", "0.0001")])
def test_select_by(store, select_by, lr_ce, lr_sd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReportWarning)
        data = compute_report(store.experiment, store.uri, select_by=select_by)
    r = data.results.set_index(["dataset", "weights", "method"])
    assert r.loc[("brats18", "CE", "mc_decoder"), "lr_selected"] == lr_ce
    assert r.loc[("brats18", "SD", "mc_center"), "lr_selected"] == lr_sd
    assert set(data.results["select_by"]) == {select_by}
    dice, _ = BRATS[("CE", "mc_decoder", lr_ce)]
    assert r.loc[("brats18", "CE", "mc_decoder"), "dice_mean"] == pytest.approx(_mean(dice))


def test_holm_correction(store):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReportWarning)
        data = compute_report(store.experiment, store.uri, use_holm=True)
    r = data.results.set_index(["dataset", "weights", "method"])
    # family brats18/CE/Dice: p = 3.05e-5 (base), 0.0443 (aux), 0.0507 (platt); Holm multiplies
    # by 3, 2, 1 and keeps the sequence monotone: aux → 0.0886, platt → max(0.0507, 0.0886).
    assert r.loc[("brats18", "CE", "base"), "dice_p_vs_best"] == pytest.approx(3 * P16)
    assert r.loc[("brats18", "CE", "auxiliary"), "dice_p_vs_best"] == pytest.approx(2 * 0.0443115234375)
    assert r.loc[("brats18", "CE", "platt"), "dice_p_vs_best"] == pytest.approx(2 * 0.0443115234375)
    assert bool(r.loc[("brats18", "CE", "auxiliary"), "dice_bold"])  # bold once corrected
    assert set(data.results["p_adjust"]) == {"holm"}


def test_sweep_scope(store):
    data = compute_report(store.experiment, store.uri, sweep_run=store.sweep2)
    assert data.trials.scope == "sweep" and data.trials.log_run_id == store.sweep2
    brats = data.results[data.results["dataset"] == "brats18"]
    assert list(brats["method"]) == ["base"] and list(brats["n_subjects"]) == [8]
    assert set(data.results["dataset"]) == {"brats18", "isles18"}
    # The experiment scope with an explicit sweep run: all runs, logged to that run.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReportWarning)
        data = compute_report(store.experiment, store.uri, sweep_run=store.sweep1, scope="experiment")
    assert data.trials.log_run_id == store.sweep1
    assert_results(data.results, expected_rows())


def test_missing_artifact_names_the_run(store, tmp_path, capsys):
    with pytest.raises(ReportError, match=rf"run {store.broken_run} .*no artifact reliability_bins.csv"):
        compute_report(store.broken_experiment, store.uri)
    out = tmp_path / "out"
    rc = main(["--experiment", store.broken_experiment, "--tracking-uri", store.uri, "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert store.broken_run in err and "reliability_bins.csv" in err and "per_subject.csv" in err
    assert not out.exists()  # nothing half-written


def test_bad_arguments_exit_2(store, tmp_path, capsys):
    base = ["--tracking-uri", store.uri, "--out", str(tmp_path / "o")]
    assert main(["--experiment", "nope"] + base) == 2
    assert "no experiment named 'nope'" in capsys.readouterr().err
    assert main(["--experiment", store.experiment, "--sweep-run", "deadbeef"] + base) == 2
    assert "deadbeef" in capsys.readouterr().err
    run = store.run_ids[("brats18", "CE", "base", "", 0)]
    assert main(["--experiment", store.experiment, "--sweep-run", run] + base) == 2
    assert "not a sweep run" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'absent.db'}"
    assert main(["--experiment", "x", "--tracking-uri", missing, "--out", str(tmp_path)]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--experiment", "x", "--out", str(tmp_path), "--select-by", "auc"])
    assert exc.value.code == 2


def check_latex(tex: str) -> None:
    """Structure of a booktabs table: balanced environments and braces, every row as wide as
    the column spec, rules in order, special characters escaped."""
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    stack = []
    for kind, env in re.findall(r"\\(begin|end)\{(\w+)\}", body):
        if kind == "begin":
            stack.append(env)
        else:
            assert stack and stack.pop() == env, f"unbalanced \\end{{{env}}}"
    assert not stack
    depth = 0
    for ch in re.sub(r"\\[{}]", "", body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    spec = re.search(r"\\begin\{tabular\}\{([lrc|]+)\}", body).group(1)
    ncol = len(spec.replace("|", ""))
    top, mid, bot = (body.index(r"\toprule"), body.index(r"\midrule"), body.index(r"\bottomrule"))
    assert top < mid < bot
    rows = body[top + len(r"\toprule"):bot].replace(r"\midrule", "")
    rows = re.sub(r"\\cmidrule\(lr\)\{\d+-\d+\}", "", rows)
    for row in [r.strip() for r in rows.split(r"\\") if r.strip()]:
        width = sum(int(m.group(1)) if (m := re.match(r"\\multicolumn\{(\d+)\}", c.strip())) else 1
                    for c in re.split(r"(?<!\\)&", row))
        assert width == ncol, f"row {row!r} spans {width} of {ncol} columns"
    assert not re.search(r"(?<!\\)[_%#$]", re.sub(r"\$[^$]*\$", "", body).replace("&", ""))


def test_cli_writes_every_file_and_logs_them(store, default, tmp_path):
    out = tmp_path / "report"
    rc = main(["--experiment", store.experiment, "--tracking-uri", store.uri, "--out", str(out)])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    expected = {"results_long.csv", "subject_dispersion.csv", "report.md", "headline.csv"}
    for ds, weights in (("brats18", ("CE", "SD")), ("isles18", ("CE",))):
        expected |= {f"table_{ds}.md", f"table_{ds}.tex", f"pareto_{ds}.csv", f"fig1_scatter_{ds}.png"}
        expected |= {f"fig{n}_{kind}_{ds}_{w}.png" for w in weights
                     for n, kind in ((2, "reliability"), (3, "violins"))}
    assert names == expected  # and no temporary file left behind

    df = pd.read_csv(out / "results_long.csv", dtype={"lr_selected": str})
    df["lr_selected"] = df["lr_selected"].fillna("")
    assert_results(df, expected_rows())

    md = (out / "table_brats18.md").read_text()
    platt = next(line for line in md.splitlines() if line.startswith("| Platt"))
    assert platt.split(" | ")[1:] == ["**0.795**", "0.819", "**2.750**", "**2.200** |"]
    isles = (out / "table_isles18.md").read_text()
    assert "p*-distance % CE" in isles and "| fine-tune | **0.545** | **3.354** | 2.850 |" in isles
    assert "n = 8: 0.008" in isles  # the smallest attainable two-sided p under the table
    assert "n = 15: 6.10e-05; n = 16: 3.05e-05" in md
    for ds in ("brats18", "isles18"):
        check_latex((out / f"table_{ds}.tex").read_text())
    assert r"\textbf{0.828}" in (out / "table_brats18.tex").read_text()

    pareto = pd.read_csv(out / "pareto_brats18.csv")
    front = pareto[pareto["pareto"]]
    assert set(zip(front["weights"], front["method"])) == {("SD", "platt"), ("SD", "mc_center")}
    within = pareto[pareto["pareto_within_weights"]]
    assert set(zip(within["weights"], within["method"])) == {
        ("SD", "platt"), ("SD", "mc_center"), ("CE", "platt"), ("CE", "mc_decoder")}

    disp = pd.read_csv(out / "subject_dispersion.csv")
    assert {"acc_std", "acc_iqr", "acc_std_base", "acc_iqr_base"} <= set(disp.columns)
    base = disp[disp["method"] == "base"]
    assert np.allclose(base["acc_std"], base["acc_std_base"], equal_nan=True)

    from matplotlib.image import imread
    for png in out.glob("*.png"):
        img = imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0, png.name

    # the headline: these runs have no val metrics, so the choice falls back to test ECE, said so
    head = pd.read_csv(out / "headline.csv").set_index(["dataset", "weights"])
    assert list(head.index) == [("brats18", "CE"), ("brats18", "SD"), ("isles18", "CE")]
    assert set(head["selected_on"]) == {"test (no val metrics)"}
    assert head.loc[("brats18", "CE"), "chosen_method"] == "platt"
    assert head.loc[("brats18", "CE"), "ece_p_vs_base"] == pytest.approx(P16)
    assert head.loc[("brats18", "CE"), "ece_verdict"] == "lower"
    assert head.loc[("isles18", "CE"), "chosen_method"] == "finetune"
    assert head.loc[("isles18", "CE"), "true_ece_verdict"] == "no truth known"  # old runs
    assert head.loc[("isles18", "CE"), "p_star_distance_p_vs_base"] == pytest.approx(P8)

    report = (out / "report.md").read_text()
    assert report.index("## Does calibration help?") < report.index("## brats18")
    assert "--select-by val_loss" in report and "honest" in report
    assert "s15" in report and "lr 1e-05 lacks fold(s) 1" in report  # warnings listed
    assert "![Figure 1: ECE vs Dice, brats18](fig1_scatter_brats18.png)" in report
    assert "no val metrics" in report and "optimistic" in report
    assert "only estimates" not in report

    from mlflow.tracking import MlflowClient
    logged = {f.path for f in MlflowClient(store.uri).list_artifacts(store.sweep2, "report")}
    assert logged == {f"report/{n}" for n in expected}


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no LaTeX compiler installed")
def test_latex_compiles(default, tmp_path):
    from tracking.report.tables import latex_table

    doc = ("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n"
           + latex_table(default.results, "brats18") + "\\end{document}\n")
    (tmp_path / "t.tex").write_text(doc)
    subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=60)
