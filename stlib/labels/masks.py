"""Nucleus polygons (H&E level-0 pixels) -> dense instance, class, HV, ignore and confidence maps.

Pixel convention
----------------
A map is produced at a target resolution given by ``scale = level0_um_per_px /
target_um_per_px`` (output pixels per level-0 pixel). Output pixel ``(r, c)`` of a tile whose
top-left corner sits at level-0 coordinates ``origin = (x0, y0)`` covers the level-0 square

    x in [x0 + c / scale, x0 + (c + 1) / scale),   y in [y0 + r / scale, y0 + (r + 1) / scale)

and its **centre** is ``(x0 + (c + 0.5) / scale, y0 + (r + 0.5) / scale)``. A pixel belongs to
a polygon when its centre lies inside the polygon by the even-odd rule (holes are honoured).
Ties on an edge are broken half-open (a centre on a left / top edge is inside, on a right /
bottom edge outside), so two polygons that share an edge never both claim a pixel and a
polygon tiled over neighbouring tiles gives the same pixels as one big map. With ``scale=1``
and ``origin=(0, 0)`` this is ``skimage.draw.polygon(y - 0.5, x - 0.5)``.

Why a hand-written rasteriser
-----------------------------
A Xenium slide has ~10^5-10^6 nuclei of ~20-40 px. Rasterisers in rasterio / skimage /
OpenCV take one polygon per call, so the Python overhead per nucleus (~0.5 ms with the HV
map) dominates: about 2,000 nuclei/s. Here all polygons' vertices live in one flat array
(``shapely.get_coordinates``) and a numba scanline kernel fills every polygon of a tile in
one call; the HV maps follow in two compiled streaming passes over the tile. Python
work is per tile, not per nucleus.

Defined behaviour
-----------------
* **Overlaps** (``overlap=``): ``"smaller_wins"`` (default: the smaller nucleus, by polygon
  area, owns the shared pixels; equal areas -> the earlier polygon wins), ``"first"`` (the
  earlier polygon in input order wins) or ``"last"``.
* **Tile borders**: polygons are clipped to the tile; instance ids are global (``ids`` or the
  input position + 1), so a nucleus keeps its id in every tile it reaches.
  :attr:`LabelMaps.clipped_ids` lists the ids cut by the tile border.
* **Invalid polygons** (self-intersecting, e.g. a bow-tie): repaired with
  ``shapely.make_valid`` and the largest polygonal part is kept (counted in
  ``PolygonSet.report["n_repaired"]``). MultiPolygons keep their largest part as well.
* **Tiny polygons**: a polygon whose area at the target scale is below ``min_area_px``
  (output px^2) is *not* an instance (a network cannot resolve it and HoVer-Net's
  post-processing removes objects that small anyway). In :func:`label_maps` its footprint,
  and at least its centroid pixel, become ``ignore = 1`` where no other nucleus lies, so
  the loss neither rewards nor punishes predicting it. :func:`rasterize_instances` simply
  drops it.
* **Outside the imaged region** (``region=(x0, y0, x1, y1)`` in level-0 px): polygons whose
  bounding box misses the region are dropped and counted (``report["n_outside"]``); those
  that straddle it are clipped at the region edge, and output pixels outside the region
  get ``ignore = 1``.
* Empty / missing geometries are dropped and counted (``report["n_empty"]``).
* **Where Xenium did not image** (:func:`coverage_region`): the region covered by decoded
  molecules, shrunk by a margin, is passed as ``tissue``; pixels outside it are ``ignore = 1``,
  so an H&E nucleus outside the Xenium region is never taught as background.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numba
import numpy as np
import shapely

from stlib.constants import IGNORE

__all__ = [
    "MIN_AREA_PX",
    "PolygonSet",
    "LabelMaps",
    "Tile",
    "prepare_polygons",
    "rasterize_instances",
    "hv_maps",
    "label_maps",
    "tile_grid",
    "TileRenderer",
    "iter_label_tiles",
    "coverage_region",
    "known_background_region",
]

#: Default smallest nucleus area (output px^2 at the target scale) that becomes an instance.
MIN_AREA_PX: float = 4.0

OverlapRule = Literal["smaller_wins", "first", "last"]
_OVERLAP_RULES = ("smaller_wins", "first", "last")


# --------------------------------------------------------------------------------------
# compiled kernels
# --------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _ring_structure(xy, voff, n_rings, edge_ok, maybe_bad):  # pragma: no cover - compiled
    """Find ring breaks and flag polygons that may be invalid.

    Rings from ``shapely.get_coordinates`` are concatenated and closed (last vertex == first),
    so a ring ends at the first later vertex equal to its start: edges inside a ring get
    ``edge_ok = True``, the step from one ring to the next stays False. ``maybe_bad[p]`` is set
    when polygon ``p`` parses into an unexpected number of rings, a ring has < 3 edges, or two
    non-adjacent edges of a ring touch (O(n^2) per ring: nuclei have ~10-50 vertices). Flagged
    polygons are checked (and repaired) by shapely; the others are simple and skip GEOS.
    """
    for p in range(voff.size - 1):
        a = voff[p]
        b = voff[p + 1]
        s = a
        rings = 0
        while s < b:
            k = s + 1
            while k < b and not (xy[k, 0] == xy[s, 0] and xy[k, 1] == xy[s, 1]):
                k += 1
            if k >= b:  # unclosed ring
                maybe_bad[p] = True
                break
            rings += 1
            for e in range(s, k):
                edge_ok[e] = True
            if k - s < 3:
                maybe_bad[p] = True
            elif not maybe_bad[p]:
                for e1 in range(s, k):
                    x1 = xy[e1, 0]
                    y1 = xy[e1, 1]
                    x2 = xy[e1 + 1, 0]
                    y2 = xy[e1 + 1, 1]
                    for e2 in range(e1 + 2, k):
                        if e1 == s and e2 == k - 1:
                            continue  # adjacent through the closing vertex
                        x3 = xy[e2, 0]
                        y3 = xy[e2, 1]
                        x4 = xy[e2 + 1, 0]
                        y4 = xy[e2 + 1, 1]
                        if max(x1, x2) < min(x3, x4) or max(x3, x4) < min(x1, x2):
                            continue
                        if max(y1, y2) < min(y3, y4) or max(y3, y4) < min(y1, y2):
                            continue
                        d1 = (x4 - x3) * (y1 - y3) - (y4 - y3) * (x1 - x3)
                        d2 = (x4 - x3) * (y2 - y3) - (y4 - y3) * (x2 - x3)
                        d3 = (x2 - x1) * (y3 - y1) - (y2 - y1) * (x3 - x1)
                        d4 = (x2 - x1) * (y4 - y1) - (y2 - y1) * (x4 - x1)
                        if d1 * d2 <= 0.0 and d3 * d4 <= 0.0:
                            maybe_bad[p] = True  # touching counts too: shapely decides
                            break
                    if maybe_bad[p]:
                        break
            s = k + 1
        if rings != n_rings[p]:
            maybe_bad[p] = True


@numba.njit(cache=True, nogil=True)
def _centroids(xy, voff, edge_ok, out):  # pragma: no cover - compiled
    """Area centroid of each polygon (holes subtract), from its vertex rings."""
    for p in range(voff.size - 1):
        a = voff[p]
        b = voff[p + 1]
        sa = 0.0
        sx = 0.0
        sy = 0.0
        first = True
        ring_a = 0.0
        ring_x = 0.0
        ring_y = 0.0
        for j in range(a, b):
            if j + 1 < b and edge_ok[j]:
                x1 = xy[j, 0]
                y1 = xy[j, 1]
                x2 = xy[j + 1, 0]
                y2 = xy[j + 1, 1]
                cr = x1 * y2 - x2 * y1
                ring_a += cr
                ring_x += (x1 + x2) * cr
                ring_y += (y1 + y2) * cr
            else:
                # end of a ring: exterior adds, holes subtract (by absolute area)
                sign = 1.0 if first else -1.0
                if ring_a < 0.0:
                    ring_a = -ring_a
                    ring_x = -ring_x
                    ring_y = -ring_y
                sa += sign * ring_a
                sx += sign * ring_x
                sy += sign * ring_y
                first = False
                ring_a = 0.0
                ring_x = 0.0
                ring_y = 0.0
        if sa != 0.0:
            out[p, 0] = sx / (3.0 * sa)
            out[p, 1] = sy / (3.0 * sa)
        else:
            out[p, 0] = xy[a, 0]
            out[p, 1] = xy[a, 1]


@numba.njit(cache=True, nogil=True)
def _fill_polygons(xy, voff, edge_ok, bbox, polys, vals, ox, oy, scale,
                   r_lo, r_hi, c_lo, c_hi, out):  # pragma: no cover - compiled
    """Scanline even-odd fill of ``polys`` (in this order, later overwrite) into ``out``.

    Pixel-space coordinates: ``u = x * scale - ox - 0.5``, ``v = y * scale - oy - 0.5`` so that
    pixel (r, c) has its centre at (u, v) = (c, r). Only rows [r_lo, r_hi) and columns
    [c_lo, c_hi) are written (tile / region clipping). Per polygon an edge table is built:
    each edge adds its x-crossing to the rows r with min(va, vb) <= r < max(va, vb)
    (half-open), rows are counting-sorted, and the crossings of a row (usually 2) are sorted
    and filled pairwise. Cost ~ edges + rows + pixels per polygon.
    """
    maxv = 4
    for k in range(polys.size):
        p = polys[k]
        nv = voff[p + 1] - voff[p]
        if nv > maxv:
            maxv = nv
    ubuf = np.empty(maxv, np.float64)
    vbuf = np.empty(maxv, np.float64)
    rcount = np.zeros(64, np.int64)
    xs = np.empty(64, np.float64)
    for k in range(polys.size):
        p = polys[k]
        val = vals[k]
        vmin = bbox[p, 1] * scale - oy - 0.5
        vmax = bbox[p, 3] * scale - oy - 0.5
        r0 = max(int(math.ceil(vmin)), r_lo)
        r1 = min(int(math.floor(vmax)), r_hi - 1)
        if r0 > r1:
            continue
        umin = bbox[p, 0] * scale - ox - 0.5
        umax = bbox[p, 2] * scale - ox - 0.5
        if int(math.ceil(umin)) > c_hi - 1 or int(math.floor(umax)) < c_lo:
            continue
        a = voff[p]
        n = voff[p + 1] - a
        for j in range(n):
            ubuf[j] = xy[a + j, 0] * scale - ox - 0.5
            vbuf[j] = xy[a + j, 1] * scale - oy - 0.5
        nrow = r1 - r0 + 1
        if rcount.size < nrow + 1:
            rcount = np.zeros(2 * nrow + 1, np.int64)
        for i in range(nrow + 1):
            rcount[i] = 0
        # pass 1: crossings per row
        total = 0
        for j in range(n - 1):
            if not edge_ok[a + j]:
                continue
            va = vbuf[j]
            vb = vbuf[j + 1]
            lo = min(va, vb)
            hi = max(va, vb)
            ra = max(int(math.ceil(lo)), r0)
            rb = min(int(math.ceil(hi)) - 1, r1)
            for r in range(ra, rb + 1):
                rcount[r - r0 + 1] += 1
                total += 1
        if total == 0:
            continue
        for i in range(nrow):
            rcount[i + 1] += rcount[i]
        if xs.size < total:
            xs = np.empty(2 * total, np.float64)
        # pass 2: place crossings (rcount[i] is the next free slot of row i)
        for j in range(n - 1):
            if not edge_ok[a + j]:
                continue
            va = vbuf[j]
            vb = vbuf[j + 1]
            lo = min(va, vb)
            hi = max(va, vb)
            ra = max(int(math.ceil(lo)), r0)
            rb = min(int(math.ceil(hi)) - 1, r1)
            if ra > rb:
                continue
            ua = ubuf[j]
            slope = (ubuf[j + 1] - ua) / (vb - va)
            for r in range(ra, rb + 1):
                xs[rcount[r - r0]] = ua + (r - va) * slope
                rcount[r - r0] += 1
        # after pass 2, row i spans xs[start_i : rcount[i]], start_i = rcount[i - 1] (0 for i = 0)
        start = 0
        for i in range(nrow):
            end = rcount[i]
            for q in range(start + 1, end):  # insertion sort, usually 2 values
                x = xs[q]
                t = q
                while t > start and xs[t - 1] > x:
                    xs[t] = xs[t - 1]
                    t -= 1
                xs[t] = x
            r = r0 + i
            for q in range(start, end - 1, 2):
                c0 = max(int(math.ceil(xs[q])), c_lo)
                c1 = min(int(math.ceil(xs[q + 1])) - 1, c_hi - 1)
                for c in range(c0, c1 + 1):
                    out[r, c] = val
            start = end


@numba.njit(cache=True, nogil=True)
def _finish_dense(local, n, ids, cls, cf, inst, typ, conf, hv, count, with_hv=True):  # pragma: no cover
    """From a compact label image (0 = background, 1..n) write inst/type/conf and HV maps
    (``hv`` is not touched when ``with_hv`` is False: callers that store no HV maps skip them).

    Works on horizontal runs of equal labels, row by row (streaming, cache-friendly; nuclei
    are runs of ~20-40 px, so per-pixel work is a compare and a few vectorisable stores).
    Pass 1 accumulates per instance the pixel count, coordinate sums and min/max column/row
    (min(dx) = min(c) - cx, so one pass is enough); pass 2 writes every output pixel, zeros
    included, so the outputs may be allocated uninitialised. ``ids``, ``cls``, ``cf`` are
    indexed by label - 1; ``count[k - 1]`` receives the pixel count of label k.
    """
    h, w = local.shape
    sx = np.zeros(n + 1)
    sy = np.zeros(n + 1)
    cnt = np.zeros(n + 1, np.int64)
    cmin = np.full(n + 1, w, np.int64)
    cmax = np.full(n + 1, -1, np.int64)
    rmin = np.full(n + 1, h, np.int64)
    rmax = np.full(n + 1, -1, np.int64)
    for r in range(h):
        c = 0
        while c < w:
            k = local[r, c]
            e = c + 1
            while e < w and local[r, e] == k:
                e += 1
            if k > 0:
                m = e - c
                sx[k] += 0.5 * (c + e - 1) * m
                sy[k] += r * m
                cnt[k] += m
                if c < cmin[k]:
                    cmin[k] = c
                if e - 1 > cmax[k]:
                    cmax[k] = e - 1
                if r < rmin[k]:
                    rmin[k] = r
                rmax[k] = r
            c = e
    cx = np.zeros(n + 1)
    cy = np.zeros(n + 1)
    # per instance: 1 / extent on each side of the centroid (0 when that side is empty)
    ixn = np.zeros(n + 1)
    ixp = np.zeros(n + 1)
    iyn = np.zeros(n + 1)
    iyp = np.zeros(n + 1)
    for k in range(1, n + 1):
        count[k - 1] = cnt[k]
        if cnt[k] == 0:
            continue
        cx[k] = sx[k] / cnt[k]
        cy[k] = sy[k] / cnt[k]
        if cx[k] - cmin[k] > 0.0:
            ixn[k] = 1.0 / (cx[k] - cmin[k])
        if cmax[k] - cx[k] > 0.0:
            ixp[k] = 1.0 / (cmax[k] - cx[k])
        if cy[k] - rmin[k] > 0.0:
            iyn[k] = 1.0 / (cy[k] - rmin[k])
        if rmax[k] - cy[k] > 0.0:
            iyp[k] = 1.0 / (rmax[k] - cy[k])
    for r in range(h):
        c = 0
        while c < w:
            k = local[r, c]
            e = c + 1
            while e < w and local[r, e] == k:
                e += 1
            if k == 0:
                for j in range(c, e):
                    inst[r, j] = 0
                    typ[r, j] = 0
                    conf[r, j] = 0
                if with_hv:
                    for j in range(c, e):
                        hv[0, r, j] = 0.0
                        hv[1, r, j] = 0.0
            else:
                iv = ids[k - 1]
                tv = cls[k - 1]
                fv = cf[k - 1]
                dy = r - cy[k]
                hy = dy * (iyn[k] if dy < 0.0 else iyp[k])
                hy = min(max(hy, -1.0), 1.0)  # guard the last ulp: range exactly [-1, 1]
                x0 = cx[k]
                an = ixn[k]
                ap = ixp[k]
                for j in range(c, e):
                    inst[r, j] = iv
                    typ[r, j] = tv
                    conf[r, j] = fv
                if with_hv:
                    for j in range(c, e):
                        hv[1, r, j] = hy
                        dx = j - x0
                        hx = dx * (an if dx < 0.0 else ap)
                        hv[0, r, j] = min(max(hx, -1.0), 1.0)
            c = e


# --------------------------------------------------------------------------------------
# prepared polygons
# --------------------------------------------------------------------------------------


@dataclass
class PolygonSet:
    """Polygons flattened for the compiled rasteriser (level-0 px), prepared once per slide.

    Attributes
    ----------
    xy
        (V, 2) float64 vertices of all rings of all polygons, concatenated.
    voff
        (P + 1,) int64 offsets: polygon ``p`` owns ``xy[voff[p]:voff[p + 1]]``.
    edge_ok
        (V,) bool: the edge from vertex ``j`` to ``j + 1`` exists (False at ring breaks).
    bbox
        (P, 4) float64 ``minx, miny, maxx, maxy``.
    area
        (P,) float64 polygon area in level-0 px^2.
    centroid
        (P, 2) float64 area centroid ``x, y``.
    ids
        (P,) int32 instance ids written into maps (global, > 0).
    classes
        (P,) uint8 class ids (``stlib.constants``; 255 = unknown class).
    conf
        (P,) uint8 class confidence x 255 (0 for class 255).
    report
        Counts: ``n_input``, ``n_empty``, ``n_repaired``, ``n_degenerate``, ``n_outside``,
        ``n_kept``.
    """

    xy: np.ndarray
    voff: np.ndarray
    edge_ok: np.ndarray
    bbox: np.ndarray
    area: np.ndarray
    centroid: np.ndarray
    ids: np.ndarray
    classes: np.ndarray
    conf: np.ndarray
    report: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids.size)

    def tiny(self, scale: float, min_area_px: float) -> np.ndarray:
        """Bool mask of polygons below ``min_area_px`` (output px^2) at ``scale``."""
        return self.area * (scale * scale) < min_area_px


def _as_geometry_array(polygons: Any) -> np.ndarray:
    if isinstance(polygons, PolygonSet):
        raise TypeError("already a PolygonSet")
    values = getattr(polygons, "values", polygons)  # GeoSeries -> GeometryArray
    arr = np.asarray(values, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"polygons: expected a 1-d array of shapely geometries, got shape {arr.shape}")
    return arr


def _largest_polygon(geom: Any) -> Any:
    """Largest polygonal part of any geometry, or None."""
    if geom is None or shapely.is_empty(geom):
        return None
    if isinstance(geom, shapely.Polygon):
        return geom
    parts = [g for g in shapely.get_parts(geom) if isinstance(g, shapely.Polygon | shapely.MultiPolygon)]
    flat = []
    for g in parts:
        flat.extend(shapely.get_parts(g) if isinstance(g, shapely.MultiPolygon) else [g])
    flat = [g for g in flat if not g.is_empty and g.area > 0]
    if not flat:
        return None
    areas = np.array([g.area for g in flat])
    return flat[int(np.argmax(areas))]  # argmax: first of equal areas, deterministic


def _flatten(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    counts = shapely.get_num_coordinates(geoms).astype(np.int64)
    voff = np.zeros(geoms.size + 1, np.int64)
    np.cumsum(counts, out=voff[1:])
    xy = np.ascontiguousarray(shapely.get_coordinates(geoms), dtype=np.float64)
    edge_ok = np.zeros(xy.shape[0], np.bool_)
    maybe_bad = np.zeros(geoms.size, np.bool_)
    if geoms.size:
        n_rings = shapely.get_num_interior_rings(geoms).astype(np.int64) + 1
        _ring_structure(xy, voff, n_rings, edge_ok, maybe_bad)
    return xy, voff, edge_ok, maybe_bad


def prepare_polygons(
    polygons: Any,
    *,
    ids: Sequence[int] | np.ndarray | None = None,
    classes: Sequence[int] | np.ndarray | int | None = None,
    confidence: Sequence[float] | np.ndarray | float | None = None,
    region: tuple[float, float, float, float] | None = None,
) -> PolygonSet:
    """Validate, repair and flatten nucleus polygons once, for many tiles.

    Parameters
    ----------
    polygons
        Shapely geometries in H&E level-0 px (array, list or ``GeoSeries``).
    ids
        Positive instance ids (unique, < 2**31), default ``position + 1``.
    classes
        Class id per polygon (or one for all); default 255 (unknown class).
    confidence
        Class confidence in [0, 1] per polygon (or one value); default 1. Stored x 255; nuclei
        of class 255 get 0.
    region
        ``(x0, y0, x1, y1)`` imaged region in level-0 px; polygons whose bounding box misses it
        are dropped and counted as ``report["n_outside"]``.

    Returns
    -------
    PolygonSet
        Kept polygons with their ids/classes and a ``report`` of what was dropped or repaired.
    """
    geoms = _as_geometry_array(polygons)
    n = geoms.size
    ids_a, cls_a, conf_a = _polygon_attributes(n, ids, classes, confidence)
    report = {"n_input": int(n), "n_empty": 0, "n_repaired": 0, "n_degenerate": 0, "n_outside": 0}
    geoms, keep = _repair_parts(geoms, report)
    idx = np.flatnonzero(keep)
    sub, idx, xy, voff, edge_ok = _repair_invalid(geoms[idx], idx, report)
    bbox = shapely.bounds(sub).reshape(-1, 4) if sub.size else np.zeros((0, 4))
    area = shapely.area(sub) if sub.size else np.zeros(0)
    nonzero = area > 0
    if not nonzero.all():
        report["n_degenerate"] += int((~nonzero).sum())
    inside = np.ones(sub.size, bool)
    if region is not None:
        x0, y0, x1, y1 = (float(v) for v in region)
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"region: expected (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {region}")
        inside = (bbox[:, 2] >= x0) & (bbox[:, 0] <= x1) & (bbox[:, 3] >= y0) & (bbox[:, 1] <= y1)
        report["n_outside"] = int((~inside & nonzero).sum())
    sel = nonzero & inside
    if not sel.all():
        sub = sub[sel]
        idx = idx[sel]
        xy, voff, edge_ok, _ = _flatten(sub)
        bbox = bbox[sel]
        area = area[sel]
    centroid = np.zeros((sub.size, 2))
    if sub.size:
        _centroids(xy, voff, edge_ok, centroid)
    report["n_kept"] = int(sub.size)
    return PolygonSet(
        xy=xy, voff=voff, edge_ok=edge_ok, bbox=np.ascontiguousarray(bbox, np.float64),
        area=np.asarray(area, np.float64), centroid=centroid,
        ids=ids_a[idx].astype(np.int32), classes=cls_a[idx], conf=conf_a[idx], report=report,
    )


def _polygon_attributes(n: int, ids: Any, classes: Any, confidence: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked ids (int64), classes (uint8) and confidences (uint8, x 255; 0 on class 255) of ``n`` polygons."""
    if ids is None:
        ids_a = np.arange(1, n + 1, dtype=np.int64)
    else:
        ids_a = np.asarray(ids).astype(np.int64, copy=False).ravel()
        if ids_a.size != n:
            raise ValueError(f"ids: {ids_a.size} values for {n} polygons")
        if n and (ids_a.min() <= 0 or ids_a.max() >= 2**31):
            raise ValueError("ids: instance ids must be in [1, 2**31 - 1] (0 is background)")
        if np.unique(ids_a).size != n:
            raise ValueError("ids: instance ids must be unique")
    if classes is None:
        cls_a = np.full(n, IGNORE, np.uint8)
    else:
        c = np.asarray(classes)
        c = np.full(n, int(c), np.int64) if c.ndim == 0 else c.astype(np.int64).ravel()
        if c.size != n:
            raise ValueError(f"classes: {c.size} values for {n} polygons")
        if n and (c.min() < 0 or c.max() > 255):
            raise ValueError("classes: class ids must be in 0..255")
        cls_a = c.astype(np.uint8)
    if confidence is None:
        conf_a = np.full(n, 255, np.uint8)
    else:
        f = np.asarray(confidence, dtype=np.float64)
        f = np.full(n, float(f)) if f.ndim == 0 else f.ravel()
        if f.size != n:
            raise ValueError(f"confidence: {f.size} values for {n} polygons")
        if np.isnan(f).any():
            raise ValueError("confidence: NaN values; use 0 for unknown confidence")
        conf_a = np.rint(np.clip(f, 0.0, 1.0) * 255).astype(np.uint8)
    conf_a[cls_a == IGNORE] = 0
    return ids_a, cls_a, conf_a


def _repair_parts(geoms: np.ndarray, report: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Empty geometries dropped; a non-polygon (MultiPolygon, collection) replaced by its largest
    polygon part. Returns the (copied) geometries and which are kept; counts go to ``report``."""
    n = geoms.size
    missing = np.array([g is None for g in geoms], bool) if n else np.zeros(0, bool)
    empty = missing.copy()
    empty[~missing] = shapely.is_empty(geoms[~missing])
    keep = ~empty
    report["n_empty"] = int(empty.sum())

    geoms = geoms.copy()
    type_id = np.full(n, -1)
    type_id[keep] = shapely.get_type_id(geoms[keep])
    for i in np.flatnonzero(keep & (type_id != 3)):
        g = _largest_polygon(shapely.make_valid(geoms[i]))
        if g is None:
            keep[i] = False
            report["n_degenerate"] += 1
        else:
            geoms[i] = g
            report["n_repaired"] += 1
    return geoms, keep


def _repair_invalid(sub: np.ndarray, idx: np.ndarray, report: dict[str, int]) -> tuple[Any, ...]:
    """Invalid polygons (only those the flattening flags, or with holes, are checked) replaced by
    the largest polygon of ``make_valid``, or dropped. Returns ``sub, idx`` and the flattening
    ``xy, voff, edge_ok`` of what is kept."""
    xy, voff, edge_ok, maybe_bad = _flatten(sub)
    holes = shapely.get_num_interior_rings(sub) > 0 if sub.size else np.zeros(0, bool)
    check = maybe_bad | holes
    if check.any():
        ci = np.flatnonzero(check)
        bad = ci[~shapely.is_valid(sub[ci])]
        if bad.size:
            drop = []
            for j in bad:
                g = _largest_polygon(shapely.make_valid(sub[j]))
                if g is None:
                    drop.append(j)
                    report["n_degenerate"] += 1
                else:
                    sub[j] = g
                    report["n_repaired"] += 1
            if drop:
                mask = np.ones(sub.size, bool)
                mask[drop] = False
                sub = sub[mask]
                idx = idx[mask]
            xy, voff, edge_ok, _ = _flatten(sub)
    return sub, idx, xy, voff, edge_ok


def _ensure_set(polygons: Any, ids: Any = None, classes: Any = None, confidence: Any = None,
                region: Any = None) -> PolygonSet:
    if isinstance(polygons, PolygonSet):
        if ids is not None or classes is not None or confidence is not None:
            raise ValueError("ids/classes/confidence are fixed when the PolygonSet is prepared; "
                             "pass them to prepare_polygons()")
        return polygons
    return prepare_polygons(polygons, ids=ids, classes=classes, confidence=confidence, region=region)


def _draw_order(ps: PolygonSet, overlap: str) -> np.ndarray:
    """Permutation of polygons in drawing order; the last drawn owns a shared pixel."""
    if overlap not in _OVERLAP_RULES:
        raise ValueError(f"overlap: expected one of {_OVERLAP_RULES}, got {overlap!r}")
    n = len(ps)
    pos = np.arange(n)
    if overlap == "last":
        return pos
    if overlap == "first":
        return pos[::-1].copy()
    # largest first, equal areas: later input first so the earlier one is drawn last (wins)
    return np.lexsort((-pos, -ps.area))


# --------------------------------------------------------------------------------------
# per-tile rendering
# --------------------------------------------------------------------------------------


class _Window(NamedTuple):
    r_lo: int
    r_hi: int
    c_lo: int
    c_hi: int


def _region_window(region: tuple[float, float, float, float] | None, ox: float, oy: float,
                   scale: float, shape: tuple[int, int]) -> _Window:
    """Output pixels whose centre lies in the region [x0, x1) x [y0, y1)."""
    h, w = shape
    if region is None:
        return _Window(0, h, 0, w)
    x0, y0, x1, y1 = region
    c_lo = math.ceil(x0 * scale - ox - 0.5)
    c_hi = math.ceil(x1 * scale - ox - 0.5)
    r_lo = math.ceil(y0 * scale - oy - 0.5)
    r_hi = math.ceil(y1 * scale - oy - 0.5)
    clip = lambda v, m: int(min(max(v, 0), m))  # noqa: E731
    return _Window(clip(r_lo, h), clip(r_hi, h), clip(c_lo, w), clip(c_hi, w))


def _pixel_bounds(ps: PolygonSet, sel: np.ndarray, ox: float, oy: float, scale: float) -> np.ndarray:
    """(len(sel), 4) int64 unclipped pixel-centre bounds r0, r1, c0, c1 (inclusive)."""
    b = ps.bbox[sel]
    out = np.empty((sel.size, 4), np.int64)
    out[:, 0] = np.ceil(b[:, 1] * scale - oy - 0.5)
    out[:, 1] = np.floor(b[:, 3] * scale - oy - 0.5)
    out[:, 2] = np.ceil(b[:, 0] * scale - ox - 0.5)
    out[:, 3] = np.floor(b[:, 2] * scale - ox - 0.5)
    return out


def _candidates(ps: PolygonSet, order: np.ndarray, ox: float, oy: float, scale: float,
                shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    pb = _pixel_bounds(ps, order, ox, oy, scale)
    hit = (pb[:, 1] >= 0) & (pb[:, 0] <= h - 1) & (pb[:, 3] >= 0) & (pb[:, 2] <= w - 1)
    hit &= (pb[:, 0] <= pb[:, 1]) & (pb[:, 2] <= pb[:, 3])
    return order[hit]


def _fill_mask(ps: PolygonSet, polys: np.ndarray, ox: float, oy: float, scale: float,
               shape: tuple[int, int], win: _Window | None = None) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    if polys.size:
        win = win or _Window(0, shape[0], 0, shape[1])
        _fill_polygons(ps.xy, ps.voff, ps.edge_ok, ps.bbox, polys.astype(np.int64),
                       np.ones(polys.size, np.uint8), float(ox), float(oy), float(scale),
                       win.r_lo, win.r_hi, win.c_lo, win.c_hi, out)
    return out


@dataclass
class LabelMaps:
    """Dense training targets of one tile (all arrays share ``shape``).

    Attributes
    ----------
    inst
        (H, W) int32 instance ids (global, 0 = background).
    type
        (H, W) uint8 classes (0 background, 1..5, 255 = nucleus of unknown class).
    hv
        (2, H, W) float32 HoVer-Net horizontal (x) and vertical (y) maps in [-1, 1] (None when
        rendered with ``hv=False``).
    ignore
        (H, W) uint8, 1 = pixel counts for no loss (outside tissue / imaged region, excluded
        regions, nuclei too small to be instances).
    conf
        (H, W) uint8 class confidence x 255 (0 on background and on class-255 nuclei).
    ids
        Instance ids present in the tile (at least one pixel).
    clipped_ids
        Ids of present instances whose polygon extends beyond the tile (cut by its border).
    n_tiny
        Polygons in the tile below ``min_area_px`` (sent to ``ignore``).
    """

    inst: np.ndarray
    type: np.ndarray
    hv: np.ndarray | None
    ignore: np.ndarray
    conf: np.ndarray
    ids: np.ndarray
    clipped_ids: np.ndarray
    n_tiny: int = 0

    @property
    def n_nuclei(self) -> int:
        """Number of instances with at least one pixel in the tile."""
        return int(self.ids.size)


def _render(ps: PolygonSet, cand: np.ndarray, tiny_cand: np.ndarray, ox: float, oy: float,
            scale: float, shape: tuple[int, int], win: _Window, *,
            ignore_sets: Sequence[tuple[PolygonSet, np.ndarray]] = (),
            tissue: np.ndarray | None = None, hv: bool = True) -> LabelMaps:
    h, w = shape
    with_hv = hv
    local = np.zeros(shape, np.int32)
    n = cand.size
    if n:
        _fill_polygons(ps.xy, ps.voff, ps.edge_ok, ps.bbox, cand.astype(np.int64),
                       np.arange(1, n + 1, dtype=np.int32), float(ox), float(oy), float(scale),
                       win.r_lo, win.r_hi, win.c_lo, win.c_hi, local)
    inst = np.empty(shape, np.int32)
    typ = np.empty(shape, np.uint8)
    conf = np.empty(shape, np.uint8)
    hv = np.empty((2, h, w) if with_hv else (2, 0, 0), np.float32)
    count = np.zeros(n, np.int64)
    _finish_dense(local, n, ps.ids[cand], ps.classes[cand], ps.conf[cand], inst, typ, conf, hv, count, with_hv)
    if n:
        pb = _pixel_bounds(ps, cand, ox, oy, scale)
        present = count > 0
        cut = (pb[:, 0] < 0) | (pb[:, 1] > h - 1) | (pb[:, 2] < 0) | (pb[:, 3] > w - 1)
        ids = np.sort(ps.ids[cand][present])
        clipped = np.sort(ps.ids[cand][present & cut])
    else:
        ids = np.zeros(0, np.int32)
        clipped = np.zeros(0, np.int32)
    ignore = np.zeros(shape, np.uint8)
    if win != _Window(0, h, 0, w):
        ignore[:] = 1
        ignore[win.r_lo:win.r_hi, win.c_lo:win.c_hi] = 0
    if tiny_cand.size:
        small = _fill_mask(ps, tiny_cand, ox, oy, scale, shape, win)
        cr = np.floor(ps.centroid[tiny_cand, 1] * scale - oy).astype(np.int64)
        cc = np.floor(ps.centroid[tiny_cand, 0] * scale - ox).astype(np.int64)
        ok = (cr >= win.r_lo) & (cr < win.r_hi) & (cc >= win.c_lo) & (cc < win.c_hi)
        small[cr[ok], cc[ok]] = 1
        ignore |= small & (inst == 0)
    for iset, icand in ignore_sets:
        if icand.size:
            ignore |= _fill_mask(iset, icand, ox, oy, scale, shape)
    if tissue is not None:
        ignore |= (~tissue.astype(bool)).astype(np.uint8)
    return LabelMaps(inst=inst, type=typ, hv=hv if with_hv else None, ignore=ignore, conf=conf, ids=ids,
                     clipped_ids=clipped, n_tiny=int(tiny_cand.size))


def _check_geometry(shape: Sequence[int], origin: Sequence[float], scale: float) -> tuple[
        tuple[int, int], float, float]:
    if len(shape) != 2 or int(shape[0]) <= 0 or int(shape[1]) <= 0:
        raise ValueError(f"shape: expected (H, W) with positive sizes, got {tuple(shape)}")
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: must be a positive number (level0_um_per_px / target_um_per_px), got {scale}")
    if len(origin) != 2:
        raise ValueError(f"origin: expected (x0, y0) in level-0 px, got {origin}")
    return (int(shape[0]), int(shape[1])), float(origin[0]) * scale, float(origin[1]) * scale


def rasterize_instances(
    polygons: Any,
    *,
    shape: tuple[int, int],
    origin: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    ids: Sequence[int] | np.ndarray | None = None,
    classes: Sequence[int] | np.ndarray | int | None = None,
    overlap: OverlapRule = "smaller_wins",
    min_area_px: float = MIN_AREA_PX,
    region: tuple[float, float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance and class maps of one tile from nucleus polygons.

    Parameters
    ----------
    polygons
        Shapely polygons in H&E level-0 px, or a :class:`PolygonSet`.
    shape
        ``(H, W)`` of the output tile (target-scale px).
    origin
        Level-0 ``(x0, y0)`` of the tile's top-left corner (see the module's pixel convention).
    scale
        ``level0_um_per_px / target_um_per_px``.
    ids, classes
        As in :func:`prepare_polygons`.
    overlap
        ``"smaller_wins"``, ``"first"`` or ``"last"``: who owns pixels claimed twice.
    min_area_px
        Polygons smaller than this (target px^2) are dropped.
    region
        Imaged region ``(x0, y0, x1, y1)`` (level-0 px); nothing is drawn outside it.

    Returns
    -------
    inst : (H, W) int32
        Global instance ids, 0 = background.
    type : (H, W) uint8
        Class of each nucleus pixel (255 = unknown class), 0 = background.
    """
    lm = label_maps(polygons, shape=shape, origin=origin, scale=scale, ids=ids, classes=classes,
                    overlap=overlap, min_area_px=min_area_px, region=region, _with_extras=False)
    return lm.inst, lm.type


def hv_maps(inst: np.ndarray) -> np.ndarray:
    """HoVer-Net horizontal / vertical distance maps of an instance map.

    For every instance, ``dx = column - centroid_x`` and ``dy = row - centroid_y`` (centroid =
    mean pixel position, not rounded); negative values are divided by ``-min(dx)`` and positive
    ones by ``max(dx)`` of that instance (likewise for y), so each side spans [-1, 0) / (0, 1]
    as in HoVer-Net (Graham et al. 2019). Computed on the map as given: a nucleus cut by the
    tile border gets the maps of its visible part, as the network sees it.

    Parameters
    ----------
    inst
        (H, W) integer instance map, 0 = background; ids need not be contiguous.

    Returns
    -------
    (2, H, W) float32
        Channel 0 = horizontal (x), channel 1 = vertical (y); 0 on background.
    """
    inst = np.asarray(inst)
    if inst.ndim != 2 or not np.issubdtype(inst.dtype, np.integer):
        raise ValueError(f"inst: expected a 2-d integer array, got {inst.dtype} {inst.shape}")
    if inst.size == 0:
        return np.zeros((2, *inst.shape), np.float32)
    if inst.min() < 0:
        raise ValueError("inst: negative instance ids")
    mx = int(inst.max())
    if mx == 0:
        return np.zeros((2, *inst.shape), np.float32)
    if mx <= 4 * inst.size + 1024:
        present = np.bincount(inst.ravel(), minlength=mx + 1) > 0
        present[0] = False
        lut = np.cumsum(present).astype(np.int64)
        lut[0] = 0
        lab = lut[inst]
        n = int(lut[-1])
    else:
        uniq, inv = np.unique(inst, return_inverse=True)
        lab = inv.reshape(inst.shape).astype(np.int64)
        if uniq[0] != 0:
            lab += 1
        n = int(lab.max())
    lab = np.ascontiguousarray(lab)
    h, w = lab.shape
    hv = np.empty((2, h, w), np.float32)
    zeros = np.zeros(n, np.int32)
    _finish_dense(lab, n, zeros, zeros.astype(np.uint8), zeros.astype(np.uint8),
                  np.empty((h, w), np.int32), np.empty((h, w), np.uint8), np.empty((h, w), np.uint8),
                  hv, np.zeros(n, np.int64))
    return hv


def label_maps(
    polygons: Any,
    *,
    shape: tuple[int, int],
    origin: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    classes: Sequence[int] | np.ndarray | int | None = None,
    confidence: Sequence[float] | np.ndarray | float | None = None,
    ids: Sequence[int] | np.ndarray | None = None,
    ignore_polygons: Any = None,
    tissue_mask: np.ndarray | Any = None,
    region: tuple[float, float, float, float] | None = None,
    overlap: OverlapRule = "smaller_wins",
    min_area_px: float = MIN_AREA_PX,
    _with_extras: bool = True,
) -> LabelMaps:
    """All training targets of one tile: instances, classes, HV maps, ignore and confidence.

    Parameters
    ----------
    polygons
        Nucleus polygons in level-0 px, or a :class:`PolygonSet` (then ``ids``, ``classes``,
        ``confidence`` were given to :func:`prepare_polygons`).
    shape, origin, scale
        Output tile ``(H, W)``, its level-0 top-left corner and
        ``level0_um_per_px / target_um_per_px``.
    classes, confidence, ids
        Per polygon, see :func:`prepare_polygons`.
    ignore_polygons
        Excluded regions (level-0 polygons, e.g. failed alignment QC): ``ignore = 1`` inside.
    tissue_mask
        ``(H, W)`` bool array (True = tissue) for this tile, or tissue polygons in level-0
        px; pixels outside tissue get ``ignore = 1``.
    region
        Imaged region ``(x0, y0, x1, y1)`` in level-0 px: outside it nothing is drawn and
        ``ignore = 1``.
    overlap, min_area_px
        Overlap rule and the smallest instance (target px^2); see the module docstring.

    Returns
    -------
    LabelMaps
        ``inst``, ``type``, ``hv``, ``ignore``, ``conf`` plus ``ids`` / ``clipped_ids``.
    """
    shape, ox, oy = _check_geometry(shape, origin, scale)
    ps = _ensure_set(polygons, ids, classes, confidence, region)
    order = _draw_order(ps, overlap)
    tiny = ps.tiny(scale, min_area_px)
    cand = _candidates(ps, order[~tiny[order]], ox, oy, scale, shape)
    win = _region_window(region, ox, oy, scale, shape)
    if not _with_extras:
        return _render(ps, cand, np.zeros(0, np.int64), ox, oy, scale, shape, win)
    tiny_cand = _candidates(ps, np.flatnonzero(tiny), ox, oy, scale, shape)
    ignore_sets = []
    if ignore_polygons is not None:
        iset = ignore_polygons if isinstance(ignore_polygons, PolygonSet) else prepare_polygons(ignore_polygons)
        ignore_sets.append((iset, _candidates(iset, np.arange(len(iset)), ox, oy, scale, shape)))
    tissue = None
    if tissue_mask is not None:
        if isinstance(tissue_mask, np.ndarray) and tissue_mask.dtype != object:
            if tissue_mask.shape != shape:
                raise ValueError(f"tissue_mask: shape {tissue_mask.shape} != tile shape {shape}")
            tissue = tissue_mask.astype(bool)
        else:
            tset = tissue_mask if isinstance(tissue_mask, PolygonSet) else prepare_polygons(
                np.atleast_1d(np.asarray(tissue_mask, dtype=object)))
            tissue = _fill_mask(tset, _candidates(tset, np.arange(len(tset)), ox, oy, scale, shape),
                                ox, oy, scale, shape).astype(bool)
    return _render(ps, cand, tiny_cand, ox, oy, scale, shape, win, ignore_sets=ignore_sets, tissue=tissue)


# --------------------------------------------------------------------------------------
# whole slides
# --------------------------------------------------------------------------------------


class Tile(NamedTuple):
    """One tile of a slide grid: position in target px and its level-0 origin."""

    index: int
    x: int
    y: int
    origin: tuple[float, float]


def tile_grid(width: int, height: int, *, tile_px: int, overlap: int = 0) -> np.ndarray:
    """Top-left corners of a regular tile grid covering a ``width x height`` image.

    Tiles start at 0 with stride ``tile_px - overlap``; the last row / column of tiles may
    extend past the image (the caller pads; :func:`iter_label_tiles` marks it ``ignore``).

    Parameters
    ----------
    width, height
        Image size in pixels (of the grid's resolution).
    tile_px
        Tile side.
    overlap
        Pixels shared by neighbouring tiles (0 <= overlap < tile_px).

    Returns
    -------
    (n, 2) int64
        ``(x, y)`` corners in row-major order (y outer).
    """
    if tile_px <= 0:
        raise ValueError(f"tile_px: must be positive, got {tile_px}")
    if not 0 <= overlap < tile_px:
        raise ValueError(f"overlap: must be in [0, tile_px), got {overlap}")
    if width <= 0 or height <= 0:
        raise ValueError(f"width/height: must be positive, got {width}x{height}")
    stride = tile_px - overlap
    nx = max(1, math.ceil((width - overlap) / stride))
    ny = max(1, math.ceil((height - overlap) / stride))
    ys, xs = np.meshgrid(np.arange(ny, dtype=np.int64) * stride, np.arange(nx, dtype=np.int64) * stride,
                         indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def _bucket(ps: PolygonSet, order: np.ndarray, scale: float, stride: int, tile_px: int,
            nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (starts, entries): polygons reaching each tile, keeping ``order`` within a tile."""
    pb = _pixel_bounds(ps, order, 0.0, 0.0, scale)
    ok = (pb[:, 0] <= pb[:, 1]) & (pb[:, 2] <= pb[:, 3])
    order, pb = order[ok], pb[ok]
    tx0 = np.clip(-((tile_px - 1 - pb[:, 2]) // stride), 0, nx)  # ceil((c0 - T + 1) / s)
    tx1 = np.clip(pb[:, 3] // stride, -1, nx - 1)
    ty0 = np.clip(-((tile_px - 1 - pb[:, 0]) // stride), 0, ny)
    ty1 = np.clip(pb[:, 1] // stride, -1, ny - 1)
    cx = np.maximum(tx1 - tx0 + 1, 0)
    cy = np.maximum(ty1 - ty0 + 1, 0)
    reps = cx * cy
    total = int(reps.sum())
    src = np.repeat(np.arange(order.size), reps)
    first = np.cumsum(reps) - reps
    k = np.arange(total) - np.repeat(first, reps)
    kx = k % np.repeat(np.maximum(cx, 1), reps)
    ky = k // np.repeat(np.maximum(cx, 1), reps)
    key = (ty0[src] + ky) * nx + (tx0[src] + kx)
    srt = np.argsort(key, kind="stable")
    entries = order[src[srt]]
    starts = np.zeros(nx * ny + 1, np.int64)
    np.cumsum(np.bincount(key, minlength=nx * ny), out=starts[1:])
    return starts, entries


class TileRenderer:
    """Label maps of a slide's tile grid, tile by tile and in any order (the engine of
    :func:`iter_label_tiles`; its parameters). Polygons are prepared and bucketed to tiles once;
    :meth:`render` is then one compiled fill + HV pass and may run in several threads at once.
    """

    def __init__(self, polygons: Any, *, width: float, height: float, scale: float, tile_px: int,
                 overlap: int = 0, classes: Sequence[int] | np.ndarray | int | None = None,
                 confidence: Sequence[float] | np.ndarray | float | None = None,
                 ids: Sequence[int] | np.ndarray | None = None, ignore_polygons: Any = None, tissue: Any = None,
                 overlap_rule: OverlapRule = "smaller_wins", min_area_px: float = MIN_AREA_PX,
                 skip_empty: bool = False, known_background: Any = None) -> None:
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: must be positive, got {scale}")
        self.region = (0.0, 0.0, float(width), float(height))
        self.ps = ps = _ensure_set(polygons, ids, classes, confidence, self.region)
        self.scale = float(scale)
        self.skip_empty = bool(skip_empty)
        w_px = math.ceil(width * scale - 1e-9)
        h_px = math.ceil(height * scale - 1e-9)
        self.grid = grid = tile_grid(w_px, h_px, tile_px=tile_px, overlap=overlap)
        stride = tile_px - overlap
        nx = int(grid[:, 0].max() // stride + 1)
        ny = int(grid[:, 1].max() // stride + 1)
        order = _draw_order(ps, overlap_rule)
        tiny = ps.tiny(scale, min_area_px)
        self._main = _bucket(ps, order[~tiny[order]], scale, stride, tile_px, nx, ny)
        self._tiny = _bucket(ps, np.flatnonzero(tiny), scale, stride, tile_px, nx, ny)
        self._extra = []
        for geoms in (ignore_polygons, tissue):
            if geoms is None:
                self._extra.append(None)
                continue
            s = geoms if isinstance(geoms, PolygonSet) else prepare_polygons(
                np.atleast_1d(np.asarray(geoms, dtype=object)))
            self._extra.append((s, *_bucket(s, np.arange(len(s)), scale, stride, tile_px, nx, ny)))
        # where background is known (:func:`known_background_region`); None: everywhere
        self._known = None
        if known_background is not None:
            s = known_background if isinstance(known_background, PolygonSet) else prepare_polygons(
                np.atleast_1d(np.asarray(known_background, dtype=object)))
            self._known = (s, *_bucket(s, np.arange(len(s)), scale, stride, tile_px, nx, ny))
            # tiles whose whole area lies inside the known region: one vectorised shapely test here
            # instead of a fill of the region's polygon, with all its vertices, in every tile (most
            # tiles of a slide are far from the region's edge); same maps
            self._known_inside = np.zeros(len(grid), bool)
            if not isinstance(known_background, PolygonSet):
                known_all = shapely.union_all(np.atleast_1d(np.asarray(known_background, dtype=object)))
                shapely.prepare(known_all)
                x0, y0 = grid[:, 0] - 1.0, grid[:, 1] - 1.0  # one target px beyond the tile
                x1, y1 = grid[:, 0] + tile_px + 1.0, grid[:, 1] + tile_px + 1.0
                boxes = shapely.box(x0 / self.scale, y0 / self.scale, x1 / self.scale, y1 / self.scale)
                self._known_inside[:] = shapely.contains_properly(known_all, boxes)
        self.shape = (int(tile_px), int(tile_px))

    def __len__(self) -> int:
        return len(self.grid)

    def tile(self, i: int) -> Tile:
        """Grid position ``i`` as a :class:`Tile` (target px and level-0 origin)."""
        x, y = (int(v) for v in self.grid[i])
        return Tile(i, x, y, (x / self.scale, y / self.scale))

    def unknown_background(self, i: int) -> np.ndarray | None:
        """(H, W) bool of tile ``i``: pixels outside ``known_background`` (None without it), where a
        pixel that no nucleus covers is not known to be background (callers make it ``ignore``)."""
        if self._known is None or self._known_inside[i]:
            return None
        x, y = self.grid[i]
        s, st, en = self._known
        return ~_fill_mask(s, en[st[i]:st[i + 1]], float(x), float(y), self.scale, self.shape).astype(bool)

    def render(self, i: int, *, hv: bool = True) -> LabelMaps | None:
        """Label maps of tile ``i`` (None for an empty tile when ``skip_empty``); ``hv=False``
        skips the HV maps (``LabelMaps.hv`` is None), for callers that do not store them."""
        x, y = self.grid[i]
        ox, oy = float(x), float(y)
        st_main, en_main = self._main
        st_tiny, en_tiny = self._tiny
        cand = en_main[st_main[i]:st_main[i + 1]]
        if self.skip_empty and cand.size == 0:
            return None
        win = _region_window(self.region, ox, oy, self.scale, self.shape)
        ignore_sets = []
        if self._extra[0] is not None:
            s, st, en = self._extra[0]
            ignore_sets.append((s, en[st[i]:st[i + 1]]))
        tissue_arr = None
        if self._extra[1] is not None:
            s, st, en = self._extra[1]
            tissue_arr = _fill_mask(s, en[st[i]:st[i + 1]], ox, oy, self.scale, self.shape).astype(bool)
        lm = _render(self.ps, cand, en_tiny[st_tiny[i]:st_tiny[i + 1]], ox, oy, self.scale, self.shape, win,
                     ignore_sets=ignore_sets, tissue=tissue_arr, hv=hv)
        if self.skip_empty and lm.n_nuclei == 0:
            return None
        return lm


def iter_label_tiles(
    polygons: Any,
    *,
    width: float,
    height: float,
    scale: float,
    tile_px: int,
    overlap: int = 0,
    classes: Sequence[int] | np.ndarray | int | None = None,
    confidence: Sequence[float] | np.ndarray | float | None = None,
    ids: Sequence[int] | np.ndarray | None = None,
    ignore_polygons: Any = None,
    tissue: Any = None,
    overlap_rule: OverlapRule = "smaller_wins",
    min_area_px: float = MIN_AREA_PX,
    skip_empty: bool = False,
    n_workers: int = 1,
) -> Iterator[tuple[Tile, LabelMaps]]:
    """Label maps of a whole slide, tile by tile (the slide is never held in memory).

    Polygons are prepared once and bucketed to tiles with one vectorised pass; each tile is
    then one compiled fill + one compiled HV pass.

    Parameters
    ----------
    polygons
        Nucleus polygons (level-0 px) or a :class:`PolygonSet` prepared with
        ``region=(0, 0, width, height)``.
    width, height
        Slide size in level-0 px: the imaged region. Cells outside are dropped and counted
        (``PolygonSet.report``); tile pixels outside are ``ignore = 1``.
    scale
        ``level0_um_per_px / target_um_per_px``.
    tile_px, overlap
        Output tile side and overlap (target px), see :func:`tile_grid`.
    classes, confidence, ids
        Per polygon, see :func:`prepare_polygons`.
    ignore_polygons, tissue
        Excluded regions / tissue polygons in level-0 px (``ignore = 1`` inside / outside).
    overlap_rule, min_area_px
        See :func:`label_maps`.
    skip_empty
        Do not yield tiles without any nucleus pixel.
    n_workers
        Threads rendering tiles concurrently (the compiled kernels release the GIL); tiles
        are still yielded in grid order and at most ``2 * n_workers`` are held in memory.

    Yields
    ------
    (Tile, LabelMaps)
    """
    renderer = TileRenderer(polygons, width=width, height=height, scale=scale, tile_px=tile_px, overlap=overlap,
                            classes=classes, confidence=confidence, ids=ids, ignore_polygons=ignore_polygons,
                            tissue=tissue, overlap_rule=overlap_rule, min_area_px=min_area_px,
                            skip_empty=skip_empty)
    n = len(renderer)
    if n_workers <= 1:
        for i in range(n):
            lm = renderer.render(i)
            if lm is not None:
                yield renderer.tile(i), lm
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=int(n_workers), thread_name_prefix="stlib-labels") as pool:
        pending: deque = deque()
        nxt = 0
        while nxt < n or pending:
            while nxt < n and len(pending) < 2 * n_workers:
                pending.append((nxt, pool.submit(renderer.render, nxt)))
                nxt += 1
            i, fut = pending.popleft()
            lm = fut.result()
            if lm is not None:
                yield renderer.tile(i), lm


# --------------------------------------------------------------------------------------
# the Xenium-imaged region
# --------------------------------------------------------------------------------------


#: cone slope of :func:`_edge_gaps`: a molecule at depth t (µm, inward from the image edge) bounds the
#: Xenium region's edge at a distance s along the image edge to depth t + EDGE_SLOPE * |s|. A region
#: edge (straight over tens of µm) crosses the image edge at the angle between them; the demo's is up
#: to ~4 degrees (true rotation 3, registration error 1; tan ~ 0.07). EDGE_SLOPE and EDGE_PAD_UM were
#: chosen on DEV_SEEDS 101-108 (``stlib robustness --edge-grid``, benchmarks/label_edge_dev.json) as
#: the setting that keeps the most labelled nuclei with no true outside-region nucleus overlapping the
#: region (slopes 0.05 / 0.1 / 0.2 x pads 0 / 0.5 / 1 µm; 0.05 with pad 0 left one)
EDGE_SLOPE: float = 0.1
#: how far beyond the image edge (µm) the envelope must reach for the edge to count as covered (room
#: for nuclei centred just beyond the image and for the affine-only image outline's error)
EDGE_PAD_UM: float = 0.0


def coverage_region(x_um: Any, y_um: Any, *, bin_um: float = 4.0, close_um: float = 16.0,
                    margin_um: float = 10.0, min_count: int = 1, extent: Any = None,
                    edge_slope: float | None = EDGE_SLOPE, edge_pad_um: float = EDGE_PAD_UM) -> Any:
    """The region where Xenium imaged and transcripts fall, shrunk by a safety margin (µm).

    The H&E section usually extends beyond the Xenium region, and inside it there are stretches
    without any decoded molecule; there the label maps know nothing, so those pixels must be
    *ignore*, never background (an H&E nucleus there is a nucleus nobody labelled).

    Molecules are binned on a ``bin_um`` grid; bins with at least ``min_count`` molecules are
    covered; gaps up to ``close_um`` (lumina, a fat cell, a fold) are closed; then the region is
    shrunk so that every kept bin lies at least ``margin_um`` plus one and a half bins inside it:
    a covered bin can reach a bin beyond the last molecule, and a nucleus centred just outside
    the region can reach ``margin_um`` into it (the largest nuclei have ~8-10 µm semi-axes).

    With ``extent`` (the H&E image as a polygon in the same µm), the area beyond the image counts as
    covered (nothing there can be mislabelled, and a small field is not trimmed along every edge),
    except where the molecules stop short of the image edge: a Xenium region that ends a bin or less
    inside the image leaves no empty bin, so the strip between its last molecules and the image edge
    is found at sub-bin resolution by :func:`_edge_gaps` and the region is kept ``margin_um`` away
    from it as from any other uncovered area.

    Parameters
    ----------
    x_um, y_um
        Molecule coordinates (Xenium µm; any molecule, genes or controls, counts as imaged).
    bin_um, close_um, margin_um, min_count
        See above.
    extent
        The H&E image (shapely polygon, µm), or None (no image edge).
    edge_slope, edge_pad_um
        Of :func:`_edge_gaps` (chosen on the development cohorts, see :data:`EDGE_SLOPE`); ``edge_slope=None``
        skips that step (the region before the fix, kept for the comparison in :mod:`stlib.robustness`).

    Returns
    -------
    shapely (Multi)Polygon in µm (empty when no molecule is given). Binary-image work is
    done with scipy.ndimage; the covered bins become polygons as one box per run of bins in a
    row, merged with ``shapely.coverage_union_all`` (no raster-to-vector library needed).
    """
    from scipy import ndimage as ndi

    x = np.asarray(x_um, dtype=np.float64).ravel()
    y = np.asarray(y_um, dtype=np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if bin_um <= 0 or margin_um < 0 or close_um < 0:
        raise ValueError("bin_um must be > 0, close_um and margin_um >= 0")
    if x.size == 0:
        return shapely.Polygon()
    pad = int(math.ceil((close_um + margin_um) / bin_um)) + 3
    x0 = math.floor(x.min() / bin_um) * bin_um - pad * bin_um
    y0 = math.floor(y.min() / bin_um) * bin_um - pad * bin_um
    nx = int(math.ceil((x.max() - x0) / bin_um)) + pad + 1
    ny = int(math.ceil((y.max() - y0) / bin_um)) + pad + 1
    if extent is not None:  # grow the grid to the image, so its border is inside the grid
        ex0, ey0, ex1, ey1 = shapely.bounds(extent)
        if np.isfinite(ex0):
            gx0 = math.floor(min(x.min(), ex0) / bin_um) * bin_um - pad * bin_um
            gy0 = math.floor(min(y.min(), ey0) / bin_um) * bin_um - pad * bin_um
            nx = int(math.ceil((max(x.max(), ex1) - gx0) / bin_um)) + pad + 1
            ny = int(math.ceil((max(y.max(), ey1) - gy0) / bin_um)) + pad + 1
            x0, y0 = gx0, gy0
    ix = np.clip(((x - x0) / bin_um).astype(np.int64), 0, nx - 1)
    iy = np.clip(((y - y0) / bin_um).astype(np.int64), 0, ny - 1)
    counts = np.bincount(iy * nx + ix, minlength=nx * ny).reshape(ny, nx)
    cov = counts >= min_count
    r = int(round(close_um / bin_um))
    if r > 0:
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        disk = (xx ** 2 + yy ** 2) <= r * r
        cov = ndi.binary_closing(np.pad(cov, r + 1), structure=disk)[r + 1:-(r + 1), r + 1:-(r + 1)]
    if extent is not None:  # beyond the image there is nothing to mislabel: count it as covered
        # (after the closing, which must not bridge a gap between the region and the image border)
        cy, cx = np.mgrid[0:ny, 0:nx]
        beyond = ~shapely.contains_xy(extent, x0 + (cx.ravel() + 0.5) * bin_um, y0 + (cy.ravel() + 0.5) * bin_um)
        beyond = beyond.reshape(ny, nx)
        cov |= beyond
    # a kept bin at centre distance d (bins) from the nearest empty bin starts d - 0.5 bins from it;
    # the region's edge lies at most 1.5 bins inside that empty bin's centre (the outermost covered
    # bin may hold a single molecule at its far side): d >= 2 + margin keeps margin_um clear
    keep = ndi.distance_transform_edt(cov) >= 2.0 + margin_um / bin_um
    if extent is not None:
        keep &= ~beyond
    if not keep.any():
        return shapely.Polygon()
    boxes = []
    for row in range(ny):
        v = np.flatnonzero(np.diff(np.r_[0, keep[row].astype(np.int8), 0]))
        for a, b in zip(v[::2], v[1::2]):
            boxes.append(shapely.box(x0 + a * bin_um, y0 + row * bin_um, x0 + b * bin_um, y0 + (row + 1) * bin_um))
    region = shapely.coverage_union_all(np.array(boxes, dtype=object))
    if edge_slope is not None and extent is not None and np.isfinite(shapely.bounds(extent)[0]):
        gaps = _edge_gaps(x, y, extent, depth_um=close_um + margin_um + 2 * bin_um, slope=edge_slope,
                          pad_um=edge_pad_um)
        if not gaps.is_empty:
            region = shapely.difference(region, shapely.buffer(gaps, margin_um, quad_segs=4))
    return region


def _edge_gaps(x: np.ndarray, y: np.ndarray, extent: Any, *, depth_um: float, slope: float = EDGE_SLOPE,
               pad_um: float = EDGE_PAD_UM, step_um: float = 0.5) -> Any:
    """Strips along the image edge where the molecules stop short of it (µm polygons, maybe empty).

    For each side of ``extent``, molecules are put in edge coordinates (``s`` along the side, ``t``
    inward depth). Every molecule lies inside the Xenium region, and the region's edge is straight
    at the scale of a nucleus, so at position ``s`` the region reaches at least to depth
    ``G(s) = min_i (t_i + slope * |s - s_i|)`` (a lower envelope of cones, computed on a ``step_um``
    grid with the two-pass chamfer sweep; capped at ``depth_um``, where the bins take over). Where
    ``G(s) > -pad_um``, nuclei outside the region may be centred between ``-pad_um`` and ``G(s)``:
    that strip is returned. Written by hand: a 1-D lower envelope is a few lines of numpy, and no
    geometry library offers it.
    """
    ring = np.asarray(shapely.get_coordinates(shapely.get_exterior_ring(extent)), dtype=np.float64)
    cx, cy = np.asarray(shapely.get_coordinates(shapely.centroid(extent)), dtype=np.float64)[0]
    core = shapely.buffer(extent, -depth_um)  # molecules deeper than depth_um bound no edge's strip
    if not core.is_empty:
        band = ~shapely.contains_xy(core, x, y)
        x, y = x[band], y[band]
    reach = depth_um / max(slope, 1e-6)
    strips = []
    for (ax, ay), (bx, by) in zip(ring[:-1], ring[1:]):
        length = math.hypot(bx - ax, by - ay)
        if length <= 0:
            continue
        ux, uy = (bx - ax) / length, (by - ay) / length
        nx, ny = -uy, ux
        if (cx - ax) * nx + (cy - ay) * ny < 0:  # inward normal
            nx, ny = -nx, -ny
        s = (x - ax) * ux + (y - ay) * uy
        t = (x - ax) * nx + (y - ay) * ny
        near = (t < depth_um) & (s > -reach) & (s < length + reach)
        grid = np.arange(0.0, length + step_um, step_um)
        g = np.full(grid.size, float(depth_um))
        inside = near & (s >= 0) & (s <= length)
        np.minimum.at(g, np.clip(np.rint(s[inside] / step_um).astype(np.int64), 0, grid.size - 1), t[inside])
        before, after = near & (s < 0), near & (s > length)  # molecules beyond the side's ends bound it too
        if before.any():
            g[0] = min(g[0], float(np.min(t[before] - slope * s[before])))
        if after.any():
            g[-1] = min(g[-1], float(np.min(t[after] + slope * (s[after] - length))))
        k = slope * step_um
        for j in range(1, g.size):  # chamfer sweep: G(s) = min_i (t_i + slope |s - s_i|)
            g[j] = min(g[j], g[j - 1] + k)
        for j in range(g.size - 2, -1, -1):
            g[j] = min(g[j], g[j + 1] + k)
        open_ = g > -pad_um
        if not open_.any():
            continue
        edges = np.flatnonzero(np.diff(np.r_[0, open_.astype(np.int8), 0]))
        for j0, j1 in zip(edges[::2], edges[1::2]):  # one polygon per run of open grid points
            sj = np.clip(grid[j0:j1], 0.0, length)
            tj = g[j0:j1] + k / 2  # the envelope may rise k / 2 between grid points
            a, b = max(grid[j0] - step_um / 2, 0.0), min(grid[j1 - 1] + step_um / 2, length)
            s_ = np.r_[a, b, b, sj[::-1], a]  # along the edge beyond it, back along the envelope
            t_ = np.r_[-pad_um, -pad_um, tj[-1], tj[::-1], tj[0]]
            strips.append(shapely.Polygon(np.stack([ax + s_ * ux + t_ * nx, ay + s_ * uy + t_ * ny], 1)))
    return shapely.union_all(np.array(strips, dtype=object)) if strips else shapely.Polygon()


def known_background_region(region: Any, width: float, height: float, border: float) -> np.ndarray | None:
    """Where a pixel that no ST nucleus covers is known to be background: the imaged region (within the
    image) shrunk by ``border`` (level-0 px).

    The Xenium region (:func:`coverage_region`, mapped to the H&E) keeps a margin from the area Xenium
    did not image, but a nucleus that has no ST outline because its centre lies outside the region
    still reaches into it by up to its largest semi-axis: where the region's edge lies just beyond the
    H&E image edge (the region then runs up to the image edge), a nucleus centred beyond both is cut
    by the image edge and its visible part lies in the region; elsewhere the margin may be eaten by
    the alignment error. The part inside was taught as background. Within ``border`` of the region's
    edge (the image edge included: nobody knows what lies beyond it) only ST nuclei teach (they were
    imaged, so they keep their labels); every other pixel there is not known and becomes ``ignore``
    (:meth:`TileRenderer.unknown_background`).

    Parameters
    ----------
    region
        The imaged region's polygons (level-0 px; ``coverage.parquet``), or None (no region known).
    width, height
        The H&E image (level-0 px).
    border
        Width of the strip (level-0 px); <= 0 turns the step off.

    Returns
    -------
    Object array of polygons (level-0 px), or None (step off, or no region known: nothing changes).
    """
    if region is None or not border > 0:
        return None
    geoms = np.atleast_1d(np.asarray(region, dtype=object))
    R = shapely.union_all(geoms) if len(geoms) else shapely.Polygon()
    R = shapely.intersection(R, shapely.box(0.0, 0.0, float(width), float(height)))
    known = shapely.buffer(R, -float(border), quad_segs=8) if not R.is_empty else R
    parts = shapely.get_parts(known) if not known.is_empty else np.array([], object)
    if len(parts) == 0:  # nothing known: a region point far outside every tile
        return np.array([shapely.box(-2.0, -2.0, -1.0, -1.0)], dtype=object)
    return np.asarray(parts, dtype=object)
