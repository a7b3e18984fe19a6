"""Figures 1–3 of the paper, drawn on matplotlib's Agg canvas (no display, no pyplot state).

1. ECE % against Dice per method and weights, with Pareto fronts (whole dataset, and per weights).
2. Reliability diagram per dataset × weights: mean subject accuracy ± std per bin against mean
   confidence, base model beside each calibrated method.
3. Violins of the per-subject accuracy of each bin, one row per method (median solid, quartiles
   dashed, as in the paper's Figure 3).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tracking.report.analysis import BASE_METHOD, METHOD_ORDER, method_key, weights_key
from tracking.report.dispersion import bin_summary
from tracking.report.stats import pareto_front
from tracking.report.tables import method_label

_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(methods: list[str]) -> dict[str, tuple]:
    """One colour per method, the same in every figure: the paper's methods have fixed slots."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    others = sorted(m for m in methods if m not in METHOD_ORDER)
    return {m: cmap((METHOD_ORDER.index(m) if m in METHOD_ORDER
                     else len(METHOD_ORDER) + others.index(m)) % 10) for m in methods}


def _draw_front(ax, part: pd.DataFrame, **style) -> None:
    front = part[pareto_front(part["dice_mean"], part["ece_pct_mean"])].sort_values("dice_mean")
    if len(front):
        ax.plot(front["dice_mean"], front["ece_pct_mean"], **style)


def scatter_figure(results: pd.DataFrame, dataset: str) -> Figure:
    """Figure 1 for one dataset: left all weights with the dataset's front, then one panel per
    weights with that weights' own front."""
    part = results[results["dataset"] == dataset]
    weights = sorted(part["weights"].unique(), key=weights_key)
    methods = sorted(part["method"].unique(), key=method_key)
    colors = _colors(methods)
    marker = {w: _MARKERS[i % len(_MARKERS)] for i, w in enumerate(weights)}
    fig = _new_figure(4.2 * (1 + len(weights)), 4.0)
    axes = fig.subplots(1, 1 + len(weights), squeeze=False)[0]
    panels = [("all weights", part)] + [(w, part[part["weights"] == w]) for w in weights]
    for ax, (title, sub) in zip(axes, panels):
        _draw_front(ax, sub, color="black", linestyle="--", linewidth=1.0, zorder=1,
                    label="Pareto front")
        for r in sub.itertuples(index=False):
            ax.scatter(r.dice_mean, r.ece_pct_mean, color=colors[r.method], marker=marker[r.weights],
                       s=48, edgecolor="black", linewidth=0.5, zorder=2)
        ax.set_title(f"{dataset}: {title}")
        ax.set_xlabel("Dice")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ECE %")
    # One legend: colours = methods, markers = weights.
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[m], marker="o", linestyle="", label=method_label(m))
               for m in methods]
    handles += [Line2D([], [], color="grey", marker=marker[w], linestyle="", label=w) for w in weights]
    handles.append(Line2D([], [], color="black", linestyle="--", label="Pareto front"))
    axes[-1].legend(handles=handles, fontsize=7, loc="best")
    return fig


def reliability_figure(acc: Mapping[str, pd.DataFrame], dataset: str, weights: str) -> Figure:
    """Figure 2 for one dataset × weights. ``acc`` maps method → ``subject_accuracy`` frame.

    One panel per calibrated method: mean subject accuracy per bin (± one std over subjects, the
    band) against the bin's mean confidence, base model in grey on every panel.
    """
    methods = [m for m in sorted(acc, key=method_key) if m != BASE_METHOD] or list(acc)
    colors = _colors(sorted(acc, key=method_key))
    fig = _new_figure(3.6 * len(methods), 3.8)
    axes = fig.subplots(1, len(methods), squeeze=False, sharey=True)[0]
    base = bin_summary(acc[BASE_METHOD]) if BASE_METHOD in acc else None
    for ax, m in zip(axes, methods):
        ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, linestyle=":", label="ideal")
        curves = ([(BASE_METHOD, base, "grey")] if base is not None and m != BASE_METHOD else [])
        curves.append((m, bin_summary(acc[m]), colors[m]))
        for name, summ, color in curves:
            std = summ["acc_std"].fillna(0.0)
            ax.fill_between(summ["conf_mean"], summ["acc_mean"] - std, summ["acc_mean"] + std,
                            color=color, alpha=0.2, linewidth=0)
            ax.plot(summ["conf_mean"], summ["acc_mean"], marker="o", markersize=3, color=color,
                    label=method_label(name))
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("confidence")
        ax.set_title(method_label(m))
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean ± std over subjects)")
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
