"""Figures of the experiment runner (matplotlib, drawn off-screen): box plots of per-patient
metrics by arm, and one patient's follow-up slice with each arm's outline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

#: Metrics drawn by :func:`box_plots`, with their axis labels.
BOX_PLOT_METRICS = {"dice": "Dice", "avd_percent": "AVD (%)", "lesion_f1": "lesion F1", "fp_count": "false-positive lesions"}


def _figure(ncols: int, width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; inside a GUI the caller's backend stays
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * ncols, height), layout="constrained")
    return figure, figure.subplots(1, ncols, squeeze=False)[0]


def _save(figure, path: str | os.PathLike) -> Path:
    from .files import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100), overwrite=True)
    return path


def box_plots(rows: Sequence[Mapping], path: str | os.PathLike, metrics: Mapping[str, str] = BOX_PLOT_METRICS, title: str = "") -> Path:
    """One box plot per metric, one box per arm (in order of first appearance), every
    patient drawn as a dot; non-finite values are left out."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    figure, axes = _figure(len(metrics), max(2.5, 0.55 * len(arms) + 1), 4.0)
    for ax, (metric, label) in zip(axes, metrics.items()):
        values = [np.array([float(r[metric]) for r in rows if r["arm"] == arm and r.get(metric) not in ("", None)]) for arm in arms]
        values = [v[np.isfinite(v)] for v in values]
        ax.boxplot(values, showfliers=False)
        for k, v in enumerate(values, start=1):
            ax.plot(np.full(len(v), k) + np.linspace(-0.12, 0.12, len(v)), v, ".", color="0.3", markersize=4)
        ax.set_xticks(range(1, len(arms) + 1), arms, rotation=60, ha="right")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def overlay_figure(image: np.ndarray, masks: Mapping[str, np.ndarray], path: str | os.PathLike, title: str = "") -> Path:
    """The same 2D slice once per mask, each with that mask's outline and its name above."""
    figure, axes = _figure(len(masks), 2.6, 2.9)
    for ax, (name, mask) in zip(axes, masks.items()):
        ax.imshow(image, cmap="gray", interpolation="nearest")
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=["#ff3030"], linewidths=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)
