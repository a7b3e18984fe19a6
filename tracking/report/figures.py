"""Figures 1–3 of the paper, drawn on matplotlib's Agg canvas (no display, no pyplot state).

1. ECE % against Dice per method and weights, with Pareto fronts (whole dataset, and per weights);
   on phantoms two truth panels: ECE % against the true ECE % (the identity line is an unbiased
   estimate; the vertical distance is ECE's bias) and the p*-distance % (mean |p - p*|) against Dice.
2. Reliability diagram per dataset × weights: mean subject accuracy ± std per bin against mean
   confidence, base model beside each calibrated method, in a grid at most 4 panels wide.
3. Violins of the per-subject accuracy of each bin, one row per method (median solid, quartiles
   dashed, as in the paper's Figure 3).

Every method has one colour and one marker (:data:`METHOD_STYLES`), the same in every figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from calib.vocabulary import BASE, METHODS, PRETRAIN
from tracking.report.analysis import BASE_METHOD, method_key, weights_key
from tracking.report.dispersion import bin_summary
from tracking.report.stats import pareto_front
from tracking.report.tables import method_label

#: Every row a figure can show, in the vocabulary's order.
STYLED_METHODS = (BASE, PRETRAIN, *METHODS)
# 13 colours and 13 markers, one each (tab10 alone has 10 colours for 13 rows); the base model is
# grey, as it is drawn behind every reliability panel.
_COLOURS = ("#7f7f7f", "#000000", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#bcbd22", "#17becf", "#1f77b4", "#000080", "#b8860b")
_MARKER_LIST = ("o", "*", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "d")
#: method -> (colour, marker), fixed for the vocabulary's methods.
METHOD_STYLES = {m: (_COLOURS[i], _MARKER_LIST[i]) for i, m in enumerate(STYLED_METHODS)}
# A name outside the vocabulary (a run from another version) still gets a style, after these.
_SPARE = (("#5f9ea0", "8"), ("#dc143c", "H"), ("#808000", "1"), ("#4b0082", "2"))
#: How weights differ in the all-weights panel of Figure 1 (the marker is the method's).
_WEIGHTS_FILL = ("full", "left", "none", "bottom", "right", "top")
#: Reliability panels per row.
GRID_COLUMNS = 4


def method_style(method: str, others: list[str] | None = None) -> tuple[str, str]:
    """(colour, marker) of ``method``: fixed for the vocabulary's methods (:data:`METHOD_STYLES`)."""
    if method in METHOD_STYLES:
        return METHOD_STYLES[method]
    extra = sorted(set(others or []) - set(METHOD_STYLES) | {method})
    return _SPARE[extra.index(method) % len(_SPARE)]


def _colors(methods: list[str]) -> dict[str, str]:
    return {m: method_style(m, methods)[0] for m in methods}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _grid(fig: Figure, n: int, columns: int = GRID_COLUMNS, **kw):
    """``n`` axes in rows of at most ``columns``; the unused cells of the last row are hidden."""
    ncols = max(1, min(columns, n))
    nrows = max(1, math.ceil(n / ncols))
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n], nrows, ncols


def _draw_front(ax, part: pd.DataFrame, **style) -> None:
    front = part[pareto_front(part["dice_mean"], part["ece_pct_mean"])].sort_values("dice_mean")
    if len(front):
        ax.plot(front["dice_mean"], front["ece_pct_mean"], **style)


def _point(ax, x: float, y: float, method: str, methods: list[str], fill: str = "full") -> None:
    colour, marker = method_style(method, methods)
    ax.plot([x], [y], linestyle="", marker=marker, markersize=8, color=colour, fillstyle=fill,
            markerfacecoloralt="white", markeredgecolor="black" if fill == "full" else colour,
            markeredgewidth=0.6 if fill == "full" else 1.2, zorder=2)


def _has(part: pd.DataFrame, column: str) -> bool:
    return column in part and part[column].notna().any()


def scatter_figure(results: pd.DataFrame, dataset: str) -> Figure:
    """Figure 1 for one dataset: all weights with the dataset's front, one panel per weights with
    that weights' own front, then the truth panels when p* is known (module doc)."""
    part = results[results["dataset"] == dataset]
    weights = sorted(part["weights"].unique(), key=weights_key)
    methods = sorted(part["method"].unique(), key=method_key)
    fill = {w: _WEIGHTS_FILL[i % len(_WEIGHTS_FILL)] for i, w in enumerate(weights)}
    truth = [p for p, col in (("true_ece", "true_ece_pct_mean"), ("p_star", "p_star_distance_pct_mean"))
             if _has(part, col)]
    n = 1 + len(weights) + len(truth)
    ncols = min(GRID_COLUMNS, n)
    fig = _new_figure(4.2 * ncols, 4.0 * math.ceil(n / ncols) + 0.8)
    axes, _, _ = _grid(fig, n)
    panels = [("all weights", part)] + [(w, part[part["weights"] == w]) for w in weights]
    for ax, (title, sub) in zip(axes, panels):
        _draw_front(ax, sub, color="black", linestyle="--", linewidth=1.0, zorder=1,
                    label="Pareto front")
        for r in sub.itertuples(index=False):
            _point(ax, r.dice_mean, r.ece_pct_mean, r.method, methods,
                   fill[r.weights] if title == "all weights" else "full")
        ax.set_title(f"{dataset}: {title}")
        ax.set_xlabel("Dice")
        ax.set_ylabel("ECE %")
        ax.grid(alpha=0.3)
    for ax, kind in zip(axes[len(panels):], truth):
        for r in part.itertuples(index=False):
            if kind == "true_ece":
                x, y = r.true_ece_pct_mean, r.ece_pct_mean
            else:
                x, y = r.dice_mean, r.p_star_distance_pct_mean
            if np.isfinite(x) and np.isfinite(y):
                _point(ax, x, y, r.method, methods, fill[r.weights])
        if kind == "true_ece":
            ok = part[["true_ece_pct_mean", "ece_pct_mean"]].to_numpy(float)
            ok = ok[np.isfinite(ok).all(axis=1)]
            hi = float(ok.max()) * 1.05 if len(ok) else 1.0
            ax.plot([0, hi], [0, hi], color="black", linestyle=":", linewidth=0.8)
            ax.set_title(f"{dataset}: truth, ECE vs true ECE")
            ax.set_xlabel("true ECE % (label-free, from p*)")
            ax.set_ylabel("ECE % (estimate from labels)")
        else:
            ax.set_title(f"{dataset}: truth, p*-distance")
            ax.set_xlabel("Dice")
            ax.set_ylabel("p*-distance %: mean |p - p*|")
        ax.grid(alpha=0.3)
    # One legend below the panels: colour + marker = method, fill = weights.
    handles = [Line2D([], [], color=method_style(m, methods)[0], marker=method_style(m, methods)[1],
                      markeredgecolor="black", markeredgewidth=0.6, linestyle="", markersize=8,
                      label=method_label(m)) for m in methods]
    handles += [Line2D([], [], color="grey", marker="o", fillstyle=fill[w], markerfacecoloralt="white",
                       linestyle="", markersize=8, label=f"{w} (all-weights and truth panels)")
                for w in weights]
    handles.append(Line2D([], [], color="black", linestyle="--", label="Pareto front"))
    if "true_ece" in truth:
        handles.append(Line2D([], [], color="black", linestyle=":", label="ECE = true ECE"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), fontsize=8)
    return fig


def reliability_figure(acc: Mapping[str, pd.DataFrame], dataset: str, weights: str) -> Figure:
    """Figure 2 for one dataset × weights. ``acc`` maps method → ``subject_accuracy`` frame.

    One panel per calibrated method: mean subject accuracy per bin (± one std over subjects, the
    band) against the bin's mean confidence, base model in grey on every panel.
    """
    methods = [m for m in sorted(acc, key=method_key) if m != BASE_METHOD] or list(acc)
    everyone = sorted(acc, key=method_key)
    ncols = min(GRID_COLUMNS, len(methods))
    fig = _new_figure(3.6 * ncols, 3.4 * math.ceil(len(methods) / ncols) + 0.5)
    axes, _, ncols = _grid(fig, len(methods), sharex=True, sharey=True)
    base = bin_summary(acc[BASE_METHOD]) if BASE_METHOD in acc else None
    for ax, m in zip(axes, methods):
        ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, linestyle=":", label="ideal")
        curves = ([(BASE_METHOD, base)] if base is not None and m != BASE_METHOD else [])
        curves.append((m, bin_summary(acc[m])))
        for name, summ in curves:
            color, marker = method_style(name, everyone)
            std = summ["acc_std"].fillna(0.0)
            ax.fill_between(summ["conf_mean"], summ["acc_mean"] - std, summ["acc_mean"] + std,
                            color=color, alpha=0.2, linewidth=0)
            ax.plot(summ["conf_mean"], summ["acc_mean"], marker=marker, markersize=4, color=color,
                    label=method_label(name))
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(method_label(m))
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    for i, ax in enumerate(axes):
        if i % ncols == 0:
            ax.set_ylabel("accuracy (mean ± std)")
        if i >= len(axes) - ncols:  # the lowest panel of each column
            ax.set_xlabel("confidence")
            ax.xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(f"Reliability, {dataset} {weights}")
    return fig


def violin_figure(acc: Mapping[str, pd.DataFrame], dataset: str, weights: str) -> Figure:
    """Figure 3 for one dataset × weights: per bin, the distribution of subject accuracy.

    One row per method (base first). A bin whose subjects all share one value (or has a single
    subject) cannot carry a density estimate and is drawn as points.
    """
    methods = sorted(acc, key=method_key)
    colors = _colors(methods)
    fig = _new_figure(9.0, 2.2 * len(methods) + 0.6)
    axes = fig.subplots(len(methods), 1, squeeze=False, sharex=True, sharey=True)[:, 0]
    for ax, m in zip(axes, methods):
        frame = acc[m]
        groups = {int(b): g["acc"].to_numpy(float) for b, g in frame.groupby("bin")}
        dense = [b for b, a in groups.items() if len(a) > 1 and np.ptp(a) > 0]
        if dense:
            data = [groups[b] for b in dense]
            parts = ax.violinplot(data, positions=dense, widths=0.8, showextrema=False,
                                  showmedians=True, quantiles=[[0.25, 0.75]] * len(dense))
            for body in parts["bodies"]:
                body.set_facecolor(colors[m])
                body.set_alpha(0.5)
            parts["cmedians"].set_color("black")
            parts["cquantiles"].set_color("black")
            parts["cquantiles"].set_linestyle("--")
        for b, a in groups.items():
            if b not in dense:
                ax.scatter(np.full(len(a), b), a, color=colors[m], s=10, zorder=3)
        ax.set_ylabel(f"{method_label(m)}\naccuracy", fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3, axis="y")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("confidence bin k (confidence in [k/n, (k+1)/n), n bins)")
    fig.suptitle(f"Per-subject accuracy per bin, {dataset} {weights}")
    return fig
