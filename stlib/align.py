"""Put Xenium nuclei on H&E pixels, score the registration and refine it.

The map every later stage uses is **Xenium µm -> H&E level-0 px**: a 3x3 affine acting on
``[x_um, y_um, 1]`` plus an optional smooth displacement grid (H&E px, defined over Xenium µm,
interpolated bilinearly). :class:`Transform` holds it.

Where the first guess comes from (``route``):

- ``"hest"``: HEST-1k transcripts carry both ``x_location, y_location`` (µm) and ``he_x, he_y``
  (H&E px through HEST's registration); :func:`fit_hest_registration` recovers that affine by
  robust least squares.
- ``"xenium-csv"``: a raw Xenium bundle's ``{id}_he_imagealignment.csv`` (H&E px -> morphology
  px, matrix or keypoints form, parsed by :func:`stlib.io.xenium.read_he_alignment`);
  :func:`xenium_alignment_um_to_he_px` turns it into the µm -> H&E px map.

How it is scored and refined (:func:`align_nuclei`): the haematoxylin channel of the H&E
(colour deconvolution, :func:`haematoxylin_image`) is compared at a working resolution
(``work_um_per_px``) with the rasterised nucleus mask (:func:`rasterize_polygons`). Per tile,
the Pearson correlation and the Dice of an Otsu-thresholded haematoxylin mask score the
overlap; a phase correlation between the haematoxylin tile and the blurred mask tile measures
the local residual shift. The refinement fits (1) an affine correction to the tile shifts by
robust least squares, coarse to fine, then (2) a smooth displacement grid where the residual
field is smooth (neighbour-median outlier rejection + normalised Gaussian smoothing). Tiles
whose residual stays above ``max_residual_um`` after refinement, or whose score stays very low,
are returned as excluded regions (boxes in H&E px) for the label and tile stages.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stlib.config import AlignConfig, with_options
from stlib.constants import TARGET_UM_PER_PX_40X, XENIUM_PIXEL_SIZE_UM
from stlib.utils import InputError, cache_key, file_fingerprint, keep_freed_memory, read_json, write_json

__all__ = [
    "AlignConfig",
    "AlignmentFailedError",
    "AlignmentResult",
    "Transform",
    "WorkGrid",
    "affine_from_points",
    "align_nuclei",
    "align_and_save",
    "alignment_key",
    "align_sample",
    "overlay_crop",
    "alignment_error_um",
    "alignment_evidence",
    "alignment_verdict",
    "apply_affine",
    "check_alignment",
    "cli_main",
    "compose",
    "fit_hest_registration",
    "haematoxylin_image",
    "haematoxylin_od",
    "in_excluded_region",
    "load_alignment",
    "nuclei_mask_dice",
    "rasterize_polygons",
    "robust_affine_from_points",
    "transform_nuclei",
    "truth_comparison",
    "xenium_alignment_um_to_he_px",
]

#: version of the alignment algorithm; part of the idempotence key of alignment.json
ALIGN_VERSION = "1"


# =====================================================================================
# Affine transforms
# =====================================================================================

def _as_affine(M: Any, name: str = "M") -> np.ndarray:
    A = np.asarray(M, dtype=float)
    if A.shape == (2, 3):
        A = np.vstack([A, [0.0, 0.0, 1.0]])
    if A.shape != (3, 3):
        raise ValueError(f"{name} must be a 3x3 (or 2x3) affine matrix, got shape {A.shape}")
    if not np.all(np.isfinite(A)):
        raise ValueError(f"{name} has non-finite entries")
    return A


def _as_points(xy: Any, name: str) -> np.ndarray:
    P = np.asarray(xy, dtype=float)
    if P.ndim == 1 and P.size == 2:
        P = P[None, :]
    if P.ndim != 2 or P.shape[1] != 2:
        raise ValueError(f"{name} must be an (N, 2) array of x, y; got shape {P.shape}")
    return P


def apply_affine(M: Any, xy: Any) -> np.ndarray:
    """Apply a 3x3 affine to points.

    Parameters
    ----------
    M
        (3, 3) matrix acting on column vectors ``[x, y, 1]``.
    xy
        (N, 2) points ``x, y``.

    Returns
    -------
    numpy.ndarray
        (N, 2) mapped points.
    """
    A = _as_affine(M)
    P = _as_points(xy, "xy")
    return P @ A[:2, :2].T + A[:2, 2]


def compose(*mats: Any) -> np.ndarray:
    """Matrix product of affines in mathematical order.

    ``compose(A, B)`` is ``A @ B``: the map that applies ``B`` first, then ``A``
    (so ``compose(he_from_um, um_from_px)`` maps px -> µm -> H&E px).
    """
    if not mats:
        raise ValueError("compose needs at least one matrix")
    out = np.eye(3)
    for i, m in enumerate(mats):
        out = out @ _as_affine(m, f"mats[{i}]")
    return out


def affine_from_points(src: Any, dst: Any, *, weights: Any | None = None) -> np.ndarray:
    """Least-squares affine mapping ``src`` onto ``dst``.

    Minimises ``sum_i w_i |A [src_i, 1] - dst_i|^2`` over the six affine parameters.

    Parameters
    ----------
    src, dst
        (N, 2) corresponding points, N >= 3 and not collinear.
    weights
        Optional (N,) non-negative weights.

    Returns
    -------
    numpy.ndarray
        (3, 3) affine with last row ``[0, 0, 1]``.
    """
    S = _as_points(src, "src")
    D = _as_points(dst, "dst")
    if S.shape != D.shape:
        raise ValueError(f"src and dst must have the same shape, got {S.shape} and {D.shape}")
    w = np.ones(len(S)) if weights is None else np.asarray(weights, dtype=float).ravel()
    if w.shape != (len(S),) or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("weights must be (N,) finite and non-negative")
    keep = w > 0
    if keep.sum() < 3:
        raise ValueError(f"need at least 3 points with positive weight, got {int(keep.sum())}")
    S, D, w = S[keep], D[keep], w[keep]
    # centre for conditioning
    cs = np.average(S, axis=0, weights=w)
    cd = np.average(D, axis=0, weights=w)
    X = np.column_stack([S - cs, np.ones(len(S))])
    sw = np.sqrt(w)[:, None]
    sol, _, rank, _ = np.linalg.lstsq(X * sw, (D - cd) * sw, rcond=None)
    if rank < 3:
        raise ValueError("points are collinear (or coincide): an affine is not determined")
    L = sol[:2].T  # 2x2
    t = sol[2] + cd - L @ cs
    return np.array([[L[0, 0], L[0, 1], t[0]], [L[1, 0], L[1, 1], t[1]], [0.0, 0.0, 1.0]])


def robust_affine_from_points(src: Any, dst: Any, *, weights: Any | None = None,
                              n_iter: int = 20, tukey_c: float = 4.685,
                              min_scale: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Affine fit that ignores outliers (iteratively reweighted least squares, Tukey biweight).

    The residual scale is re-estimated each iteration as 1.4826 x the weighted median
    absolute residual (floored at ``min_scale``); a point whose residual exceeds
    ``tukey_c`` scales gets weight 0.

    Returns
    -------
    (M, w)
        The (3, 3) affine and the final robust weights (0 = outlier), times ``weights``.
    """
    S = _as_points(src, "src")
    D = _as_points(dst, "dst")
    w0 = np.ones(len(S)) if weights is None else np.asarray(weights, dtype=float).ravel()
    M = affine_from_points(S, D, weights=w0)
    w = w0.copy()
    for _ in range(int(n_iter)):
        r = np.linalg.norm(apply_affine(M, S) - D, axis=1)
        pos = w0 > 0
        scale = max(1.4826 * float(np.median(r[pos])), float(min_scale))
        u = r / (tukey_c * scale)
        w_new = w0 * np.where(u < 1.0, (1.0 - u**2) ** 2, 0.0)
        if (w_new > 0).sum() < 3:
            break
        M_new = affine_from_points(S, D, weights=w_new)
        done = np.allclose(M_new, M, atol=1e-10, rtol=1e-9)
        M, w = M_new, w_new
        if done:
            break
    return M, w


def px_per_um(M: Any) -> float:
    """Isotropic scale of an affine (sqrt of |det| of its linear part)."""
    A = _as_affine(M)
    return float(math.sqrt(abs(np.linalg.det(A[:2, :2]))))


def fit_hest_registration(transcripts: Any, *, max_points: int = 200_000,
                          sample: str | None = None) -> np.ndarray:
    """The Xenium µm -> H&E px affine implied by HEST's transcript table.

    Fits ``(he_x, he_y) ~ A @ (x_location, y_location, 1)`` by robust least squares
    (:func:`robust_affine_from_points`) on at most ``max_points`` rows (a deterministic,
    evenly spaced subset).

    Parameters
    ----------
    transcripts
        DataFrame with columns ``x_location, y_location`` (µm) and ``he_x, he_y`` (H&E px).
    max_points
        Rows used for the fit.
    sample
        Sample id, named in errors.

    Returns
    -------
    numpy.ndarray
        (3, 3) affine, row-major, acting on ``[x_um, y_um, 1]``.
    """
    need = ("x_location", "y_location", "he_x", "he_y")
    missing = [c for c in need if c not in transcripts.columns]
    if missing:
        raise InputError(f"transcripts lack column(s) {missing}", sample=sample,
                         fix="use HEST-1k transcripts (they carry he_x/he_y) or pass --xenium-dir for the CSV route")
    arr = np.column_stack([np.asarray(transcripts[c], dtype=float) for c in need])
    arr = arr[np.all(np.isfinite(arr), axis=1)]
    if len(arr) < 3:
        raise InputError(f"only {len(arr)} transcripts with finite coordinates; cannot fit the registration",
                         sample=sample, fix="check the transcripts parquet")
    if len(arr) > max_points:
        idx = np.linspace(0, len(arr) - 1, int(max_points)).round().astype(int)
        arr = arr[idx]
    try:
        M, _ = robust_affine_from_points(arr[:, :2], arr[:, 2:], min_scale=1e-3)
    except ValueError as e:
        raise InputError(f"cannot fit HEST's registration: {e}", sample=sample,
                         fix="check x_location/y_location and he_x/he_y") from e
    return M


def xenium_alignment_um_to_he_px(csv_path: str | Path, *,
                                 pixel_size_um: float = XENIUM_PIXEL_SIZE_UM,
                                 sample: str | None = None) -> np.ndarray:
    """Xenium µm -> H&E px map from a bundle's ``*_he_imagealignment.csv``.

    The CSV (matrix or keypoints form, parsed by :func:`stlib.io.xenium.read_he_alignment`)
    gives ``A``: H&E level-0 px -> morphology px. Then
    ``H&E px = inv(A) @ diag(1/pixel_size_um, 1/pixel_size_um, 1) @ [x_um, y_um, 1]``.
    """
    from stlib.io.xenium import read_he_alignment

    A = _as_affine(read_he_alignment(csv_path, pixel_size_um=pixel_size_um, sample=sample), "image alignment")
    if abs(np.linalg.det(A[:2, :2])) < 1e-12:
        raise InputError("image alignment matrix is singular", path=csv_path, sample=sample,
                         fix="re-export the H&E alignment from Xenium Explorer")
    S = np.diag([1.0 / pixel_size_um, 1.0 / pixel_size_um, 1.0])
    return compose(np.linalg.inv(A), S)


# =====================================================================================
# Transform: affine + bilinear displacement grid
# =====================================================================================

def _bilinear(gx: np.ndarray, gy: np.ndarray, values: np.ndarray,
              x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``values[iy, ix]`` on the rectilinear grid; clamped outside."""
    def axis(g: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(g) == 1:
            return np.zeros(v.shape, dtype=int), np.zeros(v.shape)
        vc = np.clip(v, g[0], g[-1])
        i = np.clip(np.searchsorted(g, vc, side="right") - 1, 0, len(g) - 2)
        t = (vc - g[i]) / (g[i + 1] - g[i])
        return i, t

    ix, tx = axis(gx, x)
    iy, ty = axis(gy, y)
    ix1 = np.minimum(ix + 1, len(gx) - 1)
    iy1 = np.minimum(iy + 1, len(gy) - 1)
    v00 = values[iy, ix]
    v01 = values[iy, ix1]
    v10 = values[iy1, ix]
    v11 = values[iy1, ix1]
    return (v00 * (1 - tx) * (1 - ty) + v01 * tx * (1 - ty) + v10 * (1 - tx) * ty + v11 * tx * ty)


@dataclass(frozen=True)
class Transform:
    """Xenium µm -> H&E level-0 px: an affine plus an optional bilinear displacement grid.

    ``px = affine @ [x_um, y_um, 1] + (dx(x_um, y_um), dy(x_um, y_um))`` where ``dx, dy``
    (H&E px) are interpolated bilinearly on the grid ``x_um`` x ``y_um`` (values indexed
    ``[iy][ix]``) and held constant beyond its edges.

    Parameters
    ----------
    affine
        (3, 3) row-major matrix acting on ``[x_um, y_um, 1]``.
    x_um, y_um
        Increasing grid coordinates (µm), or ``None`` for a pure affine.
    dx_px, dy_px
        (len(y_um), len(x_um)) displacements in H&E px.
    """

    affine: np.ndarray
    x_um: np.ndarray | None = None
    y_um: np.ndarray | None = None
    dx_px: np.ndarray | None = None
    dy_px: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "affine", _as_affine(self.affine, "affine"))
        parts = (self.x_um, self.y_um, self.dx_px, self.dy_px)
        if all(p is None for p in parts):
            return
        if any(p is None for p in parts):
            raise ValueError("x_um, y_um, dx_px, dy_px must be given together")
        gx = np.asarray(self.x_um, dtype=float).ravel()
        gy = np.asarray(self.y_um, dtype=float).ravel()
        dx = np.asarray(self.dx_px, dtype=float)
        dy = np.asarray(self.dy_px, dtype=float)
        if len(gx) < 1 or len(gy) < 1 or np.any(np.diff(gx) <= 0) or np.any(np.diff(gy) <= 0):
            raise ValueError("grid coordinates must be non-empty and strictly increasing")
        if dx.shape != (len(gy), len(gx)) or dy.shape != dx.shape:
            raise ValueError(f"dx_px/dy_px must have shape (len(y_um), len(x_um)) = {(len(gy), len(gx))}, "
                             f"got {dx.shape} and {dy.shape}")
        if not (np.all(np.isfinite(dx)) and np.all(np.isfinite(dy))):
            raise ValueError("displacement grid has non-finite values")
        for k, v in (("x_um", gx), ("y_um", gy), ("dx_px", dx), ("dy_px", dy)):
            object.__setattr__(self, k, v)

    # -- evaluation ---------------------------------------------------------------------
    @property
    def has_grid(self) -> bool:
        """Whether a displacement grid is present."""
        return self.dx_px is not None

    @property
    def px_per_um(self) -> float:
        """Scale of the affine part (H&E px per µm)."""
        return px_per_um(self.affine)

    def displacement(self, x_um: Any, y_um: Any) -> tuple[np.ndarray, np.ndarray]:
        """Displacement ``(dx_px, dy_px)`` of the grid at Xenium µm (zeros without a grid)."""
        x = np.asarray(x_um, dtype=float)
        y = np.asarray(y_um, dtype=float)
        if not self.has_grid:
            z = np.zeros(np.broadcast(x, y).shape)
            return z, z.copy()
        x, y = np.broadcast_arrays(x, y)
        return (_bilinear(self.x_um, self.y_um, self.dx_px, x, y),
                _bilinear(self.x_um, self.y_um, self.dy_px, x, y))

    def __call__(self, x_um: Any, y_um: Any) -> tuple[np.ndarray, np.ndarray]:
        """Map Xenium µm to H&E level-0 px; returns ``(x_px, y_px)`` shaped like the input."""
        x = np.asarray(x_um, dtype=float)
        y = np.asarray(y_um, dtype=float)
        x, y = np.broadcast_arrays(x, y)
        A = self.affine
        px = A[0, 0] * x + A[0, 1] * y + A[0, 2]
        py = A[1, 0] * x + A[1, 1] * y + A[1, 2]
        if self.has_grid:
            dx, dy = self.displacement(x, y)
            px = px + dx
            py = py + dy
        return px, py

    def apply_xy(self, xy: Any) -> np.ndarray:
        """(N, 2) µm -> (N, 2) H&E px."""
        P = _as_points(xy, "xy")
        px, py = self(P[:, 0], P[:, 1])
        return np.column_stack([px, py])

    def apply_xy_fast(self, xy: Any, *, workers: int | None = None) -> np.ndarray:
        """:meth:`apply_xy` compiled (:func:`stlib._align_kernels.apply_transform`, the same
        numbers), the points split over ``workers`` threads (default: the usable CPUs)."""
        from concurrent.futures import ThreadPoolExecutor

        from stlib import _align_kernels as K

        P = np.ascontiguousarray(_as_points(xy, "xy"), dtype=np.float64)
        out = np.empty_like(P)
        z = np.zeros((1, 1))
        grid = (self.x_um, self.y_um, self.dx_px, self.dy_px, True) if self.has_grid else (z[0], z[0], z, z, False)
        n = len(P)
        cuts = np.linspace(0, n, max(1, min(4 * _usable_cpus(), n // 50_000 + 1)) + 1).astype(np.int64)
        with ThreadPoolExecutor(max_workers=workers or _usable_cpus()) as pool:
            list(pool.map(lambda k: K.apply_transform(P, self.affine, *grid, out, cuts[k], cuts[k + 1]),
                          range(cuts.size - 1)))
        return out

    def warp_geometries(self, geoms: Any, *, before: Transform | None = None) -> np.ndarray:
        """Map shapely geometries (µm) to H&E px, vertex by vertex (``shapely.transform``);
        ``before``: a transform applied to the vertices first (one pass over the coordinates)."""
        import shapely

        if before is None:
            return shapely.transform(np.asarray(geoms, dtype=object), self.apply_xy_fast)
        return shapely.transform(np.asarray(geoms, dtype=object),
                                 lambda c: self.apply_xy_fast(before.apply_xy_fast(c)))

    # -- building -----------------------------------------------------------------------
    def with_grid(self, x_um: Any, y_um: Any, dx_px: Any, dy_px: Any) -> Transform:
        """Copy with another displacement grid (same affine)."""
        return Transform(self.affine, x_um, y_um, dx_px, dy_px)

    # -- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"xenium_um_to_he_px": 3x3 lists, "local_displacement": {...} or None}``."""
        grid = None
        if self.has_grid:
            grid = {"x_um": self.x_um.tolist(), "y_um": self.y_um.tolist(),
                    "dx_px": self.dx_px.tolist(), "dy_px": self.dy_px.tolist()}
        return {"xenium_um_to_he_px": self.affine.tolist(), "local_displacement": grid}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Transform:
        """Inverse of :meth:`to_dict`; also reads the demo truth ``transform.json``."""
        if "xenium_um_to_he_px" not in d:
            raise ValueError(f"transform dict lacks 'xenium_um_to_he_px'; keys: {sorted(d)}")
        g = d.get("local_displacement")
        if not g:
            return cls(d["xenium_um_to_he_px"])
        return cls(d["xenium_um_to_he_px"], g["x_um"], g["y_um"], g["dx_px"], g["dy_px"])


# =====================================================================================
# Rasterisation (vectorised scan-line fill of polygon exteriors)
# =====================================================================================

def _ring_coords(geoms: Any) -> tuple[np.ndarray, np.ndarray]:
    """Exterior-ring vertices of (multi)polygons as (N, 2) and their ring index."""
    import shapely

    g = np.asarray(geoms, dtype=object).ravel()
    if g.size == 0:
        return np.zeros((0, 2)), np.zeros(0, dtype=int)
    # (Multi)polygons -> polygons; an array of Polygons (a segmentation) is its own parts
    parts = g if bool((shapely.get_type_id(g) == 3).all()) else shapely.get_parts(g)
    parts = parts[~shapely.is_empty(parts)]
    if not shapely.get_num_interior_rings(parts).any():
        # no holes: a polygon's coordinates are its exterior ring's (no ring objects made)
        return shapely.get_coordinates(parts, return_index=True)
    rings = shapely.get_exterior_ring(parts)
    xy, idx = shapely.get_coordinates(rings, return_index=True)
    return xy, idx


@dataclass(frozen=True)
class _Rings:
    """Exterior-ring vertices of nucleus polygons (``_ring_coords``' arrays) already in Xenium
    µm: what :func:`align_nuclei` measures with, handed over by :func:`align_sample`'s HEST
    route without making warped polygons first."""

    xy: np.ndarray
    ring: np.ndarray


def _rasterize_rings(xy: np.ndarray, ring: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Fill closed rings given as vertices (pixel-centre coordinates, x = column, y = row).

    A pixel is inside when its centre is inside (as :func:`skimage.draw.polygon`).
    Non-zero winding rule after orienting every ring the same way, so overlapping
    polygons stay filled.
    """
    H, W = int(shape[0]), int(shape[1])
    out = np.zeros((H, W), dtype=bool)
    if len(xy) < 2 or H == 0 or W == 0:
        return out
    same = ring[1:] == ring[:-1]
    x0, y0 = xy[:-1][same, 0], xy[:-1][same, 1]
    x1, y1 = xy[1:][same, 0], xy[1:][same, 1]
    rid = ring[:-1][same]
    # orientation of each ring (shoelace)
    n_ring = int(ring.max()) + 1
    area2 = np.bincount(rid, weights=x0 * y1 - x1 * y0, minlength=n_ring)
    orient = np.sign(area2)[rid]
    # rows crossed: integers r with min(y) <= r < max(y)
    ylo = np.minimum(y0, y1)
    yhi = np.maximum(y0, y1)
    r_start = np.ceil(ylo).astype(np.int64)
    r_stop = np.ceil(yhi).astype(np.int64)  # exclusive
    r_start = np.clip(r_start, 0, H)
    r_stop = np.clip(r_stop, 0, H)
    n = np.maximum(r_stop - r_start, 0)
    keep = (n > 0) & (orient != 0)
    if not keep.any():
        return out
    x0, y0, x1, y1, n, r_start, orient = (a[keep] for a in (x0, y0, x1, y1, n, r_start, orient))
    e = np.repeat(np.arange(len(n)), n)
    offs = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    r = r_start[e] + offs
    t = (r - y0[e]) / (y1[e] - y0[e])
    xc = x0[e] + t * (x1[e] - x0[e])
    sign = np.where(y1[e] > y0[e], -1.0, 1.0) * orient[e]
    c = np.clip(np.ceil(xc), 0, W).astype(np.int64)
    acc = np.bincount(r * (W + 1) + c, weights=sign, minlength=H * (W + 1)).reshape(H, W + 1)
    wind = np.cumsum(acc[:, :W], axis=1)
    return np.abs(wind) > 0.5


def rasterize_polygons(geoms: Any, shape: tuple[int, int], *,
                       transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Boolean mask of the union of polygon exteriors.

    Parameters
    ----------
    geoms
        Shapely (multi)polygons (array-like or GeoSeries) in pixel coordinates of the mask
        (x = column, y = row, pixel centres at integers), after ``transform``.
    shape
        ``(H, W)`` of the mask.
    transform
        Optional callable mapping an (N, 2) vertex array to mask coordinates.

    Returns
    -------
    numpy.ndarray
        (H, W) bool; a pixel is set when its centre lies inside a polygon (holes ignored).
    """
    xy, idx = _ring_coords(getattr(geoms, "values", geoms))
    if transform is not None and len(xy):
        xy = np.asarray(transform(xy), dtype=float)
    return _rasterize_rings(xy, idx, shape)


# =====================================================================================
# Haematoxylin at a working resolution
# =====================================================================================

class SlideLike(Protocol):
    """What :func:`haematoxylin_image` needs from a slide (:class:`stlib.io.wsi.Wsi` fits)."""

    level_downsamples: Sequence[float]

    def read_region(self, x: int, y: int, w: int, h: int, *, level: int = 0) -> np.ndarray: ...


@dataclass(frozen=True)
class WorkGrid:
    """A working-resolution raster over H&E level-0 px.

    Work pixel ``(u, v)`` (column, row; centres at integers) covers H&E px
    ``x0 - 0.5 + [u, u + 1) * f`` (H&E pixel centres at integers), so its centre is
    ``x = x0 + (u + 0.5) * f - 0.5``.
    """

    x0: float
    y0: float
    f: float
    shape: tuple[int, int]

    def to_work(self, x_px: Any, y_px: Any) -> tuple[np.ndarray, np.ndarray]:
        """H&E level-0 px -> work pixel coordinates."""
        return ((np.asarray(x_px, float) - self.x0 + 0.5) / self.f - 0.5,
                (np.asarray(y_px, float) - self.y0 + 0.5) / self.f - 0.5)

    def to_he(self, u: Any, v: Any) -> tuple[np.ndarray, np.ndarray]:
        """Work pixel coordinates -> H&E level-0 px."""
        return (self.x0 + (np.asarray(u, float) + 0.5) * self.f - 0.5,
                self.y0 + (np.asarray(v, float) + 0.5) * self.f - 0.5)

    def xy_to_work(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) H&E px -> (N, 2) work px."""
        u, v = self.to_work(xy[:, 0], xy[:, 1])
        return np.column_stack([u, v])


def haematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin channel of an RGB uint8 block (Ruifrok-Johnston deconvolution)."""
    from skimage.color import rgb2hed

    return rgb2hed(rgb[..., :3])[..., 0].astype(np.float32)


def haematoxylin_image(slide: SlideLike, grid: WorkGrid, *, chunk: int = 1024, reference: bool = False,
                       workers: int | None = None) -> np.ndarray:
    """Haematoxylin optical density of the slide on a :class:`WorkGrid`, robustly normalised.

    The slide is read chunk by chunk from the pyramid level closest to (not finer than
    needed for) the working resolution, deconvolved (:func:`skimage.color.rgb2hed`),
    anti-alias filtered and resampled bilinearly onto the grid. The result is scaled so that
    the 1st percentile maps to 0 and the 99.5th to 1 (clipped to [0, 1.5]).

    The chunks are processed by ``workers`` threads with compiled twins of the three library
    calls (:mod:`stlib._align_kernels`, the same pixels); ``reference=True`` calls the
    libraries one chunk after the other.
    """
    from concurrent.futures import ThreadPoolExecutor

    from scipy import ndimage

    from stlib import _align_kernels as K

    H, W = grid.shape
    out = np.zeros((H, W), dtype=np.float32)
    ds_all = [float(d) for d in slide.level_downsamples]
    ok = [i for i, d in enumerate(ds_all) if d <= grid.f * (1 + 1e-6)]
    level = max(ok, key=lambda i: ds_all[i]) if ok else 0
    ds = ds_all[level]
    s = grid.f / ds  # level px per work px
    sigma = max(0.0, (s - 1.0) / 2.0)
    pad = int(math.ceil(3 * sigma + 2))
    lut, hcol = K.hed_lut()

    def finish(rgb: np.ndarray, jy: np.ndarray, jx: np.ndarray, v0: int, u0: int) -> None:
        if reference:
            h = haematoxylin_od(np.asarray(rgb))
            if sigma > 0:
                h = ndimage.gaussian_filter(h, sigma)
            JY, JX = np.meshgrid(jy, jx, indexing="ij")
            out[v0:v0 + jy.size, u0:u0 + jx.size] = ndimage.map_coordinates(h, [JY, JX], order=1, mode="nearest")
            return
        h = K.hed_h(np.ascontiguousarray(rgb), lut, hcol)
        if sigma > 0:
            h = K.gaussian_filter32(h, sigma)
        out[v0:v0 + jy.size, u0:u0 + jx.size] = K.map_linear_nearest(h, jy, jx)

    with ThreadPoolExecutor(max_workers=1 if reference else (workers or _usable_cpus())) as pool:
        futures = []
        for v0 in range(0, H, chunk):
            for u0 in range(0, W, chunk):
                v1, u1 = min(H, v0 + chunk), min(W, u0 + chunk)
                uu = np.arange(u0, u1, dtype=float)
                vv = np.arange(v0, v1, dtype=float)
                xs, ys = grid.to_he(uu, vv)
                # level coordinates of the sample points (level pixel centres at integers)
                jx = (xs + 0.5) / ds - 0.5
                jy = (ys + 0.5) / ds - 0.5
                lx0 = int(math.floor(jx[0])) - pad
                ly0 = int(math.floor(jy[0])) - pad
                lw = int(math.ceil(jx[-1])) + pad + 1 - lx0
                lh = int(math.ceil(jy[-1])) + pad + 1 - ly0
                rgb = slide.read_region(int(round(lx0 * ds)), int(round(ly0 * ds)), lw, lh, level=level)
                # read_region's corner was rounded to level-0 px: account for it exactly
                ox = round(lx0 * ds) / ds
                oy = round(ly0 * ds) / ds
                futures.append(pool.submit(finish, rgb, jy - oy, jx - ox, v0, u0))
                if len(futures) > 8:
                    futures.pop(0).result()
        for f in futures:
            f.result()
    if not out.size:
        lo, hi = 0.0, 1.0
    elif reference:
        lo, hi = np.percentile(out, [1.0, 99.5])
    else:  # the same two numbers, the selection split over threads
        lo, hi = K.percentile_threaded(out, [1.0, 99.5], workers=workers or _usable_cpus())
    scale = hi - lo if hi > lo else 1.0
    if reference or H * W < 1 << 20:
        return np.clip((out - lo) / scale, 0.0, 1.5).astype(np.float32)
    # the same elementwise expression on bands of rows in threads (numpy releases the GIL)
    res = np.empty((H, W), np.float32)

    def band(v0: int) -> None:
        res[v0:v0 + chunk] = np.clip((out[v0:v0 + chunk] - lo) / scale, 0.0, 1.5).astype(np.float32)

    with ThreadPoolExecutor(max_workers=workers or _usable_cpus()) as pool:
        list(pool.map(band, range(0, H, chunk)))
    return res


# =====================================================================================
# Tile measurements
# =====================================================================================

@dataclass
class _Level:
    grid: WorkGrid
    h: np.ndarray
    otsu: float


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(float).ravel()
    b = b.astype(float).ravel()
    a = a - a.mean()
    b = b - b.mean()
    d = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else float("nan")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / s) if s else float("nan")


def _window(arr: np.ndarray, cu: float, cv: float, n: int) -> tuple[np.ndarray, tuple[int, int]]:
    """n x n crop centred near (cu, cv), zero-padded outside; returns crop and its origin."""
    H, W = arr.shape
    u0 = int(round(cu - n / 2))
    v0 = int(round(cv - n / 2))
    out = np.zeros((n, n), dtype=arr.dtype)
    a0, a1 = max(0, v0), min(H, v0 + n)
    b0, b1 = max(0, u0), min(W, u0 + n)
    if a1 > a0 and b1 > b0:
        out[a0 - v0:a1 - v0, b0 - u0:b1 - u0] = arr[a0:a1, b0:b1]
    return out, (u0, v0)


def _measure(level: _Level, T: Transform, xy_rings_um: np.ndarray, ring_id: np.ndarray,
             centroids_um: np.ndarray, nodes_um: np.ndarray, win_px: int, *,
             min_nuclei: int, upsample: int = 20, blur_px: float = 1.0,
             reference: bool = False) -> dict[str, np.ndarray]:
    """Rasterise nuclei through ``T`` and measure every node's tile.

    Returns per node: residual shift (dx, dy) in **H&E px** (true position = mapped + shift),
    peak correlation, nuclei count, correlation and Dice scores, reliability; plus global
    correlation/Dice. The nodes are measured in batches (:mod:`stlib._align_kernels`);
    ``reference=True`` measures them one by one with the library calls (same numbers to
    float rounding; for tests and ``stlib bench derive``).
    """
    from concurrent.futures import ThreadPoolExecutor

    from scipy import ndimage

    from stlib import _align_kernels as K

    grid = level.grid
    if reference:
        ring_work = grid.xy_to_work(T.apply_xy(xy_rings_um)) if len(xy_rings_um) else xy_rings_um
        cen_work = grid.xy_to_work(T.apply_xy(centroids_um))
        node_work = grid.xy_to_work(T.apply_xy(nodes_um))
    else:
        ring_work, cen_work, node_work = (_map_points(T, grid, p) for p in (xy_rings_um, centroids_um, nodes_um))
    if reference:
        mask = _rasterize_rings(ring_work, ring_id, grid.shape)
        blurred = ndimage.gaussian_filter(mask.astype(np.float32), blur_px)
        counts = _count_window(cen_work, grid.shape, node_work, win_px)
    else:  # the same arrays from compiled twins (the threshold mask meanwhile in a side thread)
        side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stlib-align-side")
        hmask_f = side.submit(np.greater, level.h, level.otsu)
        H, W = grid.shape
        mask, mask32 = K.fill_rings_threaded(np.ascontiguousarray(ring_work, dtype=np.float64),
                                             ring_id.astype(np.int64), H, W, workers=_usable_cpus())
        blurred = K.gaussian_filter32(mask32, blur_px, workers=_usable_cpus())
        del mask32
        u0 = np.round(node_work[:, 0] - win_px / 2).astype(np.int64)
        v0 = np.round(node_work[:, 1] - win_px / 2).astype(np.int64)
        counts = K.count_in_windows(np.round(cen_work[:, 0]).astype(np.int64), np.round(cen_work[:, 1]).astype(np.int64),
                                    H, W, u0, v0, win_px)
    n = len(nodes_um)
    res = {k: np.full(n, np.nan) for k in ("dx_px", "dy_px", "peak", "corr", "dice")}
    if reference:
        hmask = level.h > level.otsu
    else:
        hmask = hmask_f.result()
        side.shutdown()
    res["n_nuclei"] = counts.astype(int)
    measure_nodes = _measure_nodes_reference if reference else _measure_nodes_batched
    measure_nodes(res, level.h, mask, hmask, blurred, node_work, counts, win_px, min_nuclei=min_nuclei,
                  upsample=upsample, f=grid.f)
    # reliability = peak correlation x a saturating nuclei-count factor (0.5 at 10 nuclei)
    peak_ok = np.clip(np.nan_to_num(res["peak"]), 0.0, 1.0)
    res["reliability"] = np.where(np.isfinite(res["peak"]), peak_ok * res["n_nuclei"] / (res["n_nuclei"] + 10.0), 0.0)
    if reference:
        res["global_corr"] = _pearson(level.h, mask) if mask.any() else float("nan")
        res["global_dice"] = _dice(hmask, mask)
        return res
    # the two full-image scores from one pass of sums over row bands in threads
    H = mask.shape[0]
    edges = np.linspace(0, H, 4 * _usable_cpus() + 1).astype(int)
    with ThreadPoolExecutor(max_workers=_usable_cpus()) as pool:
        tot = sum(pool.map(lambda k: K.global_sums(level.h, mask, hmask, edges[k], edges[k + 1]), range(edges.size - 1)))
    sm, shm, inter = int(tot[2]), int(tot[4]), int(tot[5])
    res["global_dice"] = float(2 * inter / (sm + shm)) if sm + shm else float("nan")
    res["global_corr"] = float(K.pearson_from_sums(tot, float(mask.size))) if sm else float("nan")
    return res


def _map_points(T: Transform, grid: WorkGrid, xy: np.ndarray) -> np.ndarray:
    """``grid.xy_to_work(T.apply_xy(xy))`` (compiled, the same numbers), split over threads."""
    from concurrent.futures import ThreadPoolExecutor

    from stlib import _align_kernels as K

    xy = np.ascontiguousarray(xy, dtype=np.float64).reshape(-1, 2)
    z = np.zeros((1, 1))
    args = (T.affine, T.x_um, T.y_um, T.dx_px, T.dy_px, True) if T.has_grid else (T.affine, z[0], z[0], z, z, False)
    out = np.empty((len(xy), 2))
    cuts = np.linspace(0, len(xy), max(1, min(4 * _usable_cpus(), len(xy) // 100_000 + 1)) + 1).astype(np.int64)
    with ThreadPoolExecutor(max_workers=_usable_cpus()) as pool:  # rows written in place
        list(pool.map(lambda k: K.map_points_rows(xy, *args, grid.x0, grid.y0, grid.f, out, cuts[k], cuts[k + 1]),
                      range(cuts.size - 1)))
    return out


def _measure_nodes_reference(res: dict[str, np.ndarray], h: np.ndarray, mask: np.ndarray, hmask: np.ndarray,
                             blurred: np.ndarray, node_work: np.ndarray, counts: np.ndarray, win_px: int, *,
                             min_nuclei: int, upsample: int, f: float) -> None:
    """Per node: window scores and the sub-pixel shift by phase correlation (one call each)."""
    from scipy import ndimage
    from skimage.registration import phase_cross_correlation

    hann = np.outer(np.hanning(win_px), np.hanning(win_px)).astype(np.float32)
    max_shift = win_px / 4.0
    for i, (cu, cv) in enumerate(node_work):
        k = int(counts[i])
        h_t, _ = _window(h, cu, cv, win_px)
        m_t, _ = _window(mask, cu, cv, win_px)
        hm_t, _ = _window(hmask, cu, cv, win_px)
        if k == 0:
            continue
        res["corr"][i] = _pearson(h_t, m_t)
        res["dice"][i] = _dice(hm_t, m_t)
        if k < min_nuclei:
            continue
        b_t, _ = _window(blurred, cu, cv, win_px)
        ref = (h_t - h_t.mean()) * hann
        mov = (b_t - b_t.mean()) * hann
        if not (np.any(ref) and np.any(mov)):
            continue
        shift, _, _ = phase_cross_correlation(ref, mov, upsample_factor=upsample, normalization=None)
        dv, du = float(shift[0]), float(shift[1])
        if math.hypot(du, dv) > max_shift:
            continue
        moved = ndimage.shift(b_t, (dv, du), order=1, mode="constant")
        e = int(math.ceil(max(abs(du), abs(dv)))) + 1
        if win_px - 2 * e < 8:
            continue
        peak = _pearson(h_t[e:-e, e:-e], moved[e:-e, e:-e])
        res["peak"][i] = peak
        res["dx_px"][i] = du * f
        res["dy_px"][i] = dv * f


def _measure_nodes_batched(res: dict[str, np.ndarray], h: np.ndarray, mask: np.ndarray, hmask: np.ndarray,
                           blurred: np.ndarray, node_work: np.ndarray, counts: np.ndarray, win_px: int, *,
                           min_nuclei: int, upsample: int, f: float, batch: int = 128) -> None:
    """:func:`_measure_nodes_reference` for all nodes at once: compiled window scores, then the
    phase correlations of ``batch`` windows per batched FFT (:mod:`stlib._align_kernels`)."""
    from stlib import _align_kernels as K

    from concurrent.futures import ThreadPoolExecutor

    u0 = np.round(node_work[:, 0] - win_px / 2).astype(np.int64)
    v0 = np.round(node_work[:, 1] - win_px / 2).astype(np.int64)
    spans = np.array_split(np.arange(u0.size), 4 * _usable_cpus())
    with ThreadPoolExecutor(max_workers=_usable_cpus()) as pool:
        for sp, (corr, dice) in zip(spans, pool.map(
                lambda sp: K.window_stats(h, mask, hmask, u0[sp], v0[sp], win_px, counts[sp]), spans)):
            res["corr"][sp] = corr
            res["dice"][sp] = dice
    hann = np.outer(np.hanning(win_px), np.hanning(win_px)).astype(np.float32)
    max_shift = win_px / 4.0
    todo = np.flatnonzero(counts >= min_nuclei)

    def one(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # one compiled pass per window: zero-padded crop, minus its mean, times the Hann window
        ref, mov, ok = K.prep_windows(h, blurred, u0[idx], v0[idx], win_px, hann)
        if not ok.all():
            idx, ref, mov = idx[ok], ref[ok], mov[ok]
        if not idx.size:
            return idx, np.zeros(0), np.zeros(0), np.zeros(0)
        shift = K.batched_phase_shift(ref, mov, upsample).astype(np.float64)
        dv, du = shift[:, 0], shift[:, 1]
        near = np.hypot(du, dv) <= max_shift
        sel, dv, du = idx[near], dv[near], du[near]
        peak, keep = K.shifted_peak_at(h, blurred, u0[sel], v0[sel], win_px, dv, du)
        return sel[keep], peak[keep], du[keep], dv[keep]

    chunks = [todo[s:s + batch] for s in range(0, todo.size, batch)]
    with ThreadPoolExecutor(max_workers=_usable_cpus(), thread_name_prefix="stlib-align") as pool:
        for sel, peak, du, dv in pool.map(one, chunks):  # FFT, BLAS and the kernels release the GIL
            res["peak"][sel] = peak
            res["dx_px"][sel] = du * f
            res["dy_px"][sel] = dv * f


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _count_window(points: np.ndarray, shape: tuple[int, int], centres: np.ndarray, win: int) -> np.ndarray:
    """Number of points (work px) in the ``win`` x ``win`` window at each centre (integral image)."""
    H, W = shape
    iu = np.round(points[:, 0]).astype(np.int64)
    iv = np.round(points[:, 1]).astype(np.int64)
    ok = (iu >= 0) & (iu < W) & (iv >= 0) & (iv < H)
    img = np.bincount(iv[ok] * W + iu[ok], minlength=H * W).reshape(H, W)
    ii = np.zeros((H + 1, W + 1), dtype=np.int64)
    ii[1:, 1:] = img.cumsum(0).cumsum(1)
    u0 = np.clip(np.round(centres[:, 0] - win / 2).astype(np.int64), 0, W)
    v0 = np.clip(np.round(centres[:, 1] - win / 2).astype(np.int64), 0, H)
    u1 = np.clip(np.round(centres[:, 0] - win / 2).astype(np.int64) + win, 0, W)
    v1 = np.clip(np.round(centres[:, 1] - win / 2).astype(np.int64) + win, 0, H)
    return ii[v1, u1] - ii[v0, u1] - ii[v1, u0] + ii[v0, u0]


def _node_grid(lo: np.ndarray, hi: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Node coordinates covering [lo, hi] with spacing ``step`` (cell centres)."""
    axes = []
    for a in range(2):
        extent = max(float(hi[a] - lo[a]), 1e-9)
        k = max(1, int(math.ceil(extent / step)))
        centre = 0.5 * (lo[a] + hi[a])
        axes.append(centre + (np.arange(k) - (k - 1) / 2.0) * step)
    return axes[0], axes[1]


def _smooth_field(vals: np.ndarray, w: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Normalised Gaussian smoothing of a gridded field with weights (NaN = no data)."""
    from scipy import ndimage

    ok = np.isfinite(vals) & (w > 0)
    wv = np.where(ok, w, 0.0)
    num = ndimage.gaussian_filter(np.where(ok, vals, 0.0) * wv, sigma, mode="nearest", truncate=3.0)
    den = ndimage.gaussian_filter(wv, sigma, mode="nearest", truncate=3.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 1e-6 * max(float(wv.max(initial=0)), 1e-12), num / den, np.nan)
    return out, den


def _neighbour_outliers(dx: np.ndarray, dy: np.ndarray, ok: np.ndarray, thresh: float, *,
                        reference: bool = False) -> np.ndarray:
    """Nodes whose shift differs from the median of their reliable 3x3 neighbours by > thresh."""
    if not reference:
        from stlib import _align_kernels as K

        # the loop below, compiled (the same nodes; tests/test_fast_paths.py)
        return K.neighbour_outliers(np.asarray(dx, np.float64), np.asarray(dy, np.float64),
                                    np.asarray(ok, np.bool_), float(thresh))
    ny, nx = dx.shape
    out = np.zeros_like(ok)
    for j in range(ny):
        for i in range(nx):
            if not ok[j, i]:
                continue
            sl = (slice(max(0, j - 1), j + 2), slice(max(0, i - 1), i + 2))
            nb = ok[sl].copy()
            nb[j - sl[0].start, i - sl[1].start] = False
            if nb.sum() < 2:
                continue
            mx = float(np.median(dx[sl][nb]))
            my = float(np.median(dy[sl][nb]))
            if math.hypot(dx[j, i] - mx, dy[j, i] - my) > thresh:
                out[j, i] = True
    return out


# =====================================================================================
# Result
# =====================================================================================

@dataclass
class AlignmentResult:
    """Outcome of :func:`align_nuclei` / :func:`align_sample` (the content of alignment.json).

    Attributes
    ----------
    sample, route
        Sample id; ``"hest"`` or ``"xenium-csv"`` (where the initial map came from).
    initial
        (3, 3) initial Xenium µm -> H&E px affine (HEST's registration or the CSV's).
    transform
        The refined :class:`Transform` (equals ``initial`` when not refined).
    scores
        ``{"global": {"before": {...}, "after": {...}}, "tiles": [row, ...]}``; a tile row holds
        its centre (µm and H&E px), nuclei count, correlation/Dice before and after,
        residual before/after (µm) and reliability.
    residual_field
        Residual shifts after refinement at tile centres: ``x_um, y_um, x_px, y_px, dx_um,
        dy_um, reliability`` (lists).
    excluded_regions
        ``[{"x0", "y0", "x1", "y1" (H&E level-0 px), "reason", "residual_um"}]``.
    he_um_per_px
        H&E level-0 pixel size implied by the initial map.
    params, inputs
        Parameters used and the fingerprint of the inputs (idempotence key).
    verdict
        The sample-level verdict (:func:`alignment_verdict`): ``status`` (``"ok"`` / ``"failed"``),
        ``reasons``, ``evidence`` and the ``thresholds`` it was judged with.
    """

    sample: str
    route: str
    initial: np.ndarray
    transform: Transform
    scores: dict[str, Any] = field(default_factory=dict)
    residual_field: dict[str, list] = field(default_factory=dict)
    excluded_regions: list[dict[str, Any]] = field(default_factory=list)
    he_um_per_px: float = float("nan")
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    verdict: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``"ok"`` or ``"failed"``: the sample-level verdict (judged from the scores if not stored)."""
        if not self.verdict:
            self.verdict = alignment_verdict(self)
        return str(self.verdict["status"])

    def to_dict(self) -> dict[str, Any]:
        """The alignment.json document."""
        t = self.transform.to_dict()
        return {
            "sample": self.sample,
            "route": self.route,
            "status": self.status,
            "verdict": _jsonable(self.verdict),
            "xenium_um_to_he_px": t["xenium_um_to_he_px"],
            "local_displacement": t["local_displacement"],
            "initial_um_to_he_px": np.asarray(self.initial).tolist(),
            "he_um_per_px": float(self.he_um_per_px),
            "scores": _jsonable(self.scores),
            "residual_field": _jsonable(self.residual_field),
            "excluded_regions": _jsonable(self.excluded_regions),
            "params": _jsonable(self.params),
            "inputs": _jsonable(self.inputs),
            "align_version": ALIGN_VERSION,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlignmentResult:
        """Inverse of :meth:`to_dict`."""
        return cls(sample=str(d["sample"]), route=str(d["route"]),
                   initial=_as_affine(d["initial_um_to_he_px"]),
                   transform=Transform.from_dict(d),
                   scores=d.get("scores", {}), residual_field=d.get("residual_field", {}),
                   excluded_regions=d.get("excluded_regions", []),
                   he_um_per_px=float(d.get("he_um_per_px", float("nan"))),
                   params=d.get("params", {}), inputs=d.get("inputs", {}), verdict=d.get("verdict") or {})

    def save(self, path: str | Path) -> Path:
        """Write alignment.json atomically.

        Without indentation: a slide's file holds tens of thousands of tile rows, and only the
        unindented form is written by the json module's compiled encoder (under half the time).
        """
        return write_json(path, self.to_dict(), indent=None)


def alignment_evidence(result: AlignmentResult) -> dict[str, Any]:
    """The sample-level quality signals of an alignment, from its scores alone.

    ``corr_before`` / ``corr_after``: global Pearson correlation of the haematoxylin channel with
    the nucleus mask under the initial / refined map; ``excluded_fraction``: share of the nuclei of
    the measured tiles (at least ``min_nuclei``) that lie in excluded tiles (tiles overlap: a
    nucleus counts once per tile); ``median_residual_um``: median tile residual after refinement;
    ``moved_um``: median distance between the initial and the refined map at the tile centres;
    ``n_tiles``: measured tiles.
    """
    g = result.scores.get("global", {})
    tiles = result.scores.get("tiles", [])
    min_nuclei = int(result.params.get("min_nuclei", AlignConfig().min_nuclei))
    n = np.array([t["n_nuclei"] for t in tiles], float)
    exc = np.array([bool(t["excluded"]) for t in tiles])
    meas = n >= min_nuclei
    tot = float(n[meas].sum())
    moved = None
    if tiles:
        xy_um = np.array([[t["x_um"], t["y_um"]] for t in tiles], float)
        xy_px = np.array([[t["x_px"], t["y_px"]] for t in tiles], float)
        d = np.hypot(*(xy_px - apply_affine(result.initial, xy_um)).T) * float(result.he_um_per_px)
        moved = float(np.median(d[meas])) if meas.any() and np.isfinite(d[meas]).any() else None

    def num(v: Any) -> float | None:
        return None if v is None or not math.isfinite(float(v)) else float(v)

    return {"corr_before": num((g.get("before") or {}).get("corr")),
            "corr_after": num((g.get("after") or {}).get("corr")),
            "excluded_fraction": float(n[meas & exc].sum() / tot) if tot > 0 else None,
            "median_residual_um": num((g.get("after") or {}).get("median_residual_um")),
            "moved_um": moved, "n_tiles": int(meas.sum())}


def alignment_verdict(result: AlignmentResult, *, config: AlignConfig | None = None) -> dict[str, Any]:
    """Did the alignment of this sample fail as a whole?

    A map that the refinement could not recover (an initial error beyond the capture range, a
    wrong slide, a mirrored image) leaves tiles that lock onto wrong phase-correlation peaks;
    most are excluded, but a few are not. The sample is therefore judged as a whole:
    ``"failed"`` when its global correlation after refinement is below ``fail_min_corr`` or when
    its excluded tiles hold more than ``fail_max_excluded`` of the measured nuclei (see
    :func:`alignment_evidence`), or when no tile could be measured. The thresholds
    (:class:`stlib.config.AlignConfig`) were chosen on development cohorts of the demo generator
    (benchmarks/align_failure_flag/README.md). The label stage does not use the nuclei of a failed
    sample (:func:`stlib.labels.derive.derive_sample`).

    Parameters
    ----------
    result
        The alignment.
    config
        Its thresholds; default: the ones recorded in ``result.params``, else the defaults.

    Returns
    -------
    dict
        ``status`` (``"ok"`` / ``"failed"``), ``reasons`` (list of str), ``evidence``
        (:func:`alignment_evidence`) and ``thresholds``.
    """
    d = AlignConfig()
    if config is None:
        min_corr = float(result.params.get("fail_min_corr", d.fail_min_corr))
        max_exc = float(result.params.get("fail_max_excluded", d.fail_max_excluded))
    else:
        min_corr, max_exc = float(config.fail_min_corr), float(config.fail_max_excluded)
    ev = alignment_evidence(result)
    reasons = []
    if ev["n_tiles"] == 0 or ev["corr_after"] is None:
        reasons.append("no tile could be measured")
    if ev["corr_after"] is not None and ev["corr_after"] < min_corr:
        reasons.append(f"global correlation after refinement {ev['corr_after']:.2f} < {min_corr:.2f}")
    if ev["excluded_fraction"] is not None and ev["excluded_fraction"] > max_exc:
        reasons.append(f"{100 * ev['excluded_fraction']:.0f} % of the measured nuclei in excluded tiles "
                       f"> {100 * max_exc:.0f} %")
    return {"status": "failed" if reasons else "ok", "reasons": reasons, "evidence": ev,
            "thresholds": {"fail_min_corr": min_corr, "fail_max_excluded": max_exc}}


class AlignmentFailedError(InputError):
    """A stage was asked to use the nuclei of a sample whose alignment failed (:func:`alignment_verdict`)."""


def check_alignment(result: AlignmentResult, *, path: str | Path | None = None, accept_failed: bool = False,
                    hest_dir: str | Path | None = None) -> None:
    """Raise :class:`AlignmentFailedError` (naming the sample, the evidence and the fixes) when the
    alignment of ``result.sample`` failed, unless ``accept_failed``."""
    if accept_failed or result.status != "failed":
        return
    tile = float(result.params.get("tile_um", AlignConfig().tile_um))
    hest = hest_dir if hest_dir is not None else "HEST_DIR"
    raise AlignmentFailedError(
        "its alignment failed (" + "; ".join(result.verdict.get("reasons", [])) + "): its nuclei would land "
        "beside their H&E nuclei, so its labels are not derived",
        path=path, sample=result.sample,
        fix=f"re-align it with a larger capture range (`stlib align --hest-dir {hest} --sample {result.sample} "
            f"--run-dir RUN --force --tile-um {2 * tile:g}`: the refinement corrects initial errors up to about a "
            f"quarter of a tile), or from landmarks placed by hand (an *_he_imagealignment.csv with keypoints, "
            f"`stlib align --xenium-dir`), or leave the sample out; to use its nuclei anyway pass "
            f"--accept-failed-alignment (derive_sample(..., accept_failed_alignment=True))")


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, (np.floating, float)):
        v = float(o)
        return v if math.isfinite(v) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def load_alignment(path: str | Path) -> AlignmentResult:
    """Read an alignment.json written by ``stlib align``."""
    d = read_json(path)
    try:
        return AlignmentResult.from_dict(d)
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"not an alignment.json ({e})", path=path,
                         fix="re-run `stlib align --force` for this sample") from e


# =====================================================================================
# The alignment itself
# =====================================================================================

class _Scene:
    """What every step of :func:`align_nuclei` measures on: the nucleus rings (µm), their
    centroids, the working window of the slide and its haematoxylin images per resolution."""

    def __init__(self, slide: SlideLike, geoms: np.ndarray | _Rings, M0: np.ndarray, cfg: AlignConfig, *,
                 sample: str, timings: dict[str, float] | None) -> None:
        self.slide, self.cfg, self.timings = slide, cfg, timings
        self.ppu = px_per_um(M0)
        if not self.ppu > 0:
            raise InputError("initial map is singular", sample=sample or None, fix="check the registration input")
        self.xy_um, self.ring_id = (geoms.xy, geoms.ring) if isinstance(geoms, _Rings) else _ring_coords(geoms)
        # per-polygon centroid from vertices of its exterior ring
        cnt = np.bincount(self.ring_id)
        centroids = np.column_stack([np.bincount(self.ring_id, self.xy_um[:, 0]),
                                     np.bincount(self.ring_id, self.xy_um[:, 1])])
        self.centroids = centroids[cnt > 0] / cnt[cnt > 0, None]
        self.lo_um = self.centroids.min(axis=0)
        self.hi_um = self.centroids.max(axis=0)
        self.extent_um = float(max(self.hi_um - self.lo_um))
        self.box = self._window(M0, sample)
        self.levels: dict[float, _Level] = {}
        self._pending: dict[float, Any] = {}  # levels being computed in the background (futures)

    def _window(self, M0: np.ndarray, sample: str) -> tuple[float, float, float, float]:
        """Working raster: the nuclei's bounding box under the initial map plus a margin (H&E px)."""
        lo_um, hi_um = self.lo_um, self.hi_um
        corners = apply_affine(M0, np.array([[lo_um[0], lo_um[1]], [hi_um[0], lo_um[1]],
                                             [lo_um[0], hi_um[1]], [hi_um[0], hi_um[1]]]))
        margin_px = (self.cfg.tile_um + 30.0) * self.ppu
        bx0, by0 = corners.min(axis=0) - margin_px
        bx1, by1 = corners.max(axis=0) + margin_px
        shape0 = getattr(self.slide, "shape", None)
        if shape0 is not None:
            bx0, by0 = max(bx0, -0.5), max(by0, -0.5)
            bx1, by1 = min(bx1, shape0[1] - 0.5), min(by1, shape0[0] - 0.5)
        if bx1 <= bx0 or by1 <= by0:
            raise InputError("the nuclei map outside the H&E image under the initial registration",
                             sample=sample or None, fix="check the registration (route) and the slide")
        return bx0, by0, bx1, by1

    def level_at(self, um_px: float) -> _Level:
        """Haematoxylin image (and its Otsu threshold) of the window at ``um_px`` µm/px, cached."""
        if um_px not in self.levels:
            fut = self._pending.pop(um_px, None)
            self.levels[um_px] = fut.result() if fut is not None else self._level(um_px)
        return self.levels[um_px]

    def prefetch(self, um_pxs: Sequence[float]) -> None:
        """Start computing the haematoxylin images at ``um_pxs`` in a background thread, one
        after the other (the same images :meth:`level_at` would compute; it waits for them).

        The first measurement leaves the CPUs partly idle (its serial steps, the ends of its
        thread pools); the coarse levels the affine refinement needs next are computed there.
        Not in the reference mode (one step after the other).
        """
        from concurrent.futures import ThreadPoolExecutor

        todo = [u for u in dict.fromkeys(um_pxs) if u not in self.levels and u not in self._pending]
        if self.cfg.reference or not todo:
            return
        ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stlib-align-levels")
        for u in todo:
            self._pending[u] = ex.submit(self._level, u)
        ex.shutdown(wait=False)

    def _level(self, um_px: float) -> _Level:
        from skimage.filters import threshold_otsu

        from stlib import _align_kernels as K

        bx0, by0, bx1, by1 = self.box
        with _timed(self.timings, "haematoxylin_images"):
            f = um_px * self.ppu
            shp = (max(1, int((by1 - by0) / f)), max(1, int((bx1 - bx0) / f)))
            g = WorkGrid(x0=float(bx0), y0=float(by0), f=f, shape=shp)
            h = haematoxylin_image(self.slide, g, reference=self.cfg.reference)
            if not np.ptp(h) > 0:
                thr = 0.5
            elif self.cfg.reference:
                thr = float(threshold_otsu(h))
            else:  # the same threshold, the histogram counted over threads
                thr = K.otsu_threaded(h, workers=_usable_cpus())
            return _Level(g, h, thr)

    def measure(self, T: Transform, um_px: float, win_um: float, nodes: np.ndarray) -> dict[str, np.ndarray]:
        """Correlation, Dice and residual shift of the windows centred on ``nodes`` (µm) under ``T``."""
        lev = self.level_at(um_px)
        win_px = max(16, int(round(win_um / um_px)))
        with _single_thread_blas(), _timed(self.timings, "tile_measurements"):
            return _measure(lev, T, self.xy_um, self.ring_id, self.centroids, nodes, win_px,
                            min_nuclei=self.cfg.min_nuclei, reference=self.cfg.reference)


def align_nuclei(slide: SlideLike, nuclei_um: Any, initial: Any, *, sample: str = "",
                 route: str = "", config: AlignConfig | None = None,
                 timings: dict[str, float] | None = None, **options: Any) -> AlignmentResult:
    """Score the registration of nucleus polygons on an H&E slide and refine it.

    The steps: :func:`_refine_global` (affine, coarse to fine), :func:`_refine_local`
    (displacement grid), :func:`_rough_nodes` (where the field is not smooth) and
    :func:`_tile_table` (scores and excluded regions); their knobs are an :class:`AlignConfig`.

    Parameters
    ----------
    slide
        The H&E slide (:class:`stlib.io.wsi.Wsi` or anything with ``read_region`` and
        ``level_downsamples``).
    nuclei_um
        Nucleus polygons in **Xenium µm** (GeoSeries / array of shapely polygons).
    initial
        (3, 3) initial Xenium µm -> H&E level-0 px affine.
    sample, route
        Recorded in the result.
    config
        The knobs (:class:`stlib.config.AlignConfig`: ``refine``, ``tile_um``, ``max_residual_um``,
        ``work_um_per_px``, ``grid_um``, ``min_nuclei``, ``n_global``, ``n_local``,
        ``min_score_ratio``, ``reference``; what each does is its field's help). Default: its defaults.
    **options
        Fields of :class:`AlignConfig` that override ``config`` (``refine=False``, ``tile_um=60``).
    timings
        When given, seconds spent are added to it: ``haematoxylin_images`` (reading and
        deconvolving the slide per working resolution) and ``tile_measurements``.

    Returns
    -------
    AlignmentResult
    """
    import shapely

    if isinstance(nuclei_um, _Rings):  # align_sample's HEST route: the ring vertices in µm
        geoms = nuclei_um
        empty = nuclei_um.ring.size == 0
    else:
        geoms = np.asarray(getattr(nuclei_um, "values", nuclei_um), dtype=object).ravel()
        if geoms.size:
            geoms = geoms[~(shapely.is_missing(geoms) | shapely.is_empty(geoms))]
        empty = geoms.size == 0
    if empty:
        raise InputError("no nucleus polygons to align", sample=sample or None,
                         fix="check the nucleus segmentation (xenium_seg / nucleus_boundaries) of this sample")
    cfg = with_options(AlignConfig, config, options)
    if cfg.tile_um <= 0 or cfg.work_um_per_px <= 0 or cfg.max_residual_um <= 0:
        raise ValueError("tile_um, work_um_per_px and max_residual_um must be positive")
    M0 = _as_affine(initial, "initial")
    if not cfg.reference:
        _keep_freed_memory()
    scene = _Scene(slide, geoms, M0, cfg, sample=sample, timings=timings)
    T = Transform(M0)
    gx, gy = _node_grid(scene.lo_um, scene.hi_um, cfg.grid)
    GX, GY = np.meshgrid(gx, gy)
    nodes = np.column_stack([GX.ravel(), GY.ravel()])
    if cfg.refine:  # the working level first, the affine refinement's coarser ones meanwhile
        scene.level_at(cfg.work_um_per_px)
        scene.prefetch([u for u, _ in _global_schedule(scene)])
    before = scene.measure(T, cfg.work_um_per_px, cfg.tile_um, nodes)
    history: list[dict[str, Any]] = []
    if cfg.refine:
        T = _refine_global(scene, T, history)
        T = _refine_local(scene, T, gx, gy, nodes, history)
    after = scene.measure(T, cfg.work_um_per_px, cfg.tile_um, nodes) if cfg.refine else before
    rough = _rough_nodes(T, after, (len(gy), len(gx)), cfg.max_residual_um * scene.ppu)
    tiles, excluded, field_ = _tile_table(T, nodes, before, after, rough, cfg, scene.ppu)
    scores = {"global": {"before": _score_summary(before, _residual_um(before, scene.ppu)),
                         "after": _score_summary(after, _residual_um(after, scene.ppu))},
              "tiles": tiles, "history": history}
    res = AlignmentResult(sample=sample, route=route, initial=M0, transform=T, scores=scores,
                          residual_field=field_, excluded_regions=excluded, he_um_per_px=1.0 / scene.ppu,
                          params=cfg.params())
    res.verdict = alignment_verdict(res, config=cfg)
    return res


def _global_schedule(scene: _Scene) -> list[tuple[float, float]]:
    """(µm/px, window µm) of each stage of :func:`_refine_global`: 4x and 2x coarser where the
    nuclei span at least three windows, then the working resolution."""
    cfg = scene.cfg
    schedule = [(cfg.work_um_per_px * k, cfg.tile_um * k) for k in (4, 2) if scene.extent_um >= 3 * cfg.tile_um * k]
    schedule += [(cfg.work_um_per_px, cfg.tile_um)] * max(1, cfg.n_global - len(schedule))
    return schedule[:max(cfg.n_global, len(schedule))]


def _refine_global(scene: _Scene, T: Transform, history: list[dict[str, Any]]) -> Transform:
    """Affine refinement, coarse to fine: each stage fits an affine (or, with too few or too
    clustered windows, a weighted-median translation) to the windows' phase-correlation shifts."""
    cfg, ppu = scene.cfg, scene.ppu
    for um_px, win_um in _global_schedule(scene):
        ngx, ngy = _node_grid(scene.lo_um, scene.hi_um, win_um / 2.0)
        NX, NY = np.meshgrid(ngx, ngy)
        gnodes = np.column_stack([NX.ravel(), NY.ravel()])
        m = scene.measure(T, um_px, win_um, gnodes)
        ok = np.isfinite(m["dx_px"]) & (m["reliability"] > 0.05)
        if not ok.any():
            history.append({"stage": "global", "um_per_px": um_px, "n_tiles": 0})
            continue
        mapped = T.apply_xy(gnodes[ok])
        target = mapped + np.column_stack([m["dx_px"][ok], m["dy_px"][ok]])
        w = m["reliability"][ok]
        spread = np.ptp(gnodes[ok], axis=0)
        if ok.sum() >= 6 and np.all(spread >= 1.5 * win_um / 2.0):
            M_new, _ = robust_affine_from_points(gnodes[ok], target, weights=w, min_scale=0.05 * ppu)
            kind = "affine"
        else:  # translation only (weighted median shift)
            d = np.column_stack([m["dx_px"][ok], m["dy_px"][ok]])
            t = np.array([_weighted_median(d[:, 0], w), _weighted_median(d[:, 1], w)])
            M_new = compose(np.array([[1, 0, t[0]], [0, 1, t[1]], [0, 0, 1.0]]), T.affine)
            kind = "translation"
        T = Transform(M_new)
        history.append({"stage": "global", "fit": kind, "um_per_px": um_px, "window_um": win_um,
                        "n_tiles": int(ok.sum()),
                        "median_shift_um": float(np.median(np.hypot(m["dx_px"][ok], m["dy_px"][ok]))) / ppu})
    return T


def _refine_local(scene: _Scene, T: Transform, gx: np.ndarray, gy: np.ndarray, nodes: np.ndarray,
                  history: list[dict[str, Any]]) -> Transform:
    """Local displacement grid: ``n_local`` rounds of measured residuals, neighbour outliers
    dropped, smoothed with reliability weights and added to the grid."""
    cfg, ppu = scene.cfg, scene.ppu
    dxg = np.zeros((len(gy), len(gx)))
    dyg = np.zeros_like(dxg)
    thr_px = cfg.max_residual_um * ppu
    for _ in range(cfg.n_local):
        Tg = T.with_grid(gx, gy, dxg, dyg)
        m = scene.measure(Tg, cfg.work_um_per_px, cfg.tile_um, nodes)
        rx = m["dx_px"].reshape(dxg.shape)
        ry = m["dy_px"].reshape(dxg.shape)
        rel = m["reliability"].reshape(dxg.shape)
        ok = np.isfinite(rx) & (rel > 0.05)
        out = _neighbour_outliers(rx, ry, ok, thr_px, reference=cfg.reference)
        use = ok & ~out
        sx, den = _smooth_field(rx, np.where(use, rel, 0.0), 0.5)
        sy, _ = _smooth_field(ry, np.where(use, rel, 0.0), 0.5)
        sx = np.nan_to_num(sx)
        sy = np.nan_to_num(sy)
        dxg = dxg + sx
        dyg = dyg + sy
        history.append({"stage": "local", "n_tiles": int(use.sum()), "n_outliers": int(out.sum()),
                        "median_shift_um": float(np.median(np.hypot(rx[ok], ry[ok]))) / ppu if ok.any() else None})
    return T.with_grid(gx, gy, dxg, dyg)


def _rough_nodes(T: Transform, after: dict[str, np.ndarray], shape_g: tuple[int, int], thr: float) -> np.ndarray:
    """Nodes (flat) where the field is not smooth (a fold, a tear, a mis-stitched area), which a
    bilinear grid cannot follow: neighbour outliers of the final residual field, and grid cells
    whose displacement jumps by more than ``thr`` px between adjacent nodes."""
    fx = after["dx_px"].reshape(shape_g)
    fy = after["dy_px"].reshape(shape_g)
    fok = np.isfinite(fx) & (after["reliability"].reshape(shape_g) > 0.05)
    rough = _neighbour_outliers(fx, fy, fok, thr)
    if T.has_grid:
        # a jump alone can be a real (steep but smooth) warp; it marks a discontinuity when
        # one of its two nodes also keeps a residual above a third of the threshold
        jump = np.zeros(shape_g, dtype=bool)
        resid = np.nan_to_num(np.hypot(fx, fy)) > thr / 3.0
        ddx = (np.hypot(np.diff(T.dx_px, axis=1), np.diff(T.dy_px, axis=1)) > thr) & (resid[:, :-1] | resid[:, 1:])
        ddy = (np.hypot(np.diff(T.dx_px, axis=0), np.diff(T.dy_px, axis=0)) > thr) & (resid[:-1, :] | resid[1:, :])
        jump[:, :-1] |= ddx
        jump[:, 1:] |= ddx
        jump[:-1, :] |= ddy
        jump[1:, :] |= ddy
        rough |= jump
    return rough.ravel()


def _exclusion_reason(i: int, after: dict[str, np.ndarray], res_after: np.ndarray, rough: np.ndarray,
                      med_corr: float, cfg: AlignConfig) -> str | None:
    """Why node ``i`` (with enough nuclei) is excluded, or None."""
    if np.isfinite(res_after[i]) and res_after[i] > cfg.max_residual_um:
        return "residual"
    if rough[i]:
        return "discontinuity"
    if not np.isfinite(after["dx_px"][i]):
        return "no_match"
    if (math.isfinite(med_corr) and med_corr > 0 and np.isfinite(after["corr"][i])
            and after["corr"][i] < cfg.min_score_ratio * med_corr):
        return "low_score"
    return None


def _tile_table(T: Transform, nodes: np.ndarray, before: dict[str, np.ndarray], after: dict[str, np.ndarray],
                rough: np.ndarray, cfg: AlignConfig, ppu: float) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Per-tile scores, excluded regions (H&E px) and the residual field after refinement."""
    node_px = T.apply_xy(nodes)
    res_after = _residual_um(after, ppu)
    res_before = _residual_um(before, ppu)
    enough = after["n_nuclei"] >= cfg.min_nuclei
    corr_ok = after["corr"][enough & np.isfinite(after["corr"])]
    med_corr = float(np.median(corr_ok)) if corr_ok.size else float("nan")
    tiles = []
    excluded = []
    half_px = 0.5 * cfg.grid * ppu  # a node's cell: the cells of all nodes tile the field
    for i in range(len(nodes)):
        reason = _exclusion_reason(i, after, res_after, rough, med_corr, cfg) if enough[i] else None
        tiles.append({
            "x_um": nodes[i, 0], "y_um": nodes[i, 1], "x_px": node_px[i, 0], "y_px": node_px[i, 1],
            "n_nuclei": int(after["n_nuclei"][i]),
            "corr_before": before["corr"][i], "corr_after": after["corr"][i],
            "dice_before": before["dice"][i], "dice_after": after["dice"][i],
            "residual_before_um": res_before[i], "residual_after_um": res_after[i],
            "reliability": after["reliability"][i], "excluded": reason is not None,
        })
        if reason is not None:
            # a residual / score measured over the window may come from anywhere in it;
            # a discontinuity of the grid sits in the node's own cell
            hp = half_px if reason == "discontinuity" else max(half_px, 0.5 * cfg.tile_um * ppu)
            excluded.append({"x0": float(node_px[i, 0] - hp), "y0": float(node_px[i, 1] - hp),
                             "x1": float(node_px[i, 0] + hp), "y1": float(node_px[i, 1] + hp),
                             "reason": reason, "residual_um": float(res_after[i])})
    field_ = {"x_um": nodes[:, 0], "y_um": nodes[:, 1], "x_px": node_px[:, 0], "y_px": node_px[:, 1],
              "dx_um": after["dx_px"] / ppu, "dy_um": after["dy_px"] / ppu,
              "reliability": after["reliability"]}
    return tiles, excluded, field_


def _residual_um(m: dict[str, np.ndarray], ppu: float) -> np.ndarray:
    """Length (µm) of each window's residual shift."""
    return np.hypot(m["dx_px"], m["dy_px"]) / ppu


def _score_summary(m: dict[str, np.ndarray], r: np.ndarray) -> dict[str, Any]:
    """Global scores of one measurement and the median of its residuals ``r`` (µm)."""
    ok = np.isfinite(r)
    return {"corr": m["global_corr"], "dice": m["global_dice"],
            "median_tile_corr": float(np.nanmedian(m["corr"])) if np.isfinite(m["corr"]).any() else None,
            "median_residual_um": float(np.median(r[ok])) if ok.any() else None,
            "n_tiles_measured": int(ok.sum())}


def _timed(timings: dict[str, float] | None, key: str) -> Any:
    """Context manager adding the seconds of its block to ``timings[key]`` (no-op without timings)."""
    import contextlib

    @contextlib.contextmanager
    def run() -> Any:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if timings is not None:
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

    return run()


def _keep_freed_memory() -> None:
    """Keep the alignment's freed memory for reuse (:func:`stlib.utils.keep_freed_memory`).

    A measurement allocates and frees the same large arrays again and again (0.1-0.4 GB working
    images, a few MB per window batch in each worker thread); with glibc's adaptive thresholds a
    fifth of the alignment's CPU time on the slide-sized sample was page faults (0.2 s of 15 s
    per measurement with these settings): requests up to 1 GiB come from the heap, freed heap
    memory is kept and the heap grows in 256 MiB steps.
    """
    keep_freed_memory(mmap_threshold=1 << 30, trim_threshold=(1 << 31) - 1, top_pad=256 << 20)


def _single_thread_blas() -> Any:
    """One BLAS thread for the many tiny matrix products of the sub-pixel DFT.

    With several BLAS threads on a busy machine each tiny product waits for the pool
    (measured 20x slower on 2 shared cores); threadpoolctl ships with scikit-learn.
    """
    import contextlib

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _weighted_median(v: np.ndarray, w: np.ndarray) -> float:
    o = np.argsort(v)
    c = np.cumsum(w[o])
    return float(v[o][np.searchsorted(c, 0.5 * c[-1])])


# =====================================================================================
# Sample-level entry points
# =====================================================================================

def _input_record(p: Path) -> dict[str, Any]:
    """Provenance of one input file in alignment.json: its full path, size and mtime."""
    fp = file_fingerprint(p)
    return {"path": str(p.resolve()), "size": fp["size"], "mtime_ns": fp["mtime_ns"]}


def _resolve_bundle(xenium_dir: Path, sample_id: str) -> Path:
    cand = xenium_dir / sample_id
    return cand if cand.is_dir() else xenium_dir


def _find_alignment_csv(bundle: Path, sample_id: str) -> Path:
    exact = bundle / f"{sample_id}_he_imagealignment.csv"
    if exact.is_file():
        return exact
    hits = sorted(bundle.glob("*he_imagealignment.csv")) + sorted(bundle.glob("*imagealignment*.csv"))
    if not hits:
        raise InputError("no *_he_imagealignment.csv in the Xenium bundle", path=bundle, sample=sample_id,
                         fix="export the H&E alignment from Xenium Explorer into the bundle, or drop --xenium-dir")
    return hits[0]


def _hest_inputs(hest_dir: Path, sample_id: str, *, rings: bool = False) -> tuple[Any, np.ndarray, Any, list[Path]]:
    """Slide, initial map, nuclei (µm) and input files of the HEST route.

    With ``rings=True`` the nuclei come as :class:`_Rings` (what :func:`align_nuclei` measures
    with): the exterior-ring vertices are taken from the H&E px polygons in the reading thread,
    while the registration is fitted, and mapped to µm as one array; the same numbers as the
    rings of the warped polygons (a point map commutes with taking the rings).
    """
    from concurrent.futures import ThreadPoolExecutor

    import shapely

    from stlib.io.hest import HestSample

    hs = HestSample(hest_dir, sample_id)

    def read() -> tuple[Any, Any]:
        nuc = hs.nuclei()
        if not rings or nuc is None or len(nuc) == 0:
            return nuc, None
        g = nuc.geometry.values
        g = np.asarray(g, dtype=object)[~(shapely.is_missing(g) | shapely.is_empty(g))]
        return nuc, _ring_coords(g)

    # the polygons are read (parquet, WKB, validity) in a side thread while the registration is fitted
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stlib-align-read") as side:
        nuc_f = side.submit(read)
        tx = hs.transcripts(min_qv=None, genes_only=False, columns=["x_location", "y_location", "he_x", "he_y"])
        M0 = fit_hest_registration(tx, sample=sample_id)
        del tx
        nuc, ring_px = nuc_f.result()
    if nuc is None or len(nuc) == 0:
        raise InputError("no nucleus polygons (xenium_seg is empty)", sample=sample_id,
                         path=hest_dir / "xenium_seg" / f"{sample_id}_xenium_nucleus_seg.parquet",
                         fix="download the sample's xenium_seg or pass --xenium-dir with nucleus_boundaries")
    inv = np.linalg.inv(M0)
    if rings:
        xy_px, ring_id = ring_px
        nuclei_um: Any = _Rings(Transform(inv).apply_xy_fast(xy_px) if len(xy_px) else xy_px, ring_id)
    else:
        nuclei_um = Transform(inv).warp_geometries(nuc.geometry.values)
    files = [p for p in (hest_dir / "wsis" / f"{sample_id}.tif",
                         hest_dir / "transcripts" / f"{sample_id}_transcripts.parquet",
                         hest_dir / "xenium_seg" / f"{sample_id}_xenium_nucleus_seg.parquet") if p.exists()]
    # the haematoxylin images read whole pyramid levels region by region: their JPEG tiles are
    # decoded in threads (tifffile decodes them one after the other by default on two CPUs)
    return hs.wsi(decode_workers=_usable_cpus()), M0, nuclei_um, files


def _xenium_inputs(hest_dir: Path, xenium_dir: Path, sample_id: str) -> tuple[Any, np.ndarray, Any, list[Path]]:
    """Slide, initial map, nuclei (µm) and input files of the raw-bundle route."""
    from stlib.io.wsi import open_wsi
    from stlib.io.xenium import XeniumBundle

    bundle = _resolve_bundle(xenium_dir, sample_id)
    csv = _find_alignment_csv(bundle, sample_id)
    xb = XeniumBundle(bundle, sample=sample_id)
    ps = float(xb.pixel_size_um or XENIUM_PIXEL_SIZE_UM)
    M0 = xenium_alignment_um_to_he_px(csv, pixel_size_um=ps, sample=sample_id)
    nuc = xb.nucleus_boundaries()
    if nuc is None or len(nuc) == 0:
        raise InputError("no nucleus boundaries in the Xenium bundle", path=bundle, sample=sample_id,
                         fix="the bundle needs nucleus_boundaries.parquet|csv")
    he = None
    for name in ("he_image.ome.tif", f"{sample_id}_he_image.ome.tif", "he_image.tif"):
        if (bundle / name).is_file():
            he = bundle / name
            break
    if he is None:
        he = hest_dir / "wsis" / f"{sample_id}.tif"
    if not he.is_file():
        raise InputError("no H&E image for the Xenium route", path=bundle, sample=sample_id,
                         fix=f"put he_image.ome.tif in the bundle or the slide at {he}")
    files = [csv, he] + [p for p in (bundle / "nucleus_boundaries.parquet", bundle / "nucleus_boundaries.csv")
                         if p.exists()]
    return open_wsi(he), M0, nuc.geometry.values, files


def align_sample(hest_dir: str | Path, sample_id: str, *, config: AlignConfig | None = None,
                 xenium_dir: str | Path | None = None, timings: dict[str, float] | None = None,
                 **options: Any) -> AlignmentResult:
    """Align one sample's Xenium nuclei to its H&E slide (see :func:`align_nuclei`).

    Parameters
    ----------
    hest_dir
        HEST-1k layout root (``wsis/``, ``transcripts/``, ``xenium_seg/``).
    sample_id
        Sample id.
    xenium_dir
        When given, the raw-bundle route: ``xenium_dir/{id}/`` (or ``xenium_dir`` itself)
        with ``*_he_imagealignment.csv`` and ``nucleus_boundaries``; otherwise the HEST route
        (registration fitted from the transcripts, nuclei from ``xenium_seg``).
    config, **options
        The :class:`stlib.config.AlignConfig` and keyword overrides of its fields (:func:`align_nuclei`).
    timings
        Seconds spent, per part (:func:`align_nuclei`; ``inputs`` for reading them).
    """
    hest_dir = Path(hest_dir)
    t0 = time.perf_counter()
    if xenium_dir is not None:
        slide, M0, nuclei_um, files = _xenium_inputs(hest_dir, Path(xenium_dir), sample_id)
        route = "xenium-csv"
    else:
        slide, M0, nuclei_um, files = _hest_inputs(hest_dir, sample_id, rings=True)
        route = "hest"
    if timings is not None:
        timings["inputs"] = timings.get("inputs", 0.0) + time.perf_counter() - t0
    res = align_nuclei(slide, nuclei_um, M0, sample=sample_id, route=route,
                       config=with_options(AlignConfig, config, options), timings=timings)
    res.inputs = {"files": [_input_record(p) for p in files]}
    return res


def transform_nuclei(nuclei: Any, result: AlignmentResult | Transform, *, units: str | None = None,
                     initial: Any | None = None) -> Any:
    """Aligned nucleus polygons in H&E level-0 px.

    Parameters
    ----------
    nuclei
        GeoDataFrame (or GeoSeries) of nucleus polygons, either in Xenium µm (raw bundle)
        or in H&E px through the initial registration (HEST's ``xenium_seg``).
    result
        An :class:`AlignmentResult` (or a bare :class:`Transform`, then ``units="um"``
        unless ``initial`` is given).
    units
        ``"um"`` or ``"he_px"``; default: ``"he_px"`` for the HEST route, ``"um"`` otherwise.
        H&E px input is first taken back to µm with the inverse of the initial affine.
    initial
        Initial affine for ``units="he_px"`` when ``result`` is a bare Transform.

    Returns
    -------
    geopandas.GeoDataFrame
        Same rows and columns, geometry in H&E level-0 px.
    """
    import geopandas as gpd

    if isinstance(result, AlignmentResult):
        T, M0 = result.transform, result.initial
        if units is None:
            units = "he_px" if result.route == "hest" else "um"
    else:
        T, M0 = result, initial
        if units is None:
            units = "um" if initial is None else "he_px"
    if units not in ("um", "he_px"):
        raise ValueError(f"units must be 'um' or 'he_px', got {units!r}")
    gdf = nuclei.copy() if isinstance(nuclei, gpd.GeoDataFrame) else gpd.GeoDataFrame(geometry=gpd.GeoSeries(nuclei))
    geoms = gdf.geometry.values
    if units == "he_px":
        if M0 is None:
            raise ValueError("units='he_px' needs the initial affine")
        # back to µm through the inverse initial affine, then through T, in one pass
        warped = T.warp_geometries(geoms, before=Transform(np.linalg.inv(_as_affine(M0))))
    else:
        warped = T.warp_geometries(geoms)
    gdf = gdf.set_geometry(gpd.GeoSeries(warped, index=gdf.index))
    return gdf.set_crs(None, allow_override=True)


def overlay_crop(hest_dir: str | Path, result: AlignmentResult, *, truth_dir: str | Path | None = None,
                 crop_um: float = 60.0, center_xy: tuple[float, float] | None = None) -> dict[str, Any]:
    """The inputs of :func:`stlib.plot.alignment_overlay` for one sample: an H&E crop and the
    nucleus polygons (H&E level-0 px) under the initial and the refined map.

    Parameters
    ----------
    hest_dir
        HEST layout root of the sample.
    result
        Its alignment.
    truth_dir
        Demo truth root: also the true visible nuclei (``truth``).
    crop_um
        Edge of the square crop (µm).
    center_xy
        Centre of the crop in level-0 px (default: the slide's centre).

    Returns
    -------
    dict
        ``image``, ``origin`` (x0, y0), ``before``, ``after``, ``truth`` (or None) and ``sample``.
    """
    import geopandas as gpd

    from stlib.io.hest import HestSample

    s = HestSample(hest_dir, result.sample)
    nuc = s.nuclei()
    after = transform_nuclei(nuc, result).geometry.values
    before = nuc.geometry.values if result.route == "hest" else after
    truth = None
    if truth_dir is not None:
        t = gpd.read_parquet(Path(truth_dir) / result.sample / "nuclei.parquet")
        truth = t.geometry.values[t["visible"].to_numpy(bool)]
    with s.wsi() as w:
        H, W = w.shape
        cx, cy = center_xy or (W / 2, H / 2)
        n = int(round(crop_um / s.pixel_size_um))
        x0 = int(np.clip(cx - n / 2, 0, max(0, W - n)))
        y0 = int(np.clip(cy - n / 2, 0, max(0, H - n)))
        img = w.read_region(x0, y0, n, n)
    return {"image": img, "origin": (x0, y0), "before": before, "after": after, "truth": truth,
            "sample": result.sample}


def in_excluded_region(result: AlignmentResult | dict, x_px: Any, y_px: Any) -> np.ndarray:
    """Whether H&E px points fall in an excluded region of the alignment."""
    regions = result.excluded_regions if isinstance(result, AlignmentResult) else result.get("excluded_regions", [])
    x = np.asarray(x_px, float)
    y = np.asarray(y_px, float)
    out = np.zeros(np.broadcast(x, y).shape, dtype=bool)
    for r in regions:
        out |= (x >= r["x0"]) & (x < r["x1"]) & (y >= r["y0"]) & (y < r["y1"])
    return out


# =====================================================================================
# Evaluation against a known truth (demo cohort)
# =====================================================================================

def alignment_error_um(result_or_transform: AlignmentResult | Transform | np.ndarray,
                       truth_transform: dict[str, Any], points_um: Any) -> np.ndarray:
    """Distance (µm) between a map and the true map at Xenium µm points.

    Parameters
    ----------
    result_or_transform
        :class:`AlignmentResult`, :class:`Transform` or a 3x3 affine.
    truth_transform
        The demo's ``truth/{id}/transform.json`` (``xenium_um_to_he_px`` + optional
        ``local_displacement``).
    points_um
        (N, 2) Xenium µm points (e.g. nucleus centroids).

    Returns
    -------
    numpy.ndarray
        (N,) distances in µm (H&E px distance x the true map's µm/px).
    """
    if isinstance(result_or_transform, AlignmentResult):
        T = result_or_transform.transform
    elif isinstance(result_or_transform, Transform):
        T = result_or_transform
    else:
        T = Transform(result_or_transform)
    truth = Transform.from_dict(truth_transform)
    P = _as_points(points_um, "points_um")
    d = T.apply_xy(P) - truth.apply_xy(P)
    return np.hypot(d[:, 0], d[:, 1]) / truth.px_per_um


def nuclei_mask_dice(a_px: Any, b_px: Any, *, he_um_per_px: float, um_per_px: float = TARGET_UM_PER_PX_40X,
                     bounds: tuple[float, float, float, float] | None = None) -> float:
    """Dice of two nucleus-polygon sets (H&E px) rasterised at ``um_per_px``.

    ``bounds`` (x0, y0, x1, y1 in H&E px) defaults to the union of both sets' bounds.
    """
    import shapely

    ga = np.asarray(getattr(a_px, "values", a_px), dtype=object).ravel()
    gb = np.asarray(getattr(b_px, "values", b_px), dtype=object).ravel()
    if bounds is None:
        bb = shapely.total_bounds(np.concatenate([ga, gb]))
        bounds = tuple(float(v) for v in bb)
    f = um_per_px / he_um_per_px
    grid = WorkGrid(x0=bounds[0], y0=bounds[1], f=f,
                    shape=(int(math.ceil((bounds[3] - bounds[1]) / f)) + 1,
                           int(math.ceil((bounds[2] - bounds[0]) / f)) + 1))
    ma = rasterize_polygons(ga, grid.shape, transform=grid.xy_to_work)
    mb = rasterize_polygons(gb, grid.shape, transform=grid.xy_to_work)
    return _dice(ma, mb)


# =====================================================================================
# CLI
# =====================================================================================

def _route_files(hest_dir: Path, sample: str, xenium_dir: str | None) -> list[Path]:
    if xenium_dir is None:
        paths = [hest_dir / "wsis" / f"{sample}.tif", hest_dir / "metadata" / f"{sample}.json",
                 hest_dir / "transcripts" / f"{sample}_transcripts.parquet",
                 hest_dir / "xenium_seg" / f"{sample}_xenium_nucleus_seg.parquet"]
    else:
        bundle = _resolve_bundle(Path(xenium_dir), sample)
        paths = sorted(p for p in bundle.glob("*") if p.is_file() and (
            "imagealignment" in p.name or p.name.startswith("nucleus_boundaries") or "he_image" in p.name))
    return [p for p in paths if p.exists()]


def align_and_save(hest_dir: str | Path, sample_id: str, out_dir: str | Path, *, config: AlignConfig | None = None,
                   xenium_dir: str | Path | None = None, force: bool = False,
                   **options: Any) -> tuple[AlignmentResult, bool]:
    """Align one sample and write ``out_dir/{sample_id}/alignment.json``, idempotently.

    ``out_dir`` is the alignment folder of a run (:attr:`stlib.layout.RunLayout.alignment_root`).
    ``config`` and keyword ``options`` (fields of :class:`stlib.config.AlignConfig`) are the knobs.
    The output is reused while its cache key (:func:`stlib.utils.cache_key` of the config, the route
    and the input files' fingerprints) is unchanged, unless ``force``.

    Returns
    -------
    (result, computed)
        ``computed`` is False when an up-to-date alignment.json was reused.
    """
    hest_dir = Path(hest_dir)
    cfg = with_options(AlignConfig, config, options)
    out = Path(out_dir) / sample_id / "alignment.json"
    key = alignment_key(hest_dir, sample_id, cfg, xenium_dir)
    if out.is_file() and not force:
        try:
            old = json.loads(out.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("inputs", {}).get("key") == key:
            return AlignmentResult.from_dict(old), False
    res = align_sample(hest_dir, sample_id, config=cfg, xenium_dir=xenium_dir)
    res.inputs["key"] = key
    res.save(out)
    return res, True


def alignment_key(hest_dir: str | Path, sample_id: str, config: AlignConfig,
                  xenium_dir: str | Path | None = None) -> str:
    """The cache key of one sample's alignment: the config, the route and the input files."""
    from dataclasses import asdict

    record = {"version": ALIGN_VERSION, "sample": sample_id, "config": asdict(config),
              "xenium_dir": None if xenium_dir is None else str(Path(xenium_dir).resolve())}
    return cache_key(record, _route_files(Path(hest_dir), sample_id, None if xenium_dir is None else str(xenium_dir)))


def truth_comparison(result: AlignmentResult, hest_dir: str | Path, truth_dir: str | Path, *,
                     um_per_px: float = TARGET_UM_PER_PX_40X) -> dict[str, float]:
    """Alignment error and mask Dice before / after refinement against the demo truth.

    Error: distance (µm) between the map and the true map at the Xenium nuclei centroids
    (median and 90th percentile). Dice: Xenium nucleus polygons mapped by the initial and by the
    refined map vs the true H&E nuclei, rasterised at ``um_per_px`` over the slide.
    """
    import geopandas as gpd

    from stlib.io.hest import HestSample

    truth_dir = Path(truth_dir) / result.sample
    tf = read_json(truth_dir / "transform.json")
    true_nuc = gpd.read_parquet(truth_dir / "nuclei.parquet")
    true_geoms = true_nuc.geometry.values[true_nuc["visible"].to_numpy(bool)] if "visible" in true_nuc else true_nuc.geometry.values
    nuc = HestSample(hest_dir, result.sample).nuclei()
    if result.route == "hest":
        um = Transform(np.linalg.inv(_as_affine(result.initial))).warp_geometries(nuc.geometry.values)
    else:
        um = nuc.geometry.values
    import shapely

    cxy = shapely.get_coordinates(shapely.centroid(um))
    err_before = alignment_error_um(Transform(result.initial), tf, cxy)
    err_after = alignment_error_um(result, tf, cxy)
    he_um = float(tf.get("he_um_per_px", result.he_um_per_px))
    before = Transform(result.initial).warp_geometries(um)
    after = result.transform.warp_geometries(um)
    bounds = tuple(float(v) for v in shapely.total_bounds(true_geoms))
    return {
        "median_error_um_before": float(np.median(err_before)),
        "median_error_um_after": float(np.median(err_after)),
        "p90_error_um_before": float(np.quantile(err_before, 0.9)),
        "p90_error_um_after": float(np.quantile(err_after, 0.9)),
        "dice_before": nuclei_mask_dice(before, true_geoms, he_um_per_px=he_um, um_per_px=um_per_px, bounds=bounds),
        "dice_after": nuclei_mask_dice(after, true_geoms, he_um_per_px=he_um, um_per_px=um_per_px, bounds=bounds),
        "n_nuclei": int(len(cxy)),
    }


def cli_parser() -> argparse.ArgumentParser:
    """The parser of ``stlib align``; its knob options are generated from :class:`AlignConfig`."""
    from stlib.config import add_config_arguments

    p = argparse.ArgumentParser(prog="stlib align", description=__doc__.split("\n\n")[0])
    p.add_argument("--hest-dir", required=True, help="HEST-1k layout root (wsis/, transcripts/, xenium_seg/)")
    p.add_argument("--sample", required=True, action="append", help="sample id (repeatable)")
    p.add_argument("--run-dir", required=True, help="run folder; writes RUN/alignment/ID/alignment.json")
    p.add_argument("--profile", default=None,
                   help="start from this profile's 01_alignment block (default: the AlignConfig defaults)")
    p.add_argument("--xenium-dir", default=None, help="raw Xenium bundle(s): use the *_he_imagealignment.csv route")
    p.add_argument("--force", action="store_true", help="recompute even when the output is up to date")
    add_config_arguments(p, AlignConfig)
    return p


def cli_main(argv: list[str] | None = None) -> int:
    """``stlib align``: write ``RUN/alignment/ID/alignment.json`` for one or more samples."""
    from stlib.config import config_from_args, stage_config
    from stlib.layout import RunLayout

    args = cli_parser().parse_args(argv)
    base = stage_config(args.profile, "align") if args.profile else None
    cfg = config_from_args(AlignConfig, args, base=base)
    hest_dir, layout = Path(args.hest_dir), RunLayout(args.run_dir)
    for sample in args.sample:
        out = layout.alignment_json(sample)
        res, computed = align_and_save(hest_dir, sample, layout.alignment_root, config=cfg,
                                       xenium_dir=args.xenium_dir, force=args.force)
        if not computed:
            print(f"stlib align: {sample}: up to date ({out}); --force to recompute")
            continue
        g = res.scores["global"]
        def fmt(v: Any) -> str:
            return "n/a" if v is None else f"{v:.2f}"

        print(f"stlib align: {sample}: corr {fmt(g['before']['corr'])} -> {fmt(g['after']['corr'])}, "
              f"median tile residual {fmt(g['before']['median_residual_um'])} -> "
              f"{fmt(g['after']['median_residual_um'])} um, "
              f"{len(res.excluded_regions)} excluded region(s), status {res.status} -> {out}")
        if res.status == "failed":
            print(f"stlib align: {sample}: FAILED: " + "; ".join(res.verdict["reasons"])
                  + "; `stlib labels` will not use its nuclei (see its message for the fixes)", file=sys.stderr)
    return 0
