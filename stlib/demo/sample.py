"""Simulate one sample end to end (image, truth, Xenium cells, transcripts, CellViT-like calls)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import shapely

from stlib.constants import CLASS_NAMES
from stlib.demo.config import FINE_TYPE_TO_CLASS, ORGANS, DemoConfig, SampleSpec
from stlib.demo.expression import CONTROL_PROBES, make_programmes, simulate_expression
from stlib.demo.registration import apply_affine, dapi_outlines, make_transform, true_um_from_he
from stlib.demo.render import render_he, sample_stain
from stlib.demo.tissue import nucleus_polygons, simulate_tissue

__all__ = ["SampleData", "simulate_sample", "xoa_cell_ids"]


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


def simulate_sample(spec: SampleSpec, cfg: DemoConfig, *, seed: int, index: int, genes: list[str]) -> SampleData:
    """Simulate one sample (deterministic given ``seed`` and ``index``)."""
    rng = np.random.default_rng([seed, index, 1])
    bio_rng = np.random.default_rng([seed, 999])  # shared biology of the cohort
    organ = ORGANS[spec.organ_key]
    cancer = spec.disease_state != "Healthy"
    size = (cfg.image_px, cfg.image_px)
    um = cfg.um_per_px
    tis = simulate_tissue(organ, size, um, rng, cancer=cancer, density=cfg.cell_density,
                          dead_fraction=cfg.dead_fraction)
    stain = sample_stain(organ, rng, cfg.stain_jitter)
    img, _inst = render_he(tis, stain, rng, blur_px=cfg.blur_px, defocus_px=cfg.defocus_px,
                           defocus_fraction=cfg.defocus_fraction, noise_sd=cfg.noise_sd)
    tf = make_transform(rng, size, um, true_rot_deg=cfg.true_rot_deg, warp_px=cfg.warp_px, warp_grid=cfg.warp_grid,
                        reg_shift_um=cfg.reg_shift_um, reg_rot_deg=cfg.reg_rot_deg, reg_scale_err=cfg.reg_scale_err)
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
    # cell ids (raster order of the Xenium cells)
    xen = np.flatnonzero(has_poly)
    order = xen[np.lexsort((cen_um[xen, 0], cen_um[xen, 1]))]
    if spec.cell_id_style == "int":
        ids_x = np.arange(1, order.size + 1, dtype=np.int64)
    else:
        ids_x = xoa_cell_ids(rng, order.size)
    cell_id = np.empty(n_all, dtype=object)
    cell_id[order] = ids_x
    cell_id[missing] = [f"nopoly-{k + 1}" for k in range(int(missing.sum()))]

    # expression for every cell that carries transcripts (Xenium cells + missed nuclei)
    genes_sorted = list(genes)
    prog = make_programmes(genes_sorted, organ, cancer=cancer, bio_rng=bio_rng, sample_rng=rng)
    ex = simulate_expression(prog, fine, cen_um, has_poly, rng, cfg)
    tx = _place_transcripts(ex, dapi_um_all, cen_um, has_poly, cell_id, spec, genes_sorted, rng, cfg, tf, size)

    # truth table (one row per visible nucleus + one per extra Xenium cell)
    true_polys = _polys(all_v)
    cls = np.array([FINE_TYPE_TO_CLASS[t] for t in fine], dtype=np.uint8)
    truth = pd.DataFrame({
        "cell_id": [str(c) for c in cell_id],
        "class": cls,
        "fine_type": fine.astype(str),
        "has_polygon": has_poly,
        "visible": visible,
        "x_he": np.concatenate([tis.x, ex_x]) if n_extra else tis.x,
        "y_he": np.concatenate([tis.y, ex_y]) if n_extra else tis.y,
        "geometry": true_polys,
    })
    # Xenium cells table
    dapi_poly_um = _polys(dapi_um_all[order])
    nuc_area = shapely.area(dapi_poly_um)
    counts = _cell_counts(tx, ids_x)
    cells = pd.DataFrame({
        "cell_id": ids_x, "x_centroid": cen_um[order, 0], "y_centroid": cen_um[order, 1],
        "transcript_counts": counts["gene"], "control_probe_counts": counts["control"],
        "control_codeword_counts": np.zeros(order.size, np.int64), "total_counts": counts["gene"] + counts["control"],
        "cell_area": nuc_area * rng.uniform(2.2, 3.5, order.size), "nucleus_area": nuc_area,
        "nucleus_count": np.ones(order.size, np.int64),
        "segmentation_method": np.full(order.size, "Segmented by nucleus expansion of 5.0µm", dtype=object),
    })
    # expression truth per transcript-carrying cell
    n_src = np.zeros((n_all, 3), np.int64)
    np.add.at(n_src, (ex["cell"], ex["source"]), 1)
    expr_truth = pd.DataFrame({"cell_id": [str(c) for c in cell_id], "fine_type": fine.astype(str),
                               "n_own": n_src[:, 0], "n_spill": n_src[:, 1], "n_ambient": n_src[:, 2],
                               "atypical": ex["atypical"], "has_polygon": has_poly})
    cellvit = _cellvit(true_v, tis.fine_type, tis.regions.shape, rng, cfg, um)
    # statistics of the sample (measured on the generated data)
    dapi_true_frame = _polys(dapi_px)
    vis_xen = visible & has_poly
    iou = _iou(dapi_true_frame[vis_xen], true_polys[vis_xen])
    per_cell = counts["gene"]
    stats = {
        "n_visible_nuclei": int(n_vis), "n_xenium_cells": int(order.size), "n_missing": int(missing.sum()),
        "n_extra": int(n_extra), "median_tx_per_cell": float(np.median(per_cell)) if per_cell.size else 0.0,
        "spill_fraction": float(n_src[:, 1].sum() / max(n_src.sum(), 1)),
        "dapi_iou_median": float(np.median(iou)) if iou.size else float("nan"),
        "dapi_iou_q10": float(np.quantile(iou, 0.1)) if iou.size else float("nan"),
        "dapi_iou_q90": float(np.quantile(iou, 0.9)) if iou.size else float("nan"),
        "class_counts": {CLASS_NAMES[int(k)]: int(v) for k, v in zip(*np.unique(cls[visible], return_counts=True))},
        "fine_type_counts": {str(k): int(v) for k, v in zip(*np.unique(fine[visible], return_counts=True))},
        "n_transcripts": int(len(tx)),
        "stain": {"h_vec": stain.h_vec, "e_vec": stain.e_vec, "h_strength": stain.h_strength,
                  "e_strength": stain.e_strength},
    }
    return SampleData(spec=spec, image=img, transform=tf, truth=truth, cells=cells, dapi_um=dapi_um_all[order],
                      transcripts=tx, cellvit=cellvit, expression_truth=expr_truth, stats=stats)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = shapely.area(shapely.intersection(a, b))
    union = shapely.area(shapely.union(a, b))
    return inter / np.maximum(union, 1e-9)


def _is_control(names: np.ndarray) -> np.ndarray:
    """Vectorised control-probe test (via the unique names)."""
    from stlib.constants import is_control_feature

    u, inv = np.unique(names.astype(str), return_inverse=True)
    return np.array([is_control_feature(x) for x in u], dtype=bool)[inv]


def _cell_counts(tx: pd.DataFrame, ids: np.ndarray) -> dict[str, np.ndarray]:
    good = tx["qv"].to_numpy() >= 20
    is_ctrl = _is_control(tx["feature_name"].to_numpy())
    out = {}
    for name, m in (("gene", good & ~is_ctrl), ("control", good & is_ctrl)):
        vc = pd.Series(tx["cell_id"].to_numpy()[m]).value_counts()
        out[name] = vc.reindex(pd.Index(ids)).fillna(0).to_numpy(np.int64)
    return out


def _place_transcripts(ex: dict[str, np.ndarray], dapi_um: np.ndarray, cen_um: np.ndarray, has_poly: np.ndarray,
                       cell_id: np.ndarray, spec: SampleSpec, genes: list[str], rng: np.random.Generator,
                       cfg: DemoConfig, tf: dict[str, Any], size: tuple[int, int]) -> pd.DataFrame:
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
