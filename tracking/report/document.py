"""report.md: ties the tables, figures and CSVs together with the rules that produced them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import pandas as pd

from tracking.report import files as names
from tracking.report.analysis import BASE_METHOD, STEMS, method_key, weights_key
from tracking.report.fetch import TrialSet
from tracking.report.headline import SELECTED_ON_PAPER, SELECTED_ON_TEST, SELECTED_ON_VAL, has_truth
from tracking.report.intervals import smallest_p_line
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
    headline: object = None  # tracking.report.headline.Headline (left-out calibrators)


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
        " A method lacking subjects is tested on the common subjects (see Warnings). The tables' "
        "many comparisons per family can be Holm-corrected (`--holm`); the headline makes one "
        "held-out-chosen test per row and is never corrected. Every mean in results_long.csv and "
        "headline.csv has a 95 % percentile interval (`*_ci_low`, `*_ci_high`) from a subject-level "
        "bootstrap, B = 2000 resamples, seed 0 (the same command gives the same interval).",
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

    if "true_ece_pct_mean" in part and part["true_ece_pct_mean"].notna().any():
        out += ["### ECE against the true ECE", "",
                "The phantoms' p* is known, so the label-free true ECE (same 20 bins of p as ECE, "
                "|mean p − mean p*| per bin) can be set beside ECE, the estimate from sampled labels; "
                "their difference is ECE's bias. The p*-distance, mean |p − p*|, also counts how "
                "sharply p resolves p*. Means with 95 % bootstrap intervals.", "",
                _md(["weights", "method", "ECE %", "true ECE %", "ECE bias (pp)", "bias p vs base",
                     "p*-distance %"],
                    [[r.weights, method_label(r.method), _fmt(r.ece_pct_mean),
                      f"{_fmt(r.true_ece_pct_mean)} [{_fmt(r.true_ece_pct_ci_low)}, {_fmt(r.true_ece_pct_ci_high)}]",
                      f"{_fmt(r.ece_bias_pct_mean)} [{_fmt(r.ece_bias_pct_ci_low)}, {_fmt(r.ece_bias_pct_ci_high)}]",
                      _p(r.ece_bias_p_vs_base),
                      _fmt(getattr(r, "p_star_distance_pct_mean", math.nan))]
                     for r in part.itertuples()])]
    elif "p_star_distance_pct_mean" in part and part["p_star_distance_pct_mean"].notna().any():
        out += ["### p*-distance (no true ECE in these runs)", "",
                "These runs predate the label-free true ECE: their per_subject.csv column `true_ce` "
                "is the p*-distance, mean |p − p*| over the mask, which is not a calibration error "
                "(it also counts how sharply p resolves p*), so it is shown as such and no ECE bias "
                "can be given.", "",
                _md(["weights", "method", "ECE %", "p*-distance %"],
                    [[r.weights, method_label(r.method), _fmt(r.ece_pct_mean),
                      _fmt(r.p_star_distance_pct_mean)] for r in part.itertuples()])]

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


_HEADLINE_ROWS = (("Dice", "dice", 3, 1.0), ("Brier", "brier", 4, 1.0), ("NLL (nats)", "nll", 4, 1.0),
                  ("ECE %", "ece", 3, 1.0), ("true ECE %", "true_ece", 3, 1.0),
                  ("p*-distance %", "p_star_distance", 3, 1.0), ("ECE bias (ECE − true ECE), pp", "ece_bias", 3, 1.0))
_SELECTED_ON_TEXT = {
    SELECTED_ON_VAL: "the fold's val subjects (held out)",
    SELECTED_ON_PAPER: "**the test fold**: under `protocol: paper` the validation subjects are the "
                       "test fold, so this selection saw the subjects it is tested on",
    SELECTED_ON_TEST: "**the test subjects** (these runs have no val metrics: runs from before they "
                      "were logged), so the choice and its test are on the same subjects and the "
                      "verdict is optimistic",
}


def _ci(row, side: str, stem: str, digits: int) -> str:
    mean, low, high = (getattr(row, f"{side}_{stem}{s}") for s in ("", "_ci_low", "_ci_high"))
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def headline_markdown(headline: pd.DataFrame, slice_datasets: Sequence[str] = (),
                      excluded: Sequence = (), info=None) -> str:
    """The report's first section: does the calibrator chosen on held-out subjects beat the base
    model on test? (tracking.report.headline)."""
    if headline is None or headline.empty:
        return "## Does calibration help?\n\nNo dataset × weights has both a base model and a calibration.\n"
    by = headline["headline_by"].iloc[0]
    crit = {"val_ece": "validation ECE", "val_nll": "validation NLL"}.get(by, by)
    rows = []
    for h in headline.itertuples(index=False):
        lr = f" (lr {h.chosen_lr})" if isinstance(h.chosen_lr, str) and h.chosen_lr else ""
        on = {SELECTED_ON_VAL: "val", SELECTED_ON_PAPER: "**test fold** (paper protocol)",
              SELECTED_ON_TEST: "**test** (no val metrics)"}.get(h.selected_on, h.selected_on)
        rows.append([h.dataset, h.weights, f"{method_label(h.chosen_method)}{lr}", on,
                     f"**{h.verdict}**", _p(h.ece_p_vs_base), _p(h.dice_p_vs_base), str(h.n_subjects)])
    text = ["## Does calibration help?", "",
            f"Per dataset × weights, one candidate: the calibration method (not the base model, not "
            f"one whose output is constant over the mask) with the lowest mean {crit} over folds "
            f"(`--headline-by {by}`), each method at its selected learning rate. That one candidate "
            "is then tested once against the base model on the test subjects: two-sided Wilcoxon "
            "signed-rank tests paired over subjects (scipy), p < 0.05. The choice never looks at the "
            "test subjects, so each row makes one test and needs no multiple-comparison correction. "
            "A candidate with lower ECE but significantly lower Dice reads *lower ECE, lower Dice*: "
            "it calibrates by giving up segmentation, which is not a win. Brackets: 95 % "
            "percentile intervals of the mean from a seeded subject-level bootstrap (B = 2000). "
            "Every dataset × weights is shown, whatever its outcome.", ""]
    ons = sorted(set(headline["selected_on"]))
    for on in ons:
        if on != SELECTED_ON_VAL:
            cells = ", ".join(f"{h.dataset}/{h.weights}" for h in headline.itertuples() if h.selected_on == on)
            text += [f"Selection for {cells} was made on {_SELECTED_ON_TEXT.get(on, on)}.", ""]
    text += [_md(["dataset", "weights", f"chosen (lowest {crit})", "selected on", "verdict vs base",
                  "ECE p", "Dice p", "subjects"], rows)]
    line = smallest_p_line(headline["n_subjects"])
    if line:
        text += [line, ""]
    if has_truth(headline):
        text += ["On phantoms the true foreground probability p* is known. The **true ECE** is the "
                 "label-free calibration error: in the same 20 equal-width bins of p as ECE, the "
                 "voxel-weighted mean of |mean p − mean p*| over the mask. ECE estimates it from "
                 "sampled labels; **ECE bias** = ECE − true ECE is what the estimate adds (binning "
                 "and label noise). The **p*-distance**, mean |p − p*| over voxels, is not a "
                 "calibration error: it is ≥ the true ECE and also counts how sharply p resolves p* "
                 "(a calibrated but blurry model scores above 0).", ""]
    for h in headline.itertuples(index=False):
        body = []
        for title, metric, digits, _ in _HEADLINE_ROWS:
            stem = STEMS[metric][0]
            if not (math.isfinite(getattr(h, f"base_{stem}")) or math.isfinite(getattr(h, f"chosen_{stem}"))):
                continue
            body.append([title, _ci(h, "base", stem, digits), _ci(h, "chosen", stem, digits),
                         _p(getattr(h, f"{metric}_p_vs_base"))])
        text += [f"**{h.dataset} / {h.weights}**: base model against {method_label(h.chosen_method)} "
                 f"({h.n_subjects} test subjects)", "",
                 _md(["metric", "base [95 % CI]", f"{method_label(h.chosen_method)} [95 % CI]", "Wilcoxon p"],
                     body)]
    constant = getattr(info, "constant_output", ()) if info is not None else ()
    if constant:
        text += ["Left out of the candidates as constant-output calibrators (their output is one "
                 "value over the whole mask, erasing the lesion; they stay in the tables below): "
                 + "; ".join(c.describe() for c in constant) + ".", ""]
    if excluded:
        text += ["Left out as degenerate base models (calib.guard), with their calibrations: "
                 + "; ".join(e.describe() for e in excluded) + ".", ""]
    for ds in slice_datasets:
        text += [f"![One test subject of {ds}: image, label, p*, base and chosen calibrated "
                 f"probabilities and their errors]({names.slices(ds)})", ""]
    return "\n".join(text)


def report_markdown(results: pd.DataFrame, selections: Sequence[Selection],
                    dispersion: pd.DataFrame, warnings: Sequence[str], ctx: ReportContext,
                    headline: pd.DataFrame | None = None, slice_datasets: Sequence[str] = (),
                    questions: Sequence[str] = ()) -> str:
    """The full report.md text: the headline answer first, then the further questions' sections
    (``questions``, already rendered: train-time or post hoc, which estimator tracks the truth),
    then how it was computed."""
    parts = [_header(ctx), headline_markdown(headline, slice_datasets, ctx.trials.excluded, ctx.headline),
             *questions, _rules(ctx, selections)]
    for ds in sorted(results["dataset"].unique()):
        parts.append(_dataset_section(ds, results, selections, dispersion, ctx))
    parts += ["## Files", "", _md(["file", "content"], [[f"`{k}`", v] for k, v in ctx.files.items()])]
    parts += ["## Warnings", ""]
    parts += [f"- {w}" for w in warnings] or ["none"]
    return "\n".join(parts) + "\n"
