"""Tables 1–2 of the paper from ``results_long``: rows = methods, columns = weights × {Dice, ECE %}.

Markdown for report.md / the README, LaTeX for a paper (a ``table`` float using booktabs rules;
``\\usepackage{booktabs}`` in the preamble). On phantoms two more groups stand beside ECE: the
true ECE (%, the label-free quantity ECE estimates) and the p*-distance (%, mean |p - p*|); they
are not tested against the best, so never bold. Under each table: the smallest two-sided Wilcoxon p
attainable with its number of subjects (tracking.report.intervals).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from tracking.report.analysis import method_key, weights_key
from tracking.report.intervals import smallest_p_line

METHOD_LABELS = {"base": "base model", "platt": "Platt", "auxiliary": "auxiliary",
                 "finetune": "fine-tune", "mc_decoder": "MC-Decoder", "mc_center": "MC-Center"}
MISSING = "–"  # a method not run for these weights


def method_label(method: str) -> str:
    """The paper's row label of a method (its registry name for methods the paper lacks)."""
    return METHOD_LABELS.get(method, method)


def _groups(part: pd.DataFrame) -> list[tuple[str, str, str | None, int]]:
    """(title, value column, bold column or None, decimals) for each column group."""
    groups = [("Dice", "dice_mean", "dice_bold", 3), ("ECE %", "ece_pct_mean", "ece_bold", 3)]
    for title, col in (("true ECE %", "true_ece_pct_mean"), ("p*-distance %", "p_star_distance_pct_mean")):
        if col in part and part[col].notna().any():
            groups.append((title, col, None, 3))
    return groups


def _grid(part: pd.DataFrame):
    weights = sorted(part["weights"].unique(), key=weights_key)
    methods = sorted(part["method"].unique(), key=method_key)
    cell = {(r.method, r.weights): r for r in part.itertuples(index=False)}
    return weights, methods, cell


def _cells(part: pd.DataFrame, bold_fmt, missing: str) -> tuple[list[str], list[str], list[list[str]]]:
    weights, methods, cell = _grid(part)
    groups = _groups(part)
    body = []
    for m in methods:
        row = [m]
        for _, col, bold_col, dec in groups:
            for w in weights:
                r = cell.get((m, w))
                value = getattr(r, col) if r is not None else math.nan
                if r is None or not math.isfinite(value):
                    row.append(missing)
                    continue
                text = f"{value:.{dec}f}"
                row.append(bold_fmt(text) if bold_col and getattr(r, bold_col) else text)
        body.append(row)
    return [g[0] for g in groups], weights, body


def caption(dataset: str, use_holm: bool, select_by: str, excluded: Sequence = (),
            n_subjects: Sequence[int] = ()) -> str:
    """The table's caption: what bold means, how learning rates were chosen, which degenerate
    base models (tracking.report.fetch.Exclusion) were left out, and the smallest p its
    numbers of subjects ``n_subjects`` allow."""
    holm = ", Holm-corrected within each column" if use_holm else ""
    text = (f"Results on {dataset}. Values in bold are the best result, or not significantly "
            f"different from the best (two-sided Wilcoxon signed-rank test over subjects, "
            f"p \u2265 0.05{holm}). Learning rates selected by {select_by}.")
    if excluded:
        text += (" Left out of the means and tests as degenerate (calib.guard): "
                 + "; ".join(e.describe() for e in excluded) + ".")
    line = smallest_p_line(n_subjects)
    return text + (" " + line if line else "")


def markdown_table(results: pd.DataFrame, dataset: str, use_holm: bool = False,
                   select_by: str = "val_loss", excluded: Sequence = ()) -> str:
    """The dataset's table in GitHub Markdown, bold cells as ``**x**``, caption underneath."""
    part = results[results["dataset"] == dataset]
    titles, weights, body = _cells(part, lambda t: f"**{t}**", MISSING)
    header = ["method"] + [f"{t} {w}" for t in titles for w in weights]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" + "---:|" * (len(header) - 1)]
    for row in body:
        lines.append("| " + " | ".join([method_label(row[0])] + row[1:]) + " |")
    return ("\n".join(lines) + "\n\n"
            + caption(dataset, use_holm, select_by, excluded, part["n_subjects"]) + "\n")


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}", "\u2265": r"$\geq$", "\u2013": "--"}


def tex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def latex_table(results: pd.DataFrame, dataset: str, use_holm: bool = False,
                select_by: str = "val_loss", excluded: Sequence = ()) -> str:
    """The dataset's table as a LaTeX ``table`` float with booktabs rules (needs booktabs)."""
    part = results[results["dataset"] == dataset]
    titles, weights, body = _cells(part, lambda t: rf"\textbf{{{t}}}", "--")
    k = len(weights)
    ncol = 1 + k * len(titles)
    group_head = " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{tex_escape(t)}}}" for t in titles)
    rules = " ".join(rf"\cmidrule(lr){{{2 + i * k}-{1 + (i + 1) * k}}}" for i in range(len(titles)))
    sub_head = " & ".join(tex_escape(w) for _ in titles for w in weights)
    lines = [
        r"% Generated by python -m tracking.report; needs \usepackage{booktabs}.",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{tex_escape(caption(dataset, use_holm, select_by, excluded, part['n_subjects']))}}}",
        rf"\label{{tab:results-{tex_escape(dataset)}}}",
        rf"\begin{{tabular}}{{l{'r' * (ncol - 1)}}}",
        r"\toprule",
        rf" & {group_head} \\",
        rules,
        rf"weights $\rightarrow$ & {sub_head} \\",
        r"\midrule",
    ]
    for row in body:
        lines.append(" & ".join([tex_escape(method_label(row[0]))] + row[1:]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
