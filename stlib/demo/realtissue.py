"""A cohort of REAL annotated H&E with a SIMULATED Xenium layer (``stlib realtissue``).

The synthetic demo (:mod:`stlib.demo.cohort`) draws everything: tissue, image, nuclei and
expression. Here the H&E image and the true nuclei are a real, manually annotated image
(MoNuSeg, CoNSeP, PanNuke, any :class:`~stlib.io.annotations.AnnotatedImage`), and only what a
Xenium run would add on top is simulated, from the real outlines and with the demo's knobs
(:class:`~stlib.demo.config.DemoConfig`):

* DAPI-like nucleus outlines (size ratio, shift, jitter: :func:`stlib.demo.registration.dapi_outlines`
  applied to each real outline, resampled to a fixed number of vertices);
* nuclei the DAPI segmentation misses (``missing_fraction``) and Xenium cells with no nucleus
  in the H&E section (``extra_fraction``: an outline copied from a neighbour and placed beside it);
* the true Xenium -> H&E map and HEST's imperfect registration (shift, rotation, scale, local
  warp: :func:`stlib.demo.registration.make_transform`);
* expression and transcripts (:mod:`stlib.demo.expression`, through the one call site
  :func:`_simulate_transcripts`; the **legacy** programmes of the ``easy`` preset, whose marker genes
  come from the labeler's own marker sets, not the realistic :mod:`stlib.demo.biology`): each nucleus's cell type comes from its **real class** where
  the annotation has one (CoNSeP: inflammatory, spindle, epithelial; the merged epithelial class
  becomes tumour with probability ``tumour_fraction``), otherwise from an organ-typical mix
  (:data:`ORGAN_MIX`; MoNuSeg has no classes), drawn independently of the image;
* CellViT-like second-opinion calls, as in the demo.

The writers are the demo's (:mod:`stlib.demo.writers`): the HEST layout, one raw Xenium bundle,
``truth/{id}/`` and ``cohort.json``, so every notebook runs on it unchanged. The truth table's
``class`` is the real annotated class (255 = unknown, 254 = epithelial that the source cannot
split into neoplastic / not), ``expression_class`` the class of the cell type that generated
its expression. A PanNuke-layout folder is copied from a real PanNuke copy when one is given,
otherwise the demo's synthetic one is written (and ``cohort.json`` says which).

Public API: :func:`make_realtissue_cohort`, :func:`load_source_images`, :func:`make_subset`,
:data:`ORGAN_MIX`, :func:`cli_main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely

from stlib.constants import (CLASS_NAMES, CONNECTIVE, DEAD, EPITHELIAL, EPITHELIAL_ANY, IGNORE, INFLAMMATORY,
                             NEOPLASTIC)
from stlib.demo.config import FINE_TYPE_TO_CLASS, ORGANS, DemoConfig, SampleSpec, config_for_scale
from stlib.utils import InputError, atomic_dir, atomic_path, checkout_path, progress, read_json, write_json

__all__ = ["REALTISSUE_VERSION", "ORGAN_MIX", "CLASS_FINE_TYPES", "ONCOTREE", "make_realtissue_cohort",
           "load_source_images", "source_sample_id", "make_subset", "expected_files", "cli_main",
           "DEFAULT_HELDOUT_ORGANS", "SHIPPED_DIR", "resolve_source"]

#: bump when the output changes for the same inputs, config and seed
REALTISSUE_VERSION = "1.0"
#: organs held out from training by default (MoNuSeg kidney, MoNuSeg + CoNSeP colon)
DEFAULT_HELDOUT_ORGANS: tuple[str, ...] = ("Kidney", "Bowel")
#: the real annotated subset that ships with the repository (relative to its root)
SHIPPED_DIR = "realtissue"

#: cell-type mix of nuclei whose class the annotation does not give (tumour samples), per organ.
#: Rough, literature-level proportions for TCGA tumour fields; "default" for other organs.
ORGAN_MIX: dict[str, dict[str, float]] = {
    "default": {"tumor": 0.45, "epithelial": 0.05, "fibroblast": 0.17, "endothelial": 0.06, "smooth_muscle": 0.03,
                "t_cell": 0.10, "b_cell": 0.03, "plasma": 0.03, "macrophage": 0.06, "dead": 0.02},
    "Breast": {"tumor": 0.50, "epithelial": 0.05, "fibroblast": 0.17, "endothelial": 0.05, "smooth_muscle": 0.02,
               "t_cell": 0.10, "b_cell": 0.03, "plasma": 0.02, "macrophage": 0.04, "dead": 0.02},
    "Lung": {"tumor": 0.40, "epithelial": 0.06, "fibroblast": 0.15, "endothelial": 0.07, "smooth_muscle": 0.02,
             "t_cell": 0.12, "b_cell": 0.04, "plasma": 0.04, "macrophage": 0.08, "dead": 0.02},
    "Kidney": {"tumor": 0.55, "epithelial": 0.04, "fibroblast": 0.07, "endothelial": 0.14, "smooth_muscle": 0.02,
               "t_cell": 0.08, "b_cell": 0.02, "plasma": 0.01, "macrophage": 0.05, "dead": 0.02},
    "Prostate": {"tumor": 0.50, "epithelial": 0.08, "fibroblast": 0.12, "endothelial": 0.05, "smooth_muscle": 0.12,
                 "t_cell": 0.06, "b_cell": 0.01, "plasma": 0.01, "macrophage": 0.03, "dead": 0.02},
    "Bowel": {"tumor": 0.45, "epithelial": 0.06, "fibroblast": 0.15, "endothelial": 0.05, "smooth_muscle": 0.05,
              "t_cell": 0.10, "b_cell": 0.03, "plasma": 0.05, "macrophage": 0.04, "dead": 0.02},
}
#: annotated class -> mix of fine cell types that generate its expression (``None`` = organ mix)
CLASS_FINE_TYPES: dict[int, dict[str, float] | None] = {
    NEOPLASTIC: {"tumor": 1.0},
    EPITHELIAL: {"epithelial": 1.0},
    INFLAMMATORY: {"t_cell": 0.45, "b_cell": 0.15, "plasma": 0.15, "macrophage": 0.25},
    CONNECTIVE: {"fibroblast": 0.6, "endothelial": 0.25, "smooth_muscle": 0.15},
    DEAD: {"dead": 1.0},
    EPITHELIAL_ANY: None,  # tumour with probability `tumour_fraction`, else epithelial
    IGNORE: None,          # organ mix
}
#: OncoTree-like code of the tumour type of each organ's TCGA / CoNSeP fields
ONCOTREE: dict[str, str] = {"Breast": "BRCA", "Lung": "NSCLC", "Kidney": "CCRCC", "Prostate": "PRAD",
                            "Bowel": "COAD"}
_N_VERTICES = 32


# ----------------------------------------------------------------------------- sources
def source_sample_id(source: str, name: str) -> str:
    """Sample id of a source image: ``MONUSEG_A7-A13E``, ``CONSEP_train_1``, ``PANNUKE_...``."""
    short = name
    m = re.match(r"TCGA-([A-Z0-9]{2}-[A-Z0-9]{4})", name)
    if m:
        short = m.group(1)
    short = re.sub(r"[^A-Za-z0-9_.\-]", "-", short)
    return f"{source.upper()}_{short}"


def load_source_images(sources: Sequence[str | Path] | str | Path, *,
                       images: Mapping[str, Sequence[str]] | Sequence[str] | None = None) -> list[Any]:
    """Annotated images of one or more folders (:func:`stlib.io.annotations.read_annotations`).

    Parameters
    ----------
    sources
        Folders in a supported layout, or one folder holding ``nuclei-monuseg/`` and
        ``nuclei-consep/`` (the shipped subset, ``../shared/realdata``, a download root).
    images
        Per folder name (``"nuclei-monuseg"``), the image names to keep; or one list of names
        over all folders (default all).
    """
    from stlib.io.annotations import read_annotations

    if isinstance(sources, (str, Path)):
        root = resolve_source(sources)
        subs = [root / d for d in ("nuclei-monuseg", "nuclei-consep") if (root / d).is_dir()]
        sources = subs or [root]
    out = []
    flat = None if images is None or isinstance(images, Mapping) else set(images)
    for s in sources:
        s = resolve_source(s)
        if flat is not None:
            out.extend(a for a in read_annotations(s) if a.name in flat)
            continue
        want = (images or {}).get(s.name)
        kw: dict[str, Any] = {}
        if want is not None:
            kw = {"names": list(want)} if (s / "annotations").is_dir() else {"images": list(want)}
        out.extend(read_annotations(s, **kw))
    if flat is not None and flat - {a.name for a in out}:
        raise InputError(f"image(s) {sorted(flat - {a.name for a in out})} not found", path=str(sources))
    if not out:
        raise InputError("no annotated image found", path=str(sources), fix="point at nuclei-monuseg/ or nuclei-consep/")
    return out


def resolve_source(path: str | Path) -> Path:
    """A source folder as given, or, when a relative path is not found from the working directory,
    relative to the stlib checkout (so ``"realtissue"`` finds the shipped subset from anywhere)."""
    return checkout_path(path)


def _organ_key(organ: str | None, name: str) -> str:
    if organ:
        for k, spec in ORGANS.items():
            if organ.lower() in (k, spec.name.lower(), spec.pannuke.lower(), spec.tissue.lower()):
                return k
    raise InputError(f"organ {organ!r} of image {name} has no organ model in stlib.demo.config.ORGANS",
                     fix=f"give the organ (one of {sorted(s.name for s in ORGANS.values())}) in tissue.csv / organs=")


# ----------------------------------------------------------------------------- geometry
def _resample_ring(ring: np.ndarray, n: int = _N_VERTICES) -> np.ndarray:
    """``n`` points equally spaced along a closed ring (arc length), starting at its first vertex."""
    r = np.asarray(ring, float)
    if not np.allclose(r[0], r[-1]):
        r = np.vstack([r, r[:1]])
    seg = np.hypot(*np.diff(r, axis=0).T)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] <= 0:
        return np.repeat(r[:1], n, axis=0)
    t = np.linspace(0.0, s[-1], n, endpoint=False)
    return np.stack([np.interp(t, s, r[:, 0]), np.interp(t, s, r[:, 1])], axis=1)


def _valid(polys: np.ndarray) -> np.ndarray:
    bad = ~shapely.is_valid(polys)
    if bad.any():
        fixed = shapely.buffer(polys[bad], 0)
        polys = polys.copy()
        polys[bad] = [max(getattr(g, "geoms", [g]), key=lambda p: p.area) if not g.is_empty else g for g in fixed]
    return polys


def _fine_types(classes: np.ndarray, organ: str, rng: np.random.Generator, tumour_fraction: float) -> np.ndarray:
    mix = ORGAN_MIX.get(organ, ORGAN_MIX["default"])
    out = np.empty(classes.size, dtype=object)
    for c in np.unique(classes):
        sel = np.flatnonzero(classes == c)
        table = CLASS_FINE_TYPES.get(int(c))
        if int(c) == EPITHELIAL_ANY:
            table = {"tumor": tumour_fraction, "epithelial": 1.0 - tumour_fraction}
        elif table is None:
            table = mix
        names = list(table)
        p = np.asarray([table[k] for k in names], float)
        out[sel] = rng.choice(names, size=sel.size, p=p / p.sum())
    return out.astype(str)


# ----------------------------------------------------------------------------- one sample
def _simulate_transcripts(genes: list[str], organ_key: str, cancer: bool, fine: np.ndarray, cen_um: np.ndarray,
                          has_poly: np.ndarray, dapi_um: np.ndarray, cell_id: np.ndarray, spec: SampleSpec,
                          cfg: DemoConfig, tf: dict[str, Any], size: tuple[int, int], *, seed: int,
                          rng: np.random.Generator) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """THE call site of the demo's expression simulation (programmes, counts, transcript placement).

    Everything the expression generator needs goes through here, so a change of its interface
    (:mod:`stlib.demo.expression`) is one edit in this module.
    """
    from stlib.demo.expression import make_programmes, simulate_expression
    from stlib.demo.sample import place_transcripts

    bio_rng = np.random.default_rng([seed, 999])  # biology shared by the cohort, as in the demo
    prog = make_programmes(genes, ORGANS[organ_key], cancer=cancer, bio_rng=bio_rng, sample_rng=rng)
    ex = simulate_expression(prog, fine, cen_um, has_poly, rng, cfg)
    tx = place_transcripts(ex, dapi_um, cen_um, has_poly, cell_id, spec, genes, rng, cfg, tf, size)
    return tx, ex


def simulate_real_sample(ann: Any, spec: SampleSpec, cfg: DemoConfig, *, seed: int, index: int,
                         genes: list[str], tumour_fraction: float = 0.8) -> Any:
    """The Xenium layer of one real annotated image (a :class:`stlib.demo.sample.SampleData`)."""
    from stlib.demo.registration import dapi_outlines, make_transform, true_um_from_he
    from stlib.demo.sample import SampleData, _cell_counts, _cellvit, _iou, xenium_cells_table, xoa_cell_ids
    from stlib.io.annotations import instance_polygons

    rng = np.random.default_rng([seed, index, 7])
    um = float(ann.um_per_px)
    h, w = ann.shape
    ids, cls_real = ann.nucleus_classes()
    rings = instance_polygons(ann.inst)
    keep = np.array([i in rings and len(rings[i]) >= 4 for i in ids.tolist()], bool)
    ids, cls_real = ids[keep], cls_real[keep]
    true_polys = _valid(np.array([shapely.Polygon(rings[i]) for i in ids.tolist()], dtype=object))
    ok = ~shapely.is_empty(true_polys) & (shapely.area(true_polys) > 0)
    ids, cls_real, true_polys = ids[ok], cls_real[ok], true_polys[ok]
    n_vis = ids.size
    true_v = np.stack([_resample_ring(rings[i]) for i in ids.tolist()]) if n_vis else np.zeros((0, _N_VERTICES, 2))
    cen = shapely.get_coordinates(shapely.centroid(true_polys))
    fine_vis = _fine_types(cls_real, ann.organ, rng, tumour_fraction)
    tf = make_transform(rng, (h, w), um, true_rot_deg=cfg.true_rot_deg, warp_px=cfg.warp_px, warp_grid=cfg.warp_grid,
                        reg_shift_um=cfg.reg_shift_um, reg_rot_deg=cfg.reg_rot_deg, reg_scale_err=cfg.reg_scale_err)
    # extra Xenium cells: a neighbour's outline beside it (nucleus out of the H&E section plane)
    n_extra = int(round(cfg.extra_fraction * n_vis))
    src = rng.choice(n_vis, size=n_extra, replace=n_extra > n_vis) if n_vis and n_extra else np.zeros(0, int)
    rad = np.sqrt(shapely.area(true_polys) / np.pi) if n_vis else np.zeros(0)
    ang = rng.uniform(0, 2 * np.pi, src.size)
    dist = rng.uniform(2.2, 3.5, src.size) * rad[src]
    shift = np.stack([dist * np.cos(ang), dist * np.sin(ang)], 1)
    extra_v = true_v[src] + shift[:, None, :]
    all_v = np.concatenate([true_v, extra_v]) if src.size else true_v
    fine = np.concatenate([fine_vis, fine_vis[src]]) if src.size else fine_vis
    visible = np.r_[np.ones(n_vis, bool), np.zeros(src.size, bool)]
    n_all = all_v.shape[0]
    missing = np.zeros(n_all, bool)
    n_miss = int(round(cfg.missing_fraction * n_vis))
    if n_miss:
        missing[rng.choice(n_vis, size=n_miss, replace=False)] = True
    has_poly = ~missing
    dapi_px = dapi_outlines(all_v, rng, scale_mean=cfg.dapi_scale_mean, scale_sd=cfg.dapi_scale_sd,
                            shift_px=cfg.dapi_shift_um / um, jitter=cfg.dapi_jitter)
    xu, yu = true_um_from_he(tf, dapi_px[..., 0].ravel(), dapi_px[..., 1].ravel())
    dapi_um_all = np.stack([xu, yu], -1).reshape(dapi_px.shape)
    cen_um = dapi_um_all.mean(axis=1)
    xen = np.flatnonzero(has_poly)
    order = xen[np.lexsort((cen_um[xen, 0], cen_um[xen, 1]))]
    ids_x = (np.arange(1, order.size + 1, dtype=np.int64) if spec.cell_id_style == "int"
             else xoa_cell_ids(rng, order.size))
    cell_id = np.empty(n_all, dtype=object)
    cell_id[order] = ids_x
    cell_id[missing] = [f"nopoly-{k + 1}" for k in range(int(missing.sum()))]

    cancer = spec.disease_state != "Healthy"
    tx, ex = _simulate_transcripts(list(genes), spec.organ_key, cancer, fine, cen_um, has_poly, dapi_um_all,
                                   cell_id, spec, cfg, tf, (h, w), seed=seed, rng=rng)

    extra_polys = _valid(shapely.polygons(np.concatenate([extra_v, extra_v[:, :1]], axis=1))) if src.size \
        else np.zeros(0, dtype=object)
    all_polys = np.concatenate([true_polys, extra_polys]) if src.size else true_polys
    ex_cen = shapely.get_coordinates(shapely.centroid(extra_polys)) if src.size else np.zeros((0, 2))
    cls_all = np.concatenate([cls_real, np.full(src.size, IGNORE, np.uint8)]).astype(np.uint8)
    expr_cls = np.array([FINE_TYPE_TO_CLASS[t] for t in fine], dtype=np.uint8)
    truth = pd.DataFrame({
        "cell_id": [str(c) for c in cell_id],
        "class": cls_all,
        "expression_class": expr_cls,
        "fine_type": fine.astype(str),
        "has_polygon": has_poly,
        "visible": visible,
        "source_id": np.concatenate([ids, np.zeros(src.size, ids.dtype)]).astype(np.int64),
        "x_he": np.concatenate([cen[:, 0], ex_cen[:, 0]]),
        "y_he": np.concatenate([cen[:, 1], ex_cen[:, 1]]),
        "geometry": all_polys,
    })
    from stlib.demo.sample import _polys

    counts = _cell_counts(tx, ids_x)
    cells = xenium_cells_table(_polys(dapi_um_all[order]), cen_um[order], ids_x, counts, rng)
    n_src = np.zeros((n_all, 3), np.int64)
    np.add.at(n_src, (ex["cell"], ex["source"]), 1)
    expr_truth = pd.DataFrame({"cell_id": [str(c) for c in cell_id], "fine_type": fine.astype(str),
                               "n_own": n_src[:, 0], "n_spill": n_src[:, 1], "n_ambient": n_src[:, 2],
                               "atypical": ex["atypical"], "has_polygon": has_poly})
    cellvit = _cellvit(true_v, fine_vis, (h, w), rng, cfg, um)
    dapi_true_frame = _polys(dapi_px)
    vis_xen = visible & has_poly
    iou = _iou(dapi_true_frame[vis_xen], all_polys[vis_xen])
    stats = {
        "n_visible_nuclei": int(n_vis), "n_xenium_cells": int(order.size), "n_missing": int(missing.sum()),
        "n_extra": int(src.size), "median_tx_per_cell": float(np.median(counts["gene"])) if order.size else 0.0,
        "spill_fraction": float(n_src[:, 1].sum() / max(n_src.sum(), 1)),
        "dapi_iou_median": float(np.median(iou)) if iou.size else float("nan"),
        "dapi_iou_q10": float(np.quantile(iou, 0.1)) if iou.size else float("nan"),
        "dapi_iou_q90": float(np.quantile(iou, 0.9)) if iou.size else float("nan"),
        "class_counts": {("Ignore" if int(k) == IGNORE else "Epithelial (neoplastic or not)" if int(k) == EPITHELIAL_ANY
                          else CLASS_NAMES[int(k)]): int(v) for k, v in zip(*np.unique(cls_real, return_counts=True))},
        "fine_type_counts": {str(k): int(v) for k, v in zip(*np.unique(fine_vis, return_counts=True))},
        "n_transcripts": int(len(tx)),
        "source": ann.source, "source_image": ann.name, "source_notes": list(ann.notes),
    }
    return SampleData(spec=spec, image=np.ascontiguousarray(ann.image), transform=tf, truth=truth, cells=cells,
                      dapi_um=dapi_um_all[order], transcripts=tx, cellvit=cellvit, expression_truth=expr_truth,
                      stats=stats)


# ----------------------------------------------------------------------------- cohort
_LICENCE = {"monuseg": "CC BY-NC-SA 4.0 (MoNuSeg, Kumar et al. 2017/2020); Xenium layer simulated by stlib",
            "consep": "CC BY-NC-SA (CoNSeP, Graham et al. 2019), non-commercial; Xenium layer simulated by stlib",
            "pannuke": "CC BY-NC-SA 4.0 (PanNuke, Gamper et al.); Xenium layer simulated by stlib"}


def expected_files(sample_ids: Sequence[str], *, raw_bundle: str | None, pannuke: bool) -> list[str]:
    """Paths (relative to the data root) that a complete real-tissue cohort has."""
    out = ["cohort.json", "hest/HEST_v1_1_0.csv"]
    for i in sample_ids:
        out += [f"hest/metadata/{i}.json", f"hest/wsis/{i}.tif", f"hest/transcripts/{i}_transcripts.parquet",
                f"hest/xenium_seg/{i}_xenium_nucleus_seg.parquet", f"hest/cellvit_seg/{i}_cellvit_seg.parquet",
                f"truth/{i}/nuclei.parquet", f"truth/{i}/transform.json"]
    if raw_bundle:
        out += [f"xenium/{raw_bundle}/experiment.xenium", f"xenium/{raw_bundle}/cells.parquet"]
    if pannuke:
        out += [f"pannuke/Fold {k}/masks/fold{k}/masks.npy" for k in (1, 2, 3)]
    return out


def _fingerprint(images: Sequence[Any]) -> list[dict[str, Any]]:
    import hashlib

    rows = []
    for a in images:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(a.image[::7, ::7]).tobytes())
        h.update(np.ascontiguousarray(a.inst).tobytes())
        if a.type is not None:
            h.update(np.ascontiguousarray(a.type).tobytes())
        rows.append({"name": a.name, "source": a.source, "organ": a.organ, "um_per_px": round(float(a.um_per_px), 6),
                     "digest": h.hexdigest()[:16]})
    return rows


def make_realtissue_cohort(out: str | Path, images: Sequence[Any] | str | Path, *, seed: int = 0,
                           heldout_organs: Sequence[str] = DEFAULT_HELDOUT_ORGANS, config: DemoConfig | None = None,
                           tumour_fraction: float = 0.8, pannuke: str | Path | None = "synthetic",
                           jpeg_quality: int = 95, force: bool = False, **overrides: Any) -> Path:
    """Write a real-tissue cohort: real H&E + real nuclei, simulated Xenium layer, demo layout.

    Parameters
    ----------
    out
        The data root to create (built in a temporary folder, renamed when complete).
    images
        Annotated images (:class:`~stlib.io.annotations.AnnotatedImage`), or a folder for
        :func:`load_source_images`.
    seed
        Seed of everything simulated; the same images, config and seed give identical tables.
    heldout_organs
        Organs whose samples get the role ``held-out`` (never trained on); the others ``train``.
    config
        Knobs of the Xenium layer (:class:`DemoConfig`; its tissue/scanner knobs are unused);
        default: the demo preset. ``overrides`` change single knobs.
    tumour_fraction
        Probability that a nucleus of the merged "epithelial (neoplastic or not)" class gets a
        tumour expression programme (else a normal epithelial one).
    pannuke
        ``"synthetic"``: the demo's synthetic PanNuke-layout folds (so the PanNuke-baseline
        notebooks run); a path: a real PanNuke copy to link/copy in; ``None``: no PanNuke folder.
    jpeg_quality
        Quality of the JPEG tiles of the pyramidal TIFFs (the real image is re-encoded once).
    force
        Rebuild even if a complete cohort with the same inputs exists.

    Returns
    -------
    The data root. Its ``cohort.json`` lists every sample with its source image, licence and
    role, and states what is real and what is simulated.
    """
    from stlib.demo.writers import csv_text, write_hest_sample, write_truth, write_xenium_bundle
    from stlib.io.panels import load_panel

    out = Path(out)
    if isinstance(images, (str, Path)):
        images = load_source_images(images)
    images = list(images)
    if not images:
        raise InputError("no annotated image given", fix="pass images or a folder of a supported layout")
    cfg = config or config_for_scale("demo")
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    cfg = cfg.validate()
    if not 0.0 <= tumour_fraction <= 1.0:
        raise InputError(f"tumour_fraction must be in [0, 1], got {tumour_fraction}")
    held = {o.lower() for o in heldout_organs}
    fp = _fingerprint(images)
    sids = [source_sample_id(a.source, a.name) for a in images]
    dup = sorted({s for s in sids if sids.count(s) > 1})
    if dup:
        raise InputError(f"two images map to the same sample id(s) {dup}", fix="give every image a unique name")
    pannuke_kind = None if pannuke is None else ("synthetic" if str(pannuke) == "synthetic" else str(pannuke))
    key = {"version": REALTISSUE_VERSION, "seed": seed, "config": cfg.to_dict(), "images": fp,
           "heldout_organs": sorted(held), "tumour_fraction": tumour_fraction, "pannuke": pannuke_kind,
           "jpeg_quality": jpeg_quality}
    raw_id = sids[0]
    if not force and (out / "cohort.json").is_file():
        try:
            old = read_json(out / "cohort.json")
        except InputError:
            old = {}
        if old.get("key") == key and all((out / f).is_file() for f in expected_files(
                sids, raw_bundle=raw_id, pannuke=pannuke_kind is not None)):
            return out
    genes = load_panel(cfg.panel)
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        rows, table = [], []
        for idx, (a, sid) in enumerate(progress(list(zip(images, sids)), desc="real-tissue samples")):
            a.check()
            okey = _organ_key(a.organ, a.name)
            organ = ORGANS[okey].name
            role = "held-out" if organ.lower() in held else "train"
            spec = SampleSpec(sample_id=sid, organ_key=okey, disease_state="Cancer",
                              oncotree_code=ONCOTREE.get(organ, ""), role=role,
                              cell_id_style="int" if idx == len(images) - 1 else "xoa", raw_bundle=sid == raw_id)
            sd = simulate_real_sample(a, spec, cfg, seed=seed, index=idx, genes=genes, tumour_fraction=tumour_fraction)
            meta = {"dataset_title": f"{a.source} {a.name}: real H&E and manual nuclei, SIMULATED Xenium layer "
                                     f"(stlib realtissue)",
                    "license": _LICENCE.get(a.source, "licence of the source set; Xenium layer simulated by stlib"),
                    "magnification": "40x", "hest_version_added": "realtissue"}
            rows.append(write_hest_sample(tmp, sd, n_genes=len(genes), jpeg_quality=jpeg_quality, meta=meta))
            write_truth(tmp, sd)
            if spec.raw_bundle:
                write_xenium_bundle(tmp, sd, genes=genes, jpeg_quality=jpeg_quality)
            table.append({"sample_id": sid, "organ": organ, "disease_state": spec.disease_state,
                          "oncotree_code": spec.oncotree_code, "role": role, "cell_id_style": spec.cell_id_style,
                          "raw_bundle": spec.raw_bundle, "um_per_px": float(a.um_per_px),
                          "shape": list(a.shape), "source": a.source, "source_image": a.name,
                          "has_classes": a.type is not None, "synthetic": False, "stats": sd.stats})
        (tmp / "hest").mkdir(exist_ok=True)
        with atomic_path(tmp / "hest" / "HEST_v1_1_0.csv") as p:
            p.write_text(csv_text(rows), encoding="utf-8")
        pinfo: dict[str, Any] = {}
        if pannuke_kind == "synthetic":
            from stlib.demo.cohort import _pannuke

            pinfo = {**_pannuke(tmp, cfg, seed), "source": "SYNTHETIC (stlib.demo): no real PanNuke copy was given"}
        elif pannuke_kind is not None:
            src = Path(pannuke_kind)
            if not src.is_dir():
                raise InputError("PanNuke folder not found", path=src, fix="pass a folder holding 'Fold 1/' ...")
            shutil.copytree(src, tmp / "pannuke", symlinks=True)
            pinfo = {"source": f"real PanNuke copied from {src}"}
        meta = {"version": REALTISSUE_VERSION, "kind": "realtissue", "seed": seed, "scale": "realtissue",
                "config": cfg.to_dict(), "panel": cfg.panel, "samples": table, "pannuke": pinfo,
                "train_organs": sorted({t["organ"] for t in table if t["role"] == "train"}),
                "held_out_organs": sorted({t["organ"] for t in table if t["role"] == "held-out"}),
                "tumour_fraction": tumour_fraction, "key": key,
                "generation_seconds": round(time.perf_counter() - t0, 2),
                "note": "REAL H&E images and REAL manual nucleus outlines (and classes where the source has "
                        "them); the Xenium layer (DAPI outlines, registration, transcripts) is SIMULATED"}
        write_json(tmp / "cohort.json", meta)
    return out


# ----------------------------------------------------------------------------- shipped subset
def make_subset(src: str | Path, out: str | Path, *, monuseg: Sequence[str] | None = None,
                consep: Sequence[str] = (), jpeg_quality: int = 95) -> Path:
    """Write the small real subset that ships with the repository (same layouts as the sources).

    MoNuSeg images are re-encoded as single-level TIFF with JPEG tiles (quality
    ``jpeg_quality``) and the XML is gzip-compressed; CoNSeP patches keep their JPEG bytes and
    ``.mat`` files, the instance maps are stored as compressed ``.npz`` (same arrays). The
    licence files of the sources are copied beside the data.
    """
    import gzip

    import tifffile

    from stlib.io.annotations import read_monuseg_xml

    src, out = Path(src), Path(out)
    ms, cs = src / "nuclei-monuseg", src / "nuclei-consep"
    names = list(monuseg) if monuseg is not None else sorted(p.stem for p in (ms / "images").glob("*.tif"))
    dm = out / "nuclei-monuseg"
    (dm / "images").mkdir(parents=True, exist_ok=True)
    (dm / "annotations").mkdir(parents=True, exist_ok=True)
    for n in names:
        img = tifffile.imread(ms / "images" / f"{n}.tif")[..., :3]
        _, um, _ = read_monuseg_xml(ms / "annotations" / f"{n}.xml")
        kw: dict[str, Any] = {}
        if um:
            kw = {"resolution": (1e4 / um, 1e4 / um), "resolutionunit": "CENTIMETER"}
        with atomic_path(dm / "images" / f"{n}.tif") as tmp:
            tifffile.imwrite(tmp, img, photometric="rgb", tile=(256, 256), compression="jpeg",
                             compressionargs={"level": int(jpeg_quality)}, **kw)
        with atomic_path(dm / "annotations" / f"{n}.xml.gz") as tmp:
            tmp.write_bytes(gzip.compress((ms / "annotations" / f"{n}.xml").read_bytes(), compresslevel=9, mtime=0))
    if (ms / "LICENSE.md").is_file():
        shutil.copy(ms / "LICENSE.md", dm / "LICENSE.md")
    if consep:
        dc = out / "nuclei-consep"
        for sub in ("images", "inst", "type_mat"):
            (dc / sub).mkdir(parents=True, exist_ok=True)
        for base in consep:
            for k in range(16):
                stem = f"{base}_{k:03d}"
                shutil.copy(cs / "images" / f"{stem}.jpg", dc / "images" / f"{stem}.jpg")
                shutil.copy(cs / "type_mat" / f"{stem}.mat", dc / "type_mat" / f"{stem}.mat")
                with atomic_path(dc / "inst" / f"{stem}.npz") as tmp:
                    with open(tmp, "wb") as fh:
                        np.savez_compressed(fh, inst=np.load(cs / "inst" / f"{stem}.npy"))
        if (cs / "LICENSE.md").is_file():
            shutil.copy(cs / "LICENSE.md", dc / "LICENSE.md")
    return out


# ----------------------------------------------------------------------------- CLI
def cli_main(argv: list[str]) -> int:
    """``stlib realtissue --out DIR [--source DIR ...] [--seed N] [--heldout-organs ...]``."""
    p = argparse.ArgumentParser(
        prog="stlib realtissue",
        description="Write a cohort of REAL annotated H&E (MoNuSeg, CoNSeP, instance folders) with a SIMULATED "
                    "Xenium layer, in the layout of `stlib demo` (HEST + truth/), so every notebook runs on it.")
    p.add_argument("--out", required=True, help="data root to write (e.g. data/realtissue)")
    p.add_argument("--source", nargs="+", default=[SHIPPED_DIR],
                   help="annotated folders (or a folder with nuclei-monuseg/ and nuclei-consep/); "
                        f"default: the shipped subset ({SHIPPED_DIR}/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-organs", nargs="+", default=list(DEFAULT_HELDOUT_ORGANS))
    p.add_argument("--tumour-fraction", type=float, default=0.8)
    p.add_argument("--pannuke", default="synthetic", help="'synthetic', 'none' or a real PanNuke folder")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    srcs = args.source
    images = load_source_images(srcs[0] if len(srcs) == 1 else srcs)
    t0 = time.perf_counter()
    out = make_realtissue_cohort(args.out, images, seed=args.seed, heldout_organs=args.heldout_organs,
                                 tumour_fraction=args.tumour_fraction,
                                 pannuke=None if args.pannuke == "none" else args.pannuke, force=args.force)
    meta = read_json(Path(out) / "cohort.json")
    print(f"real-tissue cohort at {out}: {len(meta['samples'])} samples (train organs {meta['train_organs']}, "
          f"held out {meta['held_out_organs']}) in {time.perf_counter() - t0:.1f} s")
    return 0
