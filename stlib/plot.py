"""Figures of the study. Every figure carries the name of the data it shows.

Functions take arrays / DataFrames / AnnData and return a matplotlib ``Figure``; they never read
or compute study results themselves (that is the job of the stages), so the notebooks stay thin
and the figures stay honest about their source via ``source=``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from stlib.constants import CLASS_COLORS, CLASS_NAMES, IGNORE, NUCLEUS_CLASSES


def notebook_setup(*, dpi: int = 100) -> None:
    """Figure defaults of the book, and silence of known harmless library warnings.

    Only warnings that say nothing about the data are silenced (tqdm's missing-widget notice,
    numba/umap parallelism notices); everything else still shows in the executed notebooks.
    """
    import warnings

    plt.rcParams.update({"figure.dpi": dpi, "savefig.dpi": dpi})
    try:
        from tqdm import TqdmWarning

        warnings.filterwarnings("ignore", category=TqdmWarning)
    except ImportError:  # pragma: no cover
        pass
    warnings.filterwarnings("ignore", message=".*n_jobs value .* overridden.*")
    warnings.filterwarnings("ignore", category=SyntaxWarning, module="docrep")  # squidpy's docstrings
    pd.set_option("display.max_columns", 40)


def source_label(profile: str, data_dir: str | None = None) -> str:
    """The data-source caption used on every figure and table of a profile."""
    if profile in ("demo", "workshop"):
        return f"SYNTHETIC {profile} cohort (stlib.demo) - not real tissue"
    if profile == "realtissue":
        return ("REAL H&E + REAL manual nuclei (MoNuSeg, CoNSeP) with a SIMULATED Xenium layer "
                f"(stlib realtissue{', ' + str(data_dir) if data_dir else ''})")
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
    ax.legend(handles=handles, **({"loc": "upper right", "fontsize": 7} | kw))


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


def _select_in(geoms, x0: float, y0: float, n: float):
    import shapely

    box = shapely.box(x0, y0, x0 + n, y0 + n)
    g = np.asarray(geoms, dtype=object)
    return g[shapely.intersects(g, box)] if len(g) else g


def alignment_overlay(image: np.ndarray, before, after, *, origin: tuple[float, float], source: str,
                      sample: str = "", truth=None) -> plt.Figure:
    """Xenium nuclei over the H&E before (HEST/CSV registration) and after refinement.

    Left: the registration as given; right: the refined map; the true nuclei of the demo truth
    (when ``truth`` is given) in white on both. :func:`stlib.align.overlay_crop` reads the
    inputs of one sample.

    Parameters
    ----------
    image
        ``(n, n, 3)`` H&E crop whose top-left level-0 pixel is ``origin``.
    before, after
        Nucleus polygons in H&E level-0 px under the initial and the refined map.
    truth
        True visible nuclei (H&E level-0 px), or None.
    """
    x0, y0 = origin
    n = max(image.shape[:2])
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6))
    for ax, polys, label, col in ((axes[0], before, "registration as given", "yellow"),
                                  (axes[1], after, "after refinement", "cyan")):
        layers = {label: (_select_in(polys, x0, y0, n), col)}
        if truth is not None:
            layers["true nuclei (demo truth)"] = (_select_in(truth, x0, y0, n), "white")
        polygons_over_image(image, layers, source=source, origin=(x0, y0), ax=ax,
                            title=f"{sample}: {label}" if sample else label)
    fig.texts.clear()
    _caption(fig, source)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def residual_field(result, *, source: str, thumbnail: np.ndarray | None = None,
                   slide_shape: tuple[int, int] | None = None) -> plt.Figure:
    """Tile-wise residual shifts (µm) before and after refinement, as arrows over the slide."""
    tiles = pd.DataFrame(result.scores.get("tiles", []))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, when in zip(axes, ("before", "after")):
        if thumbnail is not None and slide_shape is not None:
            ax.imshow(thumbnail, extent=(0, slide_shape[1], slide_shape[0], 0), alpha=0.6)
        col = f"residual_{when}_um"
        if not tiles.empty and {"x_px", "y_px", f"dx_{when}_um", f"dy_{when}_um"} <= set(tiles.columns):
            q = ax.quiver(tiles["x_px"], tiles["y_px"], tiles[f"dx_{when}_um"], -tiles[f"dy_{when}_um"],
                          tiles.get(col, None), cmap="viridis", angles="xy")
            fig.colorbar(q, ax=ax, fraction=0.046, label="residual (µm)")
        elif not tiles.empty and {"x_px", "y_px", col} <= set(tiles.columns):
            sc_ = ax.scatter(tiles["x_px"], tiles["y_px"], c=tiles[col], cmap="viridis", s=60)
            fig.colorbar(sc_, ax=ax, fraction=0.046, label="residual (µm)")
        for r in result.excluded_regions:
            ax.add_patch(plt.Rectangle((r["x0"], r["y0"]), r["x1"] - r["x0"], r["y1"] - r["y0"],
                                       fill=False, ec="red", lw=1.5))
        ax.set_title(f"{result.sample}: residual field {when} refinement", fontsize=10)
        ax.set_aspect("equal")
        ax.set_xlabel("H&E level-0 px"); ax.set_ylabel("H&E level-0 px")
        if thumbnail is None:
            ax.invert_yaxis()
    _caption(fig, source)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def class_overlay(image: np.ndarray, nuclei, *, source: str, origin: tuple[float, float] = (0, 0),
                  title: str = "", ax: plt.Axes | None = None) -> plt.Figure:
    """Nucleus outlines coloured by class (one colour table, :mod:`stlib.constants`)."""
    import shapely

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(image)
    for g, c in zip(nuclei.geometry.values, nuclei["class"].to_numpy()):
        for part in getattr(g, "geoms", [g]):
            xy = shapely.get_coordinates(part.exterior)
            ax.plot(xy[:, 0] - origin[0], xy[:, 1] - origin[1], color=np.array(CLASS_COLORS[int(c)]) / 255, lw=1.0)
    ax.set_xlim(0, image.shape[1]); ax.set_ylim(image.shape[0], 0); ax.axis("off")
    ax.set_title(title, fontsize=10)
    class_legend(ax)
    fig = fig or ax.figure
    _caption(fig, source)
    return fig


def tile_labels(tile: Mapping[str, np.ndarray], *, source: str, title: str = "") -> plt.Figure:
    """A training tile: image, instances, class map (ignore in grey) and the ignore mask."""
    from skimage.color import label2rgb

    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    axes[0].imshow(tile["image"]); axes[0].set_title("H&E tile")
    axes[1].imshow(label2rgb(tile["inst"], bg_label=0)); axes[1].set_title("instances")
    axes[2].imshow(class_cmap_rgb(tile["type"])); axes[2].set_title("classes")
    class_legend(axes[2], fontsize=6)
    axes[3].imshow(tile["ignore"], cmap="gray_r", vmin=0, vmax=1); axes[3].set_title("ignore (black)")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    _caption(fig, source)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def refinement_overlay(tile: Mapping[str, np.ndarray], nuclei, *, origin: tuple[float, float], scale: float,
                       source: str, truth: Mapping[str, np.ndarray] | None = None, title: str = "") -> plt.Figure:
    """A training tile with the ST nuclei as rasterised from DAPI (left) and snapped to the H&E (right).

    ``nuclei``: the aligned ST polygons (level-0 px), drawn in tile px as
    ``(xy - origin) * scale``; the right panel draws the refined instance boundaries of the tile.
    Nuclei set to ``ignore`` (no H&E contrast) are shaded. With ``truth`` (a tile of the truth
    store) the true outlines are drawn in red on both panels.
    """
    import shapely
    from skimage.segmentation import find_boundaries

    img = np.asarray(tile["image"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6))
    left, right = img.copy(), img.copy()
    ign = np.asarray(tile["ignore"]).astype(bool)
    right[ign] = (right[ign] * 0.45).astype(np.uint8)
    st_b = find_boundaries(np.asarray(tile["inst"]), mode="inner")
    if truth is not None:
        tb = find_boundaries(np.asarray(truth["inst"]), mode="inner")
        left[tb] = (230, 0, 0)
        right[tb & ~st_b] = (230, 0, 0)
    right[st_b] = (0, 230, 0)
    axes[0].imshow(left)
    for g in nuclei.geometry.values:
        for part in getattr(g, "geoms", [g]):
            xy = (shapely.get_coordinates(part.exterior) - np.asarray(origin)) * scale
            axes[0].plot(xy[:, 0] - 0.5, xy[:, 1] - 0.5, color=(0, 0.9, 0), lw=0.9)
    axes[1].imshow(right)
    truth_note = "; red: true nuclei" if truth is not None else ""
    axes[0].set_title(f"ST nuclei as segmented on DAPI (green){truth_note}", fontsize=9)
    axes[1].set_title(f"snapped to the haematoxylin boundary (green); ignore shaded{truth_note}", fontsize=9)
    for ax in axes:
        ax.set_xlim(-0.5, img.shape[1] - 0.5); ax.set_ylim(img.shape[0] - 0.5, -0.5); ax.axis("off")
    fig.suptitle(title, fontsize=10)
    _caption(fig, source)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def _class_names(adata) -> pd.Series:
    return adata.obs["class"].astype(int).map(lambda c: CLASS_NAMES.get(c, "Ignore") if c != IGNORE else "Ignore")


def umap_by_class(adata, *, source: str, seed: int = 0, title: str = "") -> plt.Figure:
    """UMAP of the cells (from their PCA) coloured by image-oriented class."""
    import umap

    if "X_umap" in adata.obsm:
        emb = np.asarray(adata.obsm["X_umap"])
    else:
        rep = np.asarray(adata.obsm["X_pca"]) if "X_pca" in adata.obsm else np.asarray(adata.layers["lognorm"].todense())
        import warnings

        with warnings.catch_warnings():  # umap warns that a seed disables its parallelism
            warnings.simplefilter("ignore", UserWarning)
            emb = umap.UMAP(n_neighbors=15, min_dist=0.3, random_state=seed).fit_transform(rep)
        adata.obsm["X_umap"] = emb
    names = _class_names(adata)
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    for cid in [*NUCLEUS_CLASSES, IGNORE]:
        name = CLASS_NAMES.get(cid, "Ignore") if cid != IGNORE else "Ignore"
        m = (names == name).to_numpy()
        if m.any():
            ax.scatter(emb[m, 0], emb[m, 1], s=4, color=np.array(CLASS_COLORS[cid]) / 255, label=f"{name} ({m.sum()})")
    ax.set_xticks([]); ax.set_yticks([]); ax.set_xlabel("UMAP 1"); ax.set_ylabel("UMAP 2")
    ax.legend(fontsize=7, markerscale=3, loc="best")
    ax.set_title(title or "Cells by class (UMAP of expression)", fontsize=10)
    _caption(fig, source)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def marker_dotplot(adata, markers: Mapping[str, Sequence[str]], *, source: str, groupby: str = "fine_type",
                   max_per_type: int = 3) -> plt.Figure:
    """scanpy dot plot of marker genes (in the panel) by fine type."""
    import scanpy as sc

    present = set(adata.obs[groupby].astype(str))
    genes = {t: [g for g in gs if g in adata.var_names][:max_per_type] for t, gs in markers.items() if t in present}
    genes = {t: g for t, g in genes.items() if g}
    ad = adata.copy()
    ad.X = ad.layers["lognorm"] if "lognorm" in ad.layers else ad.X
    ad.obs[groupby] = ad.obs[groupby].astype(str).astype("category")  # no unused categories
    dp = sc.pl.dotplot(ad, genes, groupby=groupby, show=False, return_fig=True)
    dp.make_figure()
    fig = dp.fig
    _caption(fig, source)
    return fig


def nhood_enrichment(adata, *, source: str, seed: int = 0, title: str = "") -> plt.Figure:
    """squidpy neighbourhood enrichment (z-scores) of the classes on a Delaunay graph."""
    import squidpy as sq

    ad = adata.copy()
    ad.obs["class_name"] = _class_names(ad).astype("category")
    sq.gr.spatial_neighbors_delaunay(ad, spatial_key="spatial")
    sq.gr.nhood_enrichment(ad, cluster_key="class_name", seed=seed, show_progress_bar=False)
    z = ad.uns["class_name_nhood_enrichment"]["zscore"]
    cats = list(ad.obs["class_name"].cat.categories)
    fig, ax = plt.subplots(figsize=(5.4, 4.6))
    lim = np.nanmax(np.abs(z)) if np.isfinite(z).any() else 1
    im = ax.imshow(z, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(cats)), cats, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(cats)), cats, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, label="z-score")
    ax.set_title(title or "Neighbourhood enrichment of classes (squidpy)", fontsize=10)
    _caption(fig, source)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


__all__ = ["budget_curve_plot", "refinement_overlay", "notebook_setup", "source_label", "class_cmap_rgb", "class_legend", "image_grid", "polygons_over_image",
           "training_curves", "metric_ci_plot", "confusion_plot", "alignment_overlay",
           "residual_field", "class_overlay", "tile_labels", "umap_by_class", "marker_dotplot",
           "nhood_enrichment"]


def robustness_curves(sweep: pd.DataFrame, *, source: str,
                      metrics: Sequence[str] = ("accuracy", "f1_Neoplastic", "f1_Inflammatory", "f1_Connective",
                                                "f1_Epithelial"),
                      knob_labels: Mapping[str, str] | None = None, title: str = "") -> plt.Figure:
    """Scores of the labeler against each biology knob of the demo generator.

    ``sweep``: one row per (knob, value, seed) with the score columns (as
    :func:`stlib.robustness.robustness_sweep` returns). One panel per knob; per metric the mean over
    seeds with the min-max range as a band; the knob's default is marked.
    """
    knobs = list(dict.fromkeys(sweep["knob"]))
    ncols = min(4, max(1, len(knobs)))
    nrows = int(np.ceil(len(knobs) / ncols)) if knobs else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.7 * nrows + 0.7), squeeze=False)
    colours = {"accuracy": "k", **{f"f1_{CLASS_NAMES[c]}": np.array(CLASS_COLORS[c]) / 255 for c in NUCLEUS_CLASSES}}
    for ax in axes.ravel()[len(knobs):]:
        ax.axis("off")
    for ax, k in zip(axes.ravel(), knobs):
        d = sweep[sweep["knob"] == k]
        for m in metrics:
            if m not in d.columns:
                continue
            g = d.groupby("value")[m].agg(["mean", "min", "max"])
            c = colours.get(m, None)
            ax.plot(g.index, g["mean"], marker="o", ms=3, lw=1.5 if m == "accuracy" else 1.0, color=c,
                    label=m.replace("f1_", "F1 "))
            ax.fill_between(g.index, g["min"], g["max"], color=c, alpha=0.12, lw=0)
        if "default" in d.columns:
            ax.axvline(float(d["default"].iloc[0]), color="0.5", ls=":", lw=1)
        ax.axhline(0.75, color="0.7", lw=0.6, ls="--")
        ax.axhline(0.5, color="0.85", lw=0.6, ls="--")
        ax.set_ylim(0, 1.02)
        ax.set_title((knob_labels or {}).get(k, k), fontsize=9)
        ax.tick_params(labelsize=7)
    axes.ravel()[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(title or "Labeler scores against each biology knob (mean over seeds, band = min-max; "
                          "dotted = default)", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    _caption(fig, source)
    return fig


def outlines(image: np.ndarray, inst: np.ndarray, *, color: tuple[int, int, int] = (255, 255, 0)) -> np.ndarray:
    """A copy of ``image`` with the inner boundary of every instance of ``inst`` drawn in ``color``."""
    from skimage.segmentation import find_boundaries

    out = np.asarray(image).copy()
    out[find_boundaries(np.asarray(inst), mode="inner")] = color
    return out


def outline_panels(image: np.ndarray, panels: Mapping[str, np.ndarray], *, source: str, title: str = "",
                   colors: Mapping[str, tuple[int, int, int]] | None = None, size: float = 3.6) -> plt.Figure:
    """The same image once per instance map, with that map's nucleus outlines drawn on it.

    ``panels``: title -> (H, W) instance map (e.g. ``{"manual": truth, "ST-trained": pred}``);
    an empty title draws the bare image.
    """
    from skimage.segmentation import find_boundaries

    img = np.asarray(image)
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(size * n, size + 0.5), squeeze=False)
    for ax, (name, inst) in zip(axes[0], panels.items()):
        shown = img.copy()
        if inst is not None:
            shown[find_boundaries(np.asarray(inst), mode="inner")] = (colors or {}).get(name, (255, 255, 0))
        ax.imshow(shown)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    _caption(fig, source)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def budget_curve_plot(curve: pd.DataFrame, *, source: str, metric: str = "bpq", title: str = "") -> plt.Figure:
    """Mean ``metric`` against training steps per network, the classical baseline as a line
    (a :func:`stlib.realtissue.budget_curve` table: ``steps`` 0 = the baseline; ``snapshot``
    points drawn hollow), one thin line per development image beside the means."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    base = curve[curve["steps"] == 0]
    nets = curve[curve["steps"] > 0]
    for k, (m, s) in enumerate(nets.groupby("model", sort=True)):
        colour = f"C{k}"
        for _, si in s.groupby("image"):
            si = si.sort_values("steps")
            ax.plot(si["steps"], si[metric], color=colour, alpha=0.25, lw=0.8)
        mean = s.groupby("steps", as_index=False).agg(v=(metric, "mean"), snap=("snapshot", "first")) \
            if "snapshot" in s.columns else s.groupby("steps", as_index=False).agg(v=(metric, "mean")).assign(snap=False)
        ax.plot(mean["steps"], mean["v"], color=colour, lw=2, label=str(m))
        snap = mean["snap"].astype(bool).to_numpy()
        ax.scatter(mean["steps"][snap], mean["v"][snap], facecolors="white", edgecolors=colour, zorder=3)
        ax.scatter(mean["steps"][~snap], mean["v"][~snap], color=colour, zorder=3)
    if len(base):
        ax.axhline(base[metric].mean(), color="k", ls="--", lw=1.2, label="classical (Otsu + watershed)")
    ax.set_xlabel("training steps")
    ax.set_ylabel(f"{metric} (mean over development images)")
    ax.set_title(title or f"{metric} against the training budget", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _caption(fig, source)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
