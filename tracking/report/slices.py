"""The slice figure: what calibration does to one test subject's probabilities, next to the truth.

One row per base weights of a dataset: the image (first channel), the label, the phantom's true
probability p* (when known), the base model's probability, the headline's chosen calibrated
method's (lowest mean val ECE, tracking.report.headline) and the absolute errors |p - p*| of both. Every panel is the
same axial slice of the same subject (the first test subject of the lowest fold, on its most
lesioned slice: ``calib.preview``), read from the trial runs' ``preview.npz`` artifacts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from tracking.report.figures import _new_figure
from tracking.report.tables import method_label


@dataclass(frozen=True)
class SliceRow:
    """One row of the figure: the base model's and the best method's previews of one subject."""

    weights: str
    base: dict
    method: str
    calibrated: dict


def panel_titles(with_truth: bool) -> list[str]:
    """The column titles, in order (the error panels need p*)."""
    titles = ["image", "label", "p* (truth)", "base p", "calibrated p", "|base p - p*|",
              "|calibrated p - p*|"]
    return titles if with_truth else titles[:2] + titles[3:5]


def _show(ax, image: np.ndarray, **style) -> None:
    # arrays are (X, Y) in RAS: x to the right, anterior (+y) up
    ax.imshow(np.asarray(image, dtype=float).T, origin="lower", interpolation="nearest", **style)
    ax.set_xticks([])
    ax.set_yticks([])


def slice_figure(dataset: str, rows: Sequence[SliceRow]) -> Figure:
    """The figure for ``dataset`` (see the module doc); raises ValueError without rows."""
    if not rows:
        raise ValueError(f"no previews to draw for {dataset}")
    with_truth = all("true_prob" in r.base and "true_prob" in r.calibrated for r in rows)
    titles = panel_titles(with_truth)
    fig = _new_figure(2.0 * len(titles), 2.2 * len(rows) + 0.5)
    axes = fig.subplots(len(rows), len(titles), squeeze=False)
    subject = str(rows[0].base["subject_id"])
    fig.suptitle(f"{dataset}: test subject {subject}, axial slice z = {int(rows[0].base['z'])}")
    prob_style = {"cmap": "magma", "vmin": 0.0, "vmax": 1.0}
    err_style = {"cmap": "viridis", "vmin": 0.0, "vmax": 0.5}
    for i, r in enumerate(rows):
        mask = r.base["mask"]
        image = np.where(mask, r.base["image"], np.nan)
        panels = [(image, {"cmap": "gray"}), (r.base["label"], {"cmap": "gray", "vmin": 0, "vmax": 1})]
        if with_truth:
            panels.append((r.base["true_prob"], prob_style))
        panels += [(r.base["prob"], prob_style), (r.calibrated["prob"], prob_style)]
        if with_truth:
            panels += [(np.where(mask, np.abs(r.base["prob"] - r.base["true_prob"]), np.nan), err_style),
                       (np.where(mask, np.abs(r.calibrated["prob"] - r.calibrated["true_prob"]), np.nan),
                        err_style)]
        images = []
        for j, (data, style) in enumerate(panels):
            _show(axes[i, j], data, **style)
            images.append(axes[i, j].images[-1])
            if i == 0:
                axes[i, j].set_title(titles[j], fontsize=9)
        axes[i, 0].set_ylabel(f"{r.weights}\n{method_label(r.method)}", fontsize=9)
        if i == len(rows) - 1:
            fig.colorbar(images[3 if with_truth else 2], ax=axes[:, 2:5 if with_truth else 4],
                         shrink=0.6, label="probability")
            if with_truth:
                fig.colorbar(images[-1], ax=axes[:, 5:], shrink=0.6, label="|error|")
    return fig
