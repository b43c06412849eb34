"""Label derivation for a sample (``stlib labels``).

One sample: the aligned Xenium nuclei (:mod:`stlib.align`) get classes from expression
(:mod:`stlib.labels.classes`) and become ``cells.parquet`` (one row per cell: aligned centroid,
fine type, class, confidence, ignore_reason), ``nuclei.parquet`` (aligned polygons with their class) and
``label_report.json`` (the label-quality report: nuclei count and density, alignment score,
class mix, confidence distribution, marker coverage; against the demo truth: class accuracy /
per-class F1 by cell_id, centroid error and mask Dice/PQ of the ST-derived nuclei; against
HEST's CellViT nuclei where present: PQ and class agreement as a second opinion).

The next stage, :mod:`stlib.tiles` (``stlib tiles build``), cuts a run's samples into the
training tile stores.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stlib.constants import CLASS_NAMES, IGNORE, NUCLEUS_CLASSES, TARGET_UM_PER_PX_40X
from stlib.config import AlignConfig, LabelsConfig, with_options
from stlib.layout import RunLayout
from stlib.utils import InputError, atomic_path, cache_key, read_json, write_json

log = logging.getLogger(__name__)

#: version of the derivation; part of the idempotence key
LABELS_VERSION = "3"
#: CellViT / PanNuke class names -> class ids (second-opinion comparison)
_NAME_TO_CLASS = {v.lower(): k for k, v in CLASS_NAMES.items()}


def derive_sample(hest_dir: str | Path, sample_id: str, run_dir: str | Path, *, config: LabelsConfig | None = None,
                  truth_dir: str | Path | None = None, out_name: str | None = None,
                  align: AlignConfig | bool = False, force: bool = False, accept_failed_alignment: bool = False,
                  **options: Any) -> dict[str, Any]:
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
    accept_failed_alignment
        Derive labels even when the alignment's sample-level verdict is ``"failed"``
        (:func:`stlib.align.alignment_verdict`). By default such a sample raises
        :class:`stlib.align.AlignmentFailedError` (an :class:`InputError` naming the sample, the
        evidence and the fixes) and nothing is written: its nuclei would sit beside their H&E nuclei.
    **options
        Fields of :class:`LabelsConfig` that override ``config`` (e.g. ``labeler="flat"``).

    Returns
    -------
    The label report (also written as ``label_report.json``).
    """
    from stlib.align import align_and_save, check_alignment, load_alignment
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
    check_alignment(res, path=aligned, accept_failed=accept_failed_alignment, hest_dir=hest_dir)
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
                neighbors_method=cfg.neighbors_method, dead=cfg.dead, apoptosis_alpha=cfg.apoptosis_alpha,
                low_counts=cfg.low_counts,
                neoplastic_kwargs={"config": cfg.neoplastic})
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
        "ignore_reason": obs["ignore_reason"].astype(str).to_numpy(),
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
        "alignment": {"route": res.route, "status": res.status, "score_before": g.get("before"), "score_after": g.get("after"),
                      "n_excluded_regions": len(res.excluded_regions)},
        "class_mix": mix,
        "class_fraction": {k: v / max(1, len(cells)) for k, v in mix.items()},
        "confidence_quantiles": {str(q): float(np.quantile(conf, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if len(conf) else {},
        "median_counts": float(np.median(cells["n_counts"])) if len(cells) else None,
        "ignore_reasons": ({str(k): int(v) for k, v in cells.loc[cells["ignore_reason"] != "", "ignore_reason"]
                            .value_counts().items()} if "ignore_reason" in cells else {}),
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
# CLI
# --------------------------------------------------------------------------------------

def cli_parser() -> argparse.ArgumentParser:
    """The parser of ``stlib labels``; its knob options are generated from :class:`LabelsConfig`
    (the tile stores are the next stage: ``stlib tiles build``)."""
    from stlib.config import add_config_arguments

    ap = argparse.ArgumentParser(prog="stlib labels", description=__doc__.splitlines()[0])
    ap.add_argument("--hest-dir", required=True, help="HEST layout root")
    ap.add_argument("--sample", required=True, action="append", help="sample id (repeatable)")
    ap.add_argument("--run-dir", required=True, help="run folder: reads RUN/alignment/ID/, writes RUN/labels/ID/")
    ap.add_argument("--profile", default=None,
                    help="start from this profile's 02_labels block (default: the LabelsConfig defaults)")
    ap.add_argument("--truth-dir", help="demo truth root (truth/): score the labels against it")
    ap.add_argument("--align", action="store_true",
                    help="align a sample whose RUN/alignment/ID/alignment.json is missing (AlignConfig defaults; "
                         "default: stop and say so)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--accept-failed-alignment", action="store_true",
                    help="derive labels also for samples whose alignment was judged failed (default: skip them, "
                         "say why and exit 1)")
    add_config_arguments(ap, LabelsConfig)
    return ap


def cli_main(argv: list[str]) -> int:
    """``stlib labels --hest-dir DIR --sample ID --run-dir RUN``: cells.parquet, maps, report."""
    from stlib.config import config_from_args, stage_config

    args = cli_parser().parse_args(argv)
    cfg = config_from_args(LabelsConfig, args, base=stage_config(args.profile, "labels") if args.profile else None)
    from stlib.align import AlignmentFailedError

    layout = RunLayout(args.run_dir)
    failed = []
    for sid in args.sample:
        try:
            rep = derive_sample(args.hest_dir, sid, layout.root, config=cfg, truth_dir=args.truth_dir,
                                align=args.align, force=args.force,
                                accept_failed_alignment=args.accept_failed_alignment)
        except AlignmentFailedError as e:  # the other samples go on; the run says so and exits 1
            print(f"stlib labels: skipped: {e}", file=sys.stderr)
            failed.append(sid)
            continue
        line = f"stlib labels: {sid}: {rep['n_cells']} cells, classes {rep['class_mix']}"
        if "truth" in rep:
            line += f"; vs truth accuracy {rep['truth']['class']['accuracy']:.3f}"
        print(line + f" -> {layout.labels_dir(sid)}")
    if failed:
        print(f"stlib labels: no labels for {len(failed)} sample(s) whose alignment failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


__all__ = ["derive_sample", "labels_key", "imaged_region", "report_table", "pooled_truth_scores", "truth_scores",
           "cellvit_agreement", "cli_main", "LABELS_VERSION"]
