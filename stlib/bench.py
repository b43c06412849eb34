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
``train``   dispatches to ``stlib.train.bench_main(argv)``.
``infer``   dispatches to ``stlib.infer.bench_main(argv)`` (``--slide``: a whole synthetic slide).
``gpu-check``  :mod:`stlib.gpu_check` (``make gpu-check``; ``--dry-run`` on a CPU).

Every result records the machine, the date and the exact command; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stlib.utils import write_json

__all__ = ["cli_main", "machine_info", "synthetic_nuclei", "bench_labels", "bench_tiles", "bench_refine",
           "bench_derive"]


def machine_info() -> dict[str, Any]:
    """Platform, Python, CPU count (and the CPUs this process may use)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count()
    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpus_usable": usable, "cpu_model": cpu_model,
            "numba_threads": _numba_threads(),
            "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def _numba_threads() -> int | None:
    try:
        import numba

        return int(numba.get_num_threads())
    except Exception:  # pragma: no cover
        return None


def synthetic_nuclei(n: int, *, seed: int = 0, target_um_per_px: float = 0.25, level0_um_per_px: float = 0.25,
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


def bench_labels(n_nuclei: int = 500_000, *, tile_px: int = 1024, target_um_per_px: float = 0.25,
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


def bench_tiles(store: str | None = None, *, n_tiles: int = 512, tile_px: int = 256, batch: int = 64,
                n_batches: int = 20, seed: int = 0) -> dict[str, Any]:
    """Random-batch read throughput of a tile store (a synthetic one in a temp folder by default)."""
    from stlib.io.tiles import TileStore, TileStoreWriter, read_throughput

    with tempfile.TemporaryDirectory(prefix="stlib-bench-tiles-") as tmp:
        if store is None:
            rng = np.random.default_rng(seed)
            path = Path(tmp) / "store"
            with TileStoreWriter(path, tile_px=tile_px, um_per_px=0.25, source="bench-synthetic") as w:
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


def bench_refine(store: str | None = None, *, n_tiles: int = 200, tile_px: int = 256, seed: int = 0,
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

        um = 0.25
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
    from stlib.labels.slide_tiles import _zoom_linear

    t0 = time.perf_counter()
    wp, wc, ww, wh = synthetic_nuclei(60, seed=1)
    from stlib.labels.masks import iter_label_tiles

    for _t, lm in iter_label_tiles(wp, width=ww, height=wh, scale=1.0, tile_px=128, classes=wc):
        img = np.full((128, 128, 3), 220, np.uint8)
        img[lm.inst > 0] = (90, 60, 150)
        refine_label_maps(img, lm.inst, lm.type, lm.ignore, lm.conf, um_per_px=0.25)
        break
    _zoom_linear(np.zeros((30, 30, 3), np.uint8), 32)
    h = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    m = h > 0.5
    z = np.zeros(2, np.int64)
    AK.window_stats(h, m, m, z, z, 16, np.ones(2, np.int64))
    w = AK.gather_windows(h, z, z, 16)
    AK.shifted_peak(w, w, np.zeros(2), np.zeros(2))
    AK.pearson_full(h, m)
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
    from stlib.labels.slide_tiles import RowBands, read_tile_image, resample_tile

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


def bench_derive(work_dir: str | Path | None = None, *, n_nuclei: int = 500_000, um_per_px: float = 0.2737,
                 side_mm: float = 10.0, tile_px: int = 256, target_um_per_px: float = 0.25, workers: int | None = None,
                 seed: int = 0, ref_tiles: int = 60, ref_crop_mm: float = 1.5, keep: bool = False) -> dict[str, Any]:
    """The label derivation of one slide-sized synthetic sample, timed per stage.

    Stages (:mod:`stlib.align`, :mod:`stlib.labels`): alignment (inputs, haematoxylin images,
    tile measurements and fits), the aligned nuclei in H&E px, then the tile store
    (:func:`stlib.labels.derive.build_tile_stores`: label maps, H&E tiles, mask refinement,
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

    import geopandas as gpd
    import shapely

    from stlib.align import Transform, align_sample, alignment_error_um, transform_nuclei
    from stlib.io.cohort import cohort_table
    from stlib.io.hest import HestSample
    from stlib.labels.derive import _box, build_tile_stores
    from stlib.labels.slide_tiles import default_workers
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
        align_t: dict[str, float] = {}
        tile_t: dict[str, float] = {}
        cpu0, t_all = time.process_time(), time.perf_counter()

        t0 = time.perf_counter()
        res = align_sample(hest, sid, timings=align_t)
        res.save(run / "alignment" / sid / "alignment.json")
        stages["alignment"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        s = HestSample(hest, sid)
        aligned = transform_nuclei(s.nuclei(), res)
        truth = gpd.read_parquet(Path(info["truth_dir"]) / sid / "nuclei.parquet").set_index("cell_id")
        nuc = gpd.GeoDataFrame({"cell_id": aligned.index.astype(str),
                                "class": truth["class"].reindex(aligned.index.astype(str)).to_numpy(np.uint8),
                                "confidence": np.float32(1.0)}, geometry=aligned.geometry.values)
        (run / "labels" / sid).mkdir(parents=True, exist_ok=True)
        nuc.to_parquet(run / "labels" / sid / "nuclei.parquet")
        stages["aligned_nuclei"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        paths = build_tile_stores(hest, cohort_table(hest.parent, samples=[sid]), run, um_per_px=target_um_per_px,
                                  tile_px=tile_px, workers=workers, timings=tile_t)
        stages["tile_store"] = time.perf_counter() - t0
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
    return _derive_result(info, seconds, stages, align_t, tile_t, workers, cpu_s, peak, gen_peak, load0, load1, warm,
                          um_per_px, side_mm, seed, tile_px, target_um_per_px, n_tiles, store, store_bytes, sid,
                          err0, err1, res, refs)


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
        "tile_stages_busy_s": {k: round(v, 2) for k, v in tile_t.items()},
        "tile_stages_note": ("busy seconds summed over the threads of the tile stage: masks, tile_images "
                             "(resampling), mask_refinement run in worker threads at the same time, so they add up to "
                             "about workers x the tile_store wall time; slide_decoding (band reads), store_writing, "
                             "polygon_setup and store_finish run in the calling thread"),
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


def _dispatch(module: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
        func = getattr(mod, "bench_main")
    except (ImportError, AttributeError):
        print(f"stlib bench: {module}.bench_main is not available yet", file=sys.stderr)
        return 2
    return int(func(argv) or 0)


def cli_main(argv: list[str]) -> int:
    """``stlib bench labels|tiles|refine|derive|train|infer [options]``."""
    parser = argparse.ArgumentParser(prog="stlib bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("labels", help="full-slide label maps vs the per-nucleus loop")
    p.add_argument("--nuclei", type=int, default=500_000)
    p.add_argument("--tile-px", type=int, default=1024)
    p.add_argument("--um-per-px", type=float, default=0.25, help="target resolution (µm/px)")
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
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--n-batches", type=int, default=20)
    p.add_argument("--out", default="benchmarks/tiles.json")
    p = sub.add_parser("refine", help="H&E-guided mask refinement, time per tile")
    p.add_argument("--store", default=None, help="an existing tile store (default: synthetic tiles)")
    p.add_argument("--n-tiles", type=int, default=200)
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/refine.json")
    p = sub.add_parser("derive", help="label derivation of one slide-sized synthetic sample, per stage")
    p.add_argument("--work-dir", default=None,
                   help="where the sample is generated (and reused by later runs); default: a temporary folder")
    p.add_argument("--nuclei", type=int, default=500_000)
    p.add_argument("--um-per-px", type=float, default=0.2737, help="level-0 pixel size of the H&E (HEST: ~0.27)")
    p.add_argument("--side-mm", type=float, default=10.0)
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument("--target-um-per-px", type=float, default=0.25)
    p.add_argument("--workers", type=int, default=None, help="tile threads (default: usable CPUs)")
    p.add_argument("--ref-tiles", type=int, default=60, help="tiles timed with the reference forms")
    p.add_argument("--ref-crop-mm", type=float, default=1.5, help="slide crop aligned with the reference form")
    p.add_argument("--keep", action="store_true", help="keep the run folder (tile store) under --work-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/derive_slide.json")
    for name in ("train", "infer"):
        sub.add_parser(name, help=f"dispatches to stlib.{name}.bench_main", add_help=False)
    sub.add_parser("gpu-check", help="the GPU measurements in one run (stlib.gpu_check; --dry-run on a CPU)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.what in ("train", "infer"):
        return _dispatch(f"stlib.{args.what}", rest)
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
    return 0
