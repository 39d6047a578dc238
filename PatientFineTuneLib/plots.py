"""Figures (matplotlib, drawn off-screen): box plots of per-patient metrics by arm and one
patient's follow-up slice with each arm's outline (the experiment runner), and the
figures of a patient's report: lesion outlines of several results in distinct colours
with a legend, the uncertainty as a colour map over the anatomy with a colour bar, and the
lesion load over time. Slices are drawn as the library holds them (radiological display
order: the patient's right on the viewer's left), marked R and L."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

#: Metrics drawn by :func:`box_plots`, with their axis labels.
BOX_PLOT_METRICS = {
    "dice": "Dice",
    "avd_percent": "AVD (%)",
    "lesion_f1": "lesion F1",
    "fp_count": "false-positive lesions",
}


def _grid_figure(nrows: int, ncols: int, width: float, height: float):
    """A figure of ``nrows`` x ``ncols`` panels of ``width`` x ``height`` inches each."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; inside a GUI the caller's backend stays
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return figure, figure.subplots(nrows, ncols, squeeze=False)


def _figure(ncols: int, width: float, height: float):
    figure, axes = _grid_figure(1, ncols, width, height)
    return figure, axes[0]


def _save(figure, path: str | os.PathLike) -> Path:
    from .files import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100), overwrite=True)
    return path


def png_bytes(figure) -> bytes:
    """A figure as PNG bytes (for embedding in a report)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


#: Outline colours of the report figures: the reference and each model, told apart also
#: by colour-blind readers (Okabe-Ito palette).
OUTLINE_COLOURS = {
    "truth": "#009E73",
    "reference": "#009E73",
    "base": "#56B4E9",
    "fine-tuned": "#E69F00",
    "finetuned": "#E69F00",
}
_OTHER_COLOURS = ("#CC79A7", "#F0E442", "#D55E00", "#0072B2")


def _mark_sides(ax, width: int, sides: tuple[str, str] = ("R", "L")) -> None:
    """The patient sides at the left and right edges (the library's slices are in
    radiological order: R, L on axial and coronal slices, A, P on sagittal ones)."""
    for x, text, align in ((2, sides[0], "left"), (width - 3, sides[1], "right")):
        ax.text(x, 2, text, color="white", fontsize=8, fontweight="bold", ha=align, va="top")


def outline_figure(
    anatomy: Sequence[np.ndarray],
    outlines: Mapping[str, Sequence[np.ndarray]],
    slice_titles: Sequence[str],
    row_title: str = "",
    sides: tuple[str, str] = ("R", "L"),
):
    """One row of slices; on each, the outline of every named mask in its own colour, with
    a legend and a title per slice. Returns the matplotlib figure."""
    from matplotlib.lines import Line2D

    figure, axes = _figure(len(anatomy), 2.7, 3.1)
    colours = {
        name: OUTLINE_COLOURS.get(name, _OTHER_COLOURS[k % len(_OTHER_COLOURS)]) for k, name in enumerate(outlines)
    }
    for k, (ax, image) in enumerate(zip(axes, anatomy)):
        ax.imshow(image, cmap="gray", interpolation="nearest")
        # widest first, so that outlines that coincide stay visible as nested bands
        for width, (name, masks) in zip(np.linspace(3.0, 1.0, len(outlines)), outlines.items()):
            if masks[k].any():
                ax.contour(masks[k].astype(float), levels=[0.5], colors=[colours[name]], linewidths=width)
        ax.set_title(slice_titles[k], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        _mark_sides(ax, image.shape[1], sides)
    if row_title:
        axes[0].set_ylabel(row_title, fontsize=10)
    handles = [Line2D([0], [0], color=c, lw=2, label=name) for name, c in colours.items()]
    # one entry per panel's width at most: a one-slice figure stacks its entries
    columns = max(1, min(len(handles), len(anatomy)))
    figure.legend(handles=handles, loc="outside lower center", ncols=columns, fontsize=9, frameon=False)
    return figure


def uncertainty_figure(
    anatomy: Sequence[np.ndarray],
    sd: Mapping[str, Sequence[np.ndarray]],
    slice_titles: Sequence[str],
    sides: tuple[str, str] = ("R", "L"),
):
    """Rows: one per model; columns: slices. The anatomy in grey (dimmed) with the
    uncertainty (SD of the lesion probability over the MC-dropout samples) as a colour map
    over it, clear where it is below 10 % of the maximum, and one colour bar."""
    import matplotlib

    top = max((float(np.max(m)) for maps in sd.values() for m in maps), default=0.0) or 1.0
    figure, axes = _grid_figure(len(sd), len(anatomy), 2.8, 2.9)
    colour_map = matplotlib.colormaps["plasma"]
    shown = None
    for r, (name, maps) in enumerate(sd.items()):
        for k, ax in enumerate(axes[r]):
            ax.imshow(anatomy[k], cmap="gray", interpolation="nearest", alpha=0.6)
            overlay = np.ma.masked_less(maps[k], 0.1 * top)
            shown = ax.imshow(overlay, cmap=colour_map, vmin=0.0, vmax=top, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            _mark_sides(ax, anatomy[k].shape[1], sides)
            if r == 0:
                ax.set_title(slice_titles[k], fontsize=9)
        axes[r][0].set_ylabel(name, fontsize=10)
    bar = figure.colorbar(shown, ax=axes, shrink=0.9)
    bar.set_label("uncertainty (SD of lesion probability)", fontsize=9)
    return figure


def load_figure(times: Sequence[str], loads_ml: Mapping[str, Sequence[float]]):
    """Lesion load (ml) at each time point, one line per source."""
    figure, axes = _figure(1, 3.6, 2.8)
    ax = axes[0]
    for k, (name, values) in enumerate(loads_ml.items()):
        ax.plot(
            range(len(times)),
            values,
            "o-",
            color=OUTLINE_COLOURS.get(name, _OTHER_COLOURS[k % len(_OTHER_COLOURS)]),
            label=name,
        )
    ax.set_xticks(range(len(times)), times)
    ax.set_ylabel("lesion load (ml)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return figure


def box_plots(
    rows: Sequence[Mapping], path: str | os.PathLike, metrics: Mapping[str, str] = BOX_PLOT_METRICS, title: str = ""
) -> Path:
    """One box plot per metric, one box per arm (in order of first appearance), every
    patient drawn as a dot; non-finite values are left out."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    figure, axes = _figure(len(metrics), max(2.5, 0.55 * len(arms) + 1), 4.0)
    for ax, (metric, label) in zip(axes, metrics.items()):
        values = [
            np.array([float(r[metric]) for r in rows if r["arm"] == arm and r.get(metric) not in ("", None)])
            for arm in arms
        ]
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


def overlay_figure(
    image: np.ndarray, masks: Mapping[str, np.ndarray], path: str | os.PathLike, title: str = ""
) -> Path:
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
