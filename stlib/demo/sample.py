"""Simulate one sample end to end (image, truth, Xenium cells, transcripts, CellViT-like calls)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import shapely

from stlib.constants import CLASS_NAMES, MIN_QV
from stlib.demo.config import FINE_TYPE_TO_CLASS, ORGANS, DemoConfig, SampleSpec
from stlib.demo.biology import DEAD_TYPE, OFF_VOCABULARY, assign_cell_types, type_class
from stlib.demo.expression import CONTROL_PROBES, make_programmes, simulate_cell_expression, simulate_expression
from stlib.demo.registration import apply_affine, dapi_outlines, make_transform, true_um_from_he
from stlib.demo.render import POST_XENIUM_EXTRA_BLUR_PX, post_xenium_stain, render_he, sample_stain
from stlib.demo.tissue import nucleus_polygons, simulate_tissue

__all__ = ["SampleData", "simulate_sample", "xoa_cell_ids", "xenium_region_box", "place_transcripts"]


def xoa_cell_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unique XOA-style cell ids (``"aaabbbcc-1"``: 8 letters a-p encoding 32 bits)."""
    ints = rng.choice(16 ** 8, size=n, replace=False)
    digits = (ints[:, None] // (16 ** np.arange(7, -1, -1))[None, :]) % 16
    letters = np.array(list("abcdefghijklmnop"))[digits]
    return np.array(["".join(row) + "-1" for row in letters], dtype=object)


@dataclass
class SampleData:
    """Everything written for one sample."""

    spec: SampleSpec
    image: np.ndarray
    transform: dict[str, Any]
    truth: pd.DataFrame                  # columns of truth/{id}/nuclei.parquet (geometry as shapely)
    cells: pd.DataFrame                  # Xenium cells: cell_id, x/y centroid µm, areas, counts
    dapi_um: np.ndarray                  # (n_cells, v, 2) DAPI outlines in µm
    transcripts: pd.DataFrame            # cell_id, transcript_id, feature_name, qv, x/y/z_location, overlaps_nucleus
    cellvit: pd.DataFrame
    expression_truth: pd.DataFrame       # per Xenium cell / missed nucleus: counts by source, atypical
    stats: dict[str, Any] = field(default_factory=dict)


def _polys(v: np.ndarray) -> np.ndarray:
    """shapely Polygons from ``(n, v, 2)`` vertex arrays (made valid)."""
    rings = np.concatenate([v, v[:, :1]], axis=1)
    polys = shapely.polygons(rings)
    bad = ~shapely.is_valid(polys)
    if bad.any():
        polys[bad] = shapely.buffer(polys[bad], 0)
    return polys


def xenium_region_box(tf: dict[str, Any], size: tuple[int, int], fraction: float,
                      rng: np.random.Generator) -> tuple[float, float, float, float] | None:
    """The Xenium-imaged region of a field: an axis-aligned box in Xenium µm covering about
    ``fraction`` of the field (``None`` when the whole field is imaged).

    Xenium images a region of the slide chosen by the user (a union of fields of view, axis-
    aligned in Xenium coordinates); the H&E of the same section often shows tissue outside it.
    """
    if fraction >= 1.0:
        return None
    h, w = size
    cx = np.array([0.0, w, 0.0, w])
    cy = np.array([0.0, 0.0, h, h])
    xu, yu = true_um_from_he(tf, cx, cy)
    x0, x1, y0, y1 = float(xu.min()), float(xu.max()), float(yu.min()), float(yu.max())
    fx = float(rng.uniform(fraction, 1.0))
    fy = fraction / fx
    bw, bh = fx * (x1 - x0), fy * (y1 - y0)
    bx = x0 + float(rng.uniform(0.0, 1.0)) * (x1 - x0 - bw)
    by = y0 + float(rng.uniform(0.0, 1.0)) * (y1 - y0 - bh)
    return (bx, by, bx + bw, by + bh)


def _in_box(x: np.ndarray, y: np.ndarray, box: tuple[float, float, float, float] | None) -> np.ndarray:
    if box is None:
        return np.ones(np.shape(x), bool)
    return (x >= box[0]) & (x < box[2]) & (y >= box[1]) & (y < box[3])


def simulate_sample(spec: SampleSpec, cfg: DemoConfig, *, seed: int, index: int, genes: list[str],
                    render: bool = True) -> SampleData:
    """Simulate one sample (deterministic given ``seed`` and ``index``).

    Truth classes come from what each cell is and where it sits (the tissue compartment and, with
    the realistic biology, the generator's cell type of :mod:`stlib.demo.biology`), never from any
    labeler.

    With ``render=False`` the H&E image and the CellViT-like calls are skipped (``image`` is an
    empty array, ``cellvit`` an empty table): with the realistic biology the image has its own
    random stream, so the cells, classes and transcripts are exactly those of the rendered sample
    (expression-only studies such as :mod:`stlib.robustness` use this).
    """
    rng = np.random.default_rng([seed, index, 1])
    bio_rng = np.random.default_rng([seed, 999])  # shared biology of the cohort
    organ = ORGANS[spec.organ_key]
    cancer = spec.disease_state != "Healthy"
    size = (cfg.image_px, cfg.image_px)
    um = cfg.um_per_px
    tis = simulate_tissue(organ, size, um, rng, cancer=cancer, density=cfg.cell_density,
                          dead_fraction=cfg.dead_fraction)
    legacy = cfg.biology == "legacy"
    # the legacy generator drew the image from the main stream; the realistic one gives it its own
    img_rng = rng if legacy else np.random.default_rng([seed, index, 2])
    # HEST slides are H&E stained after the Xenium run: a post-Xenium look (0 = none)
    stain = post_xenium_stain(sample_stain(organ, img_rng, cfg.stain_jitter), cfg.post_xenium_stain)
    blur = cfg.blur_px + POST_XENIUM_EXTRA_BLUR_PX * cfg.post_xenium_stain
    if render or legacy:
        img, _inst = render_he(tis, stain, img_rng, blur_px=blur, defocus_px=cfg.defocus_px,
                               defocus_fraction=cfg.defocus_fraction, noise_sd=cfg.noise_sd)
    if not render:
        img = np.zeros((0, 0, 3), np.uint8)
    tf = make_transform(rng, size, um, true_rot_deg=cfg.true_rot_deg, warp_px=cfg.warp_px, warp_grid=cfg.warp_grid,
                        reg_shift_um=cfg.reg_shift_um, reg_rot_deg=cfg.reg_rot_deg, reg_scale_err=cfg.reg_scale_err)
    c = _xenium_cells(tis, tf, size, spec, cfg, seed=seed, index=index, rng=rng)
    fine, has_poly, cen_um, cell_id = c.fine, c.has_poly, c.cen_um, c.cell_id

    # what every cell is: compartment type (legacy) or the generator's own cell type
    genes_sorted = list(genes)
    carry = c.in_region  # cells that carry transcripts: Xenium cells + missed nuclei inside the region
    if cfg.biology == "legacy":
        cell_type = fine.astype(object)
        cls = np.array([FINE_TYPE_TO_CLASS[t] for t in fine], dtype=np.uint8)
        prog = make_programmes(genes_sorted, organ, cancer=cancer, bio_rng=bio_rng, sample_rng=rng)
        ex = simulate_expression(prog, fine[carry], cen_um[carry], has_poly[carry], rng, cfg)
        extra_info: dict[str, Any] = {}
    else:
        ex, cell_type, extra_info = _realistic_expression(tis, c.src, c.n_vis, fine, carry, cen_um, spec, cfg, seed,
                                                          index, genes_sorted, rng)
        cls = np.array([type_class(t) for t in cell_type], dtype=np.uint8)
    ci = np.flatnonzero(carry)
    ex["cell"] = ci[ex["cell"]]
    tx = place_transcripts(ex, c.dapi_um_all, cen_um, has_poly, cell_id, spec, genes_sorted, rng, cfg, tf, size,
                            region=c.region)

    truth, cells, expr_truth, counts, n_src = _sample_tables(c, tis, tx, ex, cls, cell_type, rng)
    if render:
        cellvit = _cellvit(c.true_v, tis.fine_type, tis.regions.shape, rng if legacy else img_rng, cfg, um)
    else:
        cellvit = pd.DataFrame({"class_name": pd.Series(dtype=str), "prob": pd.Series(dtype=float),
                                "geometry": pd.Series(dtype=object)})
    stats = _sample_stats(c, tx, counts, n_src, cls, cell_type, stain, extra_info)
    return SampleData(spec=spec, image=img, transform=tf, truth=truth, cells=cells, dapi_um=c.dapi_um_all[c.order],
                      transcripts=tx, cellvit=cellvit, expression_truth=expr_truth, stats=stats)


@dataclass
class _Cells:
    """Every cell of a sample: the visible nuclei, then the out-of-plane extra Xenium cells."""

    true_v: np.ndarray
    all_v: np.ndarray
    fine: np.ndarray
    visible: np.ndarray
    missing: np.ndarray
    has_poly: np.ndarray
    dapi_px: np.ndarray
    dapi_um_all: np.ndarray
    cen_um: np.ndarray
    in_region: np.ndarray
    region: tuple[float, float, float, float] | None
    ex_x: np.ndarray
    ex_y: np.ndarray
    src: np.ndarray
    n_vis: int
    n_extra: int
    n_all: int
    order: np.ndarray
    ids_x: np.ndarray
    cell_id: np.ndarray


def _xenium_cells(tis, tf: dict[str, Any], size: tuple[int, int], spec: SampleSpec, cfg: DemoConfig, *,
                  seed: int, index: int, rng: np.random.Generator) -> _Cells:
    """Extra out-of-plane cells, missed nuclei, DAPI outlines (Xenium µm), the Xenium region and cell ids."""
    um = cfg.um_per_px
    n_vis = tis.n
    true_v = nucleus_polygons(tis.x, tis.y, tis.a, tis.b, tis.theta, tis.harm, 32)
    # extra Xenium cells: nuclei out of the H&E plane, next to a visible cell of the same compartment
    n_extra = int(round(cfg.extra_fraction * n_vis))
    src = rng.choice(n_vis, size=n_extra, replace=n_extra > n_vis) if n_vis else np.zeros(0, int)
    ang = rng.uniform(0, 2 * np.pi, n_extra)
    dist = rng.uniform(1.2, 2.0, n_extra) * np.maximum(tis.a[src], tis.b[src] * 2)
    ex_x, ex_y = tis.x[src] + dist * np.cos(ang), tis.y[src] + dist * np.sin(ang)
    ex_th = rng.uniform(0, np.pi, n_extra)
    extra_v = nucleus_polygons(ex_x, ex_y, tis.a[src], tis.b[src], ex_th, tis.harm[src], 32)
    all_v = np.concatenate([true_v, extra_v]) if n_extra else true_v
    fine = np.concatenate([tis.fine_type, tis.fine_type[src]]) if n_extra else tis.fine_type.copy()
    visible = np.r_[np.ones(n_vis, bool), np.zeros(n_extra, bool)]
    n_all = n_vis + n_extra
    # missing: visible nuclei without a Xenium polygon
    missing = np.zeros(n_all, bool)
    n_miss = int(round(cfg.missing_fraction * n_vis))
    missing[rng.choice(n_vis, size=n_miss, replace=False)] = True
    has_poly = ~missing
    # DAPI outlines (true H&E frame) -> Xenium µm
    dapi_px = dapi_outlines(all_v, rng, scale_mean=cfg.dapi_scale_mean, scale_sd=cfg.dapi_scale_sd,
                            shift_px=cfg.dapi_shift_um / um, jitter=cfg.dapi_jitter)
    xu, yu = true_um_from_he(tf, dapi_px[..., 0].ravel(), dapi_px[..., 1].ravel())
    dapi_um_all = np.stack([xu, yu], -1).reshape(dapi_px.shape)
    cen_um = dapi_um_all.mean(axis=1)
    # the Xenium region: cells outside it have no polygon and no transcripts; out-of-plane extra
    # cells outside it do not exist at all
    region = xenium_region_box(tf, size, cfg.xenium_region_fraction, np.random.default_rng([seed, index, 5]))
    in_region = _in_box(cen_um[:, 0], cen_um[:, 1], region)
    keep = visible | in_region
    if not keep.all():
        all_v, fine, visible, missing = all_v[keep], fine[keep], visible[keep], missing[keep]
        dapi_px, dapi_um_all, cen_um, in_region = dapi_px[keep], dapi_um_all[keep], cen_um[keep], in_region[keep]
        ex_keep = keep[n_vis:]
        ex_x, ex_y, src = ex_x[ex_keep], ex_y[ex_keep], src[ex_keep]
        n_extra = int(ex_keep.sum())
        n_all = n_vis + n_extra
    has_poly = ~missing & in_region
    # cell ids (raster order of the Xenium cells)
    xen = np.flatnonzero(has_poly)
    order = xen[np.lexsort((cen_um[xen, 0], cen_um[xen, 1]))]
    if spec.cell_id_style == "int":
        ids_x = np.arange(1, order.size + 1, dtype=np.int64)
    else:
        ids_x = xoa_cell_ids(rng, order.size)
    cell_id = np.empty(n_all, dtype=object)
    cell_id[order] = ids_x
    nopoly = ~has_poly
    cell_id[nopoly] = [f"nopoly-{k + 1}" for k in range(int(nopoly.sum()))]
    return _Cells(true_v=true_v, all_v=all_v, fine=fine, visible=visible, missing=missing, has_poly=has_poly,
                  dapi_px=dapi_px, dapi_um_all=dapi_um_all, cen_um=cen_um, in_region=in_region, region=region,
                  ex_x=ex_x, ex_y=ex_y, src=src, n_vis=n_vis, n_extra=n_extra, n_all=n_all, order=order,
                  ids_x=ids_x, cell_id=cell_id)


def _sample_tables(c: _Cells, tis, tx: pd.DataFrame, ex: dict[str, np.ndarray], cls: np.ndarray, cell_type: Any,
                   rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict, np.ndarray]:
    """Truth table, Xenium cells table, expression truth; also the counts per cell and per source."""
    all_v, visible, has_poly, in_region, cell_id = c.all_v, c.visible, c.has_poly, c.in_region, c.cell_id
    ex_x, ex_y, n_extra, n_all, order, ids_x = c.ex_x, c.ex_y, c.n_extra, c.n_all, c.order, c.ids_x
    dapi_um_all, cen_um = c.dapi_um_all, c.cen_um
    ci = np.flatnonzero(in_region)
    # truth table (one row per visible nucleus + one per extra Xenium cell)
    true_polys = _polys(all_v)
    truth = pd.DataFrame({
        "cell_id": [str(c) for c in cell_id],
        "class": cls,
        "fine_type": np.asarray(cell_type).astype(str),
        "has_polygon": has_poly,
        "visible": visible,
        "in_xenium_region": in_region,
        "x_he": np.concatenate([tis.x, ex_x]) if n_extra else tis.x,
        "y_he": np.concatenate([tis.y, ex_y]) if n_extra else tis.y,
        "geometry": true_polys,
    })
    # Xenium cells table
    counts = _cell_counts(tx, ids_x)
    cells = xenium_cells_table(_polys(dapi_um_all[order]), cen_um[order], ids_x, counts, rng)
    # expression truth per transcript-carrying cell
    n_src = np.zeros((n_all, 3), np.int64)
    np.add.at(n_src, (ex["cell"], ex["source"]), 1)
    atyp = np.zeros(n_all, bool)
    atyp[ci] = ex["atypical"]
    expr_truth = pd.DataFrame({"cell_id": [str(c) for c in cell_id[ci]], "fine_type": np.asarray(cell_type)[ci].astype(str),
                               "n_own": n_src[ci, 0], "n_spill": n_src[ci, 1], "n_ambient": n_src[ci, 2],
                               "atypical": atyp[ci], "has_polygon": has_poly[ci]})
    for k in ("cycling", "clone"):
        if k in ex:
            expr_truth[k] = ex[k]
    return truth, cells, expr_truth, counts, n_src


def _sample_stats(c: _Cells, tx: pd.DataFrame, counts: dict, n_src: np.ndarray, cls: np.ndarray, cell_type: Any,
                  stain: Any, extra_info: dict[str, Any]) -> dict[str, Any]:
    """Statistics of the sample, measured on the generated data."""
    visible, has_poly, missing, in_region, region = c.visible, c.has_poly, c.missing, c.in_region, c.region
    n_vis, n_extra, order, dapi_px = c.n_vis, c.n_extra, c.order, c.dapi_px
    true_polys = _polys(c.all_v)
    dapi_true_frame = _polys(dapi_px)
    vis_xen = visible & has_poly
    iou = _iou(dapi_true_frame[vis_xen], true_polys[vis_xen])
    per_cell = counts["gene"]
    stats = {
        "n_visible_nuclei": int(n_vis), "n_xenium_cells": int(order.size), "n_missing": int((missing & visible).sum()),
        "n_extra": int(n_extra), "n_outside_xenium_region": int((visible & ~in_region).sum()),
        "xenium_region_um": None if region is None else [round(v, 2) for v in region],
        "median_tx_per_cell": float(np.median(per_cell)) if per_cell.size else 0.0,
        "spill_fraction": float(n_src[:, 1].sum() / max(n_src.sum(), 1)),
        "dapi_iou_median": float(np.median(iou)) if iou.size else float("nan"),
        "dapi_iou_q10": float(np.quantile(iou, 0.1)) if iou.size else float("nan"),
        "dapi_iou_q90": float(np.quantile(iou, 0.9)) if iou.size else float("nan"),
        "class_counts": {CLASS_NAMES[int(k)]: int(v) for k, v in zip(*np.unique(cls[visible], return_counts=True))},
        "fine_type_counts": {str(k): int(v) for k, v in zip(*np.unique(np.asarray(cell_type)[visible].astype(str),
                                                                      return_counts=True))},
        "n_transcripts": int(len(tx)),
        "stain": {"h_vec": stain.h_vec, "e_vec": stain.e_vec, "h_strength": stain.h_strength,
                  "e_strength": stain.e_strength},
        **extra_info,
    }
    return stats


def _realistic_expression(tis, src: np.ndarray, n_vis: int, fine: np.ndarray, carry: np.ndarray, cen_um: np.ndarray,
                          spec: SampleSpec, cfg: DemoConfig, seed: int, index: int, genes: list[str],
                          rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """Generator cell types of every cell and the expression of the cells inside the Xenium region."""
    brng = np.random.default_rng([seed, index, 3])
    cancer = spec.disease_state != "Healthy"
    xy = np.c_[tis.x, tis.y]
    vessels = xy[tis.fine_type == "endothelial"]
    vis_type = assign_cell_types(tis.fine_type, spec.organ_key, cancer=cancer,
                                 offvocab_fraction=cfg.offvocab_fraction, rng=brng, xy=xy, vessel_xy=vessels)
    origin_tissue = tis.origin if tis.origin is not None else tis.fine_type
    vis_origin = vis_type.copy()
    dead = vis_type == DEAD_TYPE
    if dead.any():
        vis_origin[dead] = assign_cell_types(origin_tissue[dead], spec.organ_key, cancer=cancer,
                                             offvocab_fraction=0.0, rng=brng)
    n_all = fine.size
    keep_extra = src  # extra cells copy the type of the visible cell they sit next to
    cell_type = np.concatenate([vis_type, vis_type[keep_extra]]) if n_all > n_vis else vis_type
    origin = np.concatenate([vis_origin, vis_origin[keep_extra]]) if n_all > n_vis else vis_origin
    ex = simulate_cell_expression(cen_um[carry], cell_type[carry], origin=origin[carry],
                                  organ_key=spec.organ_key, cancer=cancer, genes=genes, cfg=cfg,
                                  cohort_seed=seed, sample_key=(seed, index), rng=rng)
    info = {"cnv_events": [[a, int(sg), bool(sub)] for a, sg, sub in ex.pop("events")],
            "n_cycling": int(ex["cycling"].sum()), "n_offvocab": int(np.isin(cell_type, OFF_VOCABULARY).sum())}
    return ex, cell_type, info


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = shapely.area(shapely.intersection(a, b))
    union = shapely.area(shapely.union(a, b))
    return inter / np.maximum(union, 1e-9)


def _is_control(names: np.ndarray) -> np.ndarray:
    """Vectorised control-probe test (via the unique names)."""
    from stlib.constants import is_control_feature

    u, inv = np.unique(names.astype(str), return_inverse=True)
    return np.array([is_control_feature(x) for x in u], dtype=bool)[inv]



def xenium_cells_table(dapi_poly_um: Any, cen_um: np.ndarray, ids_x: Any, counts: dict[str, np.ndarray],
                       rng: np.random.Generator) -> pd.DataFrame:
    """The Xenium ``cells`` table of simulated cells (nucleus polygons in µm, in ``ids_x`` order).

    ``counts``: gene and control-probe counts per cell (:func:`_cell_counts`). Shared by the
    synthetic and the real-tissue cohort; draws one uniform per cell from ``rng``
    (cell area = nucleus area x 2.2-3.5, as after a 5 µm nucleus expansion).
    """
    nuc_area = shapely.area(dapi_poly_um)
    n = len(ids_x)
    return pd.DataFrame({
        "cell_id": ids_x, "x_centroid": cen_um[:, 0], "y_centroid": cen_um[:, 1],
        "transcript_counts": counts["gene"], "control_probe_counts": counts["control"],
        "control_codeword_counts": np.zeros(n, np.int64), "total_counts": counts["gene"] + counts["control"],
        "cell_area": nuc_area * rng.uniform(2.2, 3.5, n), "nucleus_area": nuc_area,
        "nucleus_count": np.ones(n, np.int64),
        "segmentation_method": np.full(n, "Segmented by nucleus expansion of 5.0µm", dtype=object),
    })

def _cell_counts(tx: pd.DataFrame, ids: np.ndarray) -> dict[str, np.ndarray]:
    good = tx["qv"].to_numpy() >= MIN_QV
    is_ctrl = _is_control(tx["feature_name"].to_numpy())
    out = {}
    for name, m in (("gene", good & ~is_ctrl), ("control", good & is_ctrl)):
        vc = pd.Series(tx["cell_id"].to_numpy()[m]).value_counts()
        out[name] = vc.reindex(pd.Index(ids)).fillna(0).to_numpy(np.int64)
    return out


def place_transcripts(ex: dict[str, np.ndarray], dapi_um: np.ndarray, cen_um: np.ndarray, has_poly: np.ndarray,
                      cell_id: np.ndarray, spec: SampleSpec, genes: list[str], rng: np.random.Generator,
                      cfg: DemoConfig, tf: dict[str, Any], size: tuple[int, int],
                      region: tuple[float, float, float, float] | None = None) -> pd.DataFrame:
    """A Xenium ``transcripts.parquet`` table from simulated counts (:func:`draw_counts` output).

    Each transcript lies inside its cell's DAPI nucleus (``nuclear_tx_fraction``) or in a
    ``cyto_um`` rim around it; unassigned transcripts and control probes are scattered over the
    imaged field (``region``, Xenium µm, when given: nothing is decoded outside it); some have
    qv < 20, a third of those decoded as a wrong gene. Cell ids of cells without a polygon
    become ``UNASSIGNED`` (or -1 for integer ids).
    """
    cell, gene = ex["cell"], ex["gene"]
    m = cell.size
    v = dapi_um.shape[1]
    # radial position inside the nucleus or in the cytoplasm rim, along a random outline vertex
    k = rng.integers(0, v, m)
    vert = dapi_um[cell, k]
    c = cen_um[cell]
    rad_vec = vert - c
    rlen = np.linalg.norm(rad_vec, axis=1) + 1e-9
    unit = rad_vec / rlen[:, None]
    nuclear = rng.random(m) < cfg.nuclear_tx_fraction
    r = np.where(nuclear, np.sqrt(rng.random(m)) * rlen * 0.97,
                 rlen + np.sqrt(rng.random(m)) * cfg.cyto_um)
    x = c[:, 0] + unit[:, 0] * r
    y = c[:, 1] + unit[:, 1] * r
    names = np.asarray(genes, dtype=object)[gene]
    ids = cell_id[cell]
    assigned = has_poly[cell]
    # scattered unassigned transcripts (ambient profile) and control probes over the field
    A = np.asarray(tf["hest_registration_um_to_he_px"])
    corners = np.array([[0, 0], [size[1], 0], [0, size[0]], [size[1], size[0]]], float)
    cu = np.stack(apply_affine(np.linalg.inv(A), corners[:, 0], corners[:, 1]), 1)
    lo, hi = cu.min(0), cu.max(0)
    if region is not None:
        lo = np.maximum(lo, [region[0], region[1]])
        hi = np.minimum(hi, [region[2], region[3]])
    n_un = int(cfg.unassigned_fraction * m)
    n_ct = int(cfg.control_fraction * m)
    ux = rng.uniform(lo[0], hi[0], n_un + n_ct)
    uy = rng.uniform(lo[1], hi[1], n_un + n_ct)
    un_names = np.concatenate([np.asarray(genes, dtype=object)[rng.choice(len(genes), n_un, p=ex["ambient_profile"])],
                               np.asarray(CONTROL_PROBES, dtype=object)[rng.integers(0, len(CONTROL_PROBES), n_ct)]])
    x = np.concatenate([x, ux])
    y = np.concatenate([y, uy])
    names = np.concatenate([names, un_names])
    nucl = np.concatenate([nuclear & assigned, np.zeros(n_un + n_ct, bool)])
    assigned = np.concatenate([assigned, np.zeros(n_un + n_ct, bool)])
    ids = np.concatenate([ids, np.empty(n_un + n_ct, dtype=object)])
    if region is not None:  # Xenium decodes nothing outside its imaged region
        inside = _in_box(x, y, region)
        x, y, names, nucl, assigned, ids = x[inside], y[inside], names[inside], nucl[inside], assigned[inside], ids[inside]
    n = x.size
    # quality: some low-qv transcripts, a third of which are decoded as a wrong gene
    low = rng.random(n) < cfg.low_qv_fraction
    qv = np.where(low, rng.uniform(4.0, 19.9, n), np.clip(rng.normal(33, 5, n), 20.0, 40.0)).astype(np.float32)
    wrong = low & (rng.random(n) < 1 / 3)
    names[wrong] = np.asarray(genes, dtype=object)[rng.integers(0, len(genes), int(wrong.sum()))]
    if spec.cell_id_style == "int":
        cid = np.where(assigned, ids, -1).astype(np.int64)
    else:
        cid = np.where(assigned, ids, "UNASSIGNED").astype(object)
    z = np.clip(rng.normal(6.0, 2.0, n), 0.5, 14.0).astype(np.float32)
    tid = (281474976710656 + np.cumsum(rng.integers(1, 400, n))).astype(np.uint64)
    perm = rng.permutation(n)
    df = pd.DataFrame({
        "transcript_id": tid,
        "cell_id": cid[perm],
        "overlaps_nucleus": nucl[perm].astype(np.uint8),
        "feature_name": names[perm].astype(str),
        "x_location": x[perm].astype(np.float32),
        "y_location": y[perm].astype(np.float32),
        "z_location": z,
        "qv": qv,
    })
    return df


def _cellvit(true_v: np.ndarray, fine: np.ndarray, shape: tuple[int, int], rng: np.random.Generator,
             cfg: DemoConfig, um: float) -> pd.DataFrame:
    """CellViT-like predictions: most true nuclei, slightly different outlines, noisy classes."""
    n = len(true_v)
    found = rng.random(n) < cfg.cellvit_recall
    v = dapi_outlines(true_v[found], rng, scale_mean=0.97, scale_sd=0.05, shift_px=0.25 / um, jitter=0.03)
    cls = np.array([FINE_TYPE_TO_CLASS[t] for t in fine[found]])
    wrong = rng.random(cls.size) > cfg.cellvit_class_acc
    cls[wrong] = rng.choice([1, 2, 3, 4, 5], size=int(wrong.sum()))
    n_fp = int(cfg.cellvit_fp * n)
    if n_fp:
        fx, fy = rng.uniform(0, shape[1], n_fp), rng.uniform(0, shape[0], n_fp)
        fa = rng.uniform(2.5, 4.5, n_fp) / um
        phi = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        fv = np.stack([fx[:, None] + fa[:, None] * np.cos(phi), fy[:, None] + 0.8 * fa[:, None] * np.sin(phi)], -1)
        v = np.concatenate([v, fv])
        cls = np.concatenate([cls, rng.choice([1, 2, 3, 5], size=n_fp)])
    polys = _polys(v)
    return pd.DataFrame({"class_name": [CLASS_NAMES[int(c)] for c in cls],
                         "prob": np.round(rng.uniform(0.55, 0.99, cls.size), 3), "geometry": polys})
