"""A slide-sized synthetic Xenium sample for ``stlib bench derive`` (about 500k nuclei, 10 x 10 mm).

The demo cohort (:mod:`stlib.demo`) renders small fields with rich biology; a whole slide of
it would take hours and tens of GiB. This is the cheap version: the same file layout (HEST-1k:
pyramidal JPEG TIFF, ``xenium_seg`` GeoParquet, transcripts with ``he_x/he_y``, metadata; the
demo truth: true nuclei and ``transform.json``), drawn so that every stage of the label
derivation has realistic work to do:

* nuclei on a jittered grid thinned by a smooth density field inside an irregular tissue
  outline (about 5,000 per mm²), ellipses with jittered outlines, 4.5-9 µm long;
* the H&E rendered band by band (256 rows at a time, so memory stays at a few hundred MiB) in
  optical density and converted by Beer-Lambert: haematoxylin in the true nuclei with a
  chromatin texture, eosin varying smoothly over the tissue, glass outside it, optical blur
  and sensor noise; written as a JPEG-compressed pyramidal TIFF;
* Xenium nuclei as DAPI-like outlines of the true ones (:func:`stlib.demo.registration.dapi_outlines`:
  larger, shifted, jittered) mapped to Xenium µm by the inverse of a true map (affine + smooth
  warp, :func:`stlib.demo.registration.make_transform`) and put on the H&E through an
  imperfect "HEST registration", so alignment has a real residual to find;
* three transcripts per cell (enough for the registration fit; cell typing is not part of
  the benchmark).

Generating it is not timed; it takes about one to two minutes and 2 GiB of memory on two
cores, and ~0.5 GB of disk. Nothing here claims to look like a particular tissue.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numba
import numpy as np

from stlib.constants import HEST_XENIUM_UM_PER_PX
from stlib.utils import atomic_path, write_json

__all__ = ["SLIDE_VERSION", "make_slide_sample"]

#: version of the generator; part of the reuse key of a generated sample
SLIDE_VERSION = "2"
_H_VEC = np.array([0.65, 0.70, 0.29])
_E_VEC = np.array([0.07, 0.99, 0.11])


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth noise, zero mean and unit sd (Gaussian-filtered white noise)."""
    from scipy import ndimage as ndi

    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


@numba.njit(cache=True, nogil=True)
def _field_at(f, cell, y, x):  # pragma: no cover - compiled
    """Bilinear value of a coarse field (one value per ``cell`` px, clamped) at pixel (y, x)."""
    fy = (y + 0.5) / cell - 0.5
    fx = (x + 0.5) / cell - 0.5
    fy = min(max(fy, 0.0), f.shape[0] - 1.0)
    fx = min(max(fx, 0.0), f.shape[1] - 1.0)
    i0 = min(int(fy), f.shape[0] - 2)
    j0 = min(int(fx), f.shape[1] - 2)
    ty = fy - i0
    tx = fx - j0
    return ((1 - ty) * ((1 - tx) * f[i0, j0] + tx * f[i0, j0 + 1])
            + ty * ((1 - tx) * f[i0 + 1, j0] + tx * f[i0 + 1, j0 + 1]))


@numba.njit(cache=True, nogil=True)
def _haem(inst, levels, tex, top):  # pragma: no cover - compiled
    """Haematoxylin OD of labelled pixels: the nucleus' level times a chromatin texture."""
    H, W = inst.shape
    out = np.zeros((H, W), np.float32)
    th, tw = tex.shape
    for i in range(H):
        for j in range(W):
            k = inst[i, j]
            if k > 0:
                out[i, j] = levels[k] * (1.0 + 0.25 * tex[(top + i) % th, j % tw])
    return out


@numba.njit(cache=True, nogil=True, parallel=True)
def _compose(hema, y0, tissue, eosin, cell, noise, h_vec, e_vec):  # pragma: no cover - compiled
    """RGB by Beer-Lambert of haematoxylin + eosin OD, plus sensor noise (from a noise tile)."""
    H, W = hema.shape
    out = np.empty((H, W, 3), np.uint8)
    nh, nw = noise.shape
    for i in numba.prange(H):
        for j in range(W):
            t = _field_at(tissue, cell, y0 + i, j)
            eos = t * (0.22 + 0.06 * _field_at(eosin, cell, y0 + i, j)) + 0.015
            nz = noise[(y0 + i) % nh, (j * 7 + y0 + i) % nw]
            for c in range(3):
                v = 255.0 * 10.0 ** (-(hema[i, j] * h_vec[c] + eos * e_vec[c])) + nz
                v = np.rint(v)
                out[i, j, c] = np.uint8(0.0 if v < 0.0 else (255.0 if v > 255.0 else v))
    return out


def _nuclei(rng: np.random.Generator, side: int, um: float, n_target: int, tissue: np.ndarray,
            density: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """True nucleus outlines (n, 24, 2) in H&E px and their classes 1..5."""
    frac = max(float(tissue.mean()), 1e-3)
    spacing = math.sqrt(frac * side * side / (1.6 * n_target))
    g = np.arange(spacing / 2, side - spacing / 2, spacing)
    cx, cy = np.meshgrid(g, g)
    cx = cx.ravel() + rng.uniform(-0.3, 0.3, cx.size) * spacing
    cy = cy.ravel() + rng.uniform(-0.3, 0.3, cy.size) * spacing
    ci = np.clip((cy / cell).astype(int), 0, tissue.shape[0] - 1)
    cj = np.clip((cx / cell).astype(int), 0, tissue.shape[1] - 1)
    p = tissue[ci, cj] * np.clip(0.8 + 0.35 * density[ci, cj], 0.05, 1.0)
    keep = rng.random(cx.size) < p
    if keep.sum() > n_target:
        keep[np.flatnonzero(keep)[rng.permutation(int(keep.sum()))[: int(keep.sum()) - n_target]]] = False
    cx, cy = cx[keep], cy[keep]
    n = cx.size
    a = rng.uniform(2.2, 4.5, n) / um
    b = a * rng.uniform(0.55, 1.0, n)
    th = rng.uniform(0, np.pi, n)
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    jit = rng.normal(0, 0.05, (n, 24))
    jit = (np.roll(jit, 1, 1) + jit + np.roll(jit, -1, 1)) / 3 + 1.0
    ex, ey = a[:, None] * np.cos(t) * jit, b[:, None] * np.sin(t) * jit
    x = cx[:, None] + ex * np.cos(th)[:, None] - ey * np.sin(th)[:, None]
    y = cy[:, None] + ex * np.sin(th)[:, None] + ey * np.cos(th)[:, None]
    zone = density[ci[keep], cj[keep]]
    cls = np.where(zone > 0.8, 1, np.where(zone < -0.8, 3, rng.integers(2, 6, n))).astype(np.uint8)
    return np.stack([x, y], axis=-1), cls


def _render_band(ps: Any, levels: np.ndarray, y0: int, rows: int, width: int, fields: dict[str, np.ndarray],
                 cell: float, tex: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """RGB uint8 rows ``y0:y0+rows`` of the slide (Beer-Lambert of haematoxylin + eosin)."""
    from scipy import ndimage as ndi

    from stlib.labels.masks import rasterize_instances

    m = 4  # margin for the blur
    top, bot = max(0, y0 - m), y0 + rows + m
    inst, _ = rasterize_instances(ps, shape=(bot - top, width), origin=(0.0, float(top)), scale=1.0, min_area_px=0)
    hema = ndi.gaussian_filter(_haem(inst, levels, tex, top), 0.9)[y0 - top:y0 - top + rows]
    return _compose(np.ascontiguousarray(hema), y0, fields["tissue"], fields["eosin"], cell, noise, _H_VEC, _E_VEC)


def _write_slide(path: Path, side: int, um: float, band_fn: Any, tile: int = 256) -> None:
    """Pyramidal JPEG TIFF written band by band (level 0 streamed; sub-levels kept in memory)."""
    import tifffile

    from stlib.io.wsi import _halve

    n_levels = 1
    while math.ceil(side / 2 ** n_levels) >= 512 and n_levels < 8:  # 256-row bands halve exactly 8 times
        n_levels += 1
    subs: list[list[np.ndarray]] = [[] for _ in range(n_levels - 1)]
    n_tx = math.ceil(side / tile)

    def tiles() -> Any:
        for y0 in range(0, side, tile):
            rows = min(tile, side - y0)
            band = band_fn(y0, rows)
            half = band
            for sub in subs:
                half = _halve(half)
                sub.append(half)
            pad = np.full((tile, n_tx * tile, 3), 255, np.uint8)
            pad[:rows, :side] = band
            for j in range(n_tx):
                yield pad[:, j * tile:(j + 1) * tile]

    px_per_cm = 1e4 / um
    kw = {"tile": (tile, tile), "photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": 90}}
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
            tw.write(tiles(), shape=(side, side, 3), dtype=np.uint8, subifds=n_levels - 1,
                     resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER", **kw)
            for sub in subs:
                level = np.concatenate(sub)
                sub.clear()
                ds = side / level.shape[0]
                tw.write(level, subfiletype=1, resolution=(px_per_cm / ds,) * 2, resolutionunit="CENTIMETER", **kw)


def make_slide_sample(out: str | Path, *, n_nuclei: int = 500_000, um_per_px: float = HEST_XENIUM_UM_PER_PX,
                      side_mm: float = 10.0, seed: int = 0, sample_id: str = "BENCH_SLIDE",
                      force: bool = False) -> dict[str, Any]:
    """Write a slide-sized synthetic sample under ``out`` (``hest/`` layout + ``truth/``).

    Parameters
    ----------
    out
        Data root; reused when it already holds a sample made with the same parameters.
    n_nuclei
        Nuclei drawn (about; fewer when the tissue is too small for them).
    um_per_px
        Level-0 pixel size of the H&E (HEST's Xenium slides: about 0.27).
    side_mm
        Side of the square slide.
    seed, sample_id, force
        Random seed, sample id, regenerate even when up to date.

    Returns
    -------
    dict
        ``sample``, ``hest_dir``, ``truth_dir``, ``nuclei``, ``slide_px``, ``seconds`` (generation).
    """
    import geopandas as gpd
    import pandas as pd
    import shapely

    from stlib.demo.config import DemoConfig
    from stlib.demo.registration import apply_affine, dapi_outlines, make_transform, true_um_from_he
    from stlib.labels.masks import prepare_polygons

    out = Path(out)
    params = {"n_nuclei": int(n_nuclei), "um_per_px": float(um_per_px), "side_mm": float(side_mm),
              "seed": int(seed), "sample": sample_id, "version": SLIDE_VERSION}
    info_path = out / "slide_sample.json"
    if not force and info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("params") == params:
            # the folders are where the sample is now, not where it was written (a moved or
            # linked work folder keeps working)
            info.update(hest_dir=str(out / "hest"), truth_dir=str(out / "truth"))
            return info
    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    side = int(round(side_mm * 1000 / um_per_px))
    cell = 64.0
    cshape = (math.ceil(side / cell),) * 2
    r = np.hypot(*np.meshgrid(np.linspace(-1, 1, cshape[0]), np.linspace(-1, 1, cshape[1]), indexing="ij"))
    tissue = ((r + 0.25 * _smooth_field(rng, cshape, cshape[0] / 12)) < 1.0).astype(np.float64)
    fields = {"tissue": tissue, "eosin": _smooth_field(rng, cshape, 6.0)}
    density = _smooth_field(rng, cshape, 10.0)
    true_px, cls = _nuclei(rng, side, um_per_px, n_nuclei, tissue, density, cell)
    n = len(true_px)
    cfg = DemoConfig()
    tf = make_transform(rng, (side, side), um_per_px, true_rot_deg=cfg.true_rot_deg, warp_px=cfg.warp_px,
                        warp_grid=9, reg_shift_um=cfg.reg_shift_um, reg_rot_deg=0.3, reg_scale_err=cfg.reg_scale_err)
    dapi_px = dapi_outlines(true_px, rng, scale_mean=cfg.dapi_scale_mean, scale_sd=cfg.dapi_scale_sd,
                            shift_px=cfg.dapi_shift_um / um_per_px, jitter=cfg.dapi_jitter)
    xu, yu = true_um_from_he(tf, dapi_px[..., 0], dapi_px[..., 1])
    A = np.asarray(tf["hest_registration_um_to_he_px"])
    hx, hy = apply_affine(A, xu, yu)

    def polys(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        ring = np.stack([x, y], -1)
        return shapely.polygons(np.concatenate([ring, ring[:, :1]], axis=1))

    ids = np.array([f"cell{i:07d}" for i in range(n)])
    hest, truth = out / "hest", out / "truth" / sample_id
    for d in ("wsis", "metadata", "transcripts", "xenium_seg"):
        (hest / d).mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    seg = gpd.GeoDataFrame({"geometry": polys(hx, hy)}, index=pd.Index(ids, name="cell_id"), geometry="geometry")
    with atomic_path(hest / "xenium_seg" / f"{sample_id}_xenium_nucleus_seg.parquet") as tmp:
        seg.to_parquet(tmp, compression="zstd")
    true_polys = polys(true_px[..., 0], true_px[..., 1])
    tn = gpd.GeoDataFrame({"cell_id": ids, "class": cls, "fine_type": "bench", "has_polygon": True,
                           "visible": True, "x_he": true_px[..., 0].mean(1), "y_he": true_px[..., 1].mean(1)},
                          geometry=true_polys)
    with atomic_path(truth / "nuclei.parquet") as tmp:
        tn.to_parquet(tmp, compression="zstd")
    write_json(truth / "transform.json", tf)
    k = 3  # transcripts per cell, inside the DAPI nucleus (near its centre)
    cxu, cyu = xu.mean(1), yu.mean(1)
    tx_x = np.repeat(cxu, k) + rng.normal(0, 0.8, n * k)
    tx_y = np.repeat(cyu, k) + rng.normal(0, 0.8, n * k)
    thx, thy = apply_affine(A, tx_x, tx_y)
    genes = np.array(["EPCAM", "PTPRC", "COL1A1", "KRT5", "MKI67", "VIM"])
    tx = pd.DataFrame({"cell_id": np.repeat(ids, k), "transcript_id": np.arange(n * k, dtype=np.int64),
                       "feature_name": genes[rng.integers(0, genes.size, n * k)], "qv": np.float32(30.0),
                       "x_location": tx_x, "y_location": tx_y, "z_location": np.float32(5.0),
                       "overlaps_nucleus": np.uint8(1), "he_x": thx, "he_y": thy})
    with atomic_path(hest / "transcripts" / f"{sample_id}_transcripts.parquet") as tmp:
        tx.to_parquet(tmp, index=False, compression="zstd")
    meta = {"id": sample_id, "organ": "Bench", "disease_state": "Healthy", "oncotree_code": None,
            "species": "Homo sapiens", "st_technology": "Xenium", "pixel_size_um_estimated": um_per_px,
            "fullres_px_width": side, "fullres_px_height": side, "dataset_title": "stlib bench slide (synthetic)"}
    write_json(hest / "metadata" / f"{sample_id}.json", meta)
    pd.DataFrame([meta]).to_csv(hest / "HEST_v1_1_0.csv", index=False)

    ps = prepare_polygons(true_polys)
    levels = np.zeros(n + 1, np.float32)
    levels[1:] = rng.uniform(0.45, 0.95, n) * np.where(cls == 2, 1.25, 1.0)  # inflammatory darker
    tex = rng.standard_normal((512, 512)).astype(np.float32)
    noise = (2.5 * rng.standard_normal((1021, 1031))).astype(np.float32)
    _write_slide(hest / "wsis" / f"{sample_id}.tif", side, um_per_px,
                 lambda y0, rows: _render_band(ps, levels, y0, rows, side, fields, cell, tex, noise))
    info = {"params": params, "sample": sample_id, "hest_dir": str(hest), "truth_dir": str(out / "truth"),
            "nuclei": int(n), "slide_px": [side, side], "seconds": round(time.perf_counter() - t_start, 1)}
    write_json(info_path, info)
    return info
