"""Inference on an image tile or a whole slide (:func:`infer_image`): resolution, tissue, tiles,
seams and the nuclei of the whole image (steps 2-7 of :mod:`stlib.infer`)."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stlib.config import InferConfig, resolve_device, with_options
from stlib.constants import CLASS_NAMES, IGNORE
from stlib.infer.engine import ModelInfo, Timing, as_model_info, default_workers, prefetch, prepare_model, run_pipeline
from stlib.model import postproc
from stlib.model.stain import apply_stain, fit_stain
from stlib.utils import InputError, progress

log = logging.getLogger("stlib.infer")

#: Slides with more level-0 pixels than this get no ``inst``/``type`` maps (polygons only).
DEFAULT_MAX_MAP_PX = 1 << 26


def tissue_mask(rgb: np.ndarray, *, min_threshold: float = 0.03, max_threshold: float = 0.12) -> np.ndarray:
    """Tissue mask of an RGB thumbnail (True = tissue).

    Otsu's threshold of the HSV saturation, clipped to ``[min_threshold, max_threshold]``:
    glass is grey/white (saturation near 0), H&E-stained tissue is pink/purple. The upper clip
    keeps pale tissue when the thumbnail holds no background (Otsu would then split the
    tissue itself). Near-black pixels (scanner margins) are not tissue. The mask is closed
    and its holes filled.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ValueError(f"rgb must be (H, W, 3), got {rgb.shape}")
    f = rgb[..., :3].astype(np.float32) / 255.0
    mx, mn = f.max(axis=-1), f.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    t = float(threshold_otsu(sat)) if float(np.ptp(sat)) > 1e-6 else min_threshold
    t = min(max(t, min_threshold), max_threshold)
    mask = (sat > t) & (mx > 0.1)
    mask = ndi.binary_closing(mask, structure=np.ones((3, 3), bool), iterations=2, border_value=0) | mask
    return ndi.binary_fill_holes(mask)


@dataclass
class InferenceResult:
    """Nuclei found in one image, in level-0 pixels of the input.

    Attributes
    ----------
    nuclei
        :class:`pandas.DataFrame`, one row per nucleus: ``id`` (1..n), ``x``, ``y`` (centroid,
        level-0 px, pixel centre = index + 0.5), ``area_um2``, ``class`` (stlib class id, 255 =
        unclassified), ``class_name``, ``probability`` (mean probability of that class).
    polygons
        One ``(k, 2)`` array of ``(x, y)`` vertices (closed ring) per row of ``nuclei``.
    source
        The image (path or ``"<array>"``).
    image_shape
        Level-0 ``(H, W)``.
    um_per_px
        Level-0 pixel size of the input (µm).
    model_um_per_px
        Resolution the network ran at.
    inst, type
        ``(H, W)`` int32 / uint8 maps at the input's level-0 resolution (``inst`` ids equal
        ``nuclei.id``), or ``None`` for slides larger than ``max_map_px``.
    thumbnail
        RGB thumbnail (for the overlay) and ``thumbnail_scale`` = thumbnail px per level-0 px.
    tissue
        Tissue mask on the thumbnail grid.
    stats
        Tiles (total, processed, skipped), timings (network, post-processing, wall), device,
        tile size, overlap, model.
    class_names
        Class table of the model.
    """

    nuclei: Any
    polygons: list[np.ndarray]
    source: str
    image_shape: tuple[int, int]
    um_per_px: float
    model_um_per_px: float
    inst: np.ndarray | None = None
    type: np.ndarray | None = None
    thumbnail: np.ndarray | None = None
    thumbnail_scale: float = 1.0
    tissue: np.ndarray | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    class_names: dict[int, str] = field(default_factory=lambda: dict(CLASS_NAMES))

    def __len__(self) -> int:
        return len(self.polygons)


def _class_label(cid: int, names: Mapping[int, str]) -> str:
    if cid == IGNORE:
        return "Ignore"
    return names.get(int(cid), f"class {cid}")


@dataclass(frozen=True)
class _Grid:
    s: float  # level-0 px per model px
    level: int
    ds: float  # level downsample
    tile: int
    origins: np.ndarray  # (n, 2) row, col in model px (processed tiles only)
    model_um: float


def _read_model_tile(wsi: Any, grid: _Grid, r: int, c: int) -> np.ndarray:
    """The model-resolution tile with top-left model pixel ``(r, c)`` (bilinear, exact geometry)."""
    from scipy import ndimage as ndi

    T = grid.tile
    k = grid.s / grid.ds  # level px per model px
    if abs(k - 1.0) < 1e-9 and grid.level == 0 and float(r * grid.s).is_integer() and float(c * grid.s).is_integer():
        return wsi.read_region(int(c * grid.s), int(r * grid.s), T, T, level=0)
    sigma = max(0.0, (k - 1.0) / 2.0)
    pad = 2 + int(math.ceil(4 * sigma))
    # level-px index coordinate of the centre of model pixel i: (i + 0.5) * k - 0.5
    y0 = int(math.floor((r + 0.5) * k - 0.5)) - pad
    x0 = int(math.floor((c + 0.5) * k - 0.5)) - pad
    h = int(math.ceil((r + T - 0.5) * k - 0.5)) + pad + 1 - y0
    w = int(math.ceil((c + T - 0.5) * k - 0.5)) + pad + 1 - x0
    # read_region floors x / ds: pass the centre of level pixel x0 so it lands on x0 exactly
    block = wsi.read_region((x0 + 0.5) * grid.ds, (y0 + 0.5) * grid.ds, w, h, level=grid.level)
    f = block.astype(np.float32)
    if sigma > 0:
        f = ndi.gaussian_filter(f, sigma=(sigma, sigma, 0), mode="nearest")
    off = ((r + 0.5) * k - 0.5 - y0, (c + 0.5) * k - 0.5 - x0, 0.0)
    out = ndi.affine_transform(f, matrix=(k, k, 1.0), offset=off, output_shape=(T, T, 3), order=1,
                               mode="nearest")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _tile_nuclei(key: int, np_prob: np.ndarray, hv: np.ndarray, tp: np.ndarray, *, grid: _Grid,
                 neighbours: Sequence[np.ndarray], keep_map: bool, pp_kwargs: Mapping[str, Any],
                 shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """Post-process one slide tile and keep the nuclei it owns, as level-0 polygons.

    With the image's level-0 ``shape``: a tile reaching past the image (an image smaller than a
    tile, read with white padding) keeps only nuclei whose centroid lies in the image, their
    outlines clipped to it."""
    from skimage.measure import find_contours

    inst, typ, table = postproc.hovernet_postprocess(np_prob, hv, tp, **pp_kwargs)
    empty = {"xy": np.zeros((0, 2)), "polys": [], "area": np.zeros(0), "cls": np.zeros(0, np.int64),
             "prob": np.zeros(0), "inst": None, "type": None}
    if not table:
        return empty
    nb = neighbours[key]
    local = int(np.searchsorted(nb, key))
    tables = [table if j == local else {} for j in range(len(nb))]
    kept = postproc.remove_seam_duplicates(tables, tile_origins=[tuple(o) for o in grid.origins[nb]],
                                           tile_size=grid.tile)
    ids = [rec["tile_id"] for rec in kept.values()]
    r0, c0 = (int(v) for v in grid.origins[key])
    s = grid.s
    if shape is not None:
        H0, W0 = shape
        ids = [i for i in ids if 0 <= (table[i]["centroid"][0] + c0 + 0.5) * s < W0
               and 0 <= (table[i]["centroid"][1] + r0 + 0.5) * s < H0]
    if not ids:
        return empty
    rings, xy, area, cls, prob = [], [], [], [], []
    for i in ids:
        rec = table[i]
        (a, b), (c, d) = rec["bbox"]
        m = np.pad(inst[a:c, b:d] == i, 1)
        contours = find_contours(m.astype(np.float32), 0.5)
        ring = max(contours, key=len)
        rows = ring[:, 0] + a - 1 + r0
        cols = ring[:, 1] + b - 1 + c0
        ring_xy = np.stack([(cols + 0.5) * s, (rows + 0.5) * s], axis=1)
        if shape is not None:
            ring_xy = np.clip(ring_xy, 0.0, [float(shape[1]), float(shape[0])])
        rings.append(ring_xy)
        cx, cy = rec["centroid"]
        xy.append(((cx + c0 + 0.5) * s, (cy + r0 + 0.5) * s))
        area.append(rec["area"] * grid.model_um ** 2)
        t = int(rec.get("type", 0))
        cls.append(IGNORE if t == 0 else t)
        p = rec.get("type_prob", float("nan"))
        prob.append(float(p))
    polys = _valid_polygons(rings, tolerance=0.35 * s)
    out = {"xy": np.asarray(xy, float), "polys": polys, "area": np.asarray(area, float),
           "cls": np.asarray(cls, np.int64), "prob": np.asarray(prob, float), "inst": None, "type": None}
    if keep_map:
        lut = np.zeros(int(inst.max()) + 1, np.int32)
        lut[np.asarray(ids)] = np.arange(1, len(ids) + 1, dtype=np.int32)
        sub = lut[inst]
        out["inst"] = sub
        out["type"] = np.where(sub > 0, np.asarray(cls, np.int64)[np.maximum(sub - 1, 0)], 0).astype(np.uint8)
    return out


def _valid_polygons(rings: list[np.ndarray], *, tolerance: float) -> list[np.ndarray]:
    """Simplify each closed ring (Douglas-Peucker) and return valid exterior rings."""
    import shapely

    out = []
    for ring in rings:
        poly = shapely.Polygon(ring)
        simple = shapely.simplify(poly, tolerance, preserve_topology=True)
        if not simple.is_empty and simple.is_valid and simple.area > 0:
            poly = simple
        if not poly.is_valid:
            fixed = shapely.make_valid(poly)
            parts = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type == "Polygon" and g.area > 0]
            if parts:
                poly = max(parts, key=lambda g: g.area)
        out.append(np.asarray(poly.exterior.coords, float))
    return out


def _level0_index(start: int, T: int, s: float, n0: int) -> tuple[slice, np.ndarray]:
    """Level-0 pixels whose nearest model pixel lies in ``[start, start + T)`` (a slice), and
    those model pixels relative to ``start``."""
    a = max(0, int(math.ceil(start * s - 0.5)))
    b = min(n0, max(a, int(math.ceil((start + T) * s - 0.5))))
    model = np.clip(np.floor((np.arange(a, b) + 0.5) / s).astype(np.int64) - start, 0, T - 1)
    return slice(a, b), model


def _open_image(image_or_path: Any, um_per_px: float | None) -> Any:
    from stlib.io.wsi import Wsi, open_wsi

    if um_per_px is not None and not float(um_per_px) > 0:
        raise InputError(f"um_per_px must be > 0, got {um_per_px}", fix="pass the pixel size in µm, e.g. 0.25 (40x)")
    if isinstance(image_or_path, np.ndarray):
        arr = image_or_path
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise InputError(f"image array must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
        return Wsi(Path("<array>"), [arr], [arr.shape[:2]], um_per_px=um_per_px, axes="YXS")
    return open_wsi(image_or_path, um_per_px=um_per_px)


def postproc_settings(info: ModelInfo, config: InferConfig, postproc_kwargs: Mapping[str, Any] | None = None
                      ) -> dict[str, Any]:
    """Keyword arguments of :func:`stlib.model.postproc.hovernet_postprocess` for one run.

    Later wins: HoVer-Net's defaults (none given), the settings stored in the model file
    (``info.postproc``), the config's ``np_thresh`` / ``marker_thresh`` / ``min_size`` / ``marker_h`` /
    ``hv_weight`` / ``postproc_mode`` (``stlib infer`` options; the last is the ``mode`` argument) when not
    None, then ``postproc_kwargs``.
    """
    pp = dict(info.postproc)
    pp.update({k: getattr(config, k) for k in ("np_thresh", "marker_thresh", "min_size", "marker_h", "hv_weight")
               if getattr(config, k) is not None})
    if config.postproc_mode is not None:
        pp["mode"] = config.postproc_mode
    pp.update(postproc_kwargs or {})
    return pp


def infer_image(model_or_path: Any, image_or_path: Any, *, config: InferConfig | None = None, device: str = "auto",
                model_um_per_px: float | None = None, max_map_px: int = DEFAULT_MAX_MAP_PX, overlay_px: int = 2048,
                postproc_kwargs: Mapping[str, Any] | None = None, **options: Any) -> InferenceResult:
    """Segment and classify the nuclei of an image tile or a whole slide.

    Parameters
    ----------
    model_or_path
        ``model.pt`` path, a :class:`ModelInfo`, or a network module (then give
        ``model_um_per_px`` unless the module has a ``um_per_px`` attribute).
    image_or_path
        PNG/JPEG/TIFF/pyramidal WSI path, or an ``(H, W, 3)`` uint8 array.
    config, **options
        The knobs (:class:`stlib.config.InferConfig`, default its defaults; keyword options override
        its fields): ``um_per_px``, ``tile_px``, ``overlap``, ``batch_size``, ``tissue_detection``,
        ``amp``, ``workers``, ``postproc_processes``, described here:
    um_per_px
        Level-0 pixel size of the image (µm); overrides the file's. Required when the file
        does not say it (PNG, JPEG, TIFF without resolution tags) or for arrays.
    device
        ``"auto"`` = CUDA when available.
    tile_px
        Tile size in model pixels (default: 512, or the model's training tile size if larger).
        Larger tiles (e.g. 1024) are faster on a GPU; the network takes any size.
    whole_image_px
        Without ``tile_px``: an image (tile, ROI, patch) whose longer side at the model's
        resolution is at most this many pixels runs as one tile of that side: no seams to stitch
        and no overlap computed twice (9 overlapping 512 px tiles of a 1000 px image cost 2.4x
        its pixels). ``0`` = always tile. Slides are tiled as before.
    overlap
        Model pixels shared by neighbouring tiles; should be at least twice the largest
        nucleus diameter so that a kept nucleus is never cut by its tile border.
    batch_size
        Tiles per forward pass.
    tissue_detection
        Skip tiles without tissue (Otsu on the saturation of a thumbnail).
    classify
        ``False``: segmentation only. The network's NT decoder is not run (a third of the
        decoders' compute); every nucleus is unclassified (class 255, probability NaN). The
        instances are those of a classifying run (tested).
    amp
        bf16 autocast on CUDA.
    workers
        Post-processing threads (default: CPUs - 1, at most 8; 0 = in the calling thread).
    postproc_processes
        Post-process in ``workers`` processes instead of threads (the same results): on a GPU
        the network outruns one post-processing core and threads share one (the GIL);
        ``make gpu-check`` measures whether either keeps up.
    model_um_per_px
        Override / supply the model's training resolution.
    max_map_px
        Assemble ``inst``/``type`` maps only for images with at most this many level-0 pixels.
    overlay_px
        Longer side of the thumbnail kept for the overlay and tissue detection.
    np_thresh, marker_thresh, min_size, postproc_mode, marker_h, hv_weight
        Post-processing settings; none = the model file's (:func:`postproc_settings`).
    postproc_kwargs
        Passed to :func:`stlib.model.postproc.hovernet_postprocess` (wins over the above).

    Returns
    -------
    InferenceResult

    Raises
    ------
    InputError
        Unreadable image or model, unknown pixel size, model trained on another class set.
    """
    t_start = time.perf_counter()
    cfg = with_options(InferConfig, config, options)
    um_per_px, tile_px, overlap, batch_size, workers = cfg.um_per_px, cfg.tile_px, cfg.overlap, cfg.batch_size, cfg.workers
    dev = torch.device(resolve_device(device))
    info = as_model_info(model_or_path, str(dev), model_um_per_px)
    model = prepare_model(info.model, dev)
    T = _check_tiling(tile_px, info.tile_px, overlap, batch_size)
    pp = postproc_settings(info, cfg, postproc_kwargs)
    workers = default_workers() if workers is None else int(workers)

    wsi = _open_image(image_or_path, um_per_px)
    try:
        plan = _plan_tiles(wsi, info, T, overlap, overlay_px=overlay_px, tissue_detection=cfg.tissue_detection,
                           whole_px=0 if tile_px else int(cfg.whole_image_px or 0))
        origins, grid = plan.origins, plan.grid
        T = grid.tile  # the whole image's side when it runs as one tile
        neighbours = [np.nonzero((np.abs(origins[:, 0] - o[0]) < T) & (np.abs(origins[:, 1] - o[1]) < T))[0]
                      for o in origins]
        acc = _Collected(plan.shape, keep_map=plan.shape[0] * plan.shape[1] <= max_map_px)
        timing = Timing()

        # the stain normalisation the network was trained with, fitted on the whole image (its thumbnail)
        stain = fit_stain(plan.thumb, info.stain_norm) if info.stain_norm != "none" else None

        def batches() -> Iterator[tuple[list[int], np.ndarray]]:
            for b in range(0, len(origins), batch_size):
                keys = list(range(b, min(b + batch_size, len(origins))))
                t0 = time.perf_counter()
                imgs = np.stack([apply_stain(_read_model_tile(wsi, grid, int(origins[k][0]), int(origins[k][1])), stain)
                                 for k in keys])
                timing.read_s += time.perf_counter() - t0
                yield keys, imgs

        work = functools.partial(_tile_nuclei, grid=grid, neighbours=neighbours, keep_map=acc.keep_map, pp_kwargs=pp,
                                 shape=plan.shape)
        src = prefetch(batches()) if workers > 0 else batches()
        bar = progress(run_pipeline(model, src, work, dev=dev, amp=cfg.amp, workers=workers, timing=timing,
                                    processes=cfg.postproc_processes, classify=cfg.classify),
                       desc="infer tiles", total=len(origins))
        for k, res in bar:
            acc.add(res, origins[k], T, grid.s)
    finally:
        wsi.close()

    table = acc.table(info.class_names)
    stats = _run_stats(plan, acc, timing, info, cfg, dev=dev, workers=workers, pp=pp, max_map_px=max_map_px,
                       t_start=t_start)
    return InferenceResult(nuclei=table, polygons=acc.polys, source=str(wsi.path), image_shape=plan.shape,
                           um_per_px=plan.img_um, model_um_per_px=info.um_per_px, inst=acc.inst, type=acc.type,
                           thumbnail=plan.thumb, thumbnail_scale=plan.tscale, tissue=plan.tissue, stats=stats,
                           class_names=dict(info.class_names))


def _run_stats(plan: _TilePlan, acc: _Collected, timing: Timing, info: ModelInfo, cfg: InferConfig, *,
               dev: torch.device, workers: int, pp: Mapping[str, Any], max_map_px: int, t_start: float
               ) -> dict[str, Any]:
    """The ``stats`` of an :class:`InferenceResult`: tiles, settings and where the time went."""
    return {
        "n_tiles": int(len(plan.all_origins)), "n_tiles_processed": int(timing.n_tiles),
        "n_tiles_skipped": int(len(plan.all_origins) - len(plan.origins)), "n_nuclei": int(len(acc.polys)),
        "tile_px": int(plan.grid.tile), "overlap": int(cfg.overlap), "level": int(plan.grid.level),
        "scale_level0_per_model_px": plan.grid.s, "device": str(dev), "amp": bool(cfg.amp and dev.type == "cuda"),
        "batch_size": int(cfg.batch_size), "workers": workers, "model": info.source, "encoder": info.encoder,
        "postproc": dict(pp), "stain_norm": info.stain_norm, "classify": bool(cfg.classify),
        "net_s": timing.net_s, "postproc_s": timing.postproc_s, "read_s": timing.read_s,
        "wall_s": time.perf_counter() - t_start,
        "maps": "level-0 input resolution" if acc.keep_map else f"omitted (> {max_map_px} level-0 px)",
    }


def _check_tiling(tile_px: int | None, model_tile_px: int, overlap: int, batch_size: int) -> int:
    """The tile size in model px (checked with ``overlap`` and ``batch_size``)."""
    # default: 512 px tiles with 128 px overlap. A nucleus is kept whole only when its diameter is
    # below overlap / 2 (seam rule); 64 px = 16 µm at 0.25 µm/px covers large tumour nuclei, and
    # 512 px tiles keep the overlap's extra compute at 1.8x instead of 4x with 256 px tiles.
    T = int(tile_px or max(512, model_tile_px))
    if T < 32:
        raise InputError(f"tile_px must be >= 32, got {T}")
    if not 0 <= overlap < T // 2:
        raise InputError(f"overlap must be in [0, tile_px / 2) = [0, {T // 2}), got {overlap}",
                         fix="use e.g. --overlap 64 with 256 px tiles")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    return T


@dataclass
class _TilePlan:
    """Where the model tiles of an image lie, which hold tissue, and the image's thumbnail."""

    grid: _Grid
    all_origins: np.ndarray
    origins: np.ndarray
    shape: tuple[int, int]
    img_um: float
    thumb: np.ndarray
    tscale: float
    tissue: np.ndarray


def _plan_tiles(wsi: Any, info: ModelInfo, T: int, overlap: int, *, overlay_px: int,
                tissue_detection: bool, whole_px: int = 0) -> _TilePlan:
    """Tile origins (model px) over the image at the model's resolution; with ``tissue_detection``
    only tiles touching tissue of the thumbnail (one thumbnail pixel of margin) are kept. An image
    whose longer side (model px) is at most ``whole_px`` gets one tile of that side (at least ``T``)."""
    if wsi.um_per_px is None:
        raise InputError("the image does not say its pixel size (µm/px)", path=wsi.path,
                         fix="pass --um-per-px (um_per_px=), e.g. 0.25 for 40x or 0.5 for 20x scans")
    img_um = float(wsi.um_per_px)
    s = info.um_per_px / img_um  # level-0 px per model px
    if s < 0.5:
        log.warning("%s: image (%.3f µm/px) is %.1fx coarser than the model (%.3f µm/px); upsampled "
                    "results are unreliable", wsi.path, img_um, 1 / s, info.um_per_px)
    H0, W0 = wsi.shape
    level = wsi.best_level_for_downsample(s)
    ds = wsi.level_downsamples[level]
    Hm, Wm = max(1, int(math.ceil(H0 / s))), max(1, int(math.ceil(W0 / s)))
    if whole_px and max(Hm, Wm) <= whole_px:
        T = max(T, Hm, Wm)
    all_origins = np.asarray(postproc.tile_origins((Hm, Wm), T, overlap), np.int64).reshape(-1, 2)

    thumb = wsi.thumbnail(overlay_px)
    tscale = thumb.shape[1] / W0
    tissue = tissue_mask(thumb) if tissue_detection else np.ones(thumb.shape[:2], bool)
    keep = np.ones(len(all_origins), bool)
    if tissue_detection:
        for i, (r, c) in enumerate(all_origins):
            y0, y1 = int(math.floor(r * s * tscale)), int(math.ceil((r + T) * s * tscale))
            x0, x1 = int(math.floor(c * s * tscale)), int(math.ceil((c + T) * s * tscale))
            keep[i] = bool(tissue[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1].any())
    origins = all_origins[keep]
    grid = _Grid(s=s, level=level, ds=ds, tile=T, origins=origins, model_um=info.um_per_px)
    return _TilePlan(grid=grid, all_origins=all_origins, origins=origins, shape=(H0, W0), img_um=img_um,
                     thumb=thumb, tscale=tscale, tissue=tissue)


class _Collected:
    """The nuclei of the processed tiles, in tile order; with ``keep_map`` also painted into
    level-0 ``inst``/``type`` maps (a pixel keeps the first nucleus painted on it)."""

    def __init__(self, shape: tuple[int, int], *, keep_map: bool) -> None:
        self.shape, self.keep_map = shape, keep_map
        self.inst = np.zeros(shape, np.int32) if keep_map else None
        self.type = np.zeros(shape, np.uint8) if keep_map else None
        self.xy: list[np.ndarray] = []
        self.polys: list[np.ndarray] = []
        self.area: list[np.ndarray] = []
        self.cls: list[np.ndarray] = []
        self.prob: list[np.ndarray] = []
        self.n = 0

    def add(self, res: dict[str, Any], origin: np.ndarray, T: int, s: float) -> None:
        """Append one tile's nuclei (``res`` of :func:`_tile_nuclei`) with top-left model px ``origin``."""
        m = len(res["polys"])
        if m == 0:
            return
        self.xy.append(res["xy"])
        self.polys.extend(res["polys"])
        self.area.append(res["area"])
        self.cls.append(res["cls"])
        self.prob.append(res["prob"])
        if self.keep_map:
            H0, W0 = self.shape
            r, c = (int(v) for v in origin)
            yi, ym = _level0_index(r, T, s, H0)
            xi, xm = _level0_index(c, T, s, W0)
            sub = res["inst"][np.ix_(ym, xm)]
            region = self.inst[yi, xi]  # a view: painted in place
            paint = (sub > 0) & (region == 0)
            region[paint] = sub[paint] + self.n
            self.type[yi, xi][paint] = res["type"][np.ix_(ym, xm)][paint]
        self.n += m

    def table(self, class_names: Mapping[int, str]) -> Any:
        """One row per nucleus: id, centroid (level-0 px), area, class and its probability."""
        import pandas as pd

        cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt))
        xy_a = np.concatenate(self.xy) if self.xy else np.zeros((0, 2))
        cls_a = cat(self.cls, np.int64)
        return pd.DataFrame({
            "id": np.arange(1, len(self.polys) + 1, dtype=np.int64),
            "x": xy_a[:, 0], "y": xy_a[:, 1],
            "area_um2": cat(self.area, float),
            "class": cls_a.astype(np.int64),
            "class_name": [_class_label(int(c), class_names) for c in cls_a],
            "probability": cat(self.prob, float),
        })
