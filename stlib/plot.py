"""Figures of the study. Every figure carries the name of the data it shows.

Functions take arrays / DataFrames / AnnData and return a matplotlib ``Figure``; they never read
or compute study results themselves (that is the job of the stages), so the notebooks stay thin
and the figures stay honest about their source via ``source=``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from stlib.constants import CLASS_COLORS, CLASS_NAMES, IGNORE, NUCLEUS_CLASSES  # noqa: E402


def source_label(profile: str, data_dir: str | None = None) -> str:
    """The data-source caption used on every figure and table of a profile."""
    if profile in ("demo", "workshop"):
        return f"SYNTHETIC {profile} cohort (stlib.demo) - not real tissue"
    where = f" ({data_dir})" if data_dir else ""
    return f"HEST-1k Xenium + PanNuke{where}"


def _caption(fig: plt.Figure, source: str) -> None:
    fig.text(0.01, 0.005, f"Data: {source}", fontsize=8, color="0.3", ha="left", va="bottom")


def class_cmap_rgb(type_map: np.ndarray) -> np.ndarray:
    """RGB image (uint8) of a class map using the one colour table of :mod:`stlib.constants`."""
    lut = np.zeros((256, 3), np.uint8)
    for k, rgb in CLASS_COLORS.items():
        lut[k] = rgb
    return lut[np.asarray(type_map, dtype=np.uint8)]


def class_legend(ax: plt.Axes, *, include_ignore: bool = True, **kw) -> None:
    """Legend patches for the five classes (+ ignore)."""
    from matplotlib.patches import Patch

    ids = [*NUCLEUS_CLASSES, *([IGNORE] if include_ignore else [])]
    handles = [Patch(color=np.array(CLASS_COLORS[i]) / 255,
                     label=CLASS_NAMES.get(i, "Ignore")) for i in ids]
    ax.legend(handles=handles, fontsize=7, **({"loc": "upper right"} | kw))


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], *, source: str, ncols: int = 4,
               size: float = 3.0, suptitle: str | None = None) -> plt.Figure:
    """A grid of images (e.g. slide thumbnails) with titles."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols)) if n else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, t in zip(axes.ravel(), images, titles):
        ax.imshow(img)
        ax.set_title(t, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    _caption(fig, source)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def polygons_over_image(image: np.ndarray, layers: Mapping[str, tuple[Sequence, str]], *, source: str,
                        title: str = "", origin: tuple[float, float] = (0.0, 0.0), scale: float = 1.0,
                        ax: plt.Axes | None = None, linewidth: float = 0.8) -> plt.Figure:
    """Draw polygon outlines (shapely geometries, level-0 px) over an image crop.

    Parameters
    ----------
    image
        RGB crop whose pixel (0, 0) is at level-0 ``origin`` and whose pixels are ``1/scale``
        level-0 px wide.
    layers
        ``{label: (geometries, colour)}``, e.g. ``{"HEST registration": (polys, "yellow")}``.
    """
    import shapely

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(image)
    for label, (geoms, colour) in layers.items():
        first = True
        for g in geoms:
            if g is None or g.is_empty:
                continue
            for part in getattr(g, "geoms", [g]):
                xy = shapely.get_coordinates(part.exterior)
                ax.plot((xy[:, 0] - origin[0]) * scale, (xy[:, 1] - origin[1]) * scale, color=colour,
                        lw=linewidth, label=label if first else None)
                first = False
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    if layers:
        ax.legend(fontsize=7, loc="upper right")
    fig = fig or ax.figure
    _caption(fig, source)
    return fig


def training_curves(history: pd.DataFrame, *, source: str, title: str = "Training",
                    loss_cols: Sequence[str] = ("loss",), val_cols: Sequence[str] = ("val_bpq",),
                    by: str | None = "recipe") -> plt.Figure:
    """Loss (left) and validation metrics (right) against the step, one line per recipe."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    groups = history.groupby(by) if by and by in history.columns else [("", history)]
    for name, h in groups:
        for c in loss_cols:
            if c in h.columns:
                s = h[["step", c]].dropna()
                ax1.plot(s["step"], s[c], label=f"{name} {c}".strip())
        for c in val_cols:
            if c in h.columns:
                s = h[["step", c]].dropna()
                ax2.plot(s["step"], s[c], marker="o", label=f"{name} {c}".strip())
    ax1.set_xlabel("step"); ax1.set_ylabel("loss"); ax1.set_yscale("log"); ax1.legend(fontsize=8)
    ax2.set_xlabel("step"); ax2.set_ylabel("validation"); ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    _caption(fig, source)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def metric_ci_plot(summary: pd.DataFrame, metric: str, *, source: str, group: str = "organ",
                   by: str = "model", title: str | None = None) -> plt.Figure:
    """Dot-and-whisker plot of a metric per group (and pooled) with its CI, one colour per model.

    ``summary`` is the long table of :func:`stlib.evaluate.summarize`.
    """
    s = summary[summary["metric"] == metric]
    groups = list(dict.fromkeys(s[group]))
    models = list(dict.fromkeys(s[by]))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(groups), 3.4))
    width = 0.7 / max(1, len(models))
    for k, m in enumerate(models):
        sm = s[s[by] == m].set_index(group).reindex(groups)
        x = np.arange(len(groups)) + (k - (len(models) - 1) / 2) * width
        yerr = np.vstack([sm["mean"] - sm["ci_low"], sm["ci_high"] - sm["mean"]])
        ax.errorbar(x, sm["mean"], yerr=yerr, fmt="o", capsize=3, label=str(m))
    ax.set_xticks(np.arange(len(groups)), groups, rotation=0)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} with 95% bootstrap CI", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _caption(fig, source)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def confusion_plot(confusion: np.ndarray, labels: Sequence[int], *, source: str, title: str = "") -> plt.Figure:
    """Row-normalised confusion matrix (truth rows, predicted columns)."""
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    names = [CLASS_NAMES.get(int(i), "Ignore") for i in labels]
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(cm):
        if v:
            ax.text(j, i, int(v), ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("derived label"); ax.set_ylabel("truth")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    _caption(fig, source)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


__all__ = ["source_label", "class_cmap_rgb", "class_legend", "image_grid", "polygons_over_image",
           "training_curves", "metric_ci_plot", "confusion_plot"]
