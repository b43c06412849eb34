"""HoVer-Net post-processing: NP / HV / NT maps -> nucleus instances, classes and a table.

The recipe is HoVer-Net's (Graham et al., Med. Image Anal. 58, 2019; ``vqdang/hover_net``
``models/hovernet/post_proc.py``), rewritten with numpy / scipy / scikit-image (no OpenCV):

1. blob = NP probability >= ``np_thresh``; 4-connected components smaller than ``min_size``
   pixels are removed.
2. H and V are min-max normalised to [0, 1] and differentiated with a ``sobel_ksize``
   Sobel filter (OpenCV's kernel: binomial smoothing across, binomial-times-difference
   along the axis; mirrored border), each derivative min-max normalised again and inverted:
   ``S_h = 1 - norm(∂h/∂x)``, ``S_v = 1 - norm(∂v/∂y)``, ``Sm = max(S_h, S_v)`` on the blob
   (0 outside). The derivative is signed, as in the reference: inside a nucleus the HV maps
   rise (large ∂, small S), between touching nuclei they fall sharply (S close to 1).
3. markers = blob with ``Sm >= marker_thresh`` removed, holes filled, opened with a 5x5
   ellipse, 4-connected components smaller than ``min_size`` removed.
4. energy = -blur3x3((1 - Sm) · blob); marker-controlled watershed of the energy inside the
   blob. A blob reached by no marker stays background in the reference; here it becomes one
   nucleus unless ``keep_unmarked=False``.
5. class of a nucleus = majority vote of the pixel classes (argmax of ``tp_prob``); if
   background wins and another class occurs, the most frequent other class;
   ``type_prob`` = mean over the nucleus of the probability of the chosen class.

Marker modes (``mode``): the steps above are ``"hv"``. ``"distance"`` replaces steps 2-4 by a
distance-transform watershed of the network's mask, as the classical baseline
(:mod:`stlib.model.baseline`) does on its Otsu mask but with other markers: the blob's holes are filled, markers are the h-maxima (height ``marker_h`` px) of its smoothed
distance transform, and the watershed floods the negated distance; the HV maps are unused, which
suits a network trained too briefly for them to mark borders. ``"blend"`` multiplies that distance
by ``1 - hv_weight * Sm`` first, so HV edges deepen the necks between touching nuclei.

Whole-slide images are processed in overlapping tiles; :func:`remove_seam_duplicates`
keeps each nucleus once (rule in its docstring) and :func:`stitch_tiles` assembles the
global maps. Per-nucleus statistics are vectorised (``np.bincount`` /
``scipy.ndimage.find_objects``), with no Python loop over pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb
from typing import Any

import numba
import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "sobel_kernels", "hovernet_postprocess", "nuclei_table", "tile_origins",
    "remove_seam_duplicates", "stitch_tiles", "hovernet_postprocess_tiled", "POSTPROC_MODES",
]

#: how :func:`hovernet_postprocess` finds its watershed markers (its ``mode``)
POSTPROC_MODES = ("hv", "distance", "blend", "peaks")

#: OpenCV's 5x5 MORPH_ELLIPSE structuring element (used for the marker opening).
ELLIPSE_5x5 = np.array(
    [[0, 0, 1, 0, 0],
     [1, 1, 1, 1, 1],
     [1, 1, 1, 1, 1],
     [1, 1, 1, 1, 1],
     [0, 0, 1, 0, 0]], bool)


def sobel_kernels(ksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable Sobel kernels of odd size ``ksize`` (>= 3): (smoothing, derivative).

    Smoothing = binomial coefficients C(k-1, i) (the k-th row of Pascal's triangle);
    derivative = binomial of order k-2 convolved with [-1, 1], so for k = 3 the familiar
    [1, 2, 1] and [-1, 0, 1]. Applied as a correlation, the derivative is positive where
    the image increases. (Same kernels as OpenCV's ``getDerivKernels``, unnormalised.)
    """
    if ksize < 3 or ksize % 2 == 0:
        raise ValueError(f"sobel_ksize must be odd and >= 3, got {ksize!r}")
    smooth = np.array([comb(ksize - 1, i) for i in range(ksize)], float)
    base = np.array([comb(ksize - 2, i) for i in range(ksize - 1)], float)
    deriv = np.convolve(base, [-1.0, 1.0])  # = [-b0, b0 - b1, ..., b_last]: rising -> positive
    return smooth, deriv


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float64)
    return (x - lo) / (hi - lo)


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Zero the labels with fewer than ``min_size`` pixels (in place); returns labels."""
    if min_size > 1 and labels.max() > 0:
        area = np.bincount(labels.ravel())
        small = area < min_size
        small[0] = False
        if small.any():
            labels[small[labels]] = 0
    return labels


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[labels], int(ids.size)


def _edge_map(hv: np.ndarray, blob: np.ndarray, sobel_ksize: int) -> np.ndarray:
    """HoVer-Net's ``Sm`` (step 2 of the module docstring): close to 1 where the HV maps fall
    sharply (between touching nuclei), 0 outside the blob."""
    h, v = _minmax(hv[0].astype(np.float64)), _minmax(hv[1].astype(np.float64))
    smooth, deriv = sobel_kernels(sobel_ksize)
    dh = ndi.correlate1d(ndi.correlate1d(h, deriv, axis=1, mode="mirror"), smooth, axis=0, mode="mirror")
    dv = ndi.correlate1d(ndi.correlate1d(v, deriv, axis=0, mode="mirror"), smooth, axis=1, mode="mirror")
    sm = np.maximum(1.0 - _minmax(dh), 1.0 - _minmax(dv))
    return np.where(blob, sm, 0.0)


def _keep_unmarked(inst: np.ndarray, blob: np.ndarray, min_size: int) -> np.ndarray:
    """A blob without any marker (flat or noisy HV, e.g. early in training) becomes one nucleus,
    not background: the reference drops it, which turns a good NP map into PQ 0."""
    lost, _ = ndi.label(blob & (inst == 0))
    lost = _remove_small(lost, min_size)
    return np.where(lost > 0, lost + inst.max(), inst).astype(np.int32)


@numba.njit(cache=True, nogil=True)
def _heap_push(hv, hi, size, v, p):  # pragma: no cover - compiled
    """Push value ``v`` of pixel ``p`` on the binary max-heap ``(hv, hi)`` of ``size`` entries (sift
    up); returns the new size."""
    k = size
    while k > 0:
        parent = (k - 1) >> 1
        if hv[parent] >= v:
            break
        hv[k] = hv[parent]
        hi[k] = hi[parent]
        k = parent
    hv[k] = v
    hi[k] = p
    return size + 1


@numba.njit(cache=True, nogil=True)
def _reconstruct_dilation(seed, mask):  # pragma: no cover - compiled
    """Grey reconstruction by dilation of ``seed`` under ``mask`` (2-D float64, ``seed <= mask``),
    8-connected: ``skimage.morphology.reconstruction(seed, mask, method="dilation")``.

    Written by hand because the library call spends ~2 ms per call in set-up (padding, a full
    argsort, linked lists) and the distance markers call it once per nucleus-sized object
    (~40 per 256 px tile): there it was the largest post-processing cost. The result is the
    bottleneck ("max-min") path value, computed by flooding from the highest value down with a
    binary max-heap; only min/max of input values, no arithmetic, so every output value is one of
    the inputs and the result is the library's to the bit (tests/test_postproc_kernels.py).
    """
    H, W = seed.shape
    n = H * W
    rec = seed.copy().reshape(n)
    m = np.ascontiguousarray(mask).reshape(n)
    cap = 9 * n + 1  # n initial entries + at most one push per improvement along each of 8 edges
    hv = np.empty(cap, np.float64)
    hi = np.empty(cap, np.int64)
    size = 0
    for p in range(n):  # push every pixel
        size = _heap_push(hv, hi, size, rec[p], p)
    while size > 0:
        v = hv[0]
        p = hi[0]
        size -= 1  # pop: move the last entry down from the root
        lv = hv[size]
        li = hi[size]
        k = 0
        while True:
            c = 2 * k + 1
            if c >= size:
                break
            if c + 1 < size and hv[c + 1] > hv[c]:
                c += 1
            if hv[c] <= lv:
                break
            hv[k] = hv[c]
            hi[k] = hi[c]
            k = c
        if size > 0:
            hv[k] = lv
            hi[k] = li
        if v < rec[p]:  # a stale entry: p was raised after this push
            continue
        y, x = p // W, p % W
        for dy in range(-1, 2):
            yy = y + dy
            if yy < 0 or yy >= H:
                continue
            for dx in range(-1, 2):
                xx = x + dx
                if (dy == 0 and dx == 0) or xx < 0 or xx >= W:
                    continue
                q = yy * W + xx
                c = v if v < m[q] else m[q]
                if c > rec[q]:
                    rec[q] = c
                    size = _heap_push(hv, hi, size, c, q)
    return rec.reshape(H, W)


def h_maxima_mask(image: np.ndarray, h: float, *, reference: bool = False) -> np.ndarray:
    """``skimage.morphology.h_maxima(image, h) > 0`` (8-connected) of a 2-D float64 image, with the
    compiled reconstruction (:func:`_reconstruct_dilation`); the library's own steps around it
    (range check, float resolution margin, residue >= h). ``reference=True`` (or another dtype /
    dimension) calls the library."""
    if reference or image.ndim != 2 or image.dtype != np.float64:
        from skimage.morphology import h_maxima

        return h_maxima(image, h) > 0
    if h > np.ptp(image):
        return np.zeros(image.shape, bool)
    if h == 0:
        raise ValueError("h = 0 is ambiguous, use local_maxima() instead?")
    resolution = 2 * np.finfo(image.dtype).resolution * np.abs(image)
    rec = _reconstruct_dilation(image - h - resolution, np.ascontiguousarray(image))
    return (image - rec) >= h


def _h_maxima_by_object(image: np.ndarray, h: float, *, reference: bool = False) -> np.ndarray:
    """``skimage.morphology.h_maxima(image, h) > 0`` of a non-negative image that is 0 outside
    its objects, computed per 8-connected object in its bounding box (plus one pixel of 0):
    the same result, as objects never interact through 0-valued pixels (h > 0), at a fraction
    of the cost (the grey reconstruction does not sweep the background). Each object goes
    through :func:`h_maxima_mask` (``reference=True``: the library's ``h_maxima``)."""
    out = np.zeros(image.shape, bool)
    lab, _ = ndi.label(image > 0, structure=np.ones((3, 3), bool))
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        mine = lab[sl] == i
        sub = np.where(mine, image[sl], 0.0)
        out[sl] |= h_maxima_mask(sub, h, reference=reference) & mine
    return out


def _filled_blob(np_prob: np.ndarray, np_thresh: float, min_size: int) -> np.ndarray:
    """The NP mask of the distance-based modes: blobs of ``np_prob >= np_thresh`` of at least
    ``min_size`` px, holes filled."""
    blob_lab, _ = ndi.label(np_prob >= np_thresh)
    return ndi.binary_fill_holes(_remove_small(blob_lab, min_size) > 0)


def _flood_distance(dist: np.ndarray, markers: np.ndarray, blob: np.ndarray, min_size: int,
                    keep_unmarked: bool) -> np.ndarray:
    """Watershed of ``-dist`` from ``markers`` inside ``blob``, small nuclei removed, unmarked blobs
    kept if asked, ids relabelled 1..n (the common end of the "peaks", "distance" and "blend" modes)."""
    from skimage.segmentation import watershed

    inst = watershed(-dist, markers=markers, mask=blob).astype(np.int32)
    inst = _remove_small(inst, min_size)
    if keep_unmarked:
        inst = _keep_unmarked(inst, blob, min_size)
    return _relabel(inst)[0]


def _peak_instances(np_prob: np.ndarray, *, np_thresh: float, min_size: int, marker_dist: float,
                    keep_unmarked: bool) -> np.ndarray:
    """Mode ``"peaks"``: the classical baseline's marker rule (:mod:`stlib.model.baseline`) on the NP mask.

    The NP blob (holes filled, small blobs removed) is split by a watershed of its Euclidean
    distance transform from markers at the distance's local maxima at least ``marker_dist`` px
    apart (``skimage.feature.peak_local_max`` per blob), exactly the rule the Otsu + watershed
    baseline applies to its Otsu mask; only the mask differs.
    """
    from skimage.feature import peak_local_max

    blob = _filled_blob(np_prob, np_thresh, min_size)
    if not blob.any():
        return np.zeros(np_prob.shape, np.int32)
    dist = ndi.distance_transform_edt(blob)
    peaks = peak_local_max(dist, min_distance=max(1, int(round(marker_dist))), labels=ndi.label(blob)[0],
                           exclude_border=False)
    markers = np.zeros(blob.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return _flood_distance(dist, markers, blob, min_size, keep_unmarked)


def _distance_instances(np_prob: np.ndarray, hv: np.ndarray, *, np_thresh: float, min_size: int,
                        sobel_ksize: int, marker_h: float, hv_weight: float, keep_unmarked: bool) -> np.ndarray:
    """Modes ``"distance"`` and ``"blend"``: the NP blob split by a watershed of its distance transform.

    A distance-transform watershed as in the classical baseline (:mod:`stlib.model.baseline`), on the
    network's nucleus mask instead of an Otsu mask, with other markers (the baseline takes the
    distance's local maxima a minimum distance apart): markers are the h-maxima (height ``marker_h`` px) of the
    distance to the blob's border, smoothed by a Gaussian of sigma 1 px, so a neck splits two nuclei
    only where both sides are at least ``marker_h`` px "higher" than the neck. ``hv_weight`` > 0
    ("blend") multiplies the distance by ``1 - hv_weight * Sm`` (HoVer-Net's edge map), so HV
    edges between touching nuclei deepen the neck.
    """
    blob = _filled_blob(np_prob, np_thresh, min_size)
    if not blob.any():
        return np.zeros(np_prob.shape, np.int32)
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(blob), 1.0) * blob
    if hv_weight > 0:
        dist = dist * (1.0 - hv_weight * _edge_map(hv, blob, sobel_ksize))
    markers, _ = ndi.label(_h_maxima_by_object(dist, marker_h), structure=np.ones((3, 3), bool))
    return _flood_distance(dist, markers, blob, min_size, keep_unmarked)


def _instances(np_prob: np.ndarray, hv: np.ndarray, *, np_thresh: float, min_size: int,
               sobel_ksize: int, marker_thresh: float, keep_unmarked: bool = True) -> np.ndarray:
    from skimage.segmentation import watershed

    blob_lab, _ = ndi.label(np_prob >= np_thresh)
    blob = _remove_small(blob_lab, min_size) > 0
    if not blob.any():
        return np.zeros(np_prob.shape, np.int32)
    sm = _edge_map(hv, blob, sobel_ksize)
    blur = np.array([0.25, 0.5, 0.25])  # OpenCV's 3x3 Gaussian with sigma 0
    energy = (1.0 - sm) * blob
    energy = -ndi.correlate1d(ndi.correlate1d(energy, blur, axis=0, mode="mirror"), blur, axis=1, mode="mirror")
    marker = blob & ~(sm >= marker_thresh)
    marker = ndi.binary_fill_holes(marker)
    # opening as OpenCV does it: the image border neither erodes nor dilates
    marker = ndi.binary_erosion(marker, ELLIPSE_5x5, border_value=1)
    marker = ndi.binary_dilation(marker, ELLIPSE_5x5, border_value=0)
    markers, _ = ndi.label(marker)
    markers = _remove_small(markers, min_size)
    inst = watershed(energy, markers=markers, mask=blob).astype(np.int32)
    if keep_unmarked:
        inst = _keep_unmarked(inst, blob, min_size)
    return _relabel(inst)[0]


def nuclei_table(inst: np.ndarray, type_map: np.ndarray | None = None,
                 type_prob: np.ndarray | None = None) -> dict[int, dict[str, Any]]:
    """Per-nucleus centroid ``(x, y)``, bbox ``[[rmin, cmin], [rmax, cmax]]`` (max exclusive),
    area, and when given the nucleus ``type`` / ``type_prob`` (arrays indexed by id).

    ``inst`` must have contiguous ids 1..n (as :func:`hovernet_postprocess` returns).
    """
    n = int(inst.max()) if inst.size else 0
    if n == 0:
        return {}
    flat = inst.ravel()
    area = np.bincount(flat, minlength=n + 1).astype(np.float64)
    rr, cc = np.indices(inst.shape)
    cy = np.bincount(flat, weights=rr.ravel(), minlength=n + 1)
    cx = np.bincount(flat, weights=cc.ravel(), minlength=n + 1)
    slices = ndi.find_objects(inst, max_label=n)
    table: dict[int, dict[str, Any]] = {}
    for i, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        rec: dict[str, Any] = {
            "centroid": (cx[i] / area[i], cy[i] / area[i]),
            "bbox": ((sl[0].start, sl[1].start), (sl[0].stop, sl[1].stop)),
            "area": int(area[i]),
        }
        if type_map is not None:
            rec["type"] = int(type_map[i])
        if type_prob is not None:
            rec["type_prob"] = float(type_prob[i])
        table[i] = rec
    return table


def hovernet_postprocess(np_prob: Any, hv: Any, tp_prob: Any = None, *, np_thresh: float = 0.5,
                         min_size: int = 10, sobel_ksize: int = 21, marker_thresh: float = 0.4,
                         keep_unmarked: bool = True, mode: str = "hv", marker_h: float = 2.0,
                         hv_weight: float = 0.5, marker_dist: float = 10.0,
                         ) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, Any]]]:
    """Instances, classes and a nucleus table from HoVer-Net outputs of one tile.

    Parameters
    ----------
    np_prob
        (H, W) nucleus probability (softmax channel 1 of the NP head).
    hv
        (2, H, W) horizontal then vertical distance maps (any scale: min-max normalised).
    tp_prob
        (C, H, W) class probabilities of the NT head (channel 0 = background) or None.
    np_thresh, min_size, sobel_ksize, marker_thresh
        The recipe's constants (module docstring).
    keep_unmarked
        Keep a blob that receives no watershed marker as one nucleus (default). HoVer-Net's
        reference leaves it background; ``False`` reproduces that.
    mode
        Where the watershed markers come from (:data:`POSTPROC_MODES`): ``"hv"`` HoVer-Net's
        (the HV edge map, ``marker_thresh``); ``"distance"`` the h-maxima (height ``marker_h``
        px) of the distance transform of the NP blob, a distance watershed like the classical
        baseline's on the network's mask (HV maps unused); ``"blend"`` that distance multiplied by
        ``1 - hv_weight * Sm`` (HV edges deepen the necks between nuclei); ``"peaks"`` the classical
        baseline's rule on the NP blob: local maxima of its distance transform at least
        ``marker_dist`` px apart.
    marker_h, hv_weight
        Constants of the ``"distance"`` / ``"blend"`` modes (model px; weight in [0, 1]).
    marker_dist
        Minimum distance between markers of the ``"peaks"`` mode (model px; about a nucleus radius:
        10 px = 2.5 µm at 0.25 µm/px, the classical baseline's ``min_distance_um``).

    Returns
    -------
    inst
        (H, W) int32, ids 1..n, 0 = background.
    type
        (H, W) uint8, each nucleus painted with its class (0 everywhere without ``tp_prob``).
    nuclei
        id -> {centroid (x, y), bbox, area, type, type_prob} (type 0 / prob NaN without tp_prob).
    """
    np_prob = np.asarray(np_prob, dtype=np.float64)
    hv = np.asarray(hv, dtype=np.float64)
    if np_prob.ndim != 2:
        raise ValueError(f"np_prob must be (H, W), got shape {np_prob.shape}")
    if hv.shape != (2, *np_prob.shape):
        raise ValueError(f"hv must be (2, H, W) = {(2, *np_prob.shape)}, got {hv.shape}")
    if tp_prob is not None:
        tp_prob = np.asarray(tp_prob)  # float32 stays float32: no copy of a (C, H, W) array
        if tp_prob.ndim != 3 or tp_prob.shape[1:] != np_prob.shape:
            raise ValueError(f"tp_prob must be (C, H, W) with (H, W) = {np_prob.shape}, got {tp_prob.shape}")
    if not 0 < np_thresh < 1:
        raise ValueError(f"np_thresh must be in (0, 1), got {np_thresh!r}")
    if not 0 < marker_thresh < 1:
        raise ValueError(f"marker_thresh must be in (0, 1), got {marker_thresh!r}")
    if mode not in POSTPROC_MODES:
        raise ValueError(f"mode must be one of {POSTPROC_MODES}, got {mode!r}")
    if mode == "peaks":
        if not marker_dist >= 1:
            raise ValueError(f"marker_dist must be >= 1 px, got {marker_dist!r}")
        inst = _peak_instances(np_prob, np_thresh=np_thresh, min_size=int(min_size), marker_dist=float(marker_dist),
                               keep_unmarked=keep_unmarked)
    elif mode == "hv":
        inst = _instances(np_prob, hv, np_thresh=np_thresh, min_size=int(min_size),
                          sobel_ksize=int(sobel_ksize), marker_thresh=marker_thresh, keep_unmarked=keep_unmarked)
    else:
        if not marker_h > 0:
            raise ValueError(f"marker_h must be > 0, got {marker_h!r}")
        if not 0 <= hv_weight <= 1:
            raise ValueError(f"hv_weight must be in [0, 1], got {hv_weight!r}")
        inst = _distance_instances(np_prob, hv, np_thresh=np_thresh, min_size=int(min_size),
                                   sobel_ksize=int(sobel_ksize), marker_h=float(marker_h),
                                   hv_weight=float(hv_weight) if mode == "blend" else 0.0,
                                   keep_unmarked=keep_unmarked)
    n = int(inst.max())
    if tp_prob is None or n == 0:
        types = np.zeros(n + 1, np.int64)
        probs = np.full(n + 1, np.nan)
    else:
        k = tp_prob.shape[0]
        pix_cls = tp_prob.argmax(axis=0).ravel()
        flat = inst.ravel()
        fg = flat > 0
        votes = np.bincount(flat[fg] * k + pix_cls[fg], minlength=(n + 1) * k).reshape(n + 1, k)
        types = votes.argmax(axis=1)  # ties -> lowest class id
        if k > 1:
            other = votes[:, 1:]
            swap = (types == 0) & (other.max(axis=1) > 0)
            types = np.where(swap, other.argmax(axis=1) + 1, types)
        chosen = types[flat]  # chosen class of each pixel's nucleus
        p = np.take_along_axis(tp_prob.reshape(k, -1), chosen[None, :], axis=0)[0]
        area = np.bincount(flat, minlength=n + 1)
        probs = np.bincount(flat[fg], weights=p[fg].astype(np.float64), minlength=n + 1) / np.maximum(area, 1)
        types[0] = 0
    type_map = types.astype(np.uint8)[inst]
    return inst, type_map, nuclei_table(inst, types if tp_prob is not None else np.zeros(n + 1, np.int64), probs)


# --------------------------------------------------------------------------- tiles
def tile_origins(image_shape: tuple[int, int], tile_size: int, overlap: int) -> list[tuple[int, int]]:
    """Origins (row, col) of overlapping tiles covering an image; the last row/column of
    tiles is shifted back to end at the image border (so every tile is full-size when the
    image is at least one tile large)."""
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), got {overlap!r}")
    stride = tile_size - overlap

    def starts(n: int) -> list[int]:
        if n <= tile_size:
            return [0]
        s = list(range(0, n - tile_size, stride))
        s.append(n - tile_size)
        return s

    return [(r, c) for r in starts(image_shape[0]) for c in starts(image_shape[1])]


def _owner(points_rc: np.ndarray, origins: np.ndarray, tile_hw: np.ndarray) -> np.ndarray:
    """Index of the tile owning each point: among the tiles containing it, the one whose
    centre is nearest (Euclidean); ties -> lowest tile index."""
    if len(points_rc) == 0:
        return np.zeros(0, np.int64)
    centres = origins + (tile_hw - 1) / 2.0
    p = points_rc[:, None, :]
    inside = np.all((p >= origins[None]) & (p <= origins[None] + tile_hw - 1), axis=2)
    d2 = np.where(inside, ((p - centres[None]) ** 2).sum(axis=2), np.inf)
    return d2.argmin(axis=1)  # argmin returns the first (lowest index) of equal minima


def remove_seam_duplicates(nuclei_tables: Sequence[dict[int, dict[str, Any]]], *,
                           tile_origins: Sequence[tuple[int, int]],
                           tile_size: int | tuple[int, int]) -> dict[int, dict[str, Any]]:
    """Keep each nucleus of overlapping tiles once.

    Rule: every image point is *owned* by one tile, the tile containing it whose centre is
    nearest (Euclidean distance; ties -> the lowest tile index). A nucleus found
    in tile k is kept iff its global centroid is owned by tile k; nuclei whose centroid lies
    in another tile's core region are dropped. On a regular grid the owned regions are the
    tiles cut at the middle of each overlap, so with ``overlap >= 2 x`` the largest nucleus
    diameter a kept nucleus is never cut by its tile's border and a cut copy is never kept.

    Parameters
    ----------
    nuclei_tables
        One :func:`nuclei_table` per tile, in tile coordinates.
    tile_origins
        (row, col) of each tile's top-left pixel in the image.
    tile_size
        Tile height and width (int or (h, w)).

    Returns
    -------
    dict
        Global id (1..n, in tile order) -> nucleus record in image coordinates, with
        ``tile`` (tile index) and ``tile_id`` (its id inside the tile) added.
    """
    if len(nuclei_tables) != len(tile_origins):
        raise ValueError(f"nuclei_tables has {len(nuclei_tables)} tiles, tile_origins {len(tile_origins)}")
    origins = np.asarray(tile_origins, float).reshape(-1, 2)
    hw = np.broadcast_to(np.asarray(tile_size, float), (2,))
    out: dict[int, dict[str, Any]] = {}
    gid = 0
    for k, table in enumerate(nuclei_tables):
        if not table:
            continue
        ids = list(table)
        xy = np.array([table[i]["centroid"] for i in ids], float)
        rc = xy[:, ::-1] + origins[k]
        keep = _owner(rc, origins, hw) == k
        r0, c0 = (int(v) for v in origins[k])
        for i, ok, (gy, gx) in zip(ids, keep, rc):
            if not ok:
                continue
            rec = dict(table[i])
            rec["centroid"] = (float(gx), float(gy))
            if "bbox" in rec:
                (a, b), (c, d) = rec["bbox"]
                rec["bbox"] = ((a + r0, b + c0), (c + r0, d + c0))
            gid += 1
            rec.update(tile=k, tile_id=int(i))
            out[gid] = rec
    return out


def stitch_tiles(inst_tiles: Sequence[np.ndarray], type_tiles: Sequence[np.ndarray] | None,
                 nuclei: dict[int, dict[str, Any]], *, tile_origins: Sequence[tuple[int, int]],
                 image_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Paint the nuclei kept by :func:`remove_seam_duplicates` into image-size maps.

    Each kept nucleus is copied from its own tile with its global id; where two kept nuclei
    claim the same pixel the one painted first (lower global id) keeps it.
    Returns (inst int32, type uint8).
    """
    inst = np.zeros(image_shape, np.int32)
    typ = np.zeros(image_shape, np.uint8)
    by_tile: dict[int, list[tuple[int, int]]] = {}
    for g, rec in nuclei.items():
        by_tile.setdefault(rec["tile"], []).append((rec["tile_id"], g))
    for k, pairs in sorted(by_tile.items()):
        t = np.asarray(inst_tiles[k])
        lut = np.zeros(int(t.max()) + 1, np.int32)
        for local, g in pairs:
            lut[local] = g
        r0, c0 = tile_origins[k]
        h, w = t.shape
        region = inst[r0:r0 + h, c0:c0 + w]
        new = lut[t]
        paint = (new > 0) & (region == 0)
        region[paint] = new[paint]
        if type_tiles is not None:
            typ[r0:r0 + h, c0:c0 + w][paint] = np.asarray(type_tiles[k])[paint]
    return inst, typ


def hovernet_postprocess_tiled(np_prob: Any, hv: Any, tp_prob: Any = None, *, tile_size: int = 1024,
                               overlap: int = 128, **kwargs: Any,
                               ) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, Any]]]:
    """:func:`hovernet_postprocess` of a large map in overlapping tiles, de-duplicated and
    stitched (bounded memory per tile; same outputs format, global ids 1..n)."""
    np_prob = np.asarray(np_prob)
    origins = tile_origins(np_prob.shape, tile_size, overlap)
    insts, types, tables = [], [], []
    for r, c in origins:
        sl = (slice(r, r + tile_size), slice(c, c + tile_size))
        tp = None if tp_prob is None else np.asarray(tp_prob)[(slice(None), *sl)]
        i, t, tab = hovernet_postprocess(np_prob[sl], np.asarray(hv)[(slice(None), *sl)], tp, **kwargs)
        insts.append(i)
        types.append(t)
        tables.append(tab)
    nuclei = remove_seam_duplicates(tables, tile_origins=origins, tile_size=tile_size)
    inst, typ = stitch_tiles(insts, types, nuclei, tile_origins=origins, image_shape=np_prob.shape)
    return inst, typ, nuclei
