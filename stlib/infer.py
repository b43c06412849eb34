"""Apply a trained model to an H&E tile or a whole slide: nuclei, classes, QuPath GeoJSON.

Pipeline of :func:`infer_image`
-------------------------------
1. **Model** - ``model.pt`` from :mod:`stlib.train` (:func:`load_inference_model`); its
   training resolution ``um_per_px`` and tile size ``tile_px`` are read from the file. A
   checkpoint trained on another class table is refused (:func:`stlib.model.net.load_model`).
2. **Image** - a PNG/JPEG tile, a plain TIFF or a pyramidal WSI (:func:`stlib.io.wsi.open_wsi`).
   The level-0 pixel size comes from the file or from ``um_per_px=`` (``--um-per-px``); when
   neither says it, inference stops with an :class:`~stlib.utils.InputError`: running a
   40x model on a 20x image silently produces garbage (the most common complaint about
   HoVer-Net/CellViT).
3. **Resolution** - the image is resampled to the model's µm/px *per tile*: the tile is read
   from the coarsest pyramid level that is still at least as fine as the model, then mapped
   onto the model's pixel grid with a bilinear affine transform (Gaussian pre-filter when
   shrinking). Model pixel ``i`` covers level-0 ``[i*s, (i+1)*s)`` with
   ``s = model_um / image_um``; nothing is resampled when ``s == 1`` and the level is 0.
4. **Tissue** - Otsu threshold of the HSV saturation of a thumbnail (clipped to [0.03, 0.12]
   so a tile without background keeps all its tissue; near-black pixels excluded); tiles
   whose footprint holds no tissue are skipped.
5. **Tiles** - overlapping ``tile_px`` tiles in model pixels (``overlap`` px shared);
   the network runs in batches (bf16 autocast + channels_last on CUDA, fp32 on CPU) while
   a thread pool (or, with ``postproc_processes=True``, a process pool: on a GPU the network
   outruns what GIL-bound threads can post-process) post-processes the previous batches
   (:func:`stlib.model.postproc.hovernet_postprocess`).
6. **Seams** - every point belongs to the processed tile containing it whose centre is
   nearest (:func:`stlib.model.postproc.remove_seam_duplicates`); a nucleus is kept only in
   the tile owning its centroid, so a nucleus on a seam is reported once. Decided per tile
   from the grid alone: nothing slide-sized is held in memory except (optionally) the maps.
7. **Outputs** - per nucleus: polygon and centroid in **level-0 pixels of the input** (pixel
   ``(0, 0)`` covers ``[0, 1) x [0, 1)``, so a pixel centre is at ``index + 0.5``, as QuPath
   and :mod:`stlib.labels.masks` use), area in µm², class id (:mod:`stlib.constants`; 255 =
   "Ignore" when the NT head says background for every pixel of the nucleus) and the mean
   probability of that class over the nucleus. :func:`write_outputs` writes the GeoJSON,
   CSV, NPZ and overlay.

``inst``/``type`` maps (``NAME.npz``) are at the **input's level-0 resolution** (nearest-
neighbour from the model grid), the grid of the image and of any ground truth drawn on it,
so ``stlib metrics`` can compare them directly. They are assembled only when the slide has
at most ``max_map_px`` level-0 pixels (default 64 Mpx, i.e. a tile or a small region); for
whole slides the polygons are the output.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stlib.config import resolve_device
from stlib.constants import CLASS_COLORS, CLASS_NAMES, IGNORE
from stlib.model import postproc
from stlib.model.net import load_model, to_input
from stlib.utils import InputError, atomic_path, progress, write_json

log = logging.getLogger("stlib.infer")

__all__ = [
    "ModelInfo", "InferenceResult", "load_inference_model", "predict_tiles", "segment_tiles",
    "tissue_mask", "infer_image", "write_outputs", "geojson_features", "cli_main",
]

#: Slides with more level-0 pixels than this get no ``inst``/``type`` maps (polygons only).
DEFAULT_MAX_MAP_PX = 1 << 26


# ----------------------------------------------------------------------------- model
@dataclass
class ModelInfo:
    """A network ready for inference and what it was trained for.

    Attributes
    ----------
    model
        The network (eval mode); ``forward`` returns ``{"np", "hv", "nt"}`` logits.
    um_per_px
        Pixel size (µm) of the training tiles: images are resampled to it.
    tile_px
        Training tile size; the default inference tile.
    class_names
        Class id -> name of the NT head (from the model file).
    source
        The model file, or a description.
    encoder
        Encoder name (``"small"``, ``"resnet50"``) when known.
    """

    model: torch.nn.Module
    um_per_px: float
    tile_px: int = 256
    class_names: dict[int, str] = field(default_factory=lambda: dict(CLASS_NAMES))
    source: str = "<in-memory model>"
    encoder: str | None = None


def load_inference_model(path: str | os.PathLike, *, device: str = "cpu") -> ModelInfo:
    """Load ``model.pt`` written by :mod:`stlib.train` for inference.

    Parameters
    ----------
    path
        The model file.
    device
        Where the weights go (``"auto"`` allowed).

    Raises
    ------
    InputError
        Missing/corrupt file, another class set (from :func:`stlib.model.net.load_model`), or
        no training resolution stored in the file.
    """
    path = Path(path)
    dev = resolve_device(device)
    model, config = load_model(path, map_location=dev)
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # old (non-zip) serialisation cannot be memory-mapped
        meta = torch.load(path, map_location="cpu", weights_only=True)
    um = meta.get("um_per_px")
    if um is None or not float(um) > 0:
        raise InputError("model file does not say at which resolution (um_per_px) it was trained", path=path,
                         fix="use a model.pt written by `stlib train`, or pass the model object with "
                             "model_um_per_px=")
    names = {int(k): str(v) for k, v in (meta.get("class_names") or CLASS_NAMES).items()}
    return ModelInfo(model=model, um_per_px=float(um), tile_px=int(meta.get("tile_px") or 256),
                     class_names=names, source=str(path), encoder=config.get("encoder"))


def _as_model_info(model_or_path: Any, device: str, model_um_per_px: float | None) -> ModelInfo:
    if isinstance(model_or_path, ModelInfo):
        info = model_or_path
    elif isinstance(model_or_path, torch.nn.Module):
        um = model_um_per_px if model_um_per_px is not None else getattr(model_or_path, "um_per_px", None)
        if um is None:
            raise InputError("the model's training resolution is unknown",
                             fix="pass model_um_per_px= (e.g. 0.25 for a 40x model) or a model.pt path")
        enc = getattr(getattr(model_or_path, "net_config", None), "encoder", None)
        info = ModelInfo(model=model_or_path, um_per_px=float(um),
                         tile_px=int(getattr(model_or_path, "tile_px", 256)), encoder=enc)
    else:
        info = load_inference_model(model_or_path, device=device)
    if model_um_per_px is not None:
        info.um_per_px = float(model_um_per_px)
    return info


def _ready(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    model.eval()
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------- network
def _forward(model: torch.nn.Module, images: np.ndarray, dev: torch.device, amp: bool) -> dict[str, np.ndarray]:
    """One batch through the network: softmax NP (channel 1), HV, softmax NT as float32 numpy."""
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(images))
        if dev.type == "cuda":
            x = x.pin_memory().to(dev, non_blocking=True)
        x = to_input(x)  # uint8 travels, the float conversion happens on the device
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bool(amp and dev.type == "cuda")):
            out = model(x)
        np_prob = torch.softmax(out["np"].float(), dim=1)[:, 1]
        hv = out["hv"].float()
        tp = torch.softmax(out["nt"].float(), dim=1)
        return {"np_prob": np_prob.cpu().numpy(), "hv": hv.cpu().numpy(), "tp_prob": tp.cpu().numpy()}


def _check_images(images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 RGB, got dtype {images.dtype}")
    return images


def predict_tiles(model: torch.nn.Module, images: np.ndarray, *, device: str = "auto", batch_size: int = 16,
                  amp: bool = True) -> dict[str, np.ndarray]:
    """Network outputs of a stack of RGB tiles.

    Parameters
    ----------
    model
        A :class:`~stlib.model.net.HoVerNet` (or any module with the same outputs). It is put
        in eval mode and moved to ``device``.
    images
        ``(B, H, W, 3)`` uint8 RGB.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    batch_size
        Tiles per forward pass.
    amp
        bf16 autocast on CUDA (ignored on CPU, which runs fp32).

    Returns
    -------
    dict
        ``np_prob`` ``(B, H, W)`` nucleus probability, ``hv`` ``(B, 2, H, W)``, ``tp_prob``
        ``(B, C, H, W)`` class probabilities (softmax over the NT head), all float32.
    """
    images = _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(resolve_device(device))
    model = _ready(model, dev)
    parts = [_forward(model, images[i:i + batch_size], dev, amp) for i in range(0, len(images), batch_size)]
    if not parts:
        h, w = images.shape[1:3]
        return {"np_prob": np.zeros((0, h, w), np.float32), "hv": np.zeros((0, 2, h, w), np.float32),
                "tp_prob": np.zeros((0, 0, h, w), np.float32)}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------- pipeline
def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n - 1))


def _prefetch(it: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``it`` in a background thread, ``depth`` items ahead (tile reading overlaps the GPU)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def fill() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("done", done))
        except BaseException as e:  # re-raised in the consumer
            q.put(("error", e))

    t = threading.Thread(target=fill, daemon=True, name="stlib-infer-reader")
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


@dataclass
class _Timing:
    net_s: float = 0.0
    postproc_s: float = 0.0
    read_s: float = 0.0
    n_tiles: int = 0


def _timed_call(work: Callable[..., Any], key: Any, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[Any, float]:
    t0 = time.perf_counter()
    res = work(key, a, b, c)
    return res, time.perf_counter() - t0


def _run_pipeline(model: torch.nn.Module, batches: Iterable[tuple[list[Any], np.ndarray]],
                  work: Callable[[Any, np.ndarray, np.ndarray, np.ndarray], Any], *, dev: torch.device,
                  amp: bool, workers: int, timing: _Timing, processes: bool = False) -> Iterator[tuple[Any, Any]]:
    """Predict batches on ``dev`` while a pool runs ``work`` on the previous ones.

    Yields ``(key, work(key, np_prob, hv, tp_prob))`` in input order. At most two batches of
    network outputs wait for post-processing, which bounds memory. The pool holds ``workers``
    threads, or with ``processes=True`` worker processes (``spawn``; ``work`` must pickle): the
    post-processing libraries hold the GIL, so only processes add CPU cores to it (for a GPU,
    whose network outruns one core).
    """
    def timed(key: Any, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[Any, float]:
        return _timed_call(work, key, a, b, c)

    if workers > 0 and processes:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
        submit = functools.partial(pool.submit, _timed_call, work)
    elif workers > 0:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="stlib-postproc")
        submit = functools.partial(pool.submit, timed)
    else:
        pool = None
    pending: deque[list[tuple[Any, Future | tuple[Any, float]]]] = deque()

    def collect(items: list[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        for key, fut in items:
            res, dt = fut.result() if isinstance(fut, Future) else fut
            timing.postproc_s += dt
            yield key, res

    try:
        for keys, imgs in batches:
            t0 = time.perf_counter()
            out = _forward(model, imgs, dev, amp)
            timing.net_s += time.perf_counter() - t0
            timing.n_tiles += len(keys)
            items = []
            for j, key in enumerate(keys):
                args = (key, out["np_prob"][j], out["hv"][j], out["tp_prob"][j])
                items.append((key, submit(*args) if pool else timed(*args)))
            pending.append(items)
            while len(pending) > (2 if pool else 0):
                yield from collect(pending.popleft())
        while pending:
            yield from collect(pending.popleft())
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def segment_tiles(model: torch.nn.Module, images: np.ndarray, *, device: str = "auto", batch_size: int = 16,
                  amp: bool = True, workers: int = 0, **postproc_kwargs: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Nucleus instances and classes of independent tiles (no stitching).

    Parameters
    ----------
    model, images, device, batch_size, amp
        As in :func:`predict_tiles`.
    workers
        Post-processing threads; while they work on one batch the next batch is predicted.
        0 = post-process in the calling thread.
    **postproc_kwargs
        Passed to :func:`stlib.model.postproc.hovernet_postprocess` (``np_thresh``, ...).

    Returns
    -------
    list
        One ``(inst, type)`` per tile: ``inst`` (H, W) int32 ids 1..n, ``type`` (H, W) uint8.
    """
    images = _check_images(images)
    dev = torch.device(resolve_device(device))
    model = _ready(model, dev)

    def batches() -> Iterator[tuple[list[int], np.ndarray]]:
        for i in range(0, len(images), batch_size):
            yield list(range(i, min(i + batch_size, len(images)))), images[i:i + batch_size]

    def work(_k: int, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inst, typ, _ = postproc.hovernet_postprocess(a, b, c, **postproc_kwargs)
        return inst, typ

    return [r for _, r in _run_pipeline(model, batches(), work, dev=dev, amp=amp, workers=workers, timing=_Timing())]


# ----------------------------------------------------------------------------- tissue
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


# ----------------------------------------------------------------------------- result
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


# ----------------------------------------------------------------------------- slide geometry
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
                 neighbours: Sequence[np.ndarray], keep_map: bool, pp_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Post-process one slide tile and keep the nuclei it owns, as level-0 polygons."""
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
    if not ids:
        return empty
    r0, c0 = (int(v) for v in grid.origins[key])
    s = grid.s
    rings, xy, area, cls, prob = [], [], [], [], []
    for i in ids:
        rec = table[i]
        (a, b), (c, d) = rec["bbox"]
        m = np.pad(inst[a:c, b:d] == i, 1)
        contours = find_contours(m.astype(np.float32), 0.5)
        ring = max(contours, key=len)
        rows = ring[:, 0] + a - 1 + r0
        cols = ring[:, 1] + b - 1 + c0
        rings.append(np.stack([(cols + 0.5) * s, (rows + 0.5) * s], axis=1))
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


# ----------------------------------------------------------------------------- main entry
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


def infer_image(model_or_path: Any, image_or_path: Any, *, um_per_px: float | None = None, device: str = "auto",
                tile_px: int | None = None, overlap: int = 128, batch_size: int = 16, tissue_detection: bool = True,
                amp: bool = True, workers: int | None = None, postproc_processes: bool = False,
                model_um_per_px: float | None = None,
                max_map_px: int = DEFAULT_MAX_MAP_PX, overlay_px: int = 2048,
                postproc_kwargs: Mapping[str, Any] | None = None) -> InferenceResult:
    """Segment and classify the nuclei of an image tile or a whole slide.

    Parameters
    ----------
    model_or_path
        ``model.pt`` path, a :class:`ModelInfo`, or a network module (then give
        ``model_um_per_px`` unless the module has a ``um_per_px`` attribute).
    image_or_path
        PNG/JPEG/TIFF/pyramidal WSI path, or an ``(H, W, 3)`` uint8 array.
    um_per_px
        Level-0 pixel size of the image (µm); overrides the file's. Required when the file
        does not say it (PNG, JPEG, TIFF without resolution tags) or for arrays.
    device
        ``"auto"`` = CUDA when available.
    tile_px
        Tile size in model pixels (default: the model's training tile size). Larger tiles
        (e.g. 1024) are faster on a GPU; the network takes any size.
    overlap
        Model pixels shared by neighbouring tiles; should be at least twice the largest
        nucleus diameter so that a kept nucleus is never cut by its tile border.
    batch_size
        Tiles per forward pass.
    tissue_detection
        Skip tiles without tissue (Otsu on the saturation of a thumbnail).
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
    postproc_kwargs
        Passed to :func:`stlib.model.postproc.hovernet_postprocess`.

    Returns
    -------
    InferenceResult

    Raises
    ------
    InputError
        Unreadable image or model, unknown pixel size, model trained on another class set.
    """
    t_start = time.perf_counter()
    dev = torch.device(resolve_device(device))
    info = _as_model_info(model_or_path, str(dev), model_um_per_px)
    model = _ready(info.model, dev)
    T = _check_tiling(tile_px, info.tile_px, overlap, batch_size)
    pp = dict(postproc_kwargs or {})
    workers = _default_workers() if workers is None else int(workers)

    wsi = _open_image(image_or_path, um_per_px)
    try:
        plan = _plan_tiles(wsi, info, T, overlap, overlay_px=overlay_px, tissue_detection=tissue_detection)
        origins, grid = plan.origins, plan.grid
        neighbours = [np.nonzero((np.abs(origins[:, 0] - o[0]) < T) & (np.abs(origins[:, 1] - o[1]) < T))[0]
                      for o in origins]
        acc = _Collected(plan.shape, keep_map=plan.shape[0] * plan.shape[1] <= max_map_px)
        timing = _Timing()

        def batches() -> Iterator[tuple[list[int], np.ndarray]]:
            for b in range(0, len(origins), batch_size):
                keys = list(range(b, min(b + batch_size, len(origins))))
                t0 = time.perf_counter()
                imgs = np.stack([_read_model_tile(wsi, grid, int(origins[k][0]), int(origins[k][1])) for k in keys])
                timing.read_s += time.perf_counter() - t0
                yield keys, imgs

        work = functools.partial(_tile_nuclei, grid=grid, neighbours=neighbours, keep_map=acc.keep_map, pp_kwargs=pp)
        src = _prefetch(batches()) if workers > 0 else batches()
        bar = progress(_run_pipeline(model, src, work, dev=dev, amp=amp, workers=workers, timing=timing,
                                     processes=postproc_processes),
                       desc="infer tiles", total=len(origins))
        for k, res in bar:
            acc.add(res, origins[k], T, grid.s)
    finally:
        wsi.close()

    table = acc.table(info.class_names)
    stats = {
        "n_tiles": int(len(plan.all_origins)), "n_tiles_processed": int(timing.n_tiles),
        "n_tiles_skipped": int(len(plan.all_origins) - len(origins)), "n_nuclei": int(len(acc.polys)),
        "tile_px": T, "overlap": int(overlap), "level": int(grid.level), "scale_level0_per_model_px": grid.s,
        "device": str(dev), "amp": bool(amp and dev.type == "cuda"), "batch_size": int(batch_size),
        "workers": workers, "model": info.source, "encoder": info.encoder,
        "net_s": timing.net_s, "postproc_s": timing.postproc_s, "read_s": timing.read_s,
        "wall_s": time.perf_counter() - t_start,
        "maps": "level-0 input resolution" if acc.keep_map else f"omitted (> {max_map_px} level-0 px)",
    }
    return InferenceResult(nuclei=table, polygons=acc.polys, source=str(wsi.path), image_shape=plan.shape,
                           um_per_px=plan.img_um, model_um_per_px=info.um_per_px, inst=acc.inst, type=acc.type,
                           thumbnail=plan.thumb, thumbnail_scale=plan.tscale, tissue=plan.tissue, stats=stats,
                           class_names=dict(info.class_names))


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
                tissue_detection: bool) -> _TilePlan:
    """Tile origins (model px) over the image at the model's resolution; with ``tissue_detection``
    only tiles touching tissue of the thumbnail (one thumbnail pixel of margin) are kept."""
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


# ----------------------------------------------------------------------------- outputs
def geojson_features(result: InferenceResult, *, decimals: int = 2) -> Iterator[dict[str, Any]]:
    """QuPath detection features (one per nucleus), polygons in level-0 px of the input.

    Built by :func:`stlib.io.annotations.geojson_feature`, the one GeoJSON writer of stlib (its
    reader, :func:`stlib.io.annotations.read_geojson`, reads these files back).
    """
    from stlib.io.annotations import geojson_feature

    df = result.nuclei
    cols = [df[c].to_numpy() for c in ("id", "class", "class_name", "area_um2", "probability")]
    for (nid, cid, cname, area, prob), ring in zip(zip(*cols), result.polygons):
        meas: dict[str, float] = {"id": int(nid), "area_um2": round(float(area), 3)}
        if np.isfinite(prob):
            meas["probability"] = round(float(prob), 4)
        yield geojson_feature(ring, class_id=int(cid), class_label=str(cname), measurements=meas,
                              decimals=decimals)


def _overlay(result: InferenceResult) -> np.ndarray:
    from PIL import Image, ImageDraw

    base = result.thumbnail if result.thumbnail is not None else np.full((*result.image_shape, 3), 255, np.uint8)
    im = Image.fromarray(np.ascontiguousarray(base))
    draw = ImageDraw.Draw(im)
    sc = result.thumbnail_scale
    for cid, ring in zip(result.nuclei["class"].to_numpy(), result.polygons):
        pts = [(float(x) * sc, float(y) * sc) for x, y in ring]
        color = tuple(CLASS_COLORS.get(int(cid), CLASS_COLORS[IGNORE]))
        if len(pts) >= 3:
            draw.line(pts, fill=color, width=1)
    return np.asarray(im)


def write_outputs(result: InferenceResult, out_dir: str | os.PathLike, name: str | None = None) -> dict[str, Path]:
    """Write the results of :func:`infer_image` (each file atomically).

    Files
    -----
    ``NAME.geojson``
        QuPath FeatureCollection of detections: Polygon in level-0 px, ``classification``
        ``{name, color}``, ``measurements`` ``{id, area_um2, probability}``.
    ``NAME_nuclei.csv``
        ``id, x, y, area_um2, class, class_name, probability`` (x, y level-0 px).
    ``NAME.npz``
        ``inst`` (int32) and ``type`` (uint8) at the input's level-0 resolution, plus
        ``um_per_px``; only when the maps were assembled (see :func:`infer_image`).
    ``NAME_overlay.png``
        Nucleus contours coloured by class over the (thumbnail of the) image.
    ``NAME_summary.json``
        Counts per class, tiles, timings, resolutions.

    Returns
    -------
    dict
        kind -> written path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if name is None:
        stem = Path(result.source).name
        for suf in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png", ".jpg", ".jpeg", ".svs"):
            if stem.lower().endswith(suf):
                stem = stem[: -len(suf)]
                break
        name = stem if stem and stem != "<array>" else "image"
    paths: dict[str, Path] = {}

    from stlib.io.annotations import write_geojson

    paths["geojson"] = write_geojson(out / f"{name}.geojson", geojson_features(result))

    p = out / f"{name}_nuclei.csv"
    with atomic_path(p) as tmp:
        result.nuclei.to_csv(tmp, index=False, float_format="%.4f")
    paths["csv"] = p

    if result.inst is not None:
        p = out / f"{name}.npz"
        with atomic_path(p) as tmp:
            np.savez_compressed(tmp, inst=result.inst, type=result.type, um_per_px=np.float64(result.um_per_px))
        paths["npz"] = p

    from PIL import Image

    p = out / f"{name}_overlay.png"
    with atomic_path(p) as tmp:
        Image.fromarray(_overlay(result)).save(tmp, format="PNG")
    paths["overlay"] = p

    counts = result.nuclei["class_name"].value_counts().to_dict()
    summary = {"source": result.source, "image_shape": list(result.image_shape), "um_per_px": result.um_per_px,
               "model_um_per_px": result.model_um_per_px, "n_nuclei": len(result), "per_class": counts,
               "coordinates": "level-0 px of the input; pixel (0,0) covers [0,1)x[0,1)", **result.stats}
    paths["summary"] = write_json(out / f"{name}_summary.json", summary)
    return paths


# ----------------------------------------------------------------------------- CLI
def cli_main(argv: list[str]) -> int:
    """``stlib infer --model PATH --input IMAGE --out DIR [options]``."""
    p = argparse.ArgumentParser(prog="stlib infer", description="Segment and classify nuclei in an H&E tile or "
                                "whole slide; writes QuPath GeoJSON, a nuclei CSV, NAME.npz and an overlay PNG.")
    p.add_argument("--model", required=True, help="model.pt written by `stlib train`")
    p.add_argument("--input", required=True, help="PNG/JPEG/TIFF tile or pyramidal WSI")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default=None, help="output file stem (default: the input's)")
    p.add_argument("--um-per-px", type=float, default=None,
                   help="level-0 pixel size of the input in µm (overrides the file; required when it has none)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tile-px", type=int, default=None,
                   help="tile size in model px (default: 512, or the model's training tile if larger)")
    p.add_argument("--overlap", type=int, default=128,
                   help="model px shared by neighbouring tiles; keep it >= 2x the largest nucleus diameter")
    p.add_argument("--workers", type=int, default=None, help="post-processing threads (default CPUs-1, max 8)")
    p.add_argument("--postproc-processes", action="store_true",
                   help="post-process in --workers processes instead of threads (GPU: more CPU cores keep up)")
    p.add_argument("--no-tissue-detection", action="store_true", help="process every tile")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (default bf16 autocast)")
    args = p.parse_args(argv)
    res = infer_image(args.model, args.input, um_per_px=args.um_per_px, device=args.device, tile_px=args.tile_px,
                      overlap=args.overlap, batch_size=args.batch_size, tissue_detection=not args.no_tissue_detection,
                      amp=not args.no_amp, workers=args.workers, postproc_processes=args.postproc_processes)
    paths = write_outputs(res, args.out, args.name)
    st = res.stats
    print(f"stlib infer: {len(res)} nuclei in {st['n_tiles_processed']}/{st['n_tiles']} tiles "
          f"({st['wall_s']:.1f}s on {st['device']}); wrote {', '.join(str(v) for v in paths.values())}")
    return 0


