"""Label derivation for a sample and the tile stores of a run (``stlib labels``).

One sample: the aligned Xenium nuclei (:mod:`stlib.align`) get classes from expression
(:mod:`stlib.labels.classes`) and become ``cells.parquet`` (one row per cell: aligned centroid,
fine type, class, confidence), ``nuclei.parquet`` (aligned polygons with their class) and
``label_report.json`` (the label-quality report: nuclei count and density, alignment score,
class mix, confidence distribution, marker coverage; against the demo truth: class accuracy /
per-class F1 by cell_id, centroid error and mask Dice/PQ of the ST-derived nuclei; against
HEST's CellViT nuclei where present: PQ and class agreement as a second opinion).

A run: :func:`build_tile_stores` cuts every sample into training tiles at a target µm/px
(:mod:`stlib.labels.masks`) into one tile store (:mod:`stlib.io.tiles`) with splits by sample
and organ, and, for the demo cohort, a store of the *true* nuclei on the same tiles.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stlib.constants import CLASS_NAMES, IGNORE, NUCLEUS_CLASSES, TARGET_UM_PER_PX_40X
from stlib.config import AlignConfig, LabelsConfig, RefineConfig, TilesConfig, with_options
from stlib.layout import RunLayout
from stlib.utils import InputError, atomic_path, cache_key, progress, read_json, write_json

log = logging.getLogger(__name__)

#: version of the derivation; part of the idempotence key
LABELS_VERSION = "2"
#: CellViT / PanNuke class names -> class ids (second-opinion comparison)
_NAME_TO_CLASS = {v.lower(): k for k, v in CLASS_NAMES.items()}


def derive_sample(hest_dir: str | Path, sample_id: str, run_dir: str | Path, *, config: LabelsConfig | None = None,
                  truth_dir: str | Path | None = None, out_name: str | None = None,
                  align: AlignConfig | bool = False, force: bool = False, **options: Any) -> dict[str, Any]:
    """Derive labels for one sample; write ``{run_dir}/labels/{sample}/`` and return the report.

    Parameters
    ----------
    hest_dir
        HEST layout root of the sample.
    run_dir
        Run folder (:class:`stlib.layout.RunLayout`); the alignment is read from
        ``run_dir/alignment/{sample}/alignment.json`` (written by ``stlib align`` / notebook 01).
    config
        The knobs (:class:`stlib.config.LabelsConfig`: ``labeler`` -- ``hierarchical`` (ours),
        ``flat`` (w/o Hier), ``marker`` or ``cluster`` --, ``seed``, ``min_counts``,
        ``min_confidence``, ``leiden_resolution``, ``neighbors_method``, ``dead`` and the
        ``neoplastic`` step's :class:`stlib.config.NeoplasticConfig`). Default: its defaults.
    truth_dir
        Demo truth root (``truth/``); when given the report scores the labels against it.
    out_name
        Sub-folder name under ``labels/`` (default: the sample id; the ablation uses
        ``{sample}__{labeler}``).
    align
        What to do when the run has no alignment of the sample: ``False`` (default) raises an
        :class:`InputError` that says how to make it; ``True`` (or an
        :class:`stlib.config.AlignConfig`) aligns the sample first with that config (the
        defaults for ``True``), into the same layout path.
    force
        Recompute even if an up-to-date output exists.
    **options
        Fields of :class:`LabelsConfig` that override ``config`` (e.g. ``labeler="flat"``).

    Returns
    -------
    The label report (also written as ``label_report.json``).
    """
    from stlib.align import align_and_save, load_alignment
    from stlib.io.hest import HestSample

    cfg = with_options(LabelsConfig, config, options)
    hest_dir, layout = Path(hest_dir), RunLayout(run_dir)
    s = HestSample(hest_dir, sample_id)
    name = out_name or sample_id
    aligned = layout.alignment_json(sample_id)
    if aligned.is_file():  # the alignment stage (notebook 01 / `stlib align`) owns its parameters
        res = load_alignment(aligned)
    elif align is not False:
        res, _ = align_and_save(hest_dir, sample_id, layout.alignment_root,
                                config=align if isinstance(align, AlignConfig) else AlignConfig())
    else:
        raise InputError("no alignment of this sample in the run folder", path=aligned, sample=sample_id,
                         fix=f"run `stlib align --hest-dir {hest_dir} --sample {sample_id} --run-dir {layout.root}` "
                             "(or notebook 01) first, or pass --align to `stlib labels` (align=True)")
    inputs = [s.path(k) for k in ("transcripts", "xenium_seg", "metadata") if s.has(k)]
    key = labels_key(cfg, truth_dir=truth_dir, alignment=res.inputs.get("key"), files=inputs)
    params = {**asdict(cfg), "truth": None if truth_dir is None else str(truth_dir), "version": LABELS_VERSION}
    report_path = layout.label_report(name)
    if report_path.is_file() and not force:
        old = read_json(report_path)
        if old.get("key") == key and layout.cells_parquet(name).is_file() and layout.coverage_parquet(name).is_file():
            return old

    cells, nuclei, adata = _label(s, res, cfg)
    coverage = imaged_region(s, res)
    report = _report(s, res, cells, nuclei, adata, labeler=cfg.labeler)
    report["coverage"] = _coverage_report(s, coverage, nuclei)
    if truth_dir is not None:
        report["truth"] = truth_scores(cells, nuclei, Path(truth_dir) / sample_id, he_um_per_px=s.pixel_size_um)
    cv = s.cellvit() if s.has("cellvit_seg") else None
    if cv is not None and len(cv):
        report["cellvit"] = cellvit_agreement(nuclei, cv, he_um_per_px=s.pixel_size_um)
    report["key"] = key
    report["params"] = params
    layout.labels_dir(name).mkdir(parents=True, exist_ok=True)
    with atomic_path(layout.cells_parquet(name)) as tmp:
        cells.to_parquet(tmp, index=False)
    with atomic_path(layout.nuclei_parquet(name)) as tmp:
        nuclei.to_parquet(tmp)
    with atomic_path(layout.cells_h5ad(name)) as tmp:
        _slim(adata).write_h5ad(tmp)
    with atomic_path(layout.coverage_parquet(name)) as tmp:
        coverage.to_parquet(tmp)
    write_json(report_path, report)
    return report


def labels_key(config: LabelsConfig, *, truth_dir: str | Path | None = None, alignment: str | None = None,
               files: Sequence[str | Path] = ()) -> str:
    """The cache key of one sample's labels (:func:`stlib.utils.cache_key`): the config, the truth
    folder scored against, the alignment's own key and the input files' fingerprints."""
    params = {**asdict(config), "truth": None if truth_dir is None else str(truth_dir), "version": LABELS_VERSION}
    return cache_key({"config": params, "alignment": alignment}, files)


def _slim(adata):
    """The AnnData kept for figures: counts, lognorm, obs and embeddings (no big graphs)."""
    ad = adata.copy()
    for k in list(ad.obsp.keys()):
        del ad.obsp[k]
    ad.uns = {k: v for k, v in ad.uns.items() if k in ("stlib_labels", "pixel_size_um", "leiden", "umap")}
    try:
        json.dumps(ad.uns, default=str)
        ad.uns = json.loads(json.dumps(ad.uns, default=str))
    except TypeError:  # pragma: no cover
        ad.uns = {}
    return ad


def imaged_region(s, res, **kw: Any):
    """The region where Xenium imaged and transcripts fall, in aligned H&E px, as a GeoDataFrame.

    :func:`stlib.labels.masks.coverage_region` on every molecule of the sample (µm), mapped with
    the alignment's transform. Outside it the training masks are *ignore* (never background).
    """
    import geopandas as gpd
    import shapely

    from stlib.labels.masks import coverage_region

    tx = s.transcripts(min_qv=None, genes_only=False, columns=["x_location", "y_location"])
    with s.wsi() as w:
        H, W = w.shape
    # the H&E image in µm (affine part; the local warp is a few px, well inside the margin)
    inv = np.linalg.inv(np.asarray(res.transform.affine, dtype=float))
    corners = np.array([[0, 0, 1], [W, 0, 1], [W, H, 1], [0, H, 1]], dtype=float) @ inv.T
    extent = shapely.Polygon(corners[:, :2])
    region = coverage_region(tx["x_location"].to_numpy(), tx["y_location"].to_numpy(), extent=extent, **kw)
    parts = shapely.get_parts(shapely.segmentize(region, 4.0)) if not region.is_empty else np.array([], object)
    geoms = res.transform.warp_geometries(parts) if len(parts) else parts
    return gpd.GeoDataFrame({"part": np.arange(len(geoms))}, geometry=list(geoms))


def _coverage_report(s, coverage, nuclei) -> dict[str, Any]:
    """Share of the slide and of the nuclei inside the imaged region."""
    import shapely

    with s.wsi() as w:
        H, W = w.shape
    region = shapely.union_all(coverage.geometry.values) if len(coverage) else shapely.Polygon()
    inside = shapely.contains_xy(region, *shapely.get_coordinates(shapely.centroid(nuclei.geometry.values)).T) \
        if len(nuclei) and not region.is_empty else np.zeros(len(nuclei), bool)
    return {"fraction_of_slide": float(region.area / max(H * W, 1)),
            "nuclei_inside_fraction": float(np.mean(inside)) if len(nuclei) else float("nan"),
            "n_parts": int(len(coverage))}


def _label(s, res, cfg: LabelsConfig):
    """Classes per cell and the aligned nuclei table of one sample."""
    import geopandas as gpd
    import shapely

    from stlib.align import Transform, _as_affine, in_excluded_region, transform_nuclei
    from stlib.labels.classes import label_cells

    adata = s.cells()
    if adata.n_obs == 0:
        raise InputError("no cell has a transcript assigned", path=s.path("transcripts"), sample=s.id,
                         fix="check the transcripts parquet (cell_id / qv columns)")
    label_cells(adata, method=cfg.labeler, organ=s.organ, disease_state=s.disease_state,
                oncotree_code=s.oncotree_code, seed=cfg.seed, min_counts=cfg.min_counts,
                min_confidence=cfg.min_confidence, resolution=cfg.leiden_resolution,
                neighbors_method=cfg.neighbors_method, dead=cfg.dead, neoplastic_kwargs={"config": cfg.neoplastic})
    nuc = s.nuclei()
    nuc = nuc[~nuc.index.duplicated()]
    aligned = transform_nuclei(nuc, res)
    # cells without a polygon: their (HEST-registered) transcript centroid, mapped like the nuclei
    xy = np.asarray(adata.obsm["spatial"], float).copy()
    no_poly = ~adata.obs["has_nucleus"].to_numpy(bool)
    if no_poly.any():
        um = Transform(np.linalg.inv(_as_affine(res.initial))).apply_xy(xy[no_poly]) if res.route == "hest" else None
        if um is not None:
            xy[no_poly] = res.transform.apply_xy(um)
    cent = shapely.centroid(aligned.geometry.values)
    cxy = shapely.get_coordinates(cent)
    idx = pd.Index(aligned.index.astype(str)).get_indexer(adata.obs_names.astype(str))
    has = idx >= 0
    xy[has] = cxy[idx[has]]
    obs = adata.obs
    cells = pd.DataFrame({
        "cell_id": adata.obs_names.astype(str),
        "x_he": xy[:, 0], "y_he": xy[:, 1],
        "fine_type": obs["fine_type"].astype(str).to_numpy(),
        "class": obs["class"].astype(np.uint8).to_numpy(),
        "confidence": obs["confidence"].astype(np.float32).to_numpy(),
        "n_counts": obs["n_counts"].astype(np.int32).to_numpy(),
        "has_nucleus": has,
    })
    cells["excluded"] = in_excluded_region(res, cells["x_he"].to_numpy(), cells["y_he"].to_numpy())
    lab = cells.set_index("cell_id")
    ids = aligned.index.astype(str)
    nuclei = gpd.GeoDataFrame({
        "cell_id": ids,
        "class": lab["class"].reindex(ids).fillna(IGNORE).astype(np.uint8).to_numpy(),
        "confidence": lab["confidence"].reindex(ids).fillna(0.0).astype(np.float32).to_numpy(),
        "fine_type": lab["fine_type"].reindex(ids).fillna("no_transcripts").to_numpy(),
    }, geometry=aligned.geometry.values)
    return cells, nuclei, adata


def _report(s, res, cells: pd.DataFrame, nuclei, adata, *, labeler: str) -> dict[str, Any]:
    """The per-sample part of the label-quality report (no truth needed)."""
    import shapely

    area_um2 = float("nan")
    if len(nuclei):
        hull = shapely.convex_hull(shapely.union_all(shapely.centroid(nuclei.geometry.values)))
        area_um2 = float(hull.area) * s.pixel_size_um ** 2
    cls = cells["class"].to_numpy()
    mix = {CLASS_NAMES.get(int(c), "Ignore") if c != IGNORE else "Ignore": int((cls == c).sum())
           for c in [*NUCLEUS_CLASSES, IGNORE]}
    conf = cells["confidence"].to_numpy(float)
    g = res.scores.get("global", {})
    uns = adata.uns.get("stlib_labels", {})
    cov = uns.get("marker_coverage")
    if isinstance(cov, pd.DataFrame):
        cov = cov.to_dict(orient="records")
    return {
        "sample": s.id, "organ": s.organ, "disease_state": s.disease_state,
        "oncotree_code": s.oncotree_code, "labeler": labeler,
        "n_cells": int(len(cells)), "n_nuclei": int(len(nuclei)),
        "density_per_mm2": float(len(nuclei) / (area_um2 / 1e6)) if area_um2 and area_um2 > 0 else None,
        "alignment": {"route": res.route, "score_before": g.get("before"), "score_after": g.get("after"),
                      "n_excluded_regions": len(res.excluded_regions)},
        "class_mix": mix,
        "class_fraction": {k: v / max(1, len(cells)) for k, v in mix.items()},
        "confidence_quantiles": {str(q): float(np.quantile(conf, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if len(conf) else {},
        "median_counts": float(np.median(cells["n_counts"])) if len(cells) else None,
        "marker_coverage": cov,
    }


def _rasterize_pair(a, b, *, he_um_per_px: float, um_per_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Instance maps of two polygon sets (H&E px) on one grid covering both, at ``um_per_px``."""
    import shapely

    from stlib.labels.masks import rasterize_instances

    x0, y0, x1, y1 = shapely.total_bounds(np.concatenate([a, b]))
    scale = he_um_per_px / um_per_px
    shape = (int(math.ceil((y1 - y0) * scale)) + 1, int(math.ceil((x1 - x0) * scale)) + 1)
    ia, _ = rasterize_instances(a, shape=shape, origin=(x0, y0), scale=scale)
    ib, _ = rasterize_instances(b, shape=shape, origin=(x0, y0), scale=scale)
    return ia, ib


def truth_scores(cells: pd.DataFrame, nuclei, truth_sample_dir: str | Path, *, he_um_per_px: float,
                 um_per_px: float = TARGET_UM_PER_PX_40X) -> dict[str, Any]:
    """Score derived labels against the demo truth of one sample.

    Class accuracy and per-class F1 by ``cell_id`` (255 counts as wrong), the median distance
    between derived and true nucleus centroids (µm), and mask Dice / PQ of the ST-derived
    nuclei against the true visible nuclei, rasterised over the slide at ``um_per_px``.
    """
    import geopandas as gpd

    from stlib.metrics import dice, label_accuracy_vs_truth, pq

    p = Path(truth_sample_dir) / "nuclei.parquet"
    if not p.is_file():
        raise InputError("truth nuclei not found", path=p, fix="generate the demo cohort with `stlib demo`")
    truth = gpd.read_parquet(p)
    acc = label_accuracy_vs_truth(cells, pd.DataFrame(truth.drop(columns="geometry")))
    out: dict[str, Any] = {"class": acc["class_scores"], "n_matched": acc["n_matched"], "n_truth": acc["n_truth"],
                           "confusion": acc["confusion"], "confusion_labels": acc["confusion_labels"]}
    if "median_centroid_error_px" in acc:
        out["median_centroid_error_um"] = acc["median_centroid_error_px"] * he_um_per_px
    vis = truth[truth["visible"].to_numpy(bool)] if "visible" in truth.columns else truth
    geoms_t = vis.geometry.values
    geoms_p = nuclei.geometry.values
    if len(geoms_t) and len(geoms_p):
        t_inst, p_inst = _rasterize_pair(geoms_t, geoms_p, he_um_per_px=he_um_per_px, um_per_px=um_per_px)
        r = pq(t_inst, p_inst)
        out["mask"] = {"dice": float(dice(t_inst, p_inst)), "pq": float(r.pq), "dq": float(r.dq),
                       "sq": float(r.sq), "um_per_px": um_per_px}
    return out


def cellvit_agreement(nuclei, cellvit, *, he_um_per_px: float, um_per_px: float = TARGET_UM_PER_PX_40X,
                      radius_um: float = 3.0) -> dict[str, Any]:
    """Second opinion: ST-derived nuclei vs HEST's CellViT nuclei (PQ) and their classes.

    CellViT is a model, not ground truth: agreement is reported, not accuracy. Nuclei are
    paired by centroid within ``radius_um`` (Hungarian, :func:`stlib.metrics.pair_coordinates`);
    class agreement is over pairs where both classes are known.
    """
    import shapely

    from stlib.metrics import pair_coordinates, pq

    a, b = nuclei.geometry.values, cellvit.geometry.values
    ia, ib = _rasterize_pair(a, b, he_um_per_px=he_um_per_px, um_per_px=um_per_px)
    r = pq(ib, ia)
    out: dict[str, Any] = {"pq": float(r.pq), "dq": float(r.dq), "sq": float(r.sq),
                           "n_st": int(len(a)), "n_cellvit": int(len(b))}
    name_col = next((c for c in ("class_name", "class", "type") if c in cellvit.columns), None)
    if name_col is not None and "class" in nuclei.columns:
        ca = shapely.get_coordinates(shapely.centroid(a))
        cb = shapely.get_coordinates(shapely.centroid(b))
        pairing = pair_coordinates(ca, cb, radius_um / he_um_per_px)
        pa, pb = pairing.paired[:, 0], pairing.paired[:, 1]
        st_cls = nuclei["class"].to_numpy()[pa].astype(int)
        cv_cls = np.array([_NAME_TO_CLASS.get(str(v).lower(), -1) for v in cellvit[name_col].to_numpy()[pb]])
        ok = (st_cls != IGNORE) & (cv_cls > 0)
        out["n_paired"] = int(len(pa))
        out["class_agreement"] = float(np.mean(st_cls[ok] == cv_cls[ok])) if ok.any() else None
        out["n_class_compared"] = int(ok.sum())
    return out


def report_table(reports: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per sample of label reports (:func:`derive_sample`): the label-quality table."""
    rows = []
    for r in reports:
        row = {"sample": r["sample"], "organ": r["organ"], "labeler": r.get("labeler"),
               "nuclei": r["n_nuclei"], "density /mm²": r.get("density_per_mm2"),
               "align corr after": (r["alignment"].get("score_after") or {}).get("corr"),
               "% slide imaged": 100 * (r.get("coverage") or {}).get("fraction_of_slide", float("nan")),
               "median confidence": r.get("confidence_quantiles", {}).get("0.5"),
               **{f"% {k}": 100 * v for k, v in r["class_fraction"].items()}}
        t = r.get("truth")
        if t:
            row.update({"truth accuracy": t["class"]["accuracy"], "truth macro F1": t["class"]["macro_f1"],
                        "centroid error (µm)": t.get("median_centroid_error_um"),
                        "mask Dice vs truth": (t.get("mask") or {}).get("dice"),
                        "mask PQ vs truth": (t.get("mask") or {}).get("pq")})
        cv = r.get("cellvit")
        if cv:
            row.update({"PQ vs CellViT": cv.get("pq"), "class agreement vs CellViT": cv.get("class_agreement")})
        rows.append(row)
    return pd.DataFrame(rows)


def pooled_truth_scores(run_dir: str | Path, samples: Sequence[str], truth_dir: str | Path, *,
                        out_name: str = "{sample}") -> dict[str, Any]:
    """Class scores of derived labels against the demo truth, pooled over cells of all samples."""
    import geopandas as gpd

    from stlib.metrics import label_accuracy_vs_truth

    cells, truth = [], []
    for sid in samples:
        c = pd.read_parquet(RunLayout(run_dir).cells_parquet(out_name.format(sample=sid)))
        t = gpd.read_parquet(Path(truth_dir) / sid / "nuclei.parquet")
        c["cell_id"] = sid + "/" + c["cell_id"].astype(str)
        t = pd.DataFrame(t.drop(columns="geometry"))
        t["cell_id"] = sid + "/" + t["cell_id"].astype(str)
        cells.append(c)
        truth.append(t)
    return label_accuracy_vs_truth(pd.concat(cells, ignore_index=True), pd.concat(truth, ignore_index=True))


# --------------------------------------------------------------------------------------
# tile stores
# --------------------------------------------------------------------------------------

def assign_splits(meta: pd.DataFrame, *, heldout_organs: Sequence[str], val_fraction: float = 0.2,
                  seed: int = 0, guard_tiles: int = 1) -> pd.Series:
    """Splits by sample and organ; organs with a single training sample get a spatial split.

    Held-out organs -> ``test``. A training organ with >= 2 samples: whole samples go to
    ``val`` (:func:`stlib.io.tiles.split_by_sample`). A training organ with one sample: the
    right-most columns of its tiles (about ``val_fraction`` of them) are ``val`` and the
    ``guard_tiles`` columns before them are dropped (``""``), so no tile or its neighbour
    crosses the split.
    """
    from stlib.io.tiles import split_by_sample

    split = split_by_sample(meta, val_fraction=val_fraction, seed=seed, heldout_organs=heldout_organs)
    for organ, sub in meta.groupby("organ"):
        if organ in set(heldout_organs) or sub["sample"].nunique() != 1:
            continue
        cols = np.sort(sub["x0"].unique())
        n_val = max(1, int(round(val_fraction * len(cols))))
        if len(cols) < n_val + guard_tiles + 1:
            continue
        val_cols = set(cols[-n_val:])
        guard_cols = set(cols[-n_val - guard_tiles:-n_val]) if guard_tiles else set()
        x = sub["x0"]
        split.loc[sub.index[x.isin(val_cols).to_numpy()]] = "val"
        split.loc[sub.index[x.isin(guard_cols).to_numpy()]] = ""
    return split


def build_tile_stores(hest_dir: str | Path, samples: pd.DataFrame, run_dir: str | Path, *,
                      config: TilesConfig | None = None, truth_dir: str | Path | None = None,
                      name: str = "st", labels_name: str = "{sample}", force: bool = False, workers: int | None = None,
                      timings: dict[str, float] | None = None, **options: Any) -> dict[str, Path]:
    """Cut every sample into training tiles; write ``{run_dir}/tiles/{name}`` (and ``truth``).

    The ST store's pixels outside the region where Xenium imaged and transcripts fall
    (``coverage.parquet`` of each sample, :func:`imaged_region`) are ``ignore``: an H&E nucleus
    there is not background, nobody labelled it.

    Parameters
    ----------
    samples
        Cohort table with ``sample``, ``organ``, ``role`` (``train`` / ``held-out``).
    config
        The knobs (:class:`stlib.config.TilesConfig`: ``um_per_px``, ``tile_px``, ``seed`` and
        ``val_fraction`` of the split, ``refine_masks`` and its ``refinement``); keyword ``options``
        (its fields) override it. Default: its defaults.
    truth_dir
        Demo truth root: also writes ``tiles/{name}_truth`` with the true nuclei and classes on
        exactly the same tiles (the "manual truth" of the demo evaluation).
    labels_name
        Folder of each sample's labels under ``run_dir/labels`` (``{sample}`` is replaced; the
        labeler ablation uses ``"{sample}__flat"`` etc.).
    refine_masks (config)
        Snap the rasterised ST nuclei to their haematoxylin boundary in each tile
        (:mod:`stlib.labels.refine`); nuclei without H&E contrast become ``ignore``. What it
        did, per sample, is recorded under ``refinement`` in the store's ``store.json`` (with
        the mask PQ of the ST masks against the truth before and after, when there is a truth).
    workers
        Threads cutting tiles (:func:`stlib.labels.slide_tiles.iter_slide_tiles`; default: the
        usable CPUs). The tiles and the stores are the same for any number.
    timings
        When given, busy seconds per stage are added to it (``stlib bench derive``).

    Returns
    -------
    ``{"st": path, "truth": path?}``. Idempotent: stores built with the same parameters from the
    same labels are kept (``build_key`` in ``store.json``) unless ``force``.
    """
    import geopandas as gpd

    from stlib.align import load_alignment
    from stlib.io.hest import HestSample
    from stlib.io.tiles import TileStore, TileStoreWriter

    cfg = with_options(TilesConfig, config, options)
    um_per_px, tile_px = cfg.um_per_px, cfg.tile_px
    hest_dir, layout = Path(hest_dir), RunLayout(run_dir)
    out = {"st": layout.tiles_dir(name)}
    if truth_dir is not None:
        out["truth"] = layout.tiles_dir(f"{name}_truth")
    rcfg = cfg.refinement if cfg.refine_masks else None
    lab_dirs = {sid: layout.labels_dir(labels_name.format(sample=sid)) for sid in samples["sample"]}
    for sid, d in lab_dirs.items():
        if not (d / "nuclei.parquet").is_file():
            raise InputError("labels not derived yet", path=d, sample=sid,
                             fix="run derive_sample / `stlib labels` for it first")
    build_key = tiles_key(cfg, truth_dir=truth_dir, samples=samples[["sample", "organ", "role"]].astype(str)
                          .to_dict("records"), labels_name=labels_name,
                          with_report=[sid for sid, d in lab_dirs.items() if (d / "label_report.json").is_file()],
                          files=[f for d in lab_dirs.values() for f in (d / "nuclei.parquet", d / "label_report.json")
                                 if f.is_file()])
    if not force and all((p / "store.json").is_file() for p in out.values()) and all(
            read_json(p / "store.json").get("build_key") == build_key for p in out.values()):
        return out
    heldout = sorted(samples.loc[samples["role"] == "held-out", "organ"].unique())
    writers = {k: TileStoreWriter(p, tile_px=tile_px, um_per_px=um_per_px, source=k, overwrite=True)
               for k, p in out.items()}
    refinement: dict[str, Any] = {}
    try:
        for row in progress(list(samples.itertuples()), desc="tiles"):
            nuc = gpd.read_parquet(lab_dirs[row.sample] / "nuclei.parquet")
            cov_path = lab_dirs[row.sample] / "coverage.parquet"
            imaged = gpd.read_parquet(cov_path).geometry.values if cov_path.is_file() else None
            truth = None
            if "truth" in out:
                t = gpd.read_parquet(Path(truth_dir) / row.sample / "nuclei.parquet")
                truth = t[t["visible"].to_numpy(bool)] if "visible" in t.columns else t
            rep = _sample_tiles(HestSample(hest_dir, row.sample), row.organ, nuc, truth, writers,
                                load_alignment(layout.alignment_json(row.sample)),
                                um_per_px=um_per_px, tile_px=tile_px, rcfg=rcfg, workers=workers, timings=timings,
                                imaged=imaged)
            if rep is not None:
                refinement[row.sample] = rep
        t_close = time.perf_counter()
        extra = {"build_key": build_key,
                 "refinement": None if rcfg is None else {"config": asdict(rcfg), "per_sample": refinement}}
        paths = {k: w.close(extra=extra if k == "st" else {"build_key": build_key}) for k, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w._release()
        raise
    # splits are assigned once all tiles are known, identically in both stores
    meta = TileStore(paths["st"]).meta
    split = assign_splits(meta, heldout_organs=heldout, val_fraction=cfg.val_fraction, seed=cfg.seed)
    for p in paths.values():
        _write_split(p, split.to_numpy())
    if timings is not None:
        timings["store_finish"] = timings.get("store_finish", 0.0) + time.perf_counter() - t_close
    return paths


def tiles_key(config: TilesConfig, *, truth_dir: str | Path | None = None, samples: Sequence[dict] = (),
              labels_name: str = "{sample}", with_report: Sequence[str] = (), files: Sequence[str | Path] = ()) -> str:
    """The cache key of a run's tile stores (:func:`stlib.utils.cache_key`): the config (its
    ``refinement`` only with ``refine_masks``), the truth, the samples and their labels' files."""
    rcfg = asdict(config.refinement) if config.refine_masks else None
    return cache_key({"config": {**asdict(config), "refinement": rcfg}, "truth": None if truth_dir is None else str(truth_dir),
                      "samples": list(samples), "labels_name": labels_name, "version": LABELS_VERSION,
                      "with_report": list(with_report)}, files)


def _sample_tiles(s, organ: str, nuc, truth, writers: dict[str, Any], res, *, um_per_px: float, tile_px: int,
                  rcfg: RefineConfig | None, workers: int | None,
                  timings: dict[str, float] | None, imaged=None) -> dict[str, Any] | None:
    """Cut one sample into tiles (in parallel) and append them to the writers in grid order.

    ``imaged``: the Xenium-imaged region (level-0 px polygons, :func:`imaged_region`); the ST
    maps are ``ignore`` outside it.

    Returns the sample's refinement record (None without refinement).
    """
    from stlib.labels.masks import TileRenderer
    from stlib.labels.refine import RefineStats
    from stlib.labels.slide_tiles import iter_slide_tiles

    excluded = [_box(r) for r in res.excluded_regions] or None
    score = (res.scores.get("global", {}).get("after") or {}).get("corr")
    align_score = float(score) if score is not None else float("nan")
    scale = s.pixel_size_um / um_per_px
    stats, pq_before, pq_after = RefineStats(), [], []
    with s.wsi() as wsi:
        H, W = wsi.shape
        label_sets = {"st": nuc} if truth is None else {"st": nuc, "truth": truth}
        renderers = {}
        t0 = time.perf_counter()
        for k, g in label_sets.items():
            conf = g["confidence"].to_numpy(float) if "confidence" in g.columns else 1.0
            renderers[k] = TileRenderer(g.geometry.values, width=W, height=H, scale=scale, tile_px=tile_px,
                                        classes=g["class"].to_numpy().astype(np.uint8), confidence=conf,
                                        ignore_polygons=excluded if k == "st" else None,
                                        tissue=_imaged_or_none(imaged) if k == "st" else None)
        if timings is not None:
            timings["polygon_setup"] = timings.get("polygon_setup", 0.0) + time.perf_counter() - t0
        for t in iter_slide_tiles(wsi, renderers, size_l0=tile_px / scale, tile_px=tile_px, um_per_px=um_per_px,
                                  refine_config=rcfg, workers=workers, timings=timings):
            x0, y0 = t.tile.origin
            if t.refine is not None:
                stats = stats + t.refine
            if t.pq_before is not None:
                pq_before.append(t.pq_before)
                pq_after.append(t.pq_after)
            t_write = time.perf_counter()
            for k, (inst, typ, ign, cf) in t.maps.items():
                writers[k].add(image=t.image, inst=inst, type=typ, ignore=ign, conf=cf, n_nuclei=t.n_nuclei[k],
                               sample=s.id, organ=organ, x0=x0, y0=y0, align_score=align_score,
                               tile_id=f"{s.id}_{int(round(x0))}_{int(round(y0))}")
            if timings is not None:
                timings["store_writing"] = timings.get("store_writing", 0.0) + time.perf_counter() - t_write
    if rcfg is None:
        return None
    rep = stats.to_dict()
    if pq_before:
        rep["mask_pq_vs_truth_before"] = float(np.nanmean(pq_before))
        rep["mask_pq_vs_truth_after"] = float(np.nanmean(pq_after))
    return rep


def refinement_table(store: str | Path) -> pd.DataFrame:
    """Per-sample record of the mask refinement of a tile store (empty when it was not refined)."""
    info = read_json(Path(store) / "store.json")
    ref = info.get("refinement") or {}
    rows = [{"sample": sid, **d} for sid, d in (ref.get("per_sample") or {}).items()]
    return pd.DataFrame(rows)


def _imaged_or_none(imaged):
    """Imaged-region polygons for :func:`iter_label_tiles` (``tissue``: outside = ignore).

    An empty region (no molecule at all) makes every pixel ignore; ``None`` (labels derived
    before the region was recorded) leaves the maps as they are.
    """
    import shapely

    if imaged is None:
        return None
    if len(imaged) == 0:
        return np.array([shapely.box(-2.0, -2.0, -1.0, -1.0)], dtype=object)  # nothing imaged
    return imaged


def _box(r: dict[str, float]):
    import shapely

    return shapely.box(r["x0"], r["y0"], r["x1"], r["y1"])


def _write_split(store: Path, split: np.ndarray) -> None:
    meta = pd.read_parquet(store / "meta.parquet")
    if len(meta) != len(split):
        raise InputError(f"meta has {len(meta)} tiles, split {len(split)}", path=store)
    meta["split"] = split
    with atomic_path(store / "meta.parquet") as tmp:
        meta.to_parquet(tmp, index=False)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def cli_parser() -> argparse.ArgumentParser:
    """The parser of ``stlib labels``; its knob options are generated from :class:`LabelsConfig` and
    :class:`TilesConfig`."""
    from stlib.config import add_config_arguments

    ap = argparse.ArgumentParser(prog="stlib labels", description=__doc__.splitlines()[0])
    ap.add_argument("--hest-dir", required=True, help="HEST layout root")
    ap.add_argument("--sample", required=True, action="append", help="sample id (repeatable)")
    ap.add_argument("--run-dir", required=True, help="run folder: reads RUN/alignment/ID/, writes RUN/labels/ID/")
    ap.add_argument("--profile", default=None,
                    help="start from this profile's 02_labels block (default: the LabelsConfig / TilesConfig defaults)")
    ap.add_argument("--truth-dir", help="demo truth root (truth/): score the labels against it")
    ap.add_argument("--align", action="store_true",
                    help="align a sample whose RUN/alignment/ID/alignment.json is missing (AlignConfig defaults; "
                         "default: stop and say so)")
    ap.add_argument("--tiles", action="store_true", help="also build RUN/tiles/st (all given samples)")
    ap.add_argument("--force", action="store_true")
    add_config_arguments(ap, LabelsConfig)
    add_config_arguments(ap, TilesConfig, exclude=("seed",), title="TilesConfig options, with --tiles "
                         "(--seed above seeds the split too)")
    return ap


def cli_main(argv: list[str]) -> int:
    """``stlib labels --hest-dir DIR --sample ID --run-dir RUN``: cells.parquet, maps, report."""
    from stlib.config import config_from_args, stage_config

    args = cli_parser().parse_args(argv)
    cfg = config_from_args(LabelsConfig, args, base=stage_config(args.profile, "labels") if args.profile else None)
    tiles_base = stage_config(args.profile, "tiles") if args.profile else TilesConfig()
    tiles_cfg = config_from_args(TilesConfig, args, base=replace(tiles_base, seed=cfg.seed))
    layout = RunLayout(args.run_dir)
    for sid in args.sample:
        rep = derive_sample(args.hest_dir, sid, layout.root, config=cfg, truth_dir=args.truth_dir,
                            align=args.align, force=args.force)
        line = f"stlib labels: {sid}: {rep['n_cells']} cells, classes {rep['class_mix']}"
        if "truth" in rep:
            line += f"; vs truth accuracy {rep['truth']['class']['accuracy']:.3f}"
        print(line + f" -> {layout.labels_dir(sid)}")
    if args.tiles:
        from stlib.io.cohort import cohort_table

        table = cohort_table(Path(args.hest_dir).parent, samples=args.sample)
        paths = build_tile_stores(args.hest_dir, table, layout.root, config=tiles_cfg, truth_dir=args.truth_dir,
                                  force=args.force)
        print(f"stlib labels: tile stores {', '.join(str(p) for p in paths.values())}")
    return 0


__all__ = ["derive_sample", "labels_key", "tiles_key", "imaged_region", "report_table", "pooled_truth_scores", "truth_scores", "cellvit_agreement", "build_tile_stores", "refinement_table", "assign_splits",
           "cli_main", "LABELS_VERSION"]
