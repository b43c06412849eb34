"""Segmentation, detection and classification metrics for nucleus instance maps.

The definitions follow the field's reference protocols so that numbers are comparable with
published tables (HoVer-Net: Graham et al., Med. Image Anal. 58, 2019, and its
``compute_stats``; PanNuke: Gamper et al., arXiv 2003.10778, 2020; PQ: Kirillov et al.,
CVPR 2019). The code is written from those definitions, not taken from the references, and
differs from them where they need contiguous ids or divide by zero:

* instance maps are integer arrays, 0 = background; ids may be any non-negative integers,
  need not be contiguous, and are never renumbered in the output;
* every empty case has a defined value, stated in each docstring (summary: Dice, AJI and
  AJI+ are 1.0 when both maps are empty; DQ/SQ/PQ are NaN when both are empty, because a
  detection quality over zero objects is undefined; PanNuke bPQ / per-class PQ are NaN when
  the truth is empty, as in the PanNuke protocol, and NaN values are skipped by the means);
* all pairwise quantities come from one sparse contingency table of the two maps (built
  with ``np.bincount``), so an image with thousands of nuclei costs a few array passes.

Core functions do no I/O; :func:`evaluate_folder` and :func:`cli_main` (``stlib metrics``)
read ``NAME.npz`` folders and write JSON.
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from stlib.constants import (
    CLASS_NAMES,
    DEAD,
    IGNORE,
    NUCLEUS_CLASSES,
    PANNUKE_CHANNEL_TO_CLASS,
    TARGET_UM_PER_PX_40X,
    UNKNOWN_CLASSES,
)

__all__ = [
    "PQResult", "MPQResult", "Pairing", "DetectionResult", "TypeCounts", "TypeF1Result",
    "PanNukeSummary", "dice", "aji", "aji_plus", "pq", "pannuke_bpq", "pannuke_mpq",
    "pannuke_summary", "pair_coordinates", "radius_px",
    "detection_f1", "type_f1", "centroids", "instance_types", "remap_label", "evaluate_pair",
    "aggregate", "evaluate_folder", "DEFINITIONS", "CLASSES_NO_DEAD", "cli_main", "class_scores",
    "label_accuracy_vs_truth", "segmentation_errors", "error_summary", "ERROR_FIELDS",
]

#: The four classes scored by ``mpq_no_dead``: ST labels leave Dead out by default (no expression
#: signature of dead cells is validated), so mPQ is also reported over the other four.
CLASSES_NO_DEAD: tuple[int, ...] = tuple(c for c in NUCLEUS_CLASSES if c != DEAD)

#: Pairing radius of HoVer-Net's ``compute_stats`` (12 px at 40x, i.e. 3 µm).
DETECTION_RADIUS_UM = 12 * TARGET_UM_PER_PX_40X

#: One-line definitions, written into every metrics JSON.
DEFINITIONS: dict[str, str] = {
    "dice": "binary Dice 2|T∩P|/(|T|+|P|) over the image; 1.0 when both are empty",
    "aji": "AJI (MoNuSeg/HoVer-Net get_fast_aji): each true instance takes its highest-IoU "
           "prediction (predictions may be reused); ΣI/(ΣU + unpaired true + unpaired pred areas); "
           "1.0 when both are empty",
    "aji_plus": "AJI+: one-to-one pairs from a maximum-total-IoU assignment, pairs with IoU>0; "
                "1.0 when both are empty",
    "pq": "PQ (Kirillov 2019, HoVer-Net get_fast_pq): pairs with IoU > 0.5 (unique); "
          "DQ=TP/(TP+FP/2+FN/2), SQ=ΣIoU/TP (0 when TP=0), PQ=DQ·SQ; NaN when both are empty",
    "bpq": "PanNuke binary PQ of one image (all classes merged); NaN when the truth is empty",
    "mpq": "PanNuke multi-class PQ: per image, PQ of each class c between class-c instances, NaN "
           "(skipped) where the truth has no class-c nucleus; per-image mPQ = nanmean over "
           "classes; aggregate = mean over tissues of per-tissue image means "
           "(mpq_image_avg = mean over images, CellViT's 'dataset' variant)",
    "mpq_no_dead": "mPQ over Neoplastic, Inflammatory, Connective and Epithelial only (Dead left out: "
                   "ST labels ignore it by default); same per-image and per-tissue rules as mpq",
    "f_d": "detection F1 (HoVer-Net compute_stats), pooled over images: centroids paired by a "
           "Hungarian assignment on Euclidean distance, pairs farther than 3 µm (12 px at "
           "0.25 µm/px) dropped; F_d = 2TP/(2TP+FP+FN)",
    "f_c": "type F1 per class (HoVer-Net compute_stats), pooled: F_c = 2(TP_c+TN_c)/"
           "(2(TP_c+TN_c) + 2FP_c + 2FN_c + FP_d,c + FN_d,c) over paired nuclei where truth or "
           "prediction is c (so TN_c = 0, as in the reference code), FP_d,c/FN_d,c = unpaired "
           "predicted/true nuclei of class c; true nuclei of unknown class (0/255) are left out "
           "of the type counts",
}


# --------------------------------------------------------------------------- results
class PQResult(NamedTuple):
    """Panoptic quality of one pair of instance maps.

    ``paired_true`` / ``paired_pred`` hold the original instance ids of matched pairs.
    """

    dq: float
    sq: float
    pq: float
    tp: int
    fp: int
    fn: int
    sum_iou: float
    paired_true: np.ndarray
    paired_pred: np.ndarray


class MPQResult(NamedTuple):
    """PanNuke multi-class PQ of one image: ``mpq`` and ``pq`` per class id (NaN = skipped)."""

    mpq: float
    pq: dict[int, float]


class Pairing(NamedTuple):
    """Result of :func:`pair_coordinates`: ``paired`` (K,2) row indices into (a, b)."""

    paired: np.ndarray
    unpaired_a: np.ndarray
    unpaired_b: np.ndarray


class DetectionResult(NamedTuple):
    """Detection F1 with its counts (pooled over images)."""

    f1: float
    precision: float
    recall: float
    tp: int
    fp: int
    fn: int


class TypeCounts(NamedTuple):
    """Counts behind one class's type F1 (see :func:`type_f1`)."""

    tp: int
    fp: int
    fn: int
    fp_d: int
    fn_d: int


class TypeF1Result(NamedTuple):
    """Detection + classification scores of HoVer-Net's ``compute_stats`` (pooled)."""

    f_d: float
    accuracy: float
    f_c: dict[int, float]
    counts: dict[int, TypeCounts]
    detection: DetectionResult


class PanNukeSummary(NamedTuple):
    """Aggregate PanNuke scores (see :func:`pannuke_summary`)."""

    mpq: float
    bpq: float
    mpq_image_avg: float
    bpq_image_avg: float
    pq_per_class: dict[str, float]
    per_tissue: dict[str, dict[str, float]]


# --------------------------------------------------------------------------- helpers
def _nanmean(values: Any) -> float:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return math.nan
    return float(np.nanmean(arr))


def _safe_div(num: float, den: float, empty: float = math.nan) -> float:
    return float(num) / float(den) if den != 0 else empty


def _as_label_array(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            return arr.astype(np.int64)
        raise ValueError(f"{name} must be an integer label array (0 = background), got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} has negative ids (min {arr.min()}); ids must be >= 0, 0 = background")
    return arr


def _dense_index(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map ids of a flat label array to 1..n (0 stays 0): returns (ids, index, areas)."""
    flat = x.ravel()
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    mx = int(flat.max())
    if mx <= 4 * flat.size + 1024:
        counts = np.bincount(flat.astype(np.intp, copy=False), minlength=mx + 1)
        counts[0] = 0
        ids = np.flatnonzero(counts)
        lut = np.zeros(mx + 1, np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return ids.astype(np.int64), lut[flat], counts[ids]
    uniq, inv = np.unique(flat, return_inverse=True)
    inv = inv.ravel().astype(np.int64)
    if uniq[0] != 0:
        inv += 1
    else:
        uniq = uniq[1:]
    areas = np.bincount(inv, minlength=uniq.size + 1)[1:]
    return uniq.astype(np.int64), inv, areas


class _Overlap(NamedTuple):
    """Sparse contingency table: rows/cols index true_ids/pred_ids (0-based)."""

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    inter: np.ndarray
    union: np.ndarray
    iou: np.ndarray


def _overlaps(true: Any, pred: Any) -> _Overlap:
    t = _as_label_array(true, "true")
    p = _as_label_array(pred, "pred")
    if t.shape != p.shape:
        raise ValueError(f"true {t.shape} and pred {p.shape} have different shapes")
    t_ids, ti, t_area = _dense_index(t)
    p_ids, pi, p_area = _dense_index(p)
    n_p1 = p_ids.size + 1
    both = (ti > 0) & (pi > 0)
    key = ti[both] * n_p1 + pi[both]
    table = (t_ids.size + 1) * n_p1
    if table <= max(1 << 22, 4 * key.size):
        c = np.bincount(key, minlength=table)
        keys = np.flatnonzero(c)
        inter = c[keys]
    else:
        keys, inter = np.unique(key, return_counts=True)
    rows = keys // n_p1 - 1
    cols = keys % n_p1 - 1
    union = t_area[rows] + p_area[cols] - inter
    iou = inter / np.maximum(union, 1)
    return _Overlap(t_ids, p_ids, t_area, p_area, rows, cols, inter, union, iou)


def _max_weight_pairs(rows: np.ndarray, cols: np.ndarray, weight: np.ndarray,
                      n_rows: int, n_cols: int) -> np.ndarray:
    """One-to-one assignment maximising the total weight over a sparse bipartite graph.

    Returns indices into the edge arrays of the chosen pairs. The graph is split into
    connected components; a component with one row and one column is its own pair, larger
    ones are solved exactly with the Hungarian algorithm on their dense sub-matrix (the
    optimum of the whole problem is the union of the component optima).
    """
    if rows.size == 0:
        return np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(rows.size), (rows, cols + n_rows)), shape=(n_rows + n_cols,) * 2)
    _, lab = connected_components(graph, directed=False)
    comp = lab[rows]
    n_edges = np.bincount(comp, minlength=lab.max() + 1)
    chosen = [np.flatnonzero(n_edges[comp] == 1)]  # a single edge: pair it
    big = np.flatnonzero(n_edges > 1)
    if big.size:
        edge_idx = np.flatnonzero(n_edges[comp] > 1)
        edge_idx = edge_idx[np.argsort(comp[edge_idx], kind="stable")]
        bounds = np.cumsum(n_edges[big])[:-1]
        for grp in np.split(edge_idx, bounds):
            r_u, r_inv = np.unique(rows[grp], return_inverse=True)
            c_u, c_inv = np.unique(cols[grp], return_inverse=True)
            m = np.zeros((r_u.size, c_u.size))
            e = np.full((r_u.size, c_u.size), -1, np.int64)
            m[r_inv, c_inv] = weight[grp]
            e[r_inv, c_inv] = grp
            ri, ci = linear_sum_assignment(m, maximize=True)
            sel = e[ri, ci]
            chosen.append(sel[(sel >= 0)])
    out = np.concatenate(chosen)
    return np.sort(out[weight[out] > 0])


# --------------------------------------------------------------------------- instance metrics
def dice(true: Any, pred: Any) -> float:
    """Binary Dice coefficient of two label maps (HoVer-Net's ``DICE1``).

    ``Dice = 2 |T ∩ P| / (|T| + |P|)`` with T, P the foreground (id > 0) pixels.
    Both maps empty -> 1.0 (perfect agreement on "no nucleus").

    Parameters
    ----------
    true, pred
        Integer (or boolean) arrays of equal shape, 0 = background.
    """
    t = _as_label_array(true, "true") > 0
    p = _as_label_array(pred, "pred") > 0
    if t.shape != p.shape:
        raise ValueError(f"true {t.shape} and pred {p.shape} have different shapes")
    den = int(t.sum()) + int(p.sum())
    return _safe_div(2 * int(np.count_nonzero(t & p)), den, empty=1.0)


def _aji_from(ov: _Overlap) -> float:
    if ov.rows.size:
        # best prediction per true instance: highest IoU, ties -> lowest predicted id
        order = np.lexsort((ov.cols, -ov.iou, ov.rows))
        r = ov.rows[order]
        sel = order[np.r_[True, r[1:] != r[:-1]]]
    else:
        sel = np.zeros(0, np.int64)
    inter = float(ov.inter[sel].sum())
    union = float(ov.union[sel].sum())
    used_pred = np.unique(ov.cols[sel])
    union += float(ov.true_area.sum() - ov.true_area[ov.rows[sel]].sum())
    union += float(ov.pred_area.sum() - ov.pred_area[used_pred].sum())
    return _safe_div(inter, union, empty=1.0)


def _aji_plus_from(ov: _Overlap) -> float:
    sel = _max_weight_pairs(ov.rows, ov.cols, ov.iou, ov.true_ids.size, ov.pred_ids.size)
    inter = float(ov.inter[sel].sum())
    union = float(ov.union[sel].sum())
    union += float(ov.true_area.sum() - ov.true_area[ov.rows[sel]].sum())
    union += float(ov.pred_area.sum() - ov.pred_area[ov.cols[sel]].sum())
    return _safe_div(inter, union, empty=1.0)


def aji(true: Any, pred: Any) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017; HoVer-Net ``get_fast_aji``).

    Each true instance G_i is paired with the prediction S_j of highest IoU among those it
    overlaps (ties: lowest predicted id); a prediction may be paired with several true
    instances. ``AJI = Σ|G_i ∩ S_j| / (Σ|G_i ∪ S_j| + Σ|G unpaired| + Σ|S never paired|)``.
    A true instance overlapping nothing adds its area to the denominator. Both maps empty
    -> 1.0; exactly one empty -> 0.0.
    """
    return _aji_from(_overlaps(true, pred))


def aji_plus(true: Any, pred: Any) -> float:
    """AJI+ (Graham et al. 2019; HoVer-Net ``get_fast_aji_plus``).

    As :func:`aji`, but the pairs are one-to-one: an assignment maximising the total IoU
    (Hungarian algorithm), keeping pairs with IoU > 0; unpaired instances of either map add
    their areas to the denominator. Both maps empty -> 1.0.
    """
    return _aji_plus_from(_overlaps(true, pred))


def _pq_from(ov: _Overlap, match_iou: float) -> PQResult:
    if not 0.0 <= match_iou < 1.0:
        raise ValueError(f"match_iou must be in [0, 1), got {match_iou!r}")
    if match_iou >= 0.5:
        sel = np.flatnonzero(ov.iou > match_iou)  # unique by construction when IoU > 0.5
    else:
        sel = _max_weight_pairs(ov.rows, ov.cols, ov.iou, ov.true_ids.size, ov.pred_ids.size)
        sel = sel[ov.iou[sel] > match_iou]
    tp = int(sel.size)
    fp = int(ov.pred_ids.size) - tp
    fn = int(ov.true_ids.size) - tp
    sum_iou = float(ov.iou[sel].sum())
    dq = _safe_div(tp, tp + 0.5 * fp + 0.5 * fn)
    sq = sum_iou / tp if tp else (0.0 if fp + fn else math.nan)
    return PQResult(dq, sq, dq * sq, tp, fp, fn, sum_iou, ov.true_ids[ov.rows[sel]], ov.pred_ids[ov.cols[sel]])


def pq(true: Any, pred: Any, *, match_iou: float = 0.5) -> PQResult:
    """Panoptic quality (Kirillov et al., CVPR 2019) as HoVer-Net's ``get_fast_pq``.

    A true and a predicted instance match when ``IoU > match_iou`` (strictly). For
    ``match_iou >= 0.5`` matches are unique by construction; below 0.5 the pairs come from a
    one-to-one assignment maximising total IoU, then pairs with ``IoU <= match_iou`` are
    dropped (as the reference does).

    ``DQ = TP / (TP + FP/2 + FN/2)``, ``SQ = ΣIoU(matched) / TP``, ``PQ = DQ · SQ``.

    Empty cases: both maps empty -> DQ = SQ = PQ = NaN (nothing to detect: skipped by the
    nan-means of the aggregates; the reference divides by zero here); TP = 0 with some
    instance present -> DQ = 0, SQ = 0, PQ = 0 (the reference's value).

    Parameters
    ----------
    true, pred
        Instance maps (integer, 0 = background, any non-negative ids).
    match_iou
        IoU threshold in [0, 1).
    """
    return _pq_from(_overlaps(true, pred), match_iou)


def remap_label(inst: Any, *, by_size: bool = False) -> np.ndarray:
    """Renumber an instance map to contiguous ids 1..n (int32), keeping 0 as background.

    Order follows the original ids, or decreasing area with ``by_size=True``. None of the
    metrics here need it; it exists for exporting maps to tools that do.
    """
    arr = _as_label_array(inst, "inst")
    ids, idx, areas = _dense_index(arr)
    if by_size and ids.size:
        order = np.argsort(-areas, kind="stable")
        new = np.zeros(ids.size + 1, np.int32)
        new[order + 1] = np.arange(1, ids.size + 1)
        idx = new[idx]
    return idx.astype(np.int32).reshape(arr.shape)


def centroids(inst: Any) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids (sorted) and their centroids as (N, 2) float ``(x, y)`` = (column, row)."""
    arr = _as_label_array(inst, "inst")
    if arr.ndim != 2:
        raise ValueError(f"inst must be 2-D, got shape {arr.shape}")
    ids, idx, areas = _dense_index(arr)
    n = ids.size + 1
    rr, cc = np.indices(arr.shape)
    sy = np.bincount(idx, weights=rr.ravel(), minlength=n)[1:]
    sx = np.bincount(idx, weights=cc.ravel(), minlength=n)[1:]
    return ids, np.stack([sx / areas, sy / areas], axis=1) if ids.size else np.zeros((0, 2))


def instance_types(inst: Any, type_map: Any) -> tuple[np.ndarray, np.ndarray]:
    """Class of each instance by majority vote of its pixels (HoVer-Net's rule).

    The most frequent pixel class wins (ties: lowest class id); if that is background (0) and
    another class occurs, the most frequent non-background class is taken instead.
    Returns (ids, types) with ids sorted as in :func:`centroids`.
    """
    arr = _as_label_array(inst, "inst")
    typ = _as_label_array(type_map, "type")
    if typ.shape != arr.shape:
        raise ValueError(f"type {typ.shape} and inst {arr.shape} have different shapes")
    ids, idx, _ = _dense_index(arr)
    fg = idx > 0
    k = int(typ.max()) + 1 if typ.size else 1
    votes = np.bincount((idx[fg] - 1) * k + typ.ravel()[fg], minlength=ids.size * k).reshape(ids.size, k)
    best = votes.argmax(axis=1)
    if k > 1:
        second = votes[:, 1:].argmax(axis=1) + 1
        swap = (best == 0) & (votes[:, 1:].max(axis=1) > 0)
        best = np.where(swap, second, best)
    return ids, best.astype(np.int64)


# --------------------------------------------------------------------------- PanNuke protocol
def _class_maps(inst: np.ndarray, typ: np.ndarray | None, name: str) -> dict[int, np.ndarray]:
    """Per-class instance maps: PanNuke channels, or ``inst`` masked by ``type == c``."""
    if typ is None:
        if inst.ndim != 3:
            raise ValueError(f"{name}_type is required unless {name}_inst is a (H, W, 6) PanNuke mask array")
        return {cls: inst[..., ch] for ch, cls in PANNUKE_CHANNEL_TO_CLASS.items()}
    if inst.shape != typ.shape:
        raise ValueError(f"{name}_type {typ.shape} and {name}_inst {inst.shape} have different shapes")
    return {c: np.where(typ == c, inst, 0) for c in NUCLEUS_CLASSES}


def _binary_map(inst: Any, typ: Any, name: str) -> np.ndarray:
    arr = np.asarray(inst)
    if arr.ndim == 3 and typ is None:
        from stlib.io.pannuke import masks_to_inst_type  # the one PanNuke converter (last channel wins)

        return masks_to_inst_type(arr)[0]
    return _as_label_array(arr, f"{name}_inst")


def pannuke_bpq(true_inst: Any, pred_inst: Any, *, match_iou: float = 0.5) -> float:
    """PanNuke binary PQ of one image (Gamper et al. 2020): PQ with all classes merged.

    Inputs are instance maps (H, W) or PanNuke (H, W, 6) masks. NaN when the truth has no
    nucleus (the PanNuke protocol skips such images), whatever the prediction.
    """
    t = _binary_map(true_inst, None, "true")
    p = _binary_map(pred_inst, None, "pred")
    if not np.any(t):
        return math.nan
    return pq(t, p, match_iou=match_iou).pq


def pannuke_mpq(true_inst: Any, true_type: Any, pred_inst: Any, pred_type: Any, *,
                match_iou: float = 0.5, classes: Sequence[int] = NUCLEUS_CLASSES) -> MPQResult:
    """PanNuke multi-class PQ of one image (Gamper et al. 2020, PanNuke-metrics ``run.py``).

    For each class c in 1..5, PQ between the true class-c instances and the predicted
    class-c instances. A class with no true nucleus in the image is NaN: skipped, so its
    false positives in that image are never penalised. ``mpq`` = nanmean over classes (NaN
    when the truth has no nucleus at all).

    Inputs: ``(inst, type)`` maps (class-c instances = ``inst`` where ``type == c``, pixel
    by pixel, like a PanNuke channel), or a PanNuke (H, W, 6) mask array with ``type=None``.
    Extension for ST labels: true nuclei of unknown class (type 0 or 255 by majority vote)
    count for no class, and a prediction that matches one of them (binary IoU > 0.5) is
    removed from the class maps, so it is not a false positive of the class it was given.

    ``classes`` restricts the classes averaged (and returned): :data:`CLASSES_NO_DEAD` gives the
    four-class mPQ reported beside the five-class one, since ST labels ignore Dead by default.
    """
    bad = [c for c in classes if c not in NUCLEUS_CLASSES]
    if bad or not len(classes):
        raise ValueError(f"classes: must be a non-empty subset of {NUCLEUS_CLASSES}, got {tuple(classes)}")
    t_arr = np.asarray(true_inst)
    p_arr = np.asarray(pred_inst)
    t_maps = _class_maps(t_arr, None if true_type is None else np.asarray(true_type), "true")
    p_maps = _class_maps(p_arr, None if pred_type is None else np.asarray(pred_type), "pred")
    if true_type is not None and pred_type is not None:
        ids, types = instance_types(t_arr, true_type)
        unknown = ids[(types == 0) | np.isin(types, UNKNOWN_CLASSES)]
        if unknown.size:
            m = pq(t_arr, p_arr, match_iou=0.5)
            drop = m.paired_pred[np.isin(m.paired_true, unknown)]
            if drop.size:
                keep = ~np.isin(p_arr, drop)
                p_maps = {c: np.where(keep, v, 0) for c, v in p_maps.items()}
    per_class: dict[int, float] = {}
    for c in classes:
        t_c = _as_label_array(t_maps[c], "true_inst")
        per_class[c] = pq(t_c, p_maps[c], match_iou=match_iou).pq if np.any(t_c) else math.nan
    return MPQResult(_nanmean(list(per_class.values())), per_class)


def _class_key(c: int) -> str:
    return CLASS_NAMES[c].lower()


def pannuke_summary(per_image_records: Sequence[Mapping[str, Any]],
                    tissues: Sequence[str] | None = None) -> PanNukeSummary:
    """Aggregate per-image bPQ / mPQ the PanNuke way.

    ``mpq`` / ``bpq``: nanmean over the images of each tissue, then nanmean over tissues
    (PanNuke-metrics ``run.py``, the number in the PanNuke/HoVer-Net/CellViT tables).
    ``mpq_image_avg`` / ``bpq_image_avg``: nanmean over images (CellViT's "dataset" mPQ;
    a different number). ``pq_per_class``: nanmean over images of each class's PQ.

    Parameters
    ----------
    per_image_records
        Mappings with ``bpq``, ``mpq`` and optionally ``pq_<classname>`` (as returned by
        :func:`evaluate_pair`).
    tissues
        Tissue (organ) of each record; ``None`` treats all images as one tissue.
    """
    n = len(per_image_records)
    if tissues is None:
        tissues = ["all"] * n
    if len(tissues) != n:
        raise ValueError(f"tissues has {len(tissues)} entries for {n} records")
    get = lambda key: np.array([float(r.get(key, math.nan)) for r in per_image_records], float)  # noqa: E731
    mpq_i, bpq_i = get("mpq"), get("bpq")
    tis = np.asarray([str(t) for t in tissues])
    per_tissue = {}
    for name in sorted(set(tis.tolist())):
        sel = tis == name
        per_tissue[name] = {"mpq": _nanmean(mpq_i[sel]), "bpq": _nanmean(bpq_i[sel]), "n_images": int(sel.sum())}
    per_class = {_class_key(c): _nanmean(get(f"pq_{_class_key(c)}")) for c in NUCLEUS_CLASSES}
    return PanNukeSummary(
        mpq=_nanmean([v["mpq"] for v in per_tissue.values()]),
        bpq=_nanmean([v["bpq"] for v in per_tissue.values()]),
        mpq_image_avg=_nanmean(mpq_i), bpq_image_avg=_nanmean(bpq_i),
        pq_per_class=per_class, per_tissue=per_tissue,
    )


# --------------------------------------------------------------------------- detection / classification
def radius_px(um_per_px: float, *, radius_um: float = DETECTION_RADIUS_UM) -> float:
    """HoVer-Net's 12 px pairing radius at 0.25 µm/px (3 µm) expressed in pixels of ``um_per_px``."""
    if not um_per_px > 0:
        raise ValueError(f"um_per_px must be > 0, got {um_per_px!r}")
    return float(radius_um) / float(um_per_px)


def _points(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.size == 0:
        return np.zeros((0, 2))
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must be an (N, 2) array of coordinates, got shape {arr.shape}")
    return arr


def pair_coordinates(a: Any, b: Any, radius: float, *, max_dense: int = 25_000_000) -> Pairing:
    """Pair two point sets as HoVer-Net's ``pair_coordinates``.

    A minimum-total-distance one-to-one assignment (Hungarian algorithm) on the
    *unconstrained* Euclidean distances, then pairs farther than ``radius`` are dropped
    (distance <= radius is kept). For ``len(a) * len(b) > max_dense`` the assignment is
    solved per connected component of the "within radius" graph instead (memory-bounded;
    may differ from the global assignment in rare crowded configurations).

    Returns
    -------
    Pairing
        ``paired`` (K, 2) indices into a and b, sorted by the index into a; ``unpaired_a``,
        ``unpaired_b`` sorted index arrays.
    """
    a, b = _points(a, "a"), _points(b, "b")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    na, nb = len(a), len(b)
    if na == 0 or nb == 0:
        pairs = np.zeros((0, 2), np.int64)
    elif na * nb <= max_dense:
        d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
        ia, ib = linear_sum_assignment(d)
        ok = d[ia, ib] <= radius
        pairs = np.stack([ia[ok], ib[ok]], axis=1).astype(np.int64)
    else:
        from scipy.spatial import cKDTree

        sp = cKDTree(a).sparse_distance_matrix(cKDTree(b), radius, output_type="ndarray")
        rows, cols, dist = sp["i"], sp["j"], sp["v"]
        # maximise (big - distance) on the sparse graph == minimise distance among edges
        sel = _max_weight_pairs(rows, cols, 2.0 * radius + 1.0 - dist, na, nb)
        pairs = np.stack([rows[sel], cols[sel]], axis=1).astype(np.int64)
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    un_a = np.setdiff1d(np.arange(na), pairs[:, 0])
    un_b = np.setdiff1d(np.arange(nb), pairs[:, 1])
    return Pairing(pairs, un_a, un_b)


def _as_image_list(x: Any) -> list:
    """An ndarray is one image; any other sequence holds one entry per image."""
    return [x] if isinstance(x, np.ndarray) else list(x)


def detection_f1(true_points: Any, pred_points: Any, *, radius: float) -> DetectionResult:
    """Detection F1 pooled over images (HoVer-Net ``compute_stats``).

    Points of each image are paired by :func:`pair_coordinates`; TP/FP/FN are summed over
    images and ``F_d = 2TP / (2TP + FP + FN)``, precision ``TP/(TP+FP)``, recall
    ``TP/(TP+FN)`` (NaN when their denominator is 0).

    Parameters
    ----------
    true_points, pred_points
        One (N, 2) array, or a sequence of them (one per image).
    radius
        Pairing radius in pixels (see :func:`radius_px`).
    """
    tl, pl = _as_image_list(true_points), _as_image_list(pred_points)
    if len(tl) != len(pl):
        raise ValueError(f"true_points has {len(tl)} images, pred_points {len(pl)}")
    tp = fp = fn = 0
    for t, p in zip(tl, pl):
        m = pair_coordinates(t, p, radius)
        tp += len(m.paired)
        fn += len(m.unpaired_a)
        fp += len(m.unpaired_b)
    return _detection_result(tp, fp, fn)


def _detection_result(tp: int, fp: int, fn: int) -> DetectionResult:
    return DetectionResult(_safe_div(2 * tp, 2 * tp + fp + fn), _safe_div(tp, tp + fp),
                           _safe_div(tp, tp + fn), int(tp), int(fp), int(fn))


def _type_count_table(pairing: Pairing, t_types: np.ndarray, p_types: np.ndarray,
                      classes: Sequence[int]) -> tuple[np.ndarray, int, int]:
    """(len(classes), 5) counts [tp, fp, fn, fp_d, fn_d] plus (agree, n_typed) of one image."""
    pt = t_types[pairing.paired[:, 0]]
    pp = p_types[pairing.paired[:, 1]]
    known = (pt != 0) & ~np.isin(pt, UNKNOWN_CLASSES)
    pt, pp = pt[known], pp[known]
    ut = t_types[pairing.unpaired_a]
    up = p_types[pairing.unpaired_b]
    out = np.zeros((len(classes), 5), np.int64)
    for k, c in enumerate(classes):
        out[k] = [np.count_nonzero((pt == c) & (pp == c)), np.count_nonzero((pt != c) & (pp == c)),
                  np.count_nonzero((pt == c) & (pp != c)), np.count_nonzero(up == c),
                  np.count_nonzero(ut == c)]
    return out, int(np.count_nonzero(pt == pp)), int(pt.size)


def _f_type(row: Any) -> float:
    tp, fp, fn, fp_d, fn_d = (int(v) for v in row)
    return _safe_div(2 * tp, 2 * tp + 2 * fp + 2 * fn + fp_d + fn_d)


def type_f1(true_points: Any, true_types: Any, pred_points: Any, pred_types: Any, *,
            radius: float, classes: Sequence[int] = NUCLEUS_CLASSES) -> TypeF1Result:
    """Detection and per-class type F1 pooled over images (HoVer-Net ``compute_stats``).

    Over the paired nuclei where the true or the predicted class is c:
    TP_c (both c), FP_c (pred c, true other), FN_c (true c, pred other), TN_c (neither;
    always 0 on this subset, exactly as in the reference code). FP_d,c / FN_d,c are the
    unpaired predicted / true nuclei of class c. With the reference weights [2, 2, 1, 1]:

        F_c = 2(TP_c + TN_c) / (2(TP_c + TN_c) + 2FP_c + 2FN_c + FP_d,c + FN_d,c)

    ``accuracy`` = fraction of paired nuclei whose classes agree. True nuclei of unknown
    class (0 or 255) are left out of the type counts (not of detection). Counts are summed
    over images before the ratios. NaN where a denominator is 0.
    """
    tl, pl = _as_image_list(true_points), _as_image_list(pred_points)
    ttl, ptl = _as_image_list(true_types), _as_image_list(pred_types)
    if not len(tl) == len(pl) == len(ttl) == len(ptl):
        raise ValueError("true_points, true_types, pred_points and pred_types need one entry per image")
    total = np.zeros((len(classes), 5), np.int64)
    agree = n_typed = tp = fp = fn = 0
    for t, tt, p, ptt in zip(tl, ttl, pl, ptl):
        t, p = _points(t, "true_points"), _points(p, "pred_points")
        tt, ptt = np.asarray(tt, np.int64).ravel(), np.asarray(ptt, np.int64).ravel()
        if len(tt) != len(t) or len(ptt) != len(p):
            raise ValueError("true_types / pred_types must have one entry per point")
        m = pair_coordinates(t, p, radius)
        tab, a, n = _type_count_table(m, tt, ptt, classes)
        total += tab
        agree += a
        n_typed += n
        tp, fp, fn = tp + len(m.paired), fp + len(m.unpaired_b), fn + len(m.unpaired_a)
    det = _detection_result(tp, fp, fn)
    counts = {int(c): TypeCounts(*(int(v) for v in total[k])) for k, c in enumerate(classes)}
    return TypeF1Result(det.f1, _safe_div(agree, n_typed), {c: _f_type(v) for c, v in counts.items()},
                        counts, det)


# --------------------------------------------------------------------------- one image / a folder
_COUNT_FIELDS = ("tp", "fp", "fn", "fpd", "fnd")


# ----------------------------------------------------------------------------- cell labels
def class_scores(true: Sequence[int], pred: Sequence[int], *,
                 classes: Sequence[int] = NUCLEUS_CLASSES) -> dict[str, float]:
    """Accuracy and per-class F1 of predicted classes against true classes (cell by cell).

    A prediction of ``IGNORE`` (255) counts as wrong for accuracy and as a miss for the true
    class's F1 (an abstention is not a correct answer); ``ignored_fraction`` reports how often
    it happened. Classes absent from both truth and prediction get F1 = NaN.
    """
    t = np.asarray(true, dtype=int)
    p = np.asarray(pred, dtype=int)
    if t.shape != p.shape:
        raise ValueError(f"true and pred differ in length: {t.shape} vs {p.shape}")
    out: dict[str, float] = {"n": int(t.size),
                             "accuracy": float(np.mean(t == p)) if t.size else float("nan"),
                             "ignored_fraction": float(np.mean(p == IGNORE)) if t.size else float("nan")}
    f1s = []
    for c in classes:
        tp = int(np.sum((t == c) & (p == c)))
        fp = int(np.sum((t != c) & (p == c)))
        fn = int(np.sum((t == c) & (p != c)))
        f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")
        out[f"f1_{CLASS_NAMES[c]}"] = f1
        f1s.append(f1)
    out["macro_f1"] = float(np.nanmean(f1s)) if not np.all(np.isnan(f1s)) else float("nan")
    return out


def label_accuracy_vs_truth(cells: Any, truth: Any, *, visible_only: bool = False) -> dict:
    """Score derived cell labels against the demo truth, joined by ``cell_id``.

    Parameters
    ----------
    cells
        ``cells.parquet`` of :mod:`stlib.labels.derive` (``cell_id``, ``class``, ``x_he``, ``y_he``).
    truth
        ``truth/{sample}/nuclei.parquet`` (``cell_id``, ``class``, ``x_he``, ``y_he``, ``visible``).
    visible_only
        Score only cells whose nucleus is visible in the H&E.

    Returns
    -------
    dict with ``class_scores`` (see :func:`class_scores`), ``n_matched``, ``n_truth``,
    ``median_centroid_error_px`` and the confusion matrix (truth rows x predicted columns).
    """
    import pandas as pd

    for name, df in (("cells", cells), ("truth", truth)):
        if "cell_id" not in df.columns or "class" not in df.columns:
            raise ValueError(f"{name} needs columns cell_id and class")
    t = truth.copy()
    t["cell_id"] = t["cell_id"].astype(str)
    c = cells.copy()
    c["cell_id"] = c["cell_id"].astype(str)
    if visible_only and "visible" in t.columns:
        t = t[t["visible"].astype(bool)]
    m = t.merge(c, on="cell_id", suffixes=("_true", "_pred"), how="inner")
    scores = class_scores(m["class_true"].to_numpy(), m["class_pred"].to_numpy())
    out = {"class_scores": scores, "n_matched": int(len(m)), "n_truth": int(len(t)),
           "n_cells": int(len(c))}
    if {"x_he_true", "y_he_true", "x_he_pred", "y_he_pred"} <= set(m.columns):
        d = np.hypot(m["x_he_true"] - m["x_he_pred"], m["y_he_true"] - m["y_he_pred"])
        out["median_centroid_error_px"] = float(np.median(d)) if len(d) else float("nan")
    labels = [*NUCLEUS_CLASSES, IGNORE]
    cm = pd.crosstab(pd.Categorical(m["class_true"], categories=labels),
                     pd.Categorical(m["class_pred"], categories=labels), dropna=False)
    out["confusion"] = cm.to_numpy().tolist()
    out["confusion_labels"] = labels
    return out


def evaluate_pair(true_inst: Any, pred_inst: Any, true_type: Any = None, pred_type: Any = None, *,
                  um_per_px: float = TARGET_UM_PER_PX_40X, match_iou: float = 0.5) -> dict[str, Any]:
    """All per-image metrics of one prediction against its truth.

    Keys: ``dice, aji, aji_plus, dq, sq, pq`` (with ``pq_tp, pq_fp, pq_fn, sum_iou``),
    ``bpq``, ``n_true, n_pred``, detection ``det_tp, det_fp, det_fn, f_d`` (centroids paired
    within :func:`radius_px` of ``um_per_px``). With both type maps also ``mpq``, ``mpq_no_dead``,
    ``pq_<class>``, ``f_<class>``, ``type_acc``, and the pooled-count fields
    ``type_<tp|fp|fn|fpd|fnd>_<class>``, ``type_agree``, ``type_n`` used by :func:`aggregate`.
    """
    t = _as_label_array(true_inst, "true_inst")
    p = _as_label_array(pred_inst, "pred_inst")
    if t.ndim != 2 or t.shape != p.shape:
        raise ValueError(f"true_inst {t.shape} and pred_inst {p.shape} must be 2-D of the same shape")
    ov = _overlaps(t, p)
    res = _pq_from(ov, match_iou)
    t_area, p_area = int(ov.true_area.sum()), int(ov.pred_area.sum())
    out: dict[str, Any] = {
        "dice": _safe_div(2 * int(ov.inter.sum()), t_area + p_area, empty=1.0),
        "aji": _aji_from(ov), "aji_plus": _aji_plus_from(ov),
        "dq": res.dq, "sq": res.sq, "pq": res.pq,
        "pq_tp": res.tp, "pq_fp": res.fp, "pq_fn": res.fn, "sum_iou": res.sum_iou,
        "bpq": res.pq if ov.true_ids.size else math.nan,
        "n_true": int(ov.true_ids.size), "n_pred": int(ov.pred_ids.size),
    }
    _, t_xy = centroids(t)
    _, p_xy = centroids(p)
    pairing = pair_coordinates(t_xy, p_xy, radius_px(um_per_px))
    det = _detection_result(len(pairing.paired), len(pairing.unpaired_b), len(pairing.unpaired_a))
    out.update(det_tp=det.tp, det_fp=det.fp, det_fn=det.fn, f_d=det.f1)
    if (true_type is None) != (pred_type is None):
        raise ValueError("give both true_type and pred_type, or neither")
    if true_type is not None:
        tt = _as_label_array(true_type, "true_type")
        pt = _as_label_array(pred_type, "pred_type")
        if tt.shape != t.shape or pt.shape != p.shape:
            raise ValueError(f"true_type {tt.shape} / pred_type {pt.shape} must match the instance maps {t.shape}")
        mres = pannuke_mpq(t, tt, p, pt, match_iou=match_iou)
        out["mpq"] = mres.mpq
        out["mpq_no_dead"] = _nanmean([v for c, v in mres.pq.items() if c in CLASSES_NO_DEAD])
        for c, v in mres.pq.items():
            out[f"pq_{_class_key(c)}"] = v
        _, t_cls = instance_types(t, tt)
        _, p_cls = instance_types(p, pt)
        tab, agree, n_typed = _type_count_table(pairing, t_cls, p_cls, NUCLEUS_CLASSES)
        for k, c in enumerate(NUCLEUS_CLASSES):
            for f, v in zip(_COUNT_FIELDS, tab[k]):
                out[f"type_{f}_{_class_key(c)}"] = int(v)
            out[f"f_{_class_key(c)}"] = _f_type(tab[k])
        out.update(type_agree=agree, type_n=n_typed, type_acc=_safe_div(agree, n_typed))
    return out


def aggregate(records: Sequence[Mapping[str, Any]], tissues: Sequence[str] | None = None) -> dict[str, Any]:
    """Aggregate per-image :func:`evaluate_pair` records.

    Means over images (NaN skipped) for dice, aji, aji_plus, dq, sq, pq, bpq; PanNuke mPQ /
    bPQ with the tissue rule (:func:`pannuke_summary`), and ``mpq_no_dead`` (the four classes
    without Dead) with the same rule; detection ``f_d`` and per-class
    ``f_<class>`` from counts pooled over images (HoVer-Net ``compute_stats``).
    """
    out: dict[str, Any] = {"n_images": len(records)}
    for key in ("dice", "aji", "aji_plus", "dq", "sq", "pq"):
        out[key] = _nanmean([r.get(key, math.nan) for r in records])
    tp, fp, fn = (int(sum(r.get(k, 0) for r in records)) for k in ("det_tp", "det_fp", "det_fn"))
    det = _detection_result(tp, fp, fn)
    out.update(det_tp=tp, det_fp=fp, det_fn=fn, f_d=det.f1, det_precision=det.precision, det_recall=det.recall)
    summ = pannuke_summary(records, tissues)
    out.update(bpq=summ.bpq, bpq_image_avg=summ.bpq_image_avg)
    typed = [r for r in records if "mpq" in r]
    if typed:
        tis = None if tissues is None else [t for t, r in zip(tissues, records) if "mpq" in r]
        summ = pannuke_summary(typed, tis)
        out.update(mpq=summ.mpq, mpq_image_avg=summ.mpq_image_avg, per_tissue=summ.per_tissue)
        four = pannuke_summary([{"mpq": r.get("mpq_no_dead", math.nan), "bpq": r.get("bpq", math.nan)}
                                for r in typed], tis)
        out.update(mpq_no_dead=four.mpq, mpq_no_dead_image_avg=four.mpq_image_avg)
        for name, v in summ.pq_per_class.items():
            out[f"pq_{name}"] = v
        for c in NUCLEUS_CLASSES:
            key = _class_key(c)
            row = [sum(int(r.get(f"type_{f}_{key}", 0)) for r in typed) for f in _COUNT_FIELDS]
            out[f"f_{key}"] = _f_type(row)
            out[f"type_counts_{key}"] = dict(zip(_COUNT_FIELDS, row))
        agree = sum(int(r.get("type_agree", 0)) for r in typed)
        out["type_acc"] = _safe_div(agree, sum(int(r.get("type_n", 0)) for r in typed))
    else:
        out["per_tissue"] = summ.per_tissue
    return out


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    from stlib.utils import InputError

    try:
        with np.load(path, allow_pickle=False) as z:
            if "inst" not in z.files:
                raise InputError(f"has no 'inst' array (found {z.files})", path=path,
                                 fix="save the instance map as inst=... in the npz")
            inst = np.asarray(z["inst"])
            typ = np.asarray(z["type"]) if "type" in z.files else None
    except (OSError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"cannot read npz ({e})", path=path, fix="rewrite it with numpy.savez") from e
    if inst.ndim != 2 or (typ is not None and typ.shape != inst.shape):
        raise InputError(f"inst must be (H, W) and type the same shape; got inst {inst.shape}"
                         f"{'' if typ is None else f', type {typ.shape}'}", path=path)
    return inst, typ


def _read_tissue_map(path: str | Path) -> dict[str, str]:
    import csv

    from stlib.utils import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError("tissue map not found", path=path, fix="give a CSV with columns name,tissue")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"name", "tissue"} <= set(rows[0]):
        raise InputError("tissue map needs columns 'name' and 'tissue'", path=path)
    return {r["name"]: r["tissue"] for r in rows}


def evaluate_folder(true_dir: str | Path, pred_dir: str | Path, *, um_per_px: float = TARGET_UM_PER_PX_40X,
                    tissue_map: Mapping[str, str] | str | Path | None = None,
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Evaluate every ``NAME.npz`` of ``pred_dir`` against ``true_dir/NAME.npz``.

    Each npz holds ``inst`` (H, W) and optionally ``type``; type metrics are computed when
    both files of a pair have ``type``. Returns (per-image records with a ``name`` and,
    with a tissue map, ``tissue`` field; :func:`aggregate` of them).

    Raises
    ------
    stlib.utils.InputError
        Missing folders, names present in only one folder, unreadable files or shape
        mismatches (the message names the file).
    """
    from stlib.utils import InputError

    true_dir, pred_dir = Path(true_dir), Path(pred_dir)
    for d in (true_dir, pred_dir):
        if not d.is_dir():
            raise InputError("folder not found", path=d, fix="give a folder of NAME.npz files")
    t_names = {p.stem for p in true_dir.glob("*.npz")}
    p_names = {p.stem for p in pred_dir.glob("*.npz")}
    if not t_names:
        raise InputError("no .npz files", path=true_dir)
    if t_names != p_names:
        only_t, only_p = sorted(t_names - p_names), sorted(p_names - t_names)
        msg = []
        if only_t:
            msg.append(f"missing predictions for {', '.join(n + '.npz' for n in only_t[:5])}")
        if only_p:
            msg.append(f"no truth for {', '.join(n + '.npz' for n in only_p[:5])}")
        raise InputError("; ".join(msg), path=pred_dir, fix="both folders must hold the same NAME.npz files")
    tmap = _read_tissue_map(tissue_map) if isinstance(tissue_map, (str, Path)) else tissue_map
    records, tissues = [], []
    for name in sorted(t_names):
        t_inst, t_type = _load_npz(true_dir / f"{name}.npz")
        p_inst, p_type = _load_npz(pred_dir / f"{name}.npz")
        if t_inst.shape != p_inst.shape:
            raise InputError(f"shape {p_inst.shape} differs from the truth's {t_inst.shape}",
                             path=pred_dir / f"{name}.npz")
        typed = t_type is not None and p_type is not None
        try:
            rec = evaluate_pair(t_inst, p_inst, t_type if typed else None, p_type if typed else None,
                                um_per_px=um_per_px)
        except ValueError as e:
            raise InputError(str(e), path=pred_dir / f"{name}.npz") from e
        rec = {"name": name, **rec}
        if tmap is not None:
            if name not in tmap:
                raise InputError(f"image {name!r} is not in the tissue map", fix="add a row name,tissue")
            rec["tissue"] = tmap[name]
            tissues.append(tmap[name])
        records.append(rec)
    return records, aggregate(records, tissues if tmap is not None else None)


def _json_clean(obj: Any) -> Any:
    """NaN -> None (valid JSON), numpy scalars -> Python."""
    if isinstance(obj, Mapping):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def cli_main(argv: list[str]) -> int:
    """``stlib metrics --true DIR --pred DIR --json OUT [--um-per-px 0.25] [--tissue-map CSV]``."""
    from stlib.utils import write_json

    ap = argparse.ArgumentParser(prog="stlib metrics", description=__doc__.split("\n\n")[0])
    ap.add_argument("--true", required=True, type=Path, help="folder of NAME.npz truth (inst[, type])")
    ap.add_argument("--pred", required=True, type=Path, help="folder of NAME.npz predictions")
    ap.add_argument("--json", required=True, type=Path, help="output JSON (per_image, aggregate, definitions)")
    ap.add_argument("--um-per-px", type=float, default=TARGET_UM_PER_PX_40X,
                    help="pixel size, sets the 3 µm detection radius (default 0.25)")
    ap.add_argument("--tissue-map", type=Path, default=None,
                    help="CSV with columns name,tissue: PanNuke mPQ/bPQ are averaged per tissue, then over tissues")
    args = ap.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        records, agg = evaluate_folder(args.true, args.pred, um_per_px=args.um_per_px, tissue_map=args.tissue_map)
    doc = {
        "per_image": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in records},
        "aggregate": agg,
        "definitions": DEFINITIONS,
        "um_per_px": args.um_per_px,
        "detection_radius_px": radius_px(args.um_per_px),
    }
    write_json(args.json, _json_clean(doc))
    print(f"stlib metrics: {len(records)} images -> {args.json} (dice {agg['dice']:.4f}, pq {agg['pq']:.4f}"
          + (f", mPQ {agg['mpq']:.4f}" if "mpq" in agg else "") + ")")
    return 0


# ----------------------------------------------------------------------------- error decomposition
#: the count fields of :func:`segmentation_errors` (summable over tiles / images)
ERROR_FIELDS: tuple[str, ...] = (
    "n_true", "n_pred", "tp", "fp", "fn", "sum_iou", "true_px", "pred_px", "inter_px",
    "matched_true_px", "matched_pred_px", "fn_missed", "fn_ignored", "fn_merged", "fn_split", "fn_outline",
    "fp_extra", "fp_split", "fp_merged", "fp_outline")


def segmentation_errors(true_inst: Any, pred_inst: Any, *, pred_ignore: Any = None,
                        match_iou: float = 0.5) -> dict[str, int | float]:
    """Binary PQ counts of a prediction and *why* each unmatched nucleus is unmatched.

    Pairs are true / predicted nuclei with IoU > ``match_iou`` (unique for 0.5, as in PQ). Every
    unmatched true nucleus is one of

    * ``fn_ignored``: at least half of its pixels are ``pred_ignore`` (e.g. ignore pixels of a
      training map: neither nucleus nor background);
    * ``fn_missed``: at least half of its pixels are predicted background;
    * ``fn_merged``: it lies (half or more of it) in a predicted nucleus that holds half or more of
      at least one *other* true nucleus as well;
    * ``fn_split``: half or more of each of at least two predicted nuclei lie in it;
    * ``fn_outline``: otherwise (one predicted nucleus covers it, with the wrong outline);

    and every unmatched predicted nucleus one of ``fp_extra`` (at least half of it on true
    background), ``fp_split`` (half or more of it in a true nucleus that holds half or more of at
    least one other predicted nucleus too), ``fp_merged`` (it holds half or more of each of at least
    two true nuclei) or ``fp_outline``. Also the pixel counts of Dice
    (``true_px``, ``pred_px``, ``inter_px``) and the areas of the matched pairs
    (``matched_true_px``, ``matched_pred_px``: their ratio says whether matched outlines are too
    large or too small). All values are counts or sums, so they add over tiles and images;
    :func:`error_summary` turns a sum into bPQ, DQ, SQ, Dice and the bPQ each error costs.
    """
    t = _as_label_array(true_inst, "true_inst")
    p = _as_label_array(pred_inst, "pred_inst")
    if t.ndim != 2 or t.shape != p.shape:
        raise ValueError(f"true_inst {t.shape} and pred_inst {p.shape} must be 2-D of the same shape")
    ign = np.zeros(t.shape, bool) if pred_ignore is None else np.asarray(pred_ignore).astype(bool)
    if ign.shape != t.shape:
        raise ValueError(f"pred_ignore {ign.shape} must have the shape of the maps {t.shape}")
    p = np.where(ign, 0, p)
    ov = _overlaps(t, p)
    nt, npr = ov.true_ids.size, ov.pred_ids.size
    ti = _dense_index(t)[1]
    t_ign = np.bincount(ti[ign.ravel()], minlength=nt + 1)[1:]
    match = ov.iou > match_iou
    mt, mp = np.zeros(nt, bool), np.zeros(npr, bool)
    mt[ov.rows[match]] = True
    mp[ov.cols[match]] = True
    # share of each true nucleus inside each predicted one (and the reverse)
    t_half = ov.inter >= 0.5 * ov.true_area[ov.rows]
    p_half = ov.inter >= 0.5 * ov.pred_area[ov.cols]
    t_cov = np.bincount(ov.rows, weights=ov.inter, minlength=nt)
    p_cov = np.bincount(ov.cols, weights=ov.inter, minlength=npr)
    holds_t = np.bincount(ov.cols[t_half], minlength=npr)  # true nuclei half-inside each prediction
    holds_p = np.bincount(ov.rows[p_half], minlength=nt)  # predictions half-inside each true nucleus
    in_merger = np.zeros(nt, bool)
    in_merger[ov.rows[t_half & (holds_t[ov.cols] >= 2)]] = True
    in_split = np.zeros(npr, bool)
    in_split[ov.cols[p_half & (holds_p[ov.rows] >= 2)]] = True
    fn = ~mt
    ignored = fn & (t_ign >= 0.5 * ov.true_area)
    missed = fn & ~ignored & (ov.true_area - t_cov - t_ign >= 0.5 * ov.true_area)
    merged = fn & ~ignored & ~missed & in_merger
    fn_split = fn & ~ignored & ~missed & ~merged & (holds_p >= 2)
    fp = ~mp
    extra = fp & (ov.pred_area - p_cov >= 0.5 * ov.pred_area)
    split = fp & ~extra & in_split
    fp_merged = fp & ~extra & ~split & (holds_t >= 2)
    return {"n_true": int(nt), "n_pred": int(npr), "tp": int(match.sum()), "fp": int(fp.sum()), "fn": int(fn.sum()),
            "sum_iou": float(ov.iou[match].sum()), "true_px": int(ov.true_area.sum()),
            "pred_px": int(ov.pred_area.sum()), "inter_px": int(ov.inter.sum()),
            "matched_true_px": int(ov.true_area[ov.rows[match]].sum()),
            "matched_pred_px": int(ov.pred_area[ov.cols[match]].sum()),
            "fn_missed": int(missed.sum()), "fn_ignored": int(ignored.sum()), "fn_merged": int(merged.sum()),
            "fn_split": int(fn_split.sum()), "fn_outline": int((fn & ~ignored & ~missed & ~merged & ~fn_split).sum()),
            "fp_extra": int(extra.sum()), "fp_split": int(split.sum()), "fp_merged": int(fp_merged.sum()),
            "fp_outline": int((fp & ~extra & ~split & ~fp_merged).sum())}


def error_summary(counts: Mapping[str, float]) -> dict[str, float]:
    """bPQ, DQ, SQ, Dice and the error split of summed :func:`segmentation_errors` counts.

    ``gain_<error>`` is how much bPQ would rise if the nuclei of that error were not errors at all
    (an unmatched true nucleus removed from FN, an unmatched prediction from FP; SQ unchanged);
    ``gain_outline_all`` counts both outline kinds and ``gain_sq`` is the rise if every matched pair
    had IoU 1. The largest gain is the error that costs the most.
    """
    c = {k: float(counts.get(k, 0)) for k in ERROR_FIELDS}
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    sq = c["sum_iou"] / tp if tp else float("nan")

    def pq(fp_: float, fn_: float, s: float = sq) -> float:
        d = tp + 0.5 * fp_ + 0.5 * fn_
        return tp / d * s if d and tp else 0.0

    base = pq(fp, fn)
    out = {"bpq": base, "dq": tp / (tp + 0.5 * fp + 0.5 * fn) if tp + fp + fn else float("nan"), "sq": sq,
           "dice": _safe_div(2 * c["inter_px"], c["true_px"] + c["pred_px"], empty=1.0),
           "matched_area_ratio": _safe_div(c["matched_pred_px"], c["matched_true_px"], empty=float("nan"))}
    out.update({k: c[k] for k in ("n_true", "n_pred", "tp", "fp", "fn", "fn_missed", "fn_ignored", "fn_merged",
                                   "fn_split", "fn_outline", "fp_extra", "fp_split", "fp_merged", "fp_outline")})
    out.update({"gain_missed": pq(fp, fn - c["fn_missed"]) - base,
                "gain_ignored": pq(fp, fn - c["fn_ignored"]) - base,
                "gain_merged_split": pq(fp - c["fp_split"] - c["fp_merged"], fn - c["fn_merged"] - c["fn_split"]) - base,
                "gain_extra": pq(fp - c["fp_extra"], fn) - base,
                "gain_outline_all": pq(fp - c["fp_outline"], fn - c["fn_outline"]) - base,
                "gain_sq": pq(fp, fn, 1.0) - base})
    return out
