"""Cut one slide into training tiles in parallel: label maps, the H&E tile, mask refinement.

Steps 1-2 of the tile stage (:mod:`stlib.tiles`): :func:`rasterise` and :func:`refine`, with the
H&E tile (:func:`resample_tile`) between them. :func:`stlib.tiles.stage.build_tile_stores` writes a whole slide as about 25,000 tiles of
256 px (10 x 10 mm at 0.25 µm/px). Per tile it needs the label maps of the ST nuclei
(:class:`stlib.labels.masks.TileRenderer`), the H&E tile resampled to the target µm/px, and
the mask refinement (:func:`stlib.labels.refine.refine_label_maps`). Here those run for many
tiles at once in a thread pool (the compiled kernels release the GIL), while the calling
thread cuts each tile's crop from the decoded bands and hands out finished tiles in grid order
(:func:`stlib.tiles.stage.build_tile_stores` writes them in a thread of its own):

* the slide is read in full-width bands of TIFF-tile height (:class:`RowBands`), so every
  compressed tile of the pyramid is decoded once, not once per overlapping training tile; the
  bands are decoded in a background thread, the next one while the current one is cut, so the
  workers do not wait for a band;
* the tile is resampled by :func:`resample_tile`, a compiled twin of the
  ``skimage.transform.resize(order=1)`` call of :func:`read_tile_image` (bit-identical
  output, tested), 20x faster;
* at most ``4 x workers`` tiles are in flight, so memory stays bounded whatever the slide;
* the label maps are rendered without the HV maps (the store does not hold them), and freed
  per-tile arrays stay with the process for the next tile (:func:`keep_freed_memory`) instead
  of being faulted in again from the kernel.

Each stage's busy time is added to a ``timings`` dict when one is given
(``stlib bench derive`` reports them).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numba
import numpy as np

from stlib.labels._refine_kernels import _runs
from stlib.utils import keep_freed_memory as _keep_freed_memory

__all__ = ["RowBands", "SlideTile", "TileLabels", "default_workers", "iter_slide_tiles", "keep_freed_memory", "rasterise",
           "read_tile_image", "refine", "resample_tile", "unknown_background_ignored"]


def default_workers() -> int:
    """CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def keep_freed_memory() -> bool:
    """Keep the tile stage's freed memory for reuse (:func:`stlib.utils.keep_freed_memory`).

    Every tile allocates and frees a few dozen arrays of 64 kB - 1 MB (label maps, distance zones,
    the watershed's queues); with glibc's adaptive thresholds the next tile faulted the same pages
    in again (on a slide subset about 500 minor page faults per tile, a quarter of the stage's
    CPU time). ``M_MMAP_THRESHOLD`` 32 MiB (glibc's own ceiling for its adaptive one) and
    ``M_TRIM_THRESHOLD`` 64 MiB per heap keep them (faults 243k -> 4k on that subset).
    """
    return _keep_freed_memory(mmap_threshold=32 << 20, trim_threshold=64 << 20)


# --------------------------------------------------------------------------------------
# the H&E tile
# --------------------------------------------------------------------------------------

def read_tile_image(wsi: Any, x0: float, y0: float, size_l0: float, tile_px: int) -> np.ndarray:
    """RGB tile of ``tile_px`` covering ``size_l0`` level-0 px from (x0, y0), resampled.

    The straightforward form (one ``read_region`` + ``skimage.transform.resize`` per tile);
    :func:`iter_slide_tiles` computes the same pixels from decoded bands with
    :func:`resample_tile`.
    """
    n = int(math.ceil(size_l0))
    crop = wsi.read_region(int(math.floor(x0)), int(math.floor(y0)), n, n, level=0)
    return _resize_reference(crop, size_l0, tile_px)


def _resize_reference(crop: np.ndarray, size_l0: float, tile_px: int) -> np.ndarray:
    from skimage.transform import resize

    # skimage resize with anti-aliasing: exact enough for 0.27 -> 0.25 µm/px and fast per tile
    img = resize(crop, (tile_px, tile_px), order=1, anti_aliasing=size_l0 > tile_px, preserve_range=True)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@numba.njit(cache=True, nogil=True)
def _linear_taps(n, T):  # pragma: no cover - compiled
    """For each of ``T`` output px along an axis of ``n`` input px: the two mirrored input
    indices and their weights (``1 - t``, ``t``) of :func:`_zoom_linear`."""
    z = n / T
    a = np.empty(T, np.int64)
    b = np.empty(T, np.int64)
    wa = np.empty(T, np.float64)
    wb = np.empty(T, np.float64)
    for i in range(T):
        c = (i + 0.5) * z - 0.5
        i0 = int(np.floor(c))
        t = c - i0
        a[i] = -i0 if i0 < 0 else (2 * (n - 1) - i0 if i0 > n - 1 else i0)
        i1 = i0 + 1
        b[i] = -i1 if i1 < 0 else (2 * (n - 1) - i1 if i1 > n - 1 else i1)
        wa[i] = 1.0 - t
        wb[i] = t
    return a, b, wa, wb


@numba.njit(cache=True, nogil=True)
def _zoom_linear(crop, T):  # pragma: no cover - compiled
    """``ndimage.zoom(crop, order=1, mode="mirror", grid_mode=True)`` to (T, T, C) as
    ``skimage.transform.resize`` calls it, then ``rint`` and clip to uint8.

    Output pixel centre ``(i + 0.5) * n / T - 0.5`` in input px; the 2 x 2 neighbours summed in
    raster order as ``value * w_row * w_col`` (scipy's order; the channel axis is not resampled).
    The taps of rows and columns are computed once per call (:func:`_linear_taps`).
    """
    n0, n1, C = crop.shape
    out = np.empty((T, T, C), np.uint8)
    ya, yb, wya, ty = _linear_taps(n0, T)
    xa, xb, wxa, tx = _linear_taps(n1, T)
    # per output (column, channel), flat: the offsets of its two input columns in a row and
    # their weights, so that the sums below run over contiguous arrays (the compiler vectorises)
    TC = T * C
    ia = np.empty(TC, np.int64)
    ib = np.empty(TC, np.int64)
    w0 = np.empty(TC, np.float64)
    w1 = np.empty(TC, np.float64)
    for j in range(T):
        for c in range(C):
            ia[j * C + c] = xa[j] * C + c
            ib[j * C + c] = xb[j] * C + c
            w0[j * C + c] = wxa[j]
            w1[j * C + c] = tx[j]
    # value * w_row is the first product of each term: computed once per input pixel of the two
    # rows, then * w_col per output pixel (the same products, summed in the same order)
    ra = np.empty(n1 * C, np.float64)
    rb = np.empty(n1 * C, np.float64)
    g0 = np.empty(TC, np.float64)
    g1 = np.empty(TC, np.float64)
    g2 = np.empty(TC, np.float64)
    g3 = np.empty(TC, np.float64)
    for i in range(T):
        ca = crop[ya[i]].ravel()
        cb = crop[yb[i]].ravel()
        wy0 = wya[i]
        wy1 = ty[i]
        for k in range(n1 * C):
            ra[k] = np.float64(ca[k]) * wy0
            rb[k] = np.float64(cb[k]) * wy1
        for k in range(TC):
            g0[k] = ra[ia[k]]
            g1[k] = ra[ib[k]]
            g2[k] = rb[ia[k]]
            g3[k] = rb[ib[k]]
        o = out[i].ravel()
        for k in range(TC):
            t = g0[k] * w0[k]  # scipy starts from 0.0: 0.0 + x is x for these non-negative terms
            t += g1[k] * w1[k]
            t += g2[k] * w0[k]
            t += g3[k] * w1[k]
            v = np.rint(t)
            o[k] = np.uint8(min(max(v, 0.0), 255.0))
    return out


def resample_tile(crop: np.ndarray, size_l0: float, tile_px: int) -> np.ndarray:
    """The crop of :func:`read_tile_image` resampled to ``tile_px`` (same result).

    Enlarging (``size_l0 <= tile_px``, e.g. HEST's 0.27 µm/px to 0.25) runs the compiled
    twin of the bilinear resize; shrinking needs scikit-image's anti-aliasing filter and calls it.
    """
    if size_l0 > tile_px or crop.ndim != 3 or crop.dtype != np.uint8:
        return _resize_reference(crop, size_l0, tile_px)
    return _zoom_linear(np.ascontiguousarray(crop), int(tile_px))


class RowBands:
    """Level-0 regions of a slide cut from full-width decoded bands, each band decoded once.

    Requests must move down the slide (rows of tiles in order); bands above the last request
    are dropped. ``crop`` returns what ``wsi.read_region(x, y, w, h, level=0)`` returns
    (255 outside the image).

    With ``prefetch=True`` the bands are decoded in one background thread (every read of the
    slide happens in that thread, in band order, so the reader need not be thread-safe), and
    the band below the last one requested is decoded ahead, while the caller works on this
    one; :meth:`close` (or ``with``) stops that thread. ``decode_cpu`` sums the CPU seconds of
    the decoding thread (the band reads; without tifffile's / zarr's own threads).
    """

    def __init__(self, wsi: Any, rows: int = 256, *, prefetch: bool = False) -> None:
        self.wsi = wsi
        self.rows = int(rows)
        self.H, self.W = wsi.shape
        self._bands: dict[int, Any] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stlib-bands") if prefetch else None
        self.decode_cpu = 0.0

    def _read(self, b: int) -> np.ndarray:
        c = time.thread_time()
        y = b * self.rows
        band = self.wsi.read_region(0, y, self.W, min(self.rows, self.H - y), level=0)
        self.decode_cpu += time.thread_time() - c
        return band

    def _request(self, b: int) -> None:
        if b not in self._bands and 0 <= b * self.rows < self.H:
            self._bands[b] = self._pool.submit(self._read, b) if self._pool is not None else self._read(b)

    def _band(self, b: int) -> np.ndarray:
        self._request(b)
        if self._pool is not None:
            self._request(b + 1)  # decoded ahead while this band is cut
            return self._bands[b].result()
        return self._bands[b]

    def crop(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """``(h, w, 3)`` uint8 region with top-left (x, y) in level-0 px."""
        out = np.full((h, w, 3), 255, np.uint8)
        y0, y1 = max(0, y), min(self.H, y + h)
        x0, x1 = max(0, x), min(self.W, x + w)
        for b in [b for b in self._bands if (b + 1) * self.rows <= y0]:
            del self._bands[b]
        if y1 <= y0 or x1 <= x0:
            return out
        for b in range(y0 // self.rows, (y1 - 1) // self.rows + 1):
            band = self._band(b)
            r0, r1 = max(y0, b * self.rows), min(y1, (b + 1) * self.rows)
            out[r0 - y:r1 - y, x0 - x:x1 - x] = band[r0 - b * self.rows:r1 - b * self.rows, x0:x1]
        return out

    def close(self) -> None:
        """Stop the decoding thread (waits for a band being read) and drop the bands."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._bands.clear()

    def __enter__(self) -> RowBands:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# the parallel tile loop
# --------------------------------------------------------------------------------------

@dataclass
class SlideTile:
    """One finished tile: its grid position, H&E image and label maps per label set.

    ``maps[k] = (inst, type, ignore, conf)``; ``n_nuclei[k]`` instances in it; ``refine`` the
    :class:`~stlib.labels.refine.RefineStats` of the ``"st"`` set (None when not refined);
    ``pq_before`` / ``pq_after`` the binary PQ of the ST masks against the ``"truth"`` set
    before and after refinement (None without truth or without refinement).
    """

    tile: Any
    image: np.ndarray
    maps: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    n_nuclei: dict[str, int]
    refine: Any = None
    pq_before: float | None = None
    pq_after: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _count_ids(inst: np.ndarray) -> int:
    """Distinct non-zero ids (``np.unique(inst[inst > 0]).size``, from the runs of equal pixels)."""
    if inst.ndim == 2 and inst.size and inst.dtype.kind in "iu":
        return int(_count_runs_ids(np.ascontiguousarray(inst).ravel()))  # the lines below, compiled
    flat = inst.ravel()
    starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
    v = np.unique(flat[starts])
    return int(v.size - (v[0] == 0 if v.size else 0))


@numba.njit(cache=True, nogil=True)
def _count_runs_ids(flat):  # pragma: no cover - compiled
    """Distinct values of a non-empty 1-D integer array, less one when the smallest is 0 (the
    numpy lines of :func:`_count_ids`), from its runs of equal values (the refinement's run
    finder, :func:`stlib.labels._refine_kernels._runs`)."""
    vals = np.sort(_runs(flat)[1])
    k = 0
    for t in range(vals.size):
        if t == 0 or vals[t] != vals[t - 1]:
            k += 1
    return k - (1 if vals[0] == 0 else 0)


def rasterise(renderers: Mapping[str, TileLabels], i: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Step 1: the label maps ``(inst, type, ignore, conf)`` of grid tile ``i`` for every label set
    (:meth:`stlib.labels.masks.TileRenderer.render`; without the HV maps, which the tile store does
    not hold: the training loader derives them from ``inst``)."""
    out = {}
    for k, r in renderers.items():
        m = r.render(i, hv=False)
        out[k] = (m.inst, m.type, m.ignore, m.conf)
    return out


def refine(image: np.ndarray, maps: dict[str, tuple[np.ndarray, ...]], *, um_per_px: float, config: Any,
           ) -> tuple[dict[str, tuple[np.ndarray, ...]], Any, float | None, float | None]:
    """Step 2: the ``"st"`` maps snapped to the H&E tile (:func:`stlib.labels.refine.refine_label_maps`).

    Returns the maps (``"st"`` replaced), the :class:`~stlib.labels.refine.RefineStats` and the
    binary PQ of the ST masks against the ``"truth"`` set before and after (None without truth).
    """
    from stlib.labels.refine import refine_label_maps

    maps = dict(maps)
    raw = maps["st"][0]
    *st_maps, stats = refine_label_maps(image, *maps["st"], um_per_px=um_per_px, config=config)
    maps["st"] = tuple(st_maps)
    before = after = None
    if "truth" in maps and maps["truth"][0].any():
        from stlib.metrics import pannuke_bpq

        before = pannuke_bpq(maps["truth"][0], raw)
        after = pannuke_bpq(maps["truth"][0], maps["st"][0])
    return maps, stats, before, after


class _Clock:
    """Wall and thread-CPU seconds of the steps of one tile (``seconds`` / ``cpu:`` keys)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t, self._c = time.perf_counter(), time.thread_time()

    def lap(self, key: str) -> None:
        t, c = time.perf_counter(), time.thread_time()
        self.seconds[key] = self.seconds.get(key, 0.0) + t - self._t
        self.seconds["cpu:" + key] = self.seconds.get("cpu:" + key, 0.0) + c - self._c
        self._t, self._c = t, c


class TileLabels(Protocol):
    """What the steps here need of a label set's renderer (:class:`stlib.labels.masks.TileRenderer`)."""

    def tile(self, i: int) -> Any:
        """Grid position ``i`` (a :class:`stlib.labels.masks.Tile`)."""

    def render(self, i: int, *, hv: bool = True) -> Any:
        """The label maps of tile ``i`` (``inst``, ``type``, ``ignore``, ``conf``)."""

    def unknown_background(self, i: int) -> np.ndarray | None:
        """Pixels of tile ``i`` whose background is not known, or None where all of it is."""


def _tile_work(i: int, crop: np.ndarray, renderers: Mapping[str, TileLabels], size_l0: float, tile_px: int,
               um_per_px: float, refine_config: Any) -> SlideTile:
    """Label maps, H&E tile and refinement of grid tile ``i`` (runs in a worker thread)."""
    clock = _Clock()
    maps = rasterise(renderers, i)
    clock.lap("masks")
    img = resample_tile(crop, size_l0, tile_px)
    clock.lap("tile_images")
    out = SlideTile(tile=next(iter(renderers.values())).tile(i), image=img, maps=maps, n_nuclei={})
    if refine_config is not None and "st" in maps:
        out.maps, out.refine, out.pq_before, out.pq_after = refine(img, maps, um_per_px=um_per_px,
                                                                   config=refine_config)
        clock.lap("mask_refinement")
    out.maps = unknown_background_ignored(renderers, i, out.maps)
    out.n_nuclei = {k: _count_ids(m[0]) for k, m in out.maps.items()}
    out.seconds = clock.seconds
    return out


def unknown_background_ignored(renderers: Mapping[str, TileLabels], i: int,
                               maps: dict[str, tuple[np.ndarray, ...]]) -> dict[str, tuple[np.ndarray, ...]]:
    """The ``"st"`` maps with every pixel that no nucleus covers and whose background is not known
    (:meth:`stlib.labels.masks.TileRenderer.unknown_background`: near the Xenium region's edge)
    set to ``ignore``; after the refinement, so that neither a rasterised nor a refined outline leaves
    background there. Unchanged without such an area."""
    r = renderers.get("st")
    unknown = r.unknown_background(i) if r is not None else None
    if unknown is None or "st" not in maps:
        return maps
    inst, typ, ign, cf = maps["st"]
    new_ign = np.asarray(ign).copy()
    new_ign[unknown & (inst == 0)] = 1
    return {**maps, "st": (inst, typ, new_ign, cf)}


def iter_slide_tiles(wsi: Any, renderers: Mapping[str, TileLabels], *, size_l0: float, tile_px: int, um_per_px: float,
                     refine_config: Any = None, workers: int | None = None,
                     timings: dict[str, float] | None = None) -> Iterator[SlideTile]:
    """Every tile of the renderers' grid, finished, in grid order.

    Parameters
    ----------
    wsi
        The slide (:class:`stlib.io.wsi.Wsi`: ``shape``, ``read_region``).
    renderers
        Label set name -> :class:`stlib.labels.masks.TileRenderer`, all on the same grid;
        ``"st"`` is refined, ``"truth"`` (optional) scores it.
    size_l0, tile_px, um_per_px
        Level-0 px covered by a tile, its side in target px, the target µm/px.
    refine_config
        :class:`stlib.labels.refine.RefineConfig`, or None for no refinement.
    workers
        Threads (default: the usable CPUs).
    timings
        Busy seconds per stage are added to it (``masks``, ``tile_images`` for resampling,
        ``slide_decoding`` for the band reads: the calling thread's wait for a band and cutting
        of the crops, with the CPU of the decoding thread under its ``cpu:`` key;
        ``mask_refinement`` with the truth scores), and the CPU seconds of each under
        ``cpu:{stage}`` (thread CPU time); the worker stages run concurrently, so their sum
        exceeds the wall time.

    Yields
    ------
    SlideTile
    """
    keep_freed_memory()  # the per-tile arrays reuse freed pages (a quarter of the stage's CPU otherwise)
    first = next(iter(renderers.values()))
    n = len(first)
    workers = default_workers() if workers is None else max(1, int(workers))
    side = int(math.ceil(size_l0))
    pending: deque = deque()

    def collect(fut: Any) -> SlideTile:
        res = fut.result()
        if timings is not None:
            for k, v in res.seconds.items():
                timings[k] = timings.get(k, 0.0) + v
        return res

    # the bands are decoded ahead in their own thread, so the workers need not wait for a band
    with RowBands(wsi, prefetch=True) as bands, \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stlib-tiles") as pool:
        for i in range(n):
            x0, y0 = first.tile(i).origin
            t0, c0 = time.perf_counter(), time.thread_time()
            crop = bands.crop(int(math.floor(x0)), int(math.floor(y0)), side, side)
            if timings is not None:  # waiting for the band and cutting the crop (this thread's CPU)
                timings["slide_decoding"] = timings.get("slide_decoding", 0.0) + time.perf_counter() - t0
                timings["cpu:slide_decoding"] = timings.get("cpu:slide_decoding", 0.0) + time.thread_time() - c0
            pending.append(pool.submit(_tile_work, i, crop, renderers, size_l0, tile_px, um_per_px, refine_config))
            while len(pending) > 4 * workers:
                yield collect(pending.popleft())
        while pending:
            yield collect(pending.popleft())
    if timings is not None:  # the decoding thread's CPU (zarr may decode some tiles in its own threads)
        timings["cpu:slide_decoding"] = timings.get("cpu:slide_decoding", 0.0) + bands.decode_cpu
