"""Pure parts of tracking.report on tiny hand-worked cases (no MLflow)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from calib.atomic_io import atomic_write, write_text
from tracking.report.dispersion import bin_summary, dispersion_table, subject_accuracy
from tracking.report.errors import ReportError, WarningLog
from tracking.report.fetch import TrialRecord, redact_uri
from tracking.report.selection import pool_subjects, select_runs
from tracking.report.stats import compare_to_best, holm, pareto_front, wilcoxon_paired
from tracking.report.tables import tex_escape


def test_holm_by_hand():
    # m = 3 finite: 0.01·3 = 0.03; 0.03·2 = 0.06; 0.04·1 = 0.04 → raised to 0.06 (monotone)
    got = holm([0.01, 0.04, 0.03, np.nan])
    assert got[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(got[3])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_pareto_by_hand():
    dice = [0.8, 0.9, 0.9, 0.85, 0.7, np.nan]
    ece = [2.0, 3.0, 3.0, 4.0, 1.0, 0.5]
    # identical points (1, 2) do not dominate each other; 3 is dominated by 1; NaN never on front
    assert pareto_front(dice, ece).tolist() == [True, True, True, False, True, False]


def test_wilcoxon_pairs_by_subject_and_handles_identical():
    a = pd.Series([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], index=list("abcdef"))
    # Other order, 'f' missing: paired by subject every difference is positive (by position not).
    b = pd.Series([4.6, 3.7, 2.8, 1.9, 0.95], index=list("edcba"))
    t = wilcoxon_paired(a, b)
    assert t.n == 5 and t.p == pytest.approx(2 / 2**5)  # every difference positive, exact test
    assert wilcoxon_paired(a, a.copy()).p == 1.0  # identical: p = 1, no scipy warning
    assert math.isnan(wilcoxon_paired(a, pd.Series([1.0], index=["z"])).p)


@pytest.mark.parametrize("n", [2, 5, 9, 12, 13, 14])
def test_wilcoxon_with_ties_and_zeros_equals_scipy(n):
    # Tied and zero differences are where scipy's "auto" enumerates every sign flip (n <= 13) and
    # wilcoxon_paired runs the same exact test vectorised: the p must be scipy's, to the bit.
    from scipy import stats

    rng = np.random.default_rng(n)
    seen = 0
    for _ in range(10):  # scipy's own path takes ~0.3 s per test at n = 12
        a = np.round(rng.normal(0.0, 1.0, n), 1)  # one decimal: ties among |d| are common
        b = np.round(rng.normal(0.4, 1.0, n), 1)
        b[: n // 4] = a[: n // 4]  # some zero differences
        if np.all(a == b):
            continue
        idx = [f"s{i}" for i in range(n)]
        got = wilcoxon_paired(pd.Series(a, index=idx), pd.Series(b, index=idx))
        assert got.n == n and got.p == stats.wilcoxon(a, b).pvalue
        seen += 1
    assert seen >= 8


def test_compare_to_best_ties_go_first_in_order():
    s = pd.Series([0.5] * 6, index=list("abcdef"))
    comp = compare_to_best({"x": s, "y": s.copy()}, higher_is_better=True, order=["y", "x"])
    assert comp.best == "y" and comp.bold == {"x": True, "y": True} and comp.p_vs_best["x"] == 1.0


def _run(method="mc_center", lr="0.001", fold=0, val=0.3, rid=None) -> TrialRecord:
    return TrialRecord(run_id=rid or f"r-{lr}-{fold}", parent_id="p", status="FINISHED", start_time=0,
                    stage="calibrate", dataset="brats18", weights="SD", method=method, fold=fold,
                    lr=lr, trial_key=f"{lr}{fold}", metrics={"best_val_loss": val} if val else {})


def _per_subject(run: TrialRecord) -> pd.DataFrame:
    k = float(run.lr or 0)
    return pd.DataFrame({"subject_id": [f"{run.fold}a", f"{run.fold}b"], "fold": run.fold,
                         "dice": [0.5 + k, 0.6 + k], "ece": [0.1 - k, 0.2 - k]})


def test_selection_ties_go_to_the_smaller_lr():
    runs = [_run(lr=lr, fold=f, val=0.3) for lr in ("0.001", "0.0001") for f in (0, 1)]
    (sel,) = select_runs(runs, "val_loss", _per_subject)
    assert sel.lr_selected == "0.0001" and sel.mode == "grid"
    (sel,) = select_runs(runs, "dice", _per_subject)
    assert sel.lr_selected == "0.001"


def test_selection_needs_the_metric_and_names_the_run():
    runs = [_run(lr="0.001", val=None, rid="abc123"), _run(lr="0.0001", val=0.2)]
    with pytest.raises(ReportError, match="abc123.*best_val_loss.*--select-by"):
        select_runs(runs, "val_loss", _per_subject)
    (sel,) = select_runs(runs, "ece", _per_subject)  # per-subject ECE needs no metric
    assert sel.lr_selected == "0.001"
    with pytest.raises(ReportError, match="valid: val_loss, ece, dice"):
        select_runs(runs, "auc", _per_subject)


def test_selection_per_fold_when_no_lr_covers_every_fold():
    runs = [_run(lr="3e-4", fold=0, val=0.5), _run(lr="5e-5", fold=0, val=0.4),
            _run(lr="1e-3", fold=1, val=0.1)]
    warn = WarningLog()
    (sel,) = select_runs(runs, "val_loss", _per_subject, warn)
    assert sel.mode == "per_fold" and sel.lr_selected == "fold0=5e-5;fold1=1e-3"
    assert not warn.messages


def test_pooling_refuses_a_subject_in_two_folds():
    runs = [_run(lr="", fold=0, rid="A"), _run(lr="", fold=1, rid="B")]
    (sel,) = select_runs(runs, "val_loss", _per_subject)
    same = [pd.DataFrame({"subject_id": ["s1"], "dice": [0.5]})] * 2
    with pytest.raises(ReportError, match="subject s1 .* A and B"):
        pool_subjects(sel, same, "per_subject.csv")


def test_dispersion_by_hand():
    bins = pd.DataFrame({"subject_id": ["a", "a", "b", "b"], "bin": [0, 1, 0, 1],
                         "count": [10, 0, 20, 5], "conf_sum": [0.5, 0.0, 1.0, 0.3],
                         "pos_sum": [1, 0, 6, 1]})
    acc = subject_accuracy(bins)
    assert acc[["subject_id", "bin"]].values.tolist() == [["a", 0], ["b", 0], ["b", 1]]
    summ = bin_summary(acc).set_index("bin")
    assert summ.loc[0, "acc_mean"] == pytest.approx(0.2)
    assert summ.loc[0, "acc_std"] == pytest.approx(math.sqrt(0.02))  # ddof = 1
    assert summ.loc[0, "acc_iqr"] == pytest.approx(0.1)  # quartiles 0.15, 0.25
    assert summ.loc[0, "conf_mean"] == pytest.approx(0.05)
    assert math.isnan(summ.loc[1, "acc_std"]) and summ.loc[1, "n_subjects"] == 1
    table = dispersion_table({("d", "CE", "base"): bins, ("d", "CE", "platt"): bins})
    assert list(table["method"]) == ["base", "base", "platt", "platt"]
    assert table["acc_std_base"].tolist()[:1] == pytest.approx([math.sqrt(0.02)])


def test_small_helpers(tmp_path):
    assert tex_escape("mc_decoder 5% & #1") == r"mc\_decoder 5\% \& \#1"
    assert redact_uri("postgresql://u:secret@db:5432/mlflow") == "postgresql://u:***@db:5432/mlflow"
    assert redact_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    target = tmp_path / "f.txt"
    write_text(target, "old")

    class Boom(Exception):
        pass

    def bad(_):
        raise Boom

    with pytest.raises(Boom):
        atomic_write(target, bad)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_slice_figure_has_the_expected_panels():
    import numpy as np

    from tracking.report.slices import SliceRow, panel_titles, slice_figure

    rng = np.random.default_rng(0)

    def preview(prob_scale):
        p_star = rng.random((12, 10)).astype(np.float32)
        return {"subject_id": np.asarray("s1"), "z": np.asarray(4),
                "image": rng.normal(size=(12, 10)).astype(np.float32),
                "label": (p_star > 0.5).astype(np.uint8), "mask": np.ones((12, 10), bool),
                "prob": np.clip(p_star * prob_scale, 0, 1), "true_prob": p_star}

    rows = [SliceRow("CE", preview(1.5), "platt", preview(1.0)),
            SliceRow("SD", preview(2.0), "auxiliary", preview(1.1))]
    fig = slice_figure("brats18", rows)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 * 7
    assert [ax.get_title() for ax in panels[:7]] == panel_titles(True)
    assert panels[0].get_ylabel() == "CE\nPlatt" and panels[7].get_ylabel() == "SD\nauxiliary"
    assert "test subject s1" in fig._suptitle.get_text()
    # without a known truth the p* and error panels are left out
    for r in rows:
        del r.base["true_prob"], r.calibrated["true_prob"]
    assert len([ax for ax in slice_figure("brats18", rows).axes if ax.images]) == 2 * 4
