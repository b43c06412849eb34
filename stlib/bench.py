"""``stlib bench``: timed, reproducible benchmarks whose results are written as JSON.

Sub-commands
------------
``labels``  full-slide label maps (instance + class + HV + ignore + confidence) from N
            synthetic nucleus polygons with the compiled path, and in the same run the
            straightforward per-nucleus ``skimage.draw.polygon`` + HV loop on a subsample.
``tiles``   tile-store random-batch read throughput (``stlib.io.tiles.read_throughput``).
``refine``  H&E-guided refinement of ST masks (``stlib.labels.refine``), time per tile.
``derive``  the label derivation of one slide-sized synthetic sample (``stlib.bench_slide``),
            timed per stage, with the stages' reference implementations on subsamples.
``train``   :func:`bench_train_main`: training throughput on synthetic batches, tile-store read rate.
``infer``   :func:`bench_infer_main`: network vs post-processing per tile, whole-slide throughput
            (``--slide``: a whole synthetic slide of :mod:`stlib.bench_slide`).
``gpu-check``  :mod:`stlib.gpu_check` (``make gpu-check``; ``--dry-run`` on a CPU).
``unmatched``  :func:`bench_unmatched_main`: ``RefineConfig.unmatched_ignore`` on the real-tissue
            development split (label quality, ms per tile, optionally the ST network off / on).

Every result records the machine, the date and the exact command; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stlib.config import TilesConfig
from stlib.constants import HEST_XENIUM_UM_PER_PX, TARGET_UM_PER_PX_40X
from stlib.layout import RunLayout
from stlib.utils import device_name, machine_info, write_json

#: the tile stage's defaults (tile size, resolution): what the tile benchmarks measure by default
_TILES = TilesConfig()

__all__ = ["cli_main", "machine_info", "synthetic_nuclei", "bench_labels", "bench_tiles", "bench_refine",
           "bench_derive", "bench_infer_main", "bench_train_main", "synthetic_slide", "ideal_maps"]


def synthetic_nuclei(n: int, *, seed: int = 0, target_um_per_px: float = TARGET_UM_PER_PX_40X, level0_um_per_px: float = TARGET_UM_PER_PX_40X,
                     area_fraction: float = 0.25, n_vertices: int = 20) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Random nucleus-like polygons over a slide-sized area (level-0 px).

    Ellipses with jittered outlines, diameters 20-40 px at ``target_um_per_px`` (0.25 µm/px
    -> 5-10 µm), random orientation, uniformly placed so that nuclei cover ``area_fraction``
    of the slide; with uniform placement some of them overlap, as in crowded tissue.

    Returns
    -------
    polygons, classes, width, height
        Shapely polygons (level-0 px), classes 1..5, slide width and height (level-0 px).
    """
    import shapely

    rng = np.random.default_rng(seed)
    to_l0 = target_um_per_px / level0_um_per_px  # target px -> level-0 px
    a = rng.uniform(10.0, 20.0, n)
    b = a * rng.uniform(0.6, 1.0, n)
    mean_area = float(np.mean(np.pi * a * b))
    side = math.sqrt(n * mean_area / area_fraction) * to_l0
    cx = rng.uniform(0, side, n)
    cy = rng.uniform(0, side, n)
    th = rng.uniform(0, np.pi, n)
    t = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    jit = rng.uniform(0.9, 1.1, (n, n_vertices))
    ex = a[:, None] * np.cos(t) * jit
    ey = b[:, None] * np.sin(t) * jit
    x = cx[:, None] + to_l0 * (ex * np.cos(th)[:, None] - ey * np.sin(th)[:, None])
    y = cy[:, None] + to_l0 * (ex * np.sin(th)[:, None] + ey * np.cos(th)[:, None])
    polys = shapely.polygons(np.stack([x, y], axis=-1))
    classes = rng.integers(1, 6, n).astype(np.uint8)
    return polys, classes, float(side), float(side)


def _baseline_loop(polys: np.ndarray, classes: np.ndarray, scale: float) -> float:
    """Per-nucleus ``skimage.draw.polygon`` + HV in a Python loop; returns seconds.

    The lean version of the usual approach: each nucleus is drawn into its own bounding-box
    window of a shared canvas, and its HV maps are computed from the drawn pixel
    coordinates (centroid = mean, each side normalised by its extreme). Overlaps are not
    resolved, so it does less than the compiled path.
    """
    import shapely
    from skimage.draw import polygon as sk_polygon

    canvas = np.zeros((4096, 4096), np.int32)
    typ = np.zeros(canvas.shape, np.uint8)
    hv = np.zeros((2, *canvas.shape), np.float32)
    t0 = time.perf_counter()
    for i, (p, c) in enumerate(zip(polys, classes)):
        xy = shapely.get_coordinates(p) * scale - 0.5
        x0, y0 = np.floor(xy.min(0)).astype(int)
        ox = (i * 53) % (canvas.shape[1] - 128)
        oy = (i * 97) % (canvas.shape[0] - 128)
        rr, cc = sk_polygon(xy[:, 1] - y0 + oy, xy[:, 0] - x0 + ox, canvas.shape)
        if rr.size == 0:
            continue
        canvas[rr, cc] = i + 1
        typ[rr, cc] = c
        for ch, v in enumerate((cc, rr)):
            d = v - v.mean()
            neg = d < 0
            if neg.any():
                d[neg] /= -d[neg].min()
            pos = d > 0
            if pos.any():
                d[pos] /= d[pos].max()
            hv[ch, rr, cc] = d
    return time.perf_counter() - t0


def bench_labels(n_nuclei: int = 500_000, *, tile_px: int = 1024, target_um_per_px: float = TARGET_UM_PER_PX_40X,
                 level0_um_per_px: float = 0.2738, baseline_nuclei: int = 2000, seed: int = 0,
                 n_workers: int = 1) -> dict[str, Any]:
    """Time full-slide label maps with the compiled path and the per-nucleus loop.

    Returns
    -------
    dict
        JSON-ready result (see ``benchmarks/README.md``).
    """
    from stlib.labels.masks import iter_label_tiles, prepare_polygons

    scale = level0_um_per_px / target_um_per_px
    polys, classes, width, height = synthetic_nuclei(
        n_nuclei, seed=seed, target_um_per_px=target_um_per_px, level0_um_per_px=level0_um_per_px)

    # warm-up: load / compile the numba kernels on a small slide (reported, not in the timing)
    t0 = time.perf_counter()
    wp, wc, ww, wh = synthetic_nuclei(200, seed=seed + 1, target_um_per_px=target_um_per_px,
                                      level0_um_per_px=level0_um_per_px)
    for _ in iter_label_tiles(wp, width=ww, height=wh, scale=scale, tile_px=256, classes=wc):
        pass
    warmup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ps = prepare_polygons(polys, classes=classes, region=(0.0, 0.0, width, height))
    prep_s = time.perf_counter() - t0
    n_tiles = 0
    n_px = 0
    inst_total = 0
    t1 = time.perf_counter()
    for _tile, lm in iter_label_tiles(ps, width=width, height=height, scale=scale, tile_px=tile_px,
                                      n_workers=n_workers):
        n_tiles += 1
        n_px += lm.inst.size
        inst_total += lm.n_nuclei
    tiles_s = time.perf_counter() - t1
    seconds = prep_s + tiles_s

    rng = np.random.default_rng(seed + 2)
    sub = rng.choice(n_nuclei, size=min(baseline_nuclei, n_nuclei), replace=False)
    base_s = _baseline_loop(np.asarray(polys)[sub], classes[sub], scale)
    base_rate = sub.size / base_s
    rate = n_nuclei / seconds
    return {
        "benchmark": "labels",
        "nuclei": int(n_nuclei),
        "nuclei_kept": int(len(ps)),
        "seconds": round(seconds, 3),
        "seconds_prepare": round(prep_s, 3),
        "seconds_tiles": round(tiles_s, 3),
        "seconds_warmup_compile": round(warmup_s, 3),
        "nuclei_per_s": round(rate, 1),
        "baseline_nuclei_per_s": round(base_rate, 1),
        "baseline_nuclei_timed": int(sub.size),
        "baseline_seconds": round(base_s, 3),
        "baseline": ("per-nucleus skimage.draw.polygon + HV from the drawn pixels in a Python loop, "
                     "timed on a random subsample in the same run and extrapolated per nucleus; it "
                     "makes inst+type+HV only (no overlap rule, ignore/conf maps, validation or "
                     "slide-sized tiles)"),
        "speedup": round(rate / base_rate, 1),
        "what_is_timed": ("prepare_polygons (validation/repair, flattening, region check) + "
                          "iter_label_tiles over the whole slide: inst int32, type uint8, HV 2xfloat32, "
                          "ignore uint8, conf uint8 for every tile; tiles are produced and discarded"),
        "tile_px": int(tile_px),
        "n_workers": int(n_workers),
        "n_tiles": int(n_tiles),
        "megapixels": round(n_px / 1e6, 1),
        "slide_level0_px": [round(width), round(height)],
        "um_per_px": float(target_um_per_px),
        "level0_um_per_px": float(level0_um_per_px),
        "instances_in_tiles": int(inst_total),
        "seed": int(seed),
    }


def bench_tiles(store: str | None = None, *, n_tiles: int = 512, tile_px: int = _TILES.tile_px, batch: int = 64,
                n_batches: int = 20, seed: int = 0) -> dict[str, Any]:
    """Random-batch read throughput of a tile store (a synthetic one in a temp folder by default)."""
    from stlib.io.tiles import TileStore, TileStoreWriter, read_throughput

    with tempfile.TemporaryDirectory(prefix="stlib-bench-tiles-") as tmp:
        if store is None:
            rng = np.random.default_rng(seed)
            path = Path(tmp) / "store"
            with TileStoreWriter(path, tile_px=tile_px, um_per_px=_TILES.um_per_px, source="bench-synthetic") as w:
                for i in range(n_tiles):
                    w.add(image=rng.integers(0, 256, (tile_px, tile_px, 3), np.uint8),
                          inst=rng.integers(0, 50, (tile_px, tile_px), np.int32),
                          type=rng.integers(0, 6, (tile_px, tile_px), np.uint8),
                          sample=f"S{i % 8}", organ="bench", x0=i * tile_px, y0=0)
            store_path = path
        else:
            store_path = Path(store)
        res = read_throughput(TileStore(store_path), batch=batch, n_batches=n_batches, seed=seed)
    res.update({"benchmark": "tiles", "store": "synthetic (temp folder, likely in page cache)" if store is None
                else str(store)})
    return res


def bench_refine(store: str | None = None, *, n_tiles: int = 200, tile_px: int = _TILES.tile_px, seed: int = 0,
                 n_reference: int = 50) -> dict[str, Any]:
    """Time :func:`stlib.labels.refine.refine_label_maps` per tile (single thread), and its
    reference form on ``n_reference`` of the same tiles.

    Tiles come from an existing tile store (``store``: its images and instance maps; a store that
    was already refined is simply refined again) or are synthetic: nuclei of
    :func:`synthetic_nuclei` rasterised by :mod:`stlib.labels.masks`, rendered by Beer-Lambert
    as haematoxylin blobs on an eosin background, with the ST masks dilated by 1 px (DAPI-like).
    """
    from scipy import ndimage as ndi

    from stlib.labels.refine import refine_label_maps

    rng = np.random.default_rng(seed)
    tiles: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    if store is not None:
        from stlib.io.tiles import TileStore

        st = TileStore(store)
        idx = np.sort(rng.choice(len(st), size=min(n_tiles, len(st)), replace=False))
        b = st.get_batch(idx)
        tiles = [(b["image"][i], b["inst"][i], b["type"][i], b["ignore"][i], b["conf"][i]) for i in range(len(idx))]
        um = st.um_per_px
        source = str(store)
    else:
        from stlib.labels.masks import iter_label_tiles

        um = _TILES.um_per_px
        side = int(np.ceil(np.sqrt(n_tiles)))
        n_nuc = int(side * tile_px * side * tile_px * um**2 / 60)  # ~1 nucleus per 60 µm², dense tissue
        polys, classes, w, h = synthetic_nuclei(n_nuc, seed=seed, target_um_per_px=um, level0_um_per_px=um)
        for _t, lm in iter_label_tiles(polys, width=w, height=h, scale=1.0, tile_px=tile_px, classes=classes):
            hema = ndi.gaussian_filter((lm.inst > 0).astype(np.float32) * rng.uniform(0.5, 0.9), 0.8)
            od = hema[..., None] * np.array([0.65, 0.70, 0.29]) + 0.25 * np.array([0.07, 0.99, 0.11])
            img = np.clip(255 * 10 ** (-od) + rng.normal(0, 2, od.shape), 0, 255).astype(np.uint8)
            st_inst = ndi.grey_dilation(lm.inst, size=3)  # DAPI-like: a little larger
            tiles.append((img, st_inst, lm.type, lm.ignore, lm.conf))
            if len(tiles) == n_tiles:
                break
        source = "synthetic (rendered haematoxylin blobs, ST masks dilated by 1 px)"
    refine_label_maps(*tiles[0], um_per_px=um)  # warm-up (imports, compiled kernels)
    nuclei = 0
    t0 = time.perf_counter()
    for t in tiles:
        *_, stats = refine_label_maps(*t, um_per_px=um)
        nuclei += stats.n
    sec = time.perf_counter() - t0
    tps = len(tiles) / sec
    # the straightforward scikit-image / scipy form on the first tiles, same run, single thread
    ref_tiles = tiles[: max(1, min(len(tiles), n_reference))]
    refine_label_maps(*ref_tiles[0], um_per_px=um, reference=True)
    t0 = time.perf_counter()
    for t in ref_tiles:
        refine_label_maps(*t, um_per_px=um, reference=True)
    ref_sec = (time.perf_counter() - t0) / len(ref_tiles)
    fast_sec = sec / len(tiles)
    # a 10 x 10 mm Xenium section at 0.25 µm/px: 40000^2 px
    slide_tiles = (10_000 / um / tile_px) ** 2
    return {"benchmark": "refine", "source": source, "n_tiles": len(tiles), "tile_px": int(tile_px),
            "um_per_px": float(um), "nuclei_per_tile": round(nuclei / max(1, len(tiles)), 1),
            "seconds": round(sec, 3), "tiles_per_s": round(tps, 2), "ms_per_tile": round(1000 / tps, 2),
            "threads": 1, "minutes_per_10mm_slide_one_core": round(slide_tiles / tps / 60, 1),
            "reference_ms_per_tile": round(1e3 * ref_sec, 2), "reference_tiles_timed": len(ref_tiles),
            "speedup_vs_reference": round(ref_sec / fast_sec, 1),
            "reference": ("refine_label_maps(reference=True): the same steps as scikit-image / scipy calls "
                          "(refine_instances_reference), timed on the first tiles in the same run"),
            "what_is_timed": "refine_label_maps on each tile: colour deconvolution, per-nucleus thresholds, "
                             "watershed, per-nucleus clean-up, class/confidence maps (compiled kernels)",
            "seed": int(seed)}


# --------------------------------------------------------------------------------------
# whole-slide label derivation
# --------------------------------------------------------------------------------------

def _generate_in_child(work: Path, kwargs: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """:func:`stlib.bench_slide.make_slide_sample` in a child process (its memory is not ours);
    returns its info and the child's peak RSS (GiB)."""
    import multiprocessing as mp
    import resource

    from stlib.bench_slide import make_slide_sample

    ctx = mp.get_context("spawn")  # not fork: torch / OpenMP may already run threads in this process
    proc = ctx.Process(target=make_slide_sample, args=(work,), kwargs=kwargs)
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"generating the bench slide failed (exit code {proc.exitcode})")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return make_slide_sample(work, **kwargs), peak


def _warm_up() -> float:
    """Load (or compile) the numba kernels of every stage on tiny inputs; returns seconds."""
    from stlib import _align_kernels as AK
    from stlib.labels.refine import refine_label_maps
    from stlib.tiles.slide import _zoom_linear

    t0 = time.perf_counter()
    wp, wc, ww, wh = synthetic_nuclei(60, seed=1)
    from stlib.labels.masks import iter_label_tiles

    for _t, lm in iter_label_tiles(wp, width=ww, height=wh, scale=1.0, tile_px=128, classes=wc):
        img = np.full((128, 128, 3), 220, np.uint8)
        img[lm.inst > 0] = (90, 60, 150)
        refine_label_maps(img, lm.inst, lm.type, lm.ignore, lm.conf, um_per_px=TARGET_UM_PER_PX_40X)
        break
    _zoom_linear(np.zeros((30, 30, 3), np.uint8), 32)
    h = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    m = h > 0.5
    z = np.zeros(2, np.int64)
    AK.window_stats(h, m, m, z, z, 16, np.ones(2, np.int64))
    AK.pearson_full(h, m)
    AK.global_sums(h, m, m, 0, 40)
    hann = np.ones((16, 16), np.float32)
    AK.prep_windows(h, h, z, z, 16, hann)
    AK.shifted_peak_at(h, h, z, z, 16, np.zeros(2), np.zeros(2))
    AK.percentile_threaded(h, [1.0, 99.5])
    lut, hcol = AK.hed_lut()
    AK.hed_h(np.zeros((4, 4, 3), np.uint8), lut, hcol)
    return time.perf_counter() - t0


def _reference_alignment(hest: Path, sid: str, crop_mm: float) -> dict[str, Any]:
    """Alignment of a central ``crop_mm`` square of the slide with batched and with node-by-node
    tile measurements (the reference), in the same run: seconds of each and their ratio."""
    import shapely

    from stlib.align import _hest_inputs, align_nuclei

    slide, M0, nuclei_um, _ = _hest_inputs(hest, sid)
    cxy = shapely.get_coordinates(shapely.centroid(np.asarray(nuclei_um)))
    c = np.median(cxy, axis=0)
    sel = np.all(np.abs(cxy - c) < crop_mm * 500.0, axis=1)
    out: dict[str, Any] = {"crop_mm": crop_mm, "nuclei": int(sel.sum())}
    with slide:
        for key, ref in (("fast", False), ("reference", True)):
            tm: dict[str, float] = {}
            res = align_nuclei(slide, np.asarray(nuclei_um)[sel], M0, reference=ref, timings=tm)
            out[f"{key}_tile_measurements_s"] = round(tm["tile_measurements"], 3)
            out[f"{key}_transform"] = res.transform.affine.tolist()
    out["speedup"] = round(out["reference_tile_measurements_s"] / max(out["fast_tile_measurements_s"], 1e-9), 1)
    out["max_affine_difference"] = float(np.abs(np.subtract(out.pop("fast_transform"),
                                                            out.pop("reference_transform"))).max())
    return out


def _reference_tiles(hest: Path, sid: str, nuc: Any, excluded: Any, *, n_tiles: int, tile_px: int, um_per_px: float,
                     seed: int) -> dict[str, Any]:
    """Per-tile seconds of the straightforward forms on ``n_tiles`` random tiles, single thread:
    tile image (``read_tile_image``; the fast form's pixels are checked to be the same) and mask
    refinement (reference vs compiled, both timed here); and the per-nucleus
    ``skimage.draw.polygon`` loop (nuclei/s). The fast tile image and masks are timed over the
    whole slide by the run itself."""
    from stlib.io.hest import HestSample
    from stlib.labels.masks import TileRenderer
    from stlib.labels.refine import refine_label_maps
    from stlib.tiles.slide import RowBands, read_tile_image, resample_tile

    s = HestSample(hest, sid)
    scale = s.pixel_size_um / um_per_px
    size_l0 = tile_px / scale
    out: dict[str, Any] = {"tiles": int(n_tiles)}
    with s.wsi() as wsi:
        H, W = wsi.shape
        r = TileRenderer(nuc.geometry.values, width=W, height=H, scale=scale, tile_px=tile_px,
                         classes=nuc["class"].to_numpy().astype(np.uint8), ignore_polygons=excluded)
        rng = np.random.default_rng(seed)
        busy = [i for i in rng.permutation(len(r))[: 4 * n_tiles] if r.render(i).n_nuclei > 0][:n_tiles]
        t = {"image_ref": 0.0, "image_fast": 0.0, "refine_ref": 0.0, "refine_fast": 0.0, "masks": 0.0}
        same = 0
        for i in sorted(busy):
            x0, y0 = r.tile(i).origin
            t0 = time.perf_counter()
            ref_img = read_tile_image(wsi, x0, y0, size_l0, tile_px)
            t1 = time.perf_counter()
            bands = RowBands(wsi)  # a fresh band per tile: the whole decoding cost is charged to it
            n = int(math.ceil(size_l0))
            img = resample_tile(bands.crop(int(math.floor(x0)), int(math.floor(y0)), n, n), size_l0, tile_px)
            t2 = time.perf_counter()
            lm = r.render(i)
            t3 = time.perf_counter()
            a = refine_label_maps(img, lm.inst, lm.type, lm.ignore, lm.conf, um_per_px=um_per_px)
            t4 = time.perf_counter()
            b = refine_label_maps(img, lm.inst, lm.type, lm.ignore, lm.conf, um_per_px=um_per_px, reference=True)
            t5 = time.perf_counter()
            same += bool(np.array_equal(img, ref_img) and all(np.array_equal(x, y) for x, y in zip(a[:4], b[:4])))
            for k, v in (("image_ref", t1 - t0), ("image_fast", t2 - t1), ("masks", t3 - t2),
                         ("refine_fast", t4 - t3), ("refine_ref", t5 - t4)):
                t[k] += v
    k = max(1, len(busy))
    out.update({"tiles": len(busy), "identical_tiles": int(same),
                "tile_image_ms_reference": round(1e3 * t["image_ref"] / k, 2),
                "refine_ms_reference": round(1e3 * t["refine_ref"] / k, 2),
                "refine_ms_fast": round(1e3 * t["refine_fast"] / k, 2),
                "refine_speedup": round(t["refine_ref"] / max(t["refine_fast"], 1e-9), 1)})
    # masks: the per-nucleus loop of `stlib bench labels` on a subsample, nuclei per second
    sub = np.random.default_rng(seed + 1).choice(len(nuc), size=min(2000, len(nuc)), replace=False)
    base_s = _baseline_loop(nuc.geometry.values[sub], nuc["class"].to_numpy()[sub], scale)
    out["masks_reference_nuclei_per_s"] = round(sub.size / base_s, 1)
    return out


def bench_derive(work_dir: str | Path | None = None, *, n_nuclei: int = 500_000, um_per_px: float = HEST_XENIUM_UM_PER_PX,
                 side_mm: float = 10.0, tile_px: int = _TILES.tile_px, target_um_per_px: float = _TILES.um_per_px, workers: int | None = None,
                 seed: int = 0, ref_tiles: int = 60, ref_crop_mm: float = 1.5, keep: bool = False) -> dict[str, Any]:
    """The label derivation of one slide-sized synthetic sample, timed per stage.

    Stages (:mod:`stlib.align`, :mod:`stlib.labels`): alignment (inputs, haematoxylin images,
    tile measurements and fits), the aligned nuclei in H&E px, then the tile store
    (:func:`stlib.tiles.stage.build_tile_stores`: label maps, H&E tiles, mask refinement,
    writing) with ``workers`` threads. The sample (:func:`stlib.bench_slide.make_slide_sample`)
    is generated first, untimed, in a child process, into ``work_dir`` (reused when present)
    or a temporary folder. In the same run the straightforward reference of each stage that has
    one is timed on a subsample, for the speed-up ratios.

    Returns
    -------
    dict
        JSON-ready result (``nuclei``, ``seconds``, ``stages``, ...; see ``benchmarks/README.md``).
    """
    import resource
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import geopandas as gpd
    import shapely

    from stlib.align import Transform, align_sample, alignment_error_um, transform_nuclei
    from stlib.io.cohort import cohort_table
    from stlib.io.hest import HestSample
    from stlib.tiles.stage import _box, build_tile_stores
    from stlib.tiles.slide import default_workers
    from stlib.utils import read_json

    workers = default_workers() if workers is None else int(workers)
    tmp = None
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix="stlib-bench-derive-")
        work_dir = tmp
    work = Path(work_dir)
    gen_kwargs = {"n_nuclei": n_nuclei, "um_per_px": um_per_px, "side_mm": side_mm, "seed": seed}
    try:
        info, gen_peak = _generate_in_child(work / "data", gen_kwargs)
        hest, sid = Path(info["hest_dir"]), info["sample"]
        run = work / "run"
        shutil.rmtree(run, ignore_errors=True)
        warm = _warm_up()
        load0 = [round(v, 2) for v in os.getloadavg()]
        stages: dict[str, float] = {}
        stages_cpu: dict[str, float] = {}
        stages_main: dict[str, float] = {}  # CPU of the calling thread alone: the part no worker thread shares
        align_t: dict[str, float] = {}
        tile_t: dict[str, float] = {}
        cpu0, t_all = time.process_time(), time.perf_counter()

        t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
        res = align_sample(hest, sid, timings=align_t)
        res.save(RunLayout(run).alignment_json(sid))
        stages["alignment"], stages_cpu["alignment"] = time.perf_counter() - t0, time.process_time() - c0
        stages_main["alignment"] = time.thread_time() - m0

        t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
        s = HestSample(hest, sid)
        with ThreadPoolExecutor(max_workers=1) as side:  # the classes are read beside the polygons
            truth_f = side.submit(gpd.read_parquet, Path(info["truth_dir"]) / sid / "nuclei.parquet")
            aligned = transform_nuclei(s.nuclei(), res)
            truth = truth_f.result().set_index("cell_id")
        nuc = gpd.GeoDataFrame({"cell_id": aligned.index.astype(str),
                                "class": truth["class"].reindex(aligned.index.astype(str)).to_numpy(np.uint8),
                                "confidence": np.float32(1.0)}, geometry=aligned.geometry.values)
        RunLayout(run).labels_dir(sid).mkdir(parents=True, exist_ok=True)
        nuc.to_parquet(RunLayout(run).nuclei_parquet(sid))
        stages["aligned_nuclei"], stages_cpu["aligned_nuclei"] = time.perf_counter() - t0, time.process_time() - c0
        stages_main["aligned_nuclei"] = time.thread_time() - m0

        t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
        paths = build_tile_stores(hest, cohort_table(hest.parent, samples=[sid]), run, um_per_px=target_um_per_px,
                                  tile_px=tile_px, workers=workers, timings=tile_t)
        stages["tile_store"], stages_cpu["tile_store"] = time.perf_counter() - t0, time.process_time() - c0
        stages_main["tile_store"] = time.thread_time() - m0
        seconds = time.perf_counter() - t_all
        cpu_s = time.process_time() - cpu0
        load1 = [round(v, 2) for v in os.getloadavg()]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        store = read_json(paths["st"] / "store.json")
        store_bytes = sum(f.stat().st_size for f in paths["st"].iterdir())

        # untimed: does the alignment find the true map? (Xenium-µm nucleus centroids)
        tf = read_json(Path(info["truth_dir"]) / sid / "transform.json")
        um = shapely.get_coordinates(shapely.centroid(
            Transform(np.linalg.inv(res.initial)).warp_geometries(s.nuclei().geometry.values)))
        err0 = alignment_error_um(res.initial, tf, um)
        err1 = alignment_error_um(res, tf, um)
        refs = {"alignment": _reference_alignment(hest, sid, ref_crop_mm),
                "tiles": _reference_tiles(hest, sid, nuc, [_box(r) for r in res.excluded_regions] or None,
                                          n_tiles=ref_tiles, tile_px=tile_px, um_per_px=target_um_per_px, seed=seed)}
        n_tiles = int(store["n_tiles"])
        refs["tiles"]["masks_fast_nuclei_per_s"] = round(len(nuc) / max(tile_t.get("masks", 0.0), 1e-9), 1)
        # the fast tile image, amortised over the slide: band decoding + compiled resampling per tile
        refs["tiles"]["tile_image_ms_fast"] = round(
            1e3 * (tile_t.get("slide_decoding", 0.0) + tile_t.get("tile_images", 0.0)) / max(n_tiles, 1), 2)
    finally:
        if tmp is not None and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif not keep:
            shutil.rmtree(work / "run", ignore_errors=True)
    out = _derive_result(info, seconds, stages, align_t, tile_t, workers, cpu_s, peak, gen_peak, load0, load1, warm,
                         um_per_px, side_mm, seed, tile_px, target_um_per_px, n_tiles, store, store_bytes, sid,
                         err0, err1, res, refs)
    out["stages_cpu_s"] = {k: round(v, 2) for k, v in stages_cpu.items()}
    out["stages_main_thread_cpu_s"] = {k: round(v, 2) for k, v in stages_main.items()}
    # an estimate of each stage's wall time on an idle machine with `workers` cores, from CPU times
    # (load-independent): the calling thread's CPU plus the rest shared by the cores. It assumes the
    # calling thread does not work while the worker threads do (so for the tile store, whose calling
    # thread cuts crops while the workers refine, it is an upper estimate)
    out["stages_idle_wall_estimate_s"] = {
        k: round(stages_main[k] + (stages_cpu[k] - stages_main[k]) / max(workers, 1), 1) for k in stages_cpu}
    out["idle_wall_estimate_s"] = round(sum(out["stages_idle_wall_estimate_s"].values()), 1)
    return out


def _derive_result(info: dict[str, Any], seconds: float, stages: dict[str, float], align_t: dict[str, float],
                   tile_t: dict[str, float], workers: int, cpu_s: float, peak: float, gen_peak: float,
                   load0: list[float], load1: list[float], warm: float, um_per_px: float, side_mm: float, seed: int,
                   tile_px: int, target_um_per_px: float, n_tiles: int, store: dict[str, Any], store_bytes: int,
                   sid: str, err0: np.ndarray, err1: np.ndarray, res: Any, refs: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of :func:`bench_derive`."""
    return {
        "benchmark": "derive_slide",
        "nuclei": int(info["nuclei"]),
        "seconds": round(seconds, 2),
        "stages": {k: round(v, 2) for k, v in stages.items()},
        "alignment_stages": {k: round(v, 2) for k, v in align_t.items()},
        "tile_stages_busy_s": {k: round(v, 2) for k, v in tile_t.items() if not k.startswith("cpu:")},
        "tile_stages_cpu_s": {k[4:]: round(v, 2) for k, v in tile_t.items() if k.startswith("cpu:")},
        "tile_stages_note": ("busy seconds summed over the threads of the tile stage: masks, tile_images "
                             "(resampling), mask_refinement run in worker threads at the same time, so they add up to "
                             "about workers x the tile_store wall time; slide_decoding (the calling thread waiting for a "
                             "band and cutting the crops; the bands are decoded ahead in a thread of their own), "
                             "polygon_setup and store_finish run in the calling thread, store_writing in a writer "
                             "thread. tile_stages_cpu_s: the CPU "
                             "seconds of the same steps (thread CPU time; slide_decoding with the band thread's CPU, "
                             "without the decoding done in "
                             "tifffile's / zarr's own threads)"),
        "goal": "under 180 s on 2 cores for about 500k nuclei (issue 14)",
        "workers": int(workers), "process_cpu_s": round(cpu_s, 1),
        "cpu_utilisation": round(cpu_s / max(seconds, 1e-9), 2),
        "peak_rss_gib": round(peak, 2), "generation_peak_rss_gib": round(gen_peak, 2),
        "load_average_1_5_15min_before": load0, "load_average_1_5_15min_after": load1,
        "warmup_compile_s": round(warm, 2),
        "slide": {"px": info["slide_px"], "um_per_px": um_per_px, "side_mm": side_mm,
                  "generated_in_s": info["seconds"], "generator": "stlib.bench_slide.make_slide_sample",
                  "seed": seed},
        "tile_store": {"tiles": n_tiles, "tile_px": tile_px, "um_per_px": target_um_per_px,
                       "gib": round(store_bytes / 2**30, 2),
                       "refinement": (store.get("refinement") or {}).get("per_sample", {}).get(sid)},
        "alignment_check": {"median_error_um_initial": round(float(np.median(err0)), 3),
                            "median_error_um_aligned": round(float(np.median(err1)), 3),
                            "p90_error_um_aligned": round(float(np.quantile(err1, 0.9)), 3),
                            "excluded_regions": len(res.excluded_regions)},
        "references": refs,
        "what_is_timed": ("align_sample (read transcripts + nuclei, fit HEST's registration, haematoxylin images, "
                          "tile scores and the coarse-to-fine refinement), transform_nuclei + writing the labels "
                          "stand-in (classes from the generator: cell typing from expression is not part of this "
                          "benchmark), build_tile_stores (label maps, H&E tiles, mask refinement, tile store with "
                          "splits); not timed: generating the sample, numba compilation / cache loading "
                          "(warmup_compile_s), the references"),
    }


# =====================================================================================
# stlib bench infer (moved from stlib.infer)
# =====================================================================================

def synthetic_slide(size_px: int | tuple[int, int], *, seed: int = 0, spacing: int = 40,
                    background_fraction: float = 0.15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic H&E-like image: dark purple ellipses on pink, with known instances.

    Nuclei sit on a jittered grid (``spacing`` px), never touching, semi-major axis
    0.21-0.35 x ``spacing`` (with the default 40 px at 0.25 µm/px: 4-7 µm long nuclei),
    aspect ratio 0.6-1; the red channel encodes the class (70 + 10 x class). A band of glass
    (``background_fraction`` of the width, on the right) has no tissue.

    Returns
    -------
    image, inst, classes
        ``(H, W, 3)`` uint8, ``(H, W)`` int32 ids 1..n, ``(n + 1,)`` uint8 class per id.
    """
    rng = np.random.default_rng(seed)
    H, W = (size_px, size_px) if isinstance(size_px, int) else size_px
    img = np.empty((H, W, 3), np.float32)
    img[:] = (236, 170, 200)
    img += rng.normal(0, 6, (H, W, 1)).astype(np.float32)
    inst = np.zeros((H, W), np.int32)
    glass_x = int(W * (1 - background_fraction))
    cls = [0]
    amax = spacing * 0.35
    jit = max(0.0, spacing / 2 - amax - 1)
    n = 0
    for cy in np.arange(spacing / 2, H - spacing / 2 + 1, spacing):
        for cx in np.arange(spacing / 2, glass_x - spacing / 2 + 1, spacing):
            if rng.random() > 0.85:
                continue
            yc, xc = cy + rng.uniform(-jit, jit), cx + rng.uniform(-jit, jit)
            a = rng.uniform(0.6, 1.0) * amax
            b = a * rng.uniform(0.6, 1.0)
            th = rng.uniform(0, np.pi)
            y0, y1 = int(max(0, yc - a - 1)), int(min(H, yc + a + 2))
            x0, x1 = int(max(0, xc - a - 1)), int(min(W, xc + a + 2))
            yy, xx = np.mgrid[y0:y1, x0:x1]
            u = (xx - xc) * np.cos(th) + (yy - yc) * np.sin(th)
            v = -(xx - xc) * np.sin(th) + (yy - yc) * np.cos(th)
            m = (u / a) ** 2 + (v / b) ** 2 <= 1.0
            if m.sum() < 12:
                continue
            n += 1
            inst[y0:y1, x0:x1][m] = n
            c = int(rng.integers(1, 6))
            cls.append(c)
            img[y0:y1, x0:x1][m] = (70 + 10 * c, 40, 120)
    img[:, glass_x:] = 242 + rng.normal(0, 2, (H, W - glass_x, 1))
    return np.clip(img, 0, 255).astype(np.uint8), inst, np.asarray(cls, np.uint8)


def ideal_maps(inst: np.ndarray, classes: np.ndarray, n_types: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The network outputs a perfect model would give for an instance map: NP probability (1 on
    nuclei), HV maps (:func:`stlib.labels.masks.hv_maps`) and one-hot NT maps of ``classes[inst]``
    (``n_types`` channels). Post-processing timed on them (``stlib bench infer``, ``make gpu-check``)
    sees realistic nuclei, whatever an untrained network predicts.
    """
    from stlib.labels.masks import hv_maps

    np_prob = (inst > 0).astype(np.float32)
    hv = hv_maps(inst)
    typ = classes[inst]
    tp = np.zeros((n_types, *inst.shape), np.float32)
    for c in range(n_types):
        tp[c] = typ == c
    return np_prob, hv, tp


def _infer_parser() -> argparse.ArgumentParser:
    """Options of ``stlib bench infer``."""
    from stlib.model.net import ENCODERS

    p = argparse.ArgumentParser(prog="stlib bench infer",
                                description="Network vs post-processing time per tile; whole-slide throughput.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", default=None, help="model.pt to time (default: a random network)")
    g.add_argument("--encoder", choices=sorted(ENCODERS), default=None,
                   help="random network of this encoder (default: resnet50 on CUDA, small on CPU)")
    p.add_argument("--tiles", type=int, default=None, help="tiles timed (default 512 on CUDA, 16 on CPU)")
    p.add_argument("--tile-px", type=int, default=_TILES.tile_px)
    p.add_argument("--batch", type=int, default=None, help="default 64 on CUDA, 8 on CPU")
    p.add_argument("--slide-px", type=int, default=None, help="synthetic slide side (default 8192 CUDA, 1024 CPU)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--slide", action="store_true",
                   help="whole-slide run only: a synthetic pyramidal slide of --slide-mm (stlib.bench_slide), network "
                        "and post-processing timed apart (writes benchmarks/infer_slide_<device>.json)")
    p.add_argument("--slide-mm", type=float, default=1.5, help="side of the --slide slide (mm)")
    p.add_argument("--postproc-processes", action="store_true", help="--slide: post-process in processes")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/infer_<device>.json)")
    return p


def _bench_infer_slide(args: argparse.Namespace, argv: list[str]) -> int:
    """``stlib bench infer --slide``: :func:`infer_image` on a synthetic whole slide, timed per part."""
    import resource

    import torch

    from stlib.bench_slide import make_slide_sample
    from stlib.config import resolve_device
    from stlib.infer import ModelInfo, infer_image, load_inference_model
    from stlib.infer.engine import default_workers
    from stlib.model.net import build_model

    dev = torch.device(resolve_device(args.device))
    cuda = dev.type == "cuda"
    amp = cuda and not args.no_amp
    torch.manual_seed(0)
    if args.model:
        info = load_inference_model(args.model, device=str(dev))
    else:
        enc = args.encoder or ("resnet50" if cuda else "small")
        info = ModelInfo(model=build_model({"encoder": enc}), um_per_px=TARGET_UM_PER_PX_40X, tile_px=_TILES.tile_px,
                         source=f"random HoVerNet({enc})", encoder=enc)
    workers = default_workers() if args.workers is None else int(args.workers)
    batch = args.batch or (16 if cuda else 4)
    T = args.tile_px if args.tile_px != _TILES.tile_px else 512
    n_nuclei = int(5000 * args.slide_mm ** 2)  # about HEST's density over tissue
    with tempfile.TemporaryDirectory(prefix="stlib-bench-infer-") as td:
        sample = make_slide_sample(Path(td), n_nuclei=n_nuclei, side_mm=args.slide_mm, seed=0)
        path = Path(sample["hest_dir"]) / "wsis" / f"{sample['sample']}.tif"
        from stlib.io.wsi import open_wsi

        with open_wsi(path) as w:  # warm-up on a crop (kernel compilation, allocator); not timed
            crop = w.read_region(w.shape[1] // 2, w.shape[0] // 2, T + 64, T + 64)
        infer_image(info, crop, um_per_px=HEST_XENIUM_UM_PER_PX, device=str(dev), tile_px=T, batch_size=batch, amp=amp,
                    workers=workers)
        load0 = [round(v, 2) for v in os.getloadavg()]
        cpu0 = time.process_time()
        res = infer_image(info, path, device=str(dev), tile_px=T, batch_size=batch, amp=amp, workers=workers,
                          postproc_processes=args.postproc_processes)
        cpu_s = time.process_time() - cpu0
    st = res.stats
    wall = st["wall_s"]
    pp_per_worker = st["postproc_s"] / max(1, workers)
    pace = max(st["net_s"], pp_per_worker)
    result = {
        "benchmark": "infer_slide",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "stlib bench infer " + " ".join(argv),
        "device": str(dev), "device_name": device_name(dev), "machine": machine_info(),
        "load_average_1_5_15min_before": load0, "torch_threads": torch.get_num_threads(),
        "model": info.source, "encoder": info.encoder, "precision": "bf16-autocast" if amp else "fp32",
        "slide": {"side_mm": args.slide_mm, "px": sample["slide_px"], "um_per_px": HEST_XENIUM_UM_PER_PX,
                  "nuclei_true": sample["nuclei"], "generator": "stlib.bench_slide.make_slide_sample"},
        "tile_px": T, "overlap": st["overlap"], "batch": batch, "postproc_workers": workers,
        "postproc_pool": "processes" if args.postproc_processes else "threads",
        "tiles": st["n_tiles_processed"], "tiles_skipped_no_tissue": st["n_tiles_skipped"],
        "nuclei_found": st["n_nuclei"],
        "wall_s": round(wall, 2), "net_s": round(st["net_s"], 2), "read_s": round(st["read_s"], 2),
        "postproc_busy_s": round(st["postproc_s"], 2), "postproc_s_per_worker": round(pp_per_worker, 2),
        "tiles_per_s": round(st["n_tiles_processed"] / wall, 3), "nuclei_per_s": round(st["n_nuclei"] / wall, 2),
        "net_tiles_per_s": round(st["n_tiles_processed"] / max(st["net_s"], 1e-9), 3),
        "postproc_tiles_per_s": round(st["n_tiles_processed"] / max(pp_per_worker, 1e-9), 3),
        "slower_part": "network" if st["net_s"] >= pp_per_worker else "post-processing",
        "overlap_efficiency": round(pace / wall, 3),
        "process_cpu_s": round(cpu_s, 1), "cpu_utilisation": round(cpu_s / max(wall, 1e-9), 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "notes": ("net_s: forward passes in the calling thread (with host<->device copies); postproc_busy_s: "
                  "post-processing summed over its worker threads, which run while the next batch goes "
                  "through the network; overlap_efficiency = max(net_s, postproc_s_per_worker) / wall_s "
                  "(1 = the slower part sets the pace, nothing waits). "
                  + ("" if args.model else "A random (untrained) network: nuclei_found and nuclei_per_s mean "
                     "nothing; pass --model runs/<profile>/models/st/model.pt for a trained one.")),
    }
    out_path = Path(args.out or f"benchmarks/infer_slide_{dev.type}.json")
    write_json(out_path, result)
    print(f"infer slide: {result['tiles']} tiles in {result['wall_s']} s ({result['tiles_per_s']} tiles/s; "
          f"network {result['net_s']} s, post-processing {result['postproc_s_per_worker']} s per worker) -> {out_path}")
    return 0


def bench_infer_main(argv: list[str]) -> int:
    """``stlib bench infer``: network vs post-processing time per tile, whole-slide throughput."""
    import torch

    from stlib.config import resolve_device
    from stlib.infer import ModelInfo, infer_image, load_inference_model, predict_tiles
    from stlib.infer.engine import default_workers, prepare_model
    from stlib.io.wsi import write_pyramidal_tiff
    from stlib.model import postproc
    from stlib.model.net import build_model

    args = _infer_parser().parse_args(argv)
    if args.slide:
        return _bench_infer_slide(args, argv)
    dev = torch.device(resolve_device(args.device))
    cuda = dev.type == "cuda"
    amp = cuda and not args.no_amp
    n_tiles = args.tiles or (512 if cuda else 16)
    batch = args.batch or (64 if cuda else 8)
    T = args.tile_px
    slide_px = args.slide_px or (8192 if cuda else 1024)
    workers = default_workers() if args.workers is None else args.workers
    torch.manual_seed(0)
    if args.model:
        info = load_inference_model(args.model, device=str(dev))
        model_desc = args.model
    else:
        enc = args.encoder or ("resnet50" if cuda else "small")
        info = ModelInfo(model=build_model({"encoder": enc}), um_per_px=TARGET_UM_PER_PX_40X, tile_px=T,
                         source=f"random HoVerNet({enc})", encoder=enc)
        model_desc = info.source
    model = prepare_model(info.model, dev)
    n_types = int(getattr(model, "n_types", len(info.class_names)))

    # tiles cut from the synthetic slide (the same tiles for network and post-processing)
    side = max(T, int(math.ceil(math.sqrt(n_tiles))) * T)
    img, inst, classes = synthetic_slide(side, seed=0, background_fraction=0.0)
    k = side // T
    sel = [(i // k, i % k) for i in range(n_tiles)]
    tiles = np.stack([img[r * T:(r + 1) * T, c * T:(c + 1) * T] for r, c in sel])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    predict_tiles(model, tiles[:batch], device=str(dev), batch_size=batch, amp=amp)  # warm-up
    sync()
    t0 = time.perf_counter()
    out = predict_tiles(model, tiles, device=str(dev), batch_size=batch, amp=amp)
    sync()
    net_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for j in range(n_tiles):
        postproc.hovernet_postprocess(out["np_prob"][j], out["hv"][j], out["tp_prob"][j])
    pp_s = time.perf_counter() - t0
    ideal_s, n_ideal, n_true = 0.0, 0, 0
    ideal_maps(np.zeros((8, 8), np.int32), classes, n_types)  # compile/load hv_maps before timing
    for r, c in sel:
        sub = inst[r * T:(r + 1) * T, c * T:(c + 1) * T]
        n_true += len(np.unique(sub)) - 1
        maps = ideal_maps(sub, classes, n_types)
        t0 = time.perf_counter()
        n_ideal += int(postproc.hovernet_postprocess(*maps)[0].max())
        ideal_s += time.perf_counter() - t0

    # whole-slide throughput, end to end from a pyramidal TIFF (read, tissue, net, post-processing)
    with tempfile.TemporaryDirectory() as td:
        s_img, s_inst, _ = synthetic_slide(slide_px, seed=1)
        path = write_pyramidal_tiff(Path(td) / "slide.tif", s_img, um_per_px=TARGET_UM_PER_PX_40X)
        n_slide_true = int(s_inst.max())
        del s_img, s_inst
        res = infer_image(info, path, device=str(dev), tile_px=T, overlap=64, batch_size=batch, amp=amp,
                          workers=workers)
    st = res.stats
    wall = st["wall_s"]
    cpu_util = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    result = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "stlib bench infer " + " ".join(argv),
        "device": str(dev), "device_name": device_name(dev),
        "machine": {**machine_info(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "process_cpu_utilisation": round(cpu_util, 3),
                    "note": "process CPU-seconds / wall-seconds over the run; well below the usable "
                            "cores means the machine was shared and timings are pessimistic"},
        "model": model_desc, "encoder": info.encoder, "batch": batch,
        "precision": "bf16-autocast" if amp else "fp32", "channels_last": cuda, "tile_px": T,
        "tiles_timed": n_tiles,
        "net_ms_per_tile": round(1e3 * net_s / n_tiles, 3),
        "net_includes": "host->device copy of uint8 tiles, forward, softmax, device->host copy",
        "postproc_ms_per_tile": round(1e3 * ideal_s / n_tiles, 3),
        "postproc_ms_per_tile_on_model_outputs": round(1e3 * pp_s / n_tiles, 3),
        "postproc_note": ("postproc_ms_per_tile is measured on ideal NP/HV/NT maps of the known synthetic "
                          "instances (hv_maps), i.e. realistic nuclei; the model-output timing depends on "
                          "what a random network predicts. Single thread, same run as the network timing."),
        "ratio_postproc_net": round(ideal_s / net_s, 3) if net_s > 0 else None,
        "ratio_postproc_net_on_model_outputs": round(pp_s / net_s, 3) if net_s > 0 else None,
        "nuclei_per_tile_true": round(n_true / n_tiles, 2), "nuclei_per_tile_ideal_postproc": round(n_ideal / n_tiles, 2),
        "slide_px": [slide_px, slide_px], "slide_um_per_px": TARGET_UM_PER_PX_40X, "slide_tiles": st["n_tiles"],
        "slide_tiles_processed": st["n_tiles_processed"], "slide_tiles_skipped": st["n_tiles_skipped"],
        "slide_overlap": 64, "workers": workers, "slide_wall_s": round(wall, 3),
        "slide_net_s": round(st["net_s"], 3), "slide_postproc_cpu_s": round(st["postproc_s"], 3),
        "slide_read_s": round(st["read_s"], 3),
        "tiles_per_s": round(st["n_tiles_processed"] / wall, 3),
        "nuclei_per_s": round(len(res) / wall, 3), "slide_nuclei_found": len(res), "slide_nuclei_true": n_slide_true,
        "nuclei_note": (None if args.model else "random (untrained) network: the nuclei count, and so "
                        "nuclei_per_s, is not meaningful; tiles_per_s and the per-tile times are."),
    }
    out_path = Path(args.out or f"benchmarks/infer_{dev.type}.json")
    write_json(out_path, result)
    print(json.dumps(result, indent=2))
    return 0


# =====================================================================================
# stlib bench train (moved from stlib.train)
# =====================================================================================

#: Dense peak tensor FLOP/s (bf16) of known GPUs, from the vendors' data sheets.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
    "H100": 756e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "V100": 125e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "T4": 65e12,
}


def _peak_flops(name: str) -> float | None:
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_BF16_FLOPS[key]
    return None


def _synthetic_train_store(path: Path, n: int, tile: int, seed: int = 0) -> Path:
    """A store of random discs (for throughput only), written with :mod:`stlib.io.tiles`."""
    from stlib.io.tiles import TileStoreWriter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:tile, :tile]
    with TileStoreWriter(path, tile_px=tile, um_per_px=TARGET_UM_PER_PX_40X, source="bench", overwrite=True) as w:
        for i in range(n):
            inst = np.zeros((tile, tile), np.int32)
            typ = np.zeros((tile, tile), np.uint8)
            for j in range(1, 41):
                cy, cx, r = rng.integers(0, tile), rng.integers(0, tile), rng.integers(4, 10)
                m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                inst[m] = j
                typ[m] = rng.integers(1, 6)
            img = (255 - 120 * (inst > 0)[..., None] - rng.integers(0, 30, (tile, tile, 3))).astype(np.uint8)
            w.add(image=img, inst=inst, type=typ, conf=(typ > 0).astype(np.uint8) * 200,
                  sample="bench", organ="bench", x0=0.0, y0=0.0, split="train", tile_id=f"t{i}")
    return path


def _kernel_busy_us(prof: Any) -> float:
    """Microseconds covered by at least one CUDA kernel in a ``torch.profiler`` trace."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    busy, cur_s, cur_e = 0.0, None, None
    for s0, e0 in spans:
        if cur_e is None or s0 > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s0, e0
        else:
            cur_e = max(cur_e, e0)
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy


def _train_parser() -> argparse.ArgumentParser:
    """Options of ``stlib bench train``."""
    from stlib.model.net import ENCODERS

    p = argparse.ArgumentParser(prog="stlib bench train",
                                description="Training throughput on synthetic batches + tile-store read rate.")
    p.add_argument("--encoder", choices=sorted(ENCODERS), default=None,
                   help="default: resnet50 on CUDA, small on CPU")
    p.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 4 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (default bf16 autocast)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--store", default=None, help="tile store to time reads from (default: a temporary synthetic one)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/train_<device>.json)")
    return p


def _train_step_fn(model: Any, cfg: Any, device: Any, batch: int, T: int, *, compile_: bool) -> Any:
    """One optimiser step of the training loop on a fixed synthetic batch (augmentation and HV on the device)."""
    import torch

    from stlib.model.losses import hovernet_loss
    from stlib.train.augment import augment_batch, draw_augment_params
    from stlib.train.data import hv_from_inst, to_device
    from stlib.train.loop import autocast, make_optimizer

    cuda = device.type == "cuda"
    opt = make_optimizer(model, cfg)
    fwd = torch.compile(model) if compile_ else model
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    grid = np.kron(np.arange(64, dtype=np.int32).reshape(8, 8), np.ones((T // 8, T // 8), np.int32))  # 64 blocks
    host = {"images": rng.integers(0, 255, (batch, T, T, 3), dtype=np.uint8),
            "inst": np.repeat(grid[None], batch, 0),
            "type": rng.integers(0, 6, (batch, T, T), dtype=np.uint8),
            "ignore": np.zeros((batch, T, T), np.uint8), "conf": np.full((batch, T, T), 200, np.uint8)}
    tb = to_device(host, device, None)

    def step() -> None:
        t = augment_batch(tb, draw_augment_params(gen, batch, cfg))
        t["hv"] = hv_from_inst(t["inst"])
        x = t["image"].contiguous(memory_format=torch.channels_last) if cuda else t["image"]
        with autocast(device, cfg.amp):
            out = fwd(x)
        loss, _ = hovernet_loss(out, inst=t["inst"], hv=t["hv"], type_map=t["type"], ignore=t["ignore"],
                                conf=t["conf"], weights=cfg.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

    return step


def _time_steps(step: Any, device: Any, *, warmup: int, steps: int) -> dict[str, Any]:
    """Wall and CPU seconds of ``steps`` steps after ``warmup``; on CUDA the GPU-busy fraction
    (union of CUDA kernel intervals / wall time over a few profiled steps)."""
    import torch

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0
    busy = None
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        n_prof = min(steps, 5)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            tp = time.perf_counter()
            for _ in range(n_prof):
                step()
            sync()
            wall_p = time.perf_counter() - tp
        busy = _kernel_busy_us(prof) / 1e6 / wall_p
    return {"wall": wall, "cpu_s": cpu_s, "busy": busy}


def _store_read_rate(store: str | None, device: Any, batch: int, T: int) -> float:
    """Tiles/s of random tile-store batches moved to the device (warm page cache after the first pass)."""
    from stlib.train.data import TileData, to_device

    with tempfile.TemporaryDirectory() as td:
        path = Path(store) if store else _synthetic_train_store(Path(td) / "store", max(4 * batch, 32), T)
        data = TileData([path])
        idx = np.random.default_rng(1).integers(0, len(data), (8, batch))
        tr = time.perf_counter()
        for row in idx:
            to_device(data.get(row), device, None)
        return idx.size / (time.perf_counter() - tr)


def bench_train_main(argv: list[str]) -> int:
    """``stlib bench train``: training throughput on synthetic batches + tile-store read rate."""
    import resource

    import torch

    from stlib.config import resolve_device
    from stlib.model.net import build_model, count_params, model_flops
    from stlib.train import TrainConfig

    args = _train_parser().parse_args(argv)
    device = torch.device(resolve_device(args.device))
    cuda = device.type == "cuda"
    encoder = args.encoder or ("resnet50" if cuda else "small")
    batch = args.batch or (64 if cuda else 4)
    steps = args.steps or (30 if cuda else 5)
    amp = cuda and not args.no_amp
    cfg = TrainConfig(encoder=encoder, batch_size=batch, amp=amp, device=str(device), aug_blur=0.5)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    flops_fwd = model_flops(model, args.tile)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    T = args.tile
    step = _train_step_fn(model, cfg, device, batch, T, compile_=args.compile)
    tm = _time_steps(step, device, warmup=args.warmup, steps=steps)
    wall = tm["wall"]
    tiles_s = steps * batch / wall
    read_tiles_s = _store_read_rate(args.store, device, batch, T)
    name = device_name(device)
    peak = _peak_flops(name) if cuda and amp else None
    train_flops_tile = 3 * flops_fwd
    res = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "stlib bench train " + " ".join(argv),
        "device": str(device), "device_name": name,
        "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
        "model": f"HoVerNet({encoder})", "n_params": count_params(model), "batch": batch, "tile_px": T,
        "precision": "bf16-autocast" if amp else "fp32", "channels_last": cuda, "compile": bool(args.compile),
        "steps_timed": steps, "train_tiles_per_s": round(tiles_s, 3), "step_s": round(wall / steps, 4),
        "flops_fwd_per_tile": flops_fwd, "flops_train_per_tile_est": train_flops_tile,
        "achieved_tflops": round(tiles_s * train_flops_tile / 1e12, 4),
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu_est": None if peak is None else round(tiles_s * train_flops_tile / peak, 4),
        "gpu_busy_fraction": None if tm["busy"] is None else round(tm["busy"], 3),
        "cpu_utilisation": None if cuda else round(tm["cpu_s"] / wall, 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "peak_memory_gb": round((torch.cuda.max_memory_allocated(device) if cuda else
                                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9, 3),
        "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process max RSS",
        "store_read_tiles_per_s": round(read_tiles_s, 1),
        "store_read_source": args.store or "temporary synthetic store (warm page cache)",
        "input_bound": bool(read_tiles_s < tiles_s),
        "augment": "flip+rot90+scale+HED+blur on device, HV from inst on device",
    }
    out = Path(args.out or f"benchmarks/train_{device.type}.json")
    write_json(out, res)
    print(json.dumps(res, indent=2))
    return 0


def cli_main(argv: list[str]) -> int:
    """``stlib bench labels|tiles|refine|derive|train|infer [options]``."""
    parser = argparse.ArgumentParser(prog="stlib bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("labels", help="full-slide label maps vs the per-nucleus loop")
    p.add_argument("--nuclei", type=int, default=500_000)
    p.add_argument("--tile-px", type=int, default=1024)
    p.add_argument("--um-per-px", type=float, default=_TILES.um_per_px, help="target resolution (µm/px)")
    p.add_argument("--level0-um-per-px", type=float, default=0.2738,
                   help="slide level-0 resolution (HEST Xenium WSIs are about 0.27 µm/px)")
    p.add_argument("--baseline-nuclei", type=int, default=2000)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else (os.cpu_count() or 1), help="tile-rendering threads (default: usable CPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/labels.json")
    p = sub.add_parser("tiles", help="tile-store read throughput")
    p.add_argument("--store", default=None, help="an existing store (default: a synthetic one)")
    p.add_argument("--n-tiles", type=int, default=512)
    p.add_argument("--tile-px", type=int, default=_TILES.tile_px)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--n-batches", type=int, default=20)
    p.add_argument("--out", default="benchmarks/tiles.json")
    p = sub.add_parser("refine", help="H&E-guided mask refinement, time per tile")
    p.add_argument("--store", default=None, help="an existing tile store (default: synthetic tiles)")
    p.add_argument("--n-tiles", type=int, default=200)
    p.add_argument("--tile-px", type=int, default=_TILES.tile_px)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/refine.json")
    p = sub.add_parser("derive", help="label derivation of one slide-sized synthetic sample, per stage")
    p.add_argument("--work-dir", default=None,
                   help="where the sample is generated (and reused by later runs); default: a temporary folder")
    p.add_argument("--nuclei", type=int, default=500_000)
    p.add_argument("--um-per-px", type=float, default=HEST_XENIUM_UM_PER_PX, help="level-0 pixel size of the H&E (HEST: ~0.27)")
    p.add_argument("--side-mm", type=float, default=10.0)
    p.add_argument("--tile-px", type=int, default=_TILES.tile_px)
    p.add_argument("--target-um-per-px", type=float, default=_TILES.um_per_px)
    p.add_argument("--workers", type=int, default=None, help="tile threads (default: usable CPUs)")
    p.add_argument("--ref-tiles", type=int, default=60, help="tiles timed with the reference forms")
    p.add_argument("--ref-crop-mm", type=float, default=1.5, help="slide crop aligned with the reference form")
    p.add_argument("--keep", action="store_true", help="keep the run folder (tile store) under --work-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/derive_slide.json")
    sub.add_parser("train", help="training throughput on synthetic batches, tile-store read rate", add_help=False)
    sub.add_parser("infer", help="network vs post-processing per tile, whole-slide throughput", add_help=False)
    sub.add_parser("gpu-check", help="the GPU measurements in one run (stlib.gpu_check; --dry-run on a CPU)",
                   add_help=False)
    sub.add_parser("unmatched", help="H&E nuclei without an ST nucleus as ignore: real-tissue dev numbers",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.what == "unmatched":
        return bench_unmatched_main(rest)
    if args.what == "infer":
        return bench_infer_main(rest)
    if args.what == "train":
        return bench_train_main(rest)
    if args.what == "gpu-check":
        from stlib.gpu_check import cli_main as gpu_cli

        return gpu_cli(rest)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.what == "labels":
        if args.nuclei <= 0 or args.baseline_nuclei <= 0:
            parser.error("--nuclei and --baseline-nuclei must be positive")
        res = bench_labels(args.nuclei, tile_px=args.tile_px, target_um_per_px=args.um_per_px,
                           level0_um_per_px=args.level0_um_per_px, baseline_nuclei=args.baseline_nuclei,
                           seed=args.seed, n_workers=args.workers)
    elif args.what == "derive":
        if args.nuclei <= 0 or args.side_mm <= 0:
            parser.error("--nuclei and --side-mm must be positive")
        res = bench_derive(args.work_dir, n_nuclei=args.nuclei, um_per_px=args.um_per_px, side_mm=args.side_mm,
                           tile_px=args.tile_px, target_um_per_px=args.target_um_per_px, workers=args.workers,
                           seed=args.seed, ref_tiles=args.ref_tiles, ref_crop_mm=args.ref_crop_mm, keep=args.keep)
    elif args.what == "refine":
        res = bench_refine(args.store, n_tiles=args.n_tiles, tile_px=args.tile_px, seed=args.seed)
    else:
        res = bench_tiles(args.store, n_tiles=args.n_tiles, tile_px=args.tile_px, batch=args.batch,
                          n_batches=args.n_batches)
    res["machine"] = machine_info()
    res["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    res["command"] = "stlib bench " + " ".join(argv)
    write_json(args.out, res)
    keys = ("nuclei", "seconds", "nuclei_per_s", "baseline_nuclei_per_s", "speedup", "tiles_per_s", "mb_per_s", "ms_per_tile")
    print(" ".join(f"{k}={res[k]}" for k in keys if k in res), f"-> {args.out}")
    if args.what == "derive":
        print(_stage_table(res))
    return 0


def _stage_table(res: dict[str, Any]) -> str:
    """Per-stage wall and CPU seconds of a ``bench derive`` result, as printed lines."""
    cpu = res.get("stages_cpu_s", {})
    lines = [f"{'stage':<22}{'wall s':>10}{'cpu s':>10}"]
    for k, v in res["stages"].items():
        lines.append(f"{k:<22}{v:>10.1f}{cpu.get(k, float('nan')):>10.1f}")
    for k, v in res.get("tile_stages_busy_s", {}).items():
        c = res.get("tile_stages_cpu_s", {}).get(k, float("nan"))
        lines.append(f"  tiles: {k:<14}{v:>10.1f}{c:>10.1f}")
    for k, v in res.get("alignment_stages", {}).items():
        lines.append(f"  alignment: {k:<10}{v:>10.1f}{'':>10}")
    lines.append(f"{'total':<22}{res['seconds']:>10.1f}{res.get('process_cpu_s', float('nan')):>10.1f}"
                 f"   load before/after {res.get('load_average_1_5_15min_before')} / "
                 f"{res.get('load_average_1_5_15min_after')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# H&E nuclei without an ST nucleus: ignore instead of background (issue 10)
# --------------------------------------------------------------------------------------

#: the real-tissue development split of ``bench unmatched``: train organs, development organ
_UNMATCHED_TRAIN, _UNMATCHED_DEV = ("Breast", "Lung"), ("Prostate",)


def label_agreement(inst: np.ndarray, ignore: np.ndarray, truth_inst: np.ndarray, truth_ignore: np.ndarray,
                    ) -> dict[str, int]:
    """How one tile's ST training maps label the true nuclei and the true background.

    Each true nucleus (not ignored in the truth) is ``matched`` / ``ignored`` / ``background``
    by where most of its pixels are in the ST maps (in an ST nucleus, ``ignore``, neither).
    Pixel counts: ``nucleus_px`` / ``nucleus_px_bg`` (true nucleus pixels, and those labelled
    background), ``bg_px`` / ``bg_px_ignored`` (true background, and that ignored).
    """
    cat = np.where(inst > 0, 0, np.where(np.asarray(ignore) > 0, 1, 2))
    valid = (truth_inst > 0) & (truth_ignore == 0)
    _, t = np.unique(truth_inst[valid], return_inverse=True)
    cnt = np.zeros((int(t.max()) + 1 if t.size else 0, 3), np.int64)
    np.add.at(cnt, (t, cat[valid]), 1)
    kind = np.bincount(cnt.argmax(1), minlength=3) if len(cnt) else np.zeros(3, np.int64)
    tb = (truth_inst == 0) & (truth_ignore == 0)
    return {"matched": int(kind[0]), "ignored": int(kind[1]), "background": int(kind[2]),
            "nucleus_px": int(valid.sum()), "nucleus_px_bg": int((valid & (cat == 2)).sum()),
            "bg_px": int(tb.sum()), "bg_px_ignored": int((tb & (cat == 1)).sum())}


def _dev_raw_stores(data_dir: str, run_dir: str, seed: int = 0) -> tuple[Path, Path]:
    """The development cohort (MoNuSeg Breast, Lung, Prostate of the shipped subset) with its
    ST labels and *unrefined* ST / manual tile stores of all its images (``stlib.realtissue``)."""
    from stlib.demo.realtissue import load_source_images, make_realtissue_cohort
    from stlib.io.cohort import cohort_table
    from stlib.realtissue import build_stores, natural_sorted, st_labels

    organs = set(_UNMATCHED_TRAIN) | set(_UNMATCHED_DEV)
    imgs = [x for x in load_source_images("realtissue") if x.organ in organs]
    make_realtissue_cohort(data_dir, imgs, seed=seed, heldout_organs=_UNMATCHED_DEV, pannuke=None)
    table = cohort_table(data_dir)
    table = table[table["organ"].isin(organs)].assign(role="train")
    st_labels(data_dir, run_dir, natural_sorted(table["sample"]), seed=seed)
    p = build_stores(data_dir, run_dir, table, um_per_px=TARGET_UM_PER_PX_40X, tile_px=_TILES.tile_px, seed=seed,
                     refine_masks=False)
    return p["st"], p["truth"]


def unmatched_label_quality(st_store: str | Path, truth_store: str | Path, configs: dict[str, Any], *,
                            repeats: int = 3) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Refine an unrefined ST store's tiles with each :class:`~stlib.config.RefineConfig` of
    ``configs`` and count, per organ, how the result labels the truth (:func:`label_agreement`),
    plus the new ignore blobs (``n_blobs``, and ``blob_precision``: the share of them with at
    least 25 % true-nucleus pixels). Also times :func:`~stlib.labels.refine.refine_label_maps`
    per tile, one thread, with ``unmatched_ignore`` off and on alternately (``repeats`` passes)."""
    from dataclasses import replace

    from scipy import ndimage as ndi

    from stlib.io.tiles import TileStore
    from stlib.labels.refine import refine_label_maps
    from stlib.utils import InputError

    st, tr = TileStore(st_store), TileStore(truth_store)
    if st.info.get("refinement") is not None:
        raise InputError("the ST store is already refined", path=st.path, fix="build it with refine_masks=False")
    if not np.array_equal(st.meta[["sample", "x0", "y0"]].to_numpy(), tr.meta[["sample", "x0", "y0"]].to_numpy()):
        raise InputError("the ST and truth stores hold different tiles", path=tr.path, fix="build them together")
    um = st.um_per_px
    rows = []
    for name, cfg in configs.items():
        agg: dict[str, dict[str, int]] = {}
        for i in range(len(st)):
            a, b = st[i], tr[i]
            inst, _, ign, _, _ = refine_label_maps(a["image"], a["inst"], a["type"], a["ignore"], a["conf"],
                                                   um_per_px=um, config=cfg)
            g = agg.setdefault(str(st.meta["organ"][i]), {"n_blobs": 0, "blobs_on_nuclei": 0, "new_px": 0,
                                                           "new_px_true_bg": 0})
            for k, v in label_agreement(inst, ign, b["inst"], b["ignore"]).items():
                g[k] = g.get(k, 0) + v
            if cfg.unmatched_ignore:
                base = refine_label_maps(a["image"], a["inst"], a["type"], a["ignore"], a["conf"], um_per_px=um,
                                         config=replace(cfg, unmatched_ignore=False))[2]
                new = (ign > 0) & (base == 0)
                lab, n = ndi.label(new)
                if n:
                    on_nuc = ndi.mean((b["inst"] > 0) & (b["ignore"] == 0), lab, np.arange(1, n + 1))
                    g["n_blobs"] += n
                    g["blobs_on_nuclei"] += int((on_nuc >= 0.25).sum())
                g["new_px"] += int(new.sum())
                g["new_px_true_bg"] += int((new & (b["inst"] == 0) & (b["ignore"] == 0)).sum())
        for organ, g in sorted(agg.items()):
            n_true = g["matched"] + g["ignored"] + g["background"]
            rows.append({"config": name, "organ": organ, "n_true": n_true,
                         **{k: round(g[k] / n_true, 4) for k in ("matched", "ignored", "background")},
                         "true_nucleus_px_background": round(g["nucleus_px_bg"] / g["nucleus_px"], 4),
                         "true_bg_px_ignored": round(g["bg_px_ignored"] / g["bg_px"], 4),
                         "new_ignored_px": g["new_px"],
                         "new_ignored_px_true_bg": round(g["new_px_true_bg"] / g["new_px"], 4) if g["new_px"] else None,
                         "n_blobs": g["n_blobs"],
                         "blob_precision": round(g["blobs_on_nuclei"] / g["n_blobs"], 4) if g["n_blobs"] else None})
    timing = _time_unmatched(st, um, next(c for c in configs.values() if c.unmatched_ignore), repeats)
    return rows, timing


def _time_unmatched(st: Any, um: float, cfg: Any, repeats: int) -> dict[str, Any]:
    """Thread-CPU ms per tile of ``refine_label_maps`` with ``cfg`` and with its ``unmatched_ignore``
    off, alternating tile by tile so that both see the same load."""
    from dataclasses import replace

    from stlib.labels.refine import refine_label_maps

    off = replace(cfg, unmatched_ignore=False)
    tiles = [st[i] for i in range(len(st))]
    keys = ("image", "inst", "type", "ignore", "conf")
    for c in (off, cfg):
        refine_label_maps(*(tiles[0][k] for k in keys), um_per_px=um, config=c)  # warm-up
    cpu = {"off": 0.0, "on": 0.0}
    for _ in range(repeats):
        for t in tiles:
            for name, c in (("off", off), ("on", cfg)):
                c0 = time.thread_time()
                refine_label_maps(*(t[k] for k in keys), um_per_px=um, config=c)
                cpu[name] += time.thread_time() - c0
    n = repeats * len(tiles)
    return {"tiles": len(tiles), "repeats": repeats, "tile_px": int(st.tile_px),
            "cpu_ms_per_tile_off": round(1e3 * cpu["off"] / n, 3), "cpu_ms_per_tile_on": round(1e3 * cpu["on"] / n, 3),
            "added_cpu_ms_per_tile": round(1e3 * (cpu["on"] - cpu["off"]) / n, 3),
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


def unmatched_training(data_dir: str, run_root: str, *, steps: int, seed: int = 0) -> list[dict[str, Any]]:
    """The real-tissue chapter's ST-trained network with ``unmatched_ignore`` off and on: trained
    on the development split's train organs (the chapter's recipe, ``steps`` steps, one thread),
    scored against the manual outlines of the development organ's images (bPQ, Dice, AJI,
    detection F1 per image). Runs live in ``{run_root}-off`` / ``{run_root}-on``; finished ones are reused."""
    import torch

    from stlib.config import RefineConfig
    from stlib.io.cohort import cohort_table
    from stlib.realtissue import (STORE, RecipeConfig, build_stores, load_test_images, natural_sorted, score_images,
                                  st_labels)
    from stlib.train import TrainConfig, train

    torch.set_num_threads(1)
    table = cohort_table(data_dir)
    train_s = natural_sorted(table.loc[table["organ"].isin(_UNMATCHED_TRAIN), "sample"])
    dev = load_test_images(data_dir, natural_sorted(table.loc[table["organ"].isin(_UNMATCHED_DEV), "sample"]))
    r = RecipeConfig(seed=seed, device="cpu")
    rows = []
    for variant in ("off", "on"):
        run = f"{run_root}-{variant}"
        st_labels(data_dir, run, train_s, seed=seed)
        build_stores(data_dir, run, table[table["sample"].isin(train_s)].assign(role="train"),
                     um_per_px=TARGET_UM_PER_PX_40X, tile_px=_TILES.tile_px, seed=seed,
                     refinement=RefineConfig(unmatched_ignore=variant == "on"))
        cfg = TrainConfig(recipe="st", run_dir=run, stores=(f"tiles/{STORE}",), out_dir="models/dev/st",
                          train_splits=("train", "val"), val_splits=("val",), val_max_tiles=4, encoder=r.encoder,
                          steps=steps, batch_size=r.batch_size, crop_px=r.crop_px, lr=r.lr, aug_hed=r.aug_hed,
                          aug_scale=r.aug_scale, seed=r.seed, device="cpu", val_every=steps, ckpt_every=100,
                          warmup_steps=r.warmup_steps, num_workers=1)
        res = train(cfg, resume="auto")
        per, _ = score_images({f"ST, unmatched_ignore {variant}": res.model_path}, dev, device="cpu")
        for row in per.to_dict("records"):
            rows.append({"unmatched_ignore": variant, "image": row["image"], "organ": row["organ"], "steps": steps,
                         **{k: round(float(row[k]), 4) for k in ("bpq", "dice", "aji", "f_d")}})
    return rows


def bench_unmatched_main(argv: list[str]) -> int:
    """``stlib bench unmatched``: label quality, cost and (``--train-steps``) training effect of
    ``RefineConfig.unmatched_ignore`` on the real-tissue development split, into one JSON.

    Builds (or reuses) the development cohort of the shipped MoNuSeg subset (Breast, Lung, Prostate;
    never the chapter's held-out organs) and its unrefined tile stores, then sweeps the step's
    thresholds over all its tiles (:func:`unmatched_label_quality`), and with ``--train-steps N``
    trains the ST network off and on (:func:`unmatched_training`; Breast + Lung, scored on Prostate).
    """
    from stlib.config import RefineConfig

    p = argparse.ArgumentParser(prog="stlib bench unmatched", description=bench_unmatched_main.__doc__)
    p.add_argument("--data-dir", default="data/realtissue-dev")
    p.add_argument("--run-dir", default="runs/realtissue-dev-raw", help="run folder of the unrefined stores")
    p.add_argument("--edge-fractions", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    p.add_argument("--min-um2", type=float, nargs="+", default=[8.0, 15.0])
    p.add_argument("--max-um2", type=float, nargs="+", default=[150.0, 400.0])
    p.add_argument("--repeats", type=int, default=3, help="timing passes over the tiles")
    p.add_argument("--train-steps", type=int, default=0, help="also train the ST network off / on (0: no)")
    p.add_argument("--train-run-dir", default="runs/realtissue-dev", help="training runs: {this}-off, {this}-on")
    p.add_argument("--demo-seeds", type=int, nargs="*", default=[],
                   help="also check the step on demo cohorts of these development seeds (stlib.robustness.DEV_SEEDS)")
    p.add_argument("--demo-workdir", default=None, help="where the demo cohorts are written (default: a temp folder)")
    p.add_argument("--out", default="benchmarks/unmatched_ignore.json")
    a = p.parse_args(argv)
    st, truth = _dev_raw_stores(a.data_dir, a.run_dir)
    configs = {"off": RefineConfig(unmatched_ignore=False)}
    for f in a.edge_fractions:
        for lo in a.min_um2:
            for hi in a.max_um2:
                configs[f"on: edge {f}, {lo}-{hi} µm²"] = RefineConfig(
                    unmatched_ignore=True, unmatched_edge_fraction=f, unmatched_min_um2=lo, unmatched_max_um2=hi)
    rows, timing = unmatched_label_quality(st, truth, configs, repeats=a.repeats)
    res: dict[str, Any] = {
        "benchmark": "unmatched", "label_quality": rows, "timing": timing,
        "data": "MoNuSeg Breast (4 images), Lung (3), Prostate (2) of the shipped subset: real H&E and manual "
                "nuclei, simulated Xenium layer (stlib.demo.realtissue, seed 0); the chapter's held-out organs "
                "(Kidney, Bowel / CoNSeP) are not used",
        "what": "label_quality: each true nucleus is matched / ignored / background by where most of its pixels "
                "are in the refined ST maps, per organ and RefineConfig; timing: refine_label_maps thread-CPU ms "
                "per 256-px tile with unmatched_ignore off and on (first 'on' config)"}
    if a.train_steps > 0:
        res["training"] = unmatched_training(a.data_dir, a.train_run_dir, steps=a.train_steps)
        res["training_note"] = ("ST network only (the chapter's recipe: small encoder, batch 8 x 128 px at "
                                "0.25 µm/px, lr 0.004, cosine), trained on Breast + Lung, scored on the 2 Prostate "
                                "images")
    if a.demo_seeds:
        from stlib.robustness import DEV_SEEDS

        if not set(a.demo_seeds) <= set(DEV_SEEDS):
            p.error(f"--demo-seeds must be development seeds ({DEV_SEEDS[0]}-{DEV_SEEDS[-1]})")
        with tempfile.TemporaryDirectory(dir=a.demo_workdir) as tmp:
            res["demo"] = unmatched_demo_check(a.demo_seeds, tmp)
        res["demo_note"] = ("demo cohorts (synthetic H&E: rendered nuclei on a smooth stain), per seed, counts per "
                            "tile (a nucleus on two tiles counts twice); shows the mechanics (what is newly ignored, "
                            "that ST nuclei are never), not how the step behaves on real tissue")
    res["machine"] = machine_info()
    res["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    res["command"] = "stlib bench unmatched " + " ".join(argv)
    write_json(a.out, res)
    print(f"added_cpu_ms_per_tile={timing['added_cpu_ms_per_tile']} -> {a.out}")
    return 0


def unmatched_demo_check(seeds: Sequence[int], workdir: str | Path, *, config: Any = None) -> list[dict[str, Any]]:
    """``unmatched_ignore`` on written demo cohorts (development seeds): what it newly ignores.

    For each seed: the demo cohort (realistic demo scale), every sample aligned and labelled, its
    unrefined ST store and the truth on the same tiles; then each tile is refined with
    ``unmatched_ignore`` off and on (``config``, default: :class:`~stlib.config.RefineConfig` with it on).
    Per seed: the share of tile pixels newly ignored, the share of those that are true background,
    the true nuclei without an ST nucleus whose pixels it ignores, and, for the true nuclei that
    the ST layer covers, how many have (uncovered) pixels newly ignored and the ST-nucleus pixels newly
    ignored (0 by construction); and :func:`label_agreement`'s matched / ignored / background nuclei off and on.
    The demo's H&E is synthetic (rendered nuclei on a smooth stain), so this checks the mechanics,
    not how real tissue looks.
    """
    import dataclasses as _dc
    import shutil
    import warnings

    from stlib.config import RefineConfig
    from stlib.demo import make_cohort
    from stlib.demo.config import config_for_scale
    from stlib.io import cohort
    from stlib.io.tiles import TileStore
    from stlib.labels import derive
    from stlib.labels.refine import refine_label_maps
    from stlib.tiles.stage import build_tile_stores

    on = config or RefineConfig(unmatched_ignore=True)
    off = _dc.replace(on, unmatched_ignore=False)
    dcfg = _dc.replace(config_for_scale("demo"), pannuke_per_fold=0, raw_bundles=0)
    rows = []
    for s in seeds:
        root = Path(workdir) / f"seed{s}"
        data = make_cohort(root / "data", seed=int(s), config=dcfg)
        hest, table = cohort.hest_dir(data), cohort.cohort_table(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for sid in table["sample"]:
                derive.derive_sample(hest, sid, root / "run", truth_dir=data / "truth", neighbors_method="gauss",
                                     align=True)
            p = build_tile_stores(hest, table, root / "run", truth_dir=data / "truth", refine_masks=False)
        st, tr = TileStore(p["st"]), TileStore(p["truth"])
        c = dict.fromkeys(("px", "new_px", "new_px_true_bg", "st_px_new", "uncovered", "uncovered_hit", "covered",
                           "covered_hit"), 0)
        for i in range(len(st)):
            a, b = st[i], tr[i]
            args = (a["image"], a["inst"], a["type"], a["ignore"], a["conf"])
            r0 = refine_label_maps(*args, um_per_px=st.um_per_px, config=off)
            r1 = refine_label_maps(*args, um_per_px=st.um_per_px, config=on)
            new = (r1[2] > 0) & (r0[2] == 0)
            t = b["inst"] * (b["ignore"] == 0)
            covered = np.unique(t[(t > 0) & (r0[0] > 0)])
            true_ids = np.unique(t[t > 0])
            hit = np.unique(t[new & (t > 0)])
            c["px"] += t.size
            c["new_px"] += int(new.sum())
            c["new_px_true_bg"] += int((new & (b["inst"] == 0)).sum())
            c["st_px_new"] += int((new & (r0[0] > 0)).sum())
            c["covered"] += covered.size
            c["covered_hit"] += int(np.isin(hit, covered).sum())
            c["uncovered"] += true_ids.size - covered.size
            c["uncovered_hit"] += int((~np.isin(hit, covered)).sum())
            for k, r in (("off", r0), ("on", r1)):
                for cat, v in label_agreement(r[0], r[2], b["inst"], b["ignore"]).items():
                    c[f"{cat}_{k}"] = c.get(f"{cat}_{k}", 0) + v
        rows.append({"seed": int(s), "tiles": len(st), "newly_ignored_px_fraction": round(c["new_px"] / c["px"], 5),
                     "newly_ignored_true_bg_fraction": (round(c["new_px_true_bg"] / c["new_px"], 4)
                                                        if c["new_px"] else None),
                     "true_nuclei_without_st_nucleus": c["uncovered"],
                     "of_which_newly_ignored": c["uncovered_hit"],
                     "true_nuclei_covered_by_st": c["covered"],
                     "covered_with_pixels_newly_ignored": c["covered_hit"],
                     "st_nucleus_px_newly_ignored": c["st_px_new"],
                     **{f"true_nuclei_{cat}_{k}": c[f"{cat}_{k}"] for k in ("off", "on")
                        for cat in ("matched", "ignored", "background")},
                     **{f"true_nucleus_px_background_{k}": round(c[f"nucleus_px_bg_{k}"] / c[f"nucleus_px_{k}"], 4)
                        for k in ("off", "on")}})
        shutil.rmtree(root, ignore_errors=True)
    return rows
