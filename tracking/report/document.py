"""report.md: ties the tables, figures and CSVs together with the rules that produced them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import pandas as pd

from tracking.report import files as names
from tracking.report.analysis import BASE_METHOD, method_key, weights_key
from tracking.report.fetch import TrialSet
from tracking.report.selection import Selection
from tracking.report.tables import markdown_table, method_label

SELECTION_TEXT = {
    "val_loss": "the learning rate with the lowest mean validation loss (`best_val_loss`) over "
                "folds (the paper's rule: validation data only)",
    "ece": "the learning rate with the lowest mean per-subject ECE over the pooled held-out "
           "subjects (optimistic: it selects on the data the tables report)",
    "dice": "the learning rate with the highest mean per-subject Dice over the pooled held-out "
            "subjects (optimistic: it selects on the data the tables report)",
}


@dataclass(frozen=True)
class ReportContext:
    """Everything report.md states besides the results themselves."""

    tracking_uri: str  # already redacted
    trials: TrialSet
    select_by: str
    use_holm: bool
    logged_to: str | None
    files: dict[str, str]  # file name → what it is


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    return "–" if not math.isfinite(x) else (f"{x:.2e}" if x < 1e-3 else f"{x:.3f}")


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _header(ctx: ReportContext) -> str:
    t = ctx.trials
    scope = ("trial runs of the sweep run(s) below" if t.scope == "sweep" else
             "all trial runs of the experiment (every launch, resumed ones included)")
    ignored = ", ".join(f"{n} {s}" for s, n in sorted(t.ignored_by_status.items())) or "none"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: UP017 (Python 3.10)
    lines = [
        f"# Calibration sweep report: {t.experiment_name}",
        "",
        f"- Tracking URI: `{ctx.tracking_uri}`; experiment `{t.experiment_name}` (id {t.experiment_id})",
        f"- Scope: {scope}; only FINISHED runs of the base and calibrate stages, the newest per "
        f"`calib.trial_key`. Runs used: {len(t.runs)}; parent sweep run(s): "
        f"{', '.join(f'`{r}`' for r in t.sweep_run_ids) or 'none'}",
        f"- Trial runs left out: {ignored} (not FINISHED); {t.superseded} older FINISHED duplicate(s) "
        "of a trial key",
        "- Logged as artifacts `report/` of sweep run " + (f"`{ctx.logged_to}`" if ctx.logged_to
                                                           else "— (not logged)"),
        f"- Generated {stamp} by `python -m tracking.report`",
        "",
    ]
    return "\n".join(lines)


def _rules(ctx: ReportContext, selections: Sequence[Selection]) -> str:
    holm = (" p-values are Holm-corrected within each family (one metric, one dataset × weights)."
            if ctx.use_holm else " p-values are not corrected for multiple comparisons (as in the paper).")
    protocols = sorted({r.protocol or "not recorded" for s in selections for r in s.runs})
    by_method = {}
    for s in selections:
        by_method.setdefault(";".join(sorted({r.protocol or "not recorded" for r in s.runs})),
                             []).append("/".join(s.key))
    if len(by_method) == 1:
        proto = (f"Evaluation protocol (`calib.protocol`): {', '.join(protocols)} for every "
                 "dataset × weights × method.")
    else:
        proto = "Evaluation protocol (`calib.protocol`) differs between methods:\n\n" + _md(
            ["protocol", "dataset/weights/method"], [[k, ", ".join(v)] for k, v in sorted(by_method.items())])
    return "\n".join([
        "## Rules",
        "",
        f"**Learning-rate selection** (`--select-by {ctx.select_by}`): per dataset × weights × "
        f"method, {SELECTION_TEXT[ctx.select_by]}. Only learning rates that ran on every fold "
        "compete; when none did (an Optuna search per fold), each fold keeps its own best run and "
        "`lr_selected` lists `fold<k>=<lr>`. Ties go to the smaller learning rate. Per-subject "
        "results of the selected runs are pooled over folds, each subject once.",
        "",
        "**Statistics**: within one dataset × weights and per metric, the best method by mean "
        "(Dice highest, ECE lowest) and a two-sided Wilcoxon signed-rank test (scipy) of every other "
        "method against it, paired over subjects; **bold** = best or p ≥ 0.05. Every method is also "
        "tested against the base model (`*_p_vs_base` in results_long.csv)." + holm +
        " A method lacking subjects is tested on the common subjects (see Warnings).",
        "",
        "**Pareto**: a row is on the front when no other row of the same dataset (any weights) has "
        "lower-or-equal ECE and higher-or-equal Dice with one of them strict; Figure 1 also draws "
        "each weights' own front.",
        "",
        proto,
        "",
    ])


def _dataset_section(ds: str, results: pd.DataFrame, selections: Sequence[Selection],
                     dispersion: pd.DataFrame, ctx: ReportContext) -> str:
    part = results[results["dataset"] == ds]
    weights = sorted(part["weights"].unique(), key=weights_key)
    out = [f"## {ds}", "", markdown_table(results, ds, ctx.use_holm, ctx.select_by,
                                          ctx.trials.excluded_from(ds)),
           f"Files: [{names.table_md(ds)}]({names.table_md(ds)}), "
           f"[{names.table_tex(ds)}]({names.table_tex(ds)}), "
           f"[{names.pareto_csv(ds)}]({names.pareto_csv(ds)}).", ""]

    rows = []
    for s in sorted((s for s in selections if s.dataset == ds),
                    key=lambda s: (weights_key(s.weights), method_key(s.method))):
        if s.mode == "single":
            continue
        cands = ", ".join(f"{c.lr}: {_fmt(c.criterion, 4)}{' ✓' if c.selected else ''}"
                          + ("" if len(c.folds) == len(s.runs) or s.mode == "per_fold"
                             else f" (folds {','.join(map(str, c.folds))} only)")
                          for c in s.candidates)
        rows.append([s.weights, method_label(s.method), f"`{s.lr_selected}`", s.mode, cands])
    if rows:
        out += [f"### Selected learning rates ({ctx.select_by})", "",
                _md(["weights", "method", "lr_selected", "mode", f"candidates ({ctx.select_by})"], rows)]

    front = part[part["pareto"]].sort_values("dice_mean")
    out += ["### Pareto front (all weights)", "",
            _md(["weights", "method", "Dice", "ECE %"],
                [[r.weights, method_label(r.method), _fmt(r.dice_mean), _fmt(r.ece_pct_mean)]
                 for r in front.itertuples()]),
            f"![Figure 1: ECE vs Dice, {ds}]({names.fig1(ds)})", ""]

    vs_base = [[r.weights, method_label(r.method), _p(r.dice_p_vs_base), _p(r.ece_p_vs_base)]
               for r in part.itertuples() if r.method != BASE_METHOD]
    if vs_base:
        out += ["### Against the base model (two-sided Wilcoxon p)", "",
                _md(["weights", "method", "Dice p", "ECE p"], vs_base)]

    if "true_ce_pct_mean" in part and part["true_ce_pct_mean"].notna().any():
        out += ["### ECE against the true calibration error", "",
                "The phantoms' true foreground probability p* is known, so the true calibration "
                "error, mean |p̂ − p*| over the mask, can be set beside the binned ECE estimate.", "",
                _md(["weights", "method", "ECE %", "true CE %", "ECE − true CE (pp)"],
                    [[r.weights, method_label(r.method), _fmt(r.ece_pct_mean),
                      _fmt(r.true_ce_pct_mean), _fmt(r.ece_pct_mean - r.true_ce_pct_mean)]
                     for r in part.itertuples()])]

    for w in weights:
        out += [f"### {ds} {w}: reliability and subject-level spread", "",
                f"![Figure 2: reliability, {ds} {w}]({names.fig2(ds, w)})", "",
                f"![Figure 3: per-bin subject accuracy, {ds} {w}]({names.fig3(ds, w)})", ""]
        disp = dispersion[(dispersion["dataset"] == ds) & (dispersion["weights"] == w)]
        rows = []
        for m, g in sorted(disp.groupby("method"), key=lambda kv: method_key(kv[0])):
            if m == BASE_METHOD:
                continue
            both = g.dropna(subset=["acc_std", "acc_std_base"])
            rows.append([method_label(m), _fmt(both["acc_std_base"].mean()), _fmt(both["acc_std"].mean()),
                         _fmt(both["acc_iqr_base"].mean()), _fmt(both["acc_iqr"].mean())])
        if rows:
            out += ["Mean over bins of the spread of subject accuracy, base → calibrated "
                    "(bins where both have ≥ 2 subjects; details in subject_dispersion.csv):", "",
                    _md(["method", "std base", "std", "IQR base", "IQR"], rows)]
    return "\n".join(out)


def headline_markdown(headline: pd.DataFrame, slice_datasets: Sequence[str] = (),
                      excluded: Sequence = ()) -> str:
    """The report's first section: does the best post hoc method beat the base model?"""
    if headline is None or headline.empty:
        return "## Does calibration help?\n\nNo dataset × weights has both a base model and a calibration.\n"
    truth = headline["base_true_ce_pct"].notna().any()
    header = ["dataset", "weights", "base ECE %"] + (["base true CE %"] if truth else []) + \
        ["best post hoc (by ECE)", "its ECE %"] + (["its true CE %"] if truth else []) + \
        ["ECE vs base (Wilcoxon)"] + (["true CE vs base (Wilcoxon)"] if truth else []) + ["subjects"]
    rows = []
    for h in headline.itertuples(index=False):
        lr = f" (lr {h.best_lr})" if h.best_lr else ""
        row = [h.dataset, h.weights, _fmt(h.base_ece_pct)] + ([_fmt(h.base_true_ce_pct)] if truth else [])
        row += [f"{method_label(h.best_method)}{lr}", _fmt(h.best_ece_pct)]
        row += [_fmt(h.best_true_ce_pct)] if truth else []
        row += [f"{h.ece_verdict} (p = {_p(h.ece_p_vs_base)})"]
        row += [f"{h.true_ce_verdict} (p = {_p(h.true_ce_p_vs_base)})"] if truth else []
        rows.append(row + [str(h.n_subjects)])
    text = ["## Does calibration help?", "",
            "Per dataset × weights: the base model, the post hoc method with the lowest mean ECE, "
            "and a two-sided Wilcoxon signed-rank test of that method against the base model over "
            "the subjects (p < 0.05: *lower* / *higher*). "
            + ("The true calibration error is mean |p̂ − p*| against the phantoms' known voxel "
               "probability, which ECE only estimates from sampled labels. " if truth else "")
            + "Every dataset × weights is shown, whatever its outcome.", "", _md(header, rows)]
    if excluded:
        text += ["Left out as degenerate base models (calib.guard), with their calibrations: "
                 + "; ".join(e.describe() for e in excluded) + ".", ""]
    for ds in slice_datasets:
        text += [f"![One test subject of {ds}: image, label, p*, base and calibrated probabilities "
                 f"and their errors]({names.slices(ds)})", ""]
    return "\n".join(text)


def report_markdown(results: pd.DataFrame, selections: Sequence[Selection],
                    dispersion: pd.DataFrame, warnings: Sequence[str], ctx: ReportContext,
                    headline: pd.DataFrame | None = None, slice_datasets: Sequence[str] = ()) -> str:
    """The full report.md text: the headline answer first, then how it was computed."""
    parts = [_header(ctx), headline_markdown(headline, slice_datasets, ctx.trials.excluded),
             _rules(ctx, selections)]
    for ds in sorted(results["dataset"].unique()):
        parts.append(_dataset_section(ds, results, selections, dispersion, ctx))
    parts += ["## Files", "", _md(["file", "content"], [[f"`{k}`", v] for k, v in ctx.files.items()])]
    parts += ["## Warnings", ""]
    parts += [f"- {w}" for w in warnings] or ["none"]
    return "\n".join(parts) + "\n"
