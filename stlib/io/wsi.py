"""Whole-slide images: read regions of pyramidal TIFFs lazily, write pyramidal TIFFs.

:func:`open_wsi` opens a pyramidal/tiled TIFF, an OME-TIFF, a plain TIFF or a small PNG/JPEG
and returns a :class:`Wsi`. Regions are read with OpenSlide's convention: the top-left corner
is given in level-0 pixels, the size in pixels of the requested level; pixels outside the
image are white (255). Tiled TIFF levels are read through tifffile's zarr store, so only the
tiles that intersect a region are decoded, never the whole slide.

:func:`write_pyramidal_tiff` writes the tiled, JPEG-compressed pyramid (level 0 plus 2x
sub-resolution levels stored as SubIFDs, resolution in the TIFF tags) that the synthetic
cohort uses and that tifffile, QuPath and OpenSlide-compatible readers understand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from stlib.utils import InputError, atomic_path

__all__ = ["Wsi", "open_wsi", "write_pyramidal_tiff"]

_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff", ".btf", ".qptiff")


def _region_index(axes: str, ys: slice, xs: slice) -> tuple[tuple, str]:
    """Index tuple selecting rows ``ys`` / columns ``xs`` (first plane of other axes)."""
    idx: list[Any] = []
    kept = ""
    for ax in axes.upper():
        if ax == "Y":
            idx.append(ys)
            kept += ax
        elif ax == "X":
            idx.append(xs)
            kept += ax
        elif ax in "SC":
            idx.append(slice(None))
            kept += ax
        else:
            idx.append(0)
    return tuple(idx), kept


def _to_rgb(a: np.ndarray, axes: str) -> np.ndarray:
    """Bring a block with axes from ``"YXSC"`` to (h, w, 3) uint8."""
    a = np.asarray(a)
    if len(axes) == 3 and axes.index("Y") != 0:  # channels first (CYX)
        a = np.moveaxis(a, 0, -1)
    elif len(axes) == 4:  # e.g. CYXS: take the first C
        a = a[0] if axes[0] in "SC" else a[..., 0]
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.shape[-1] > 3:
        a = a[..., :3]
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):
            a = np.clip(a if a.max(initial=0) > 1.0 else a * 255.0, 0, 255).astype(np.uint8)
        elif a.dtype == np.bool_:
            a = a.astype(np.uint8) * 255
        else:
            info = np.iinfo(a.dtype)
            a = (a.astype(np.float64) * (255.0 / info.max)).round().astype(np.uint8)
    return a


class Wsi:
    """A whole-slide image opened for lazy region reads.

    Use :func:`open_wsi` to create one. Attributes
    ----------
    path
        The file.
    shape
        Level-0 ``(H, W)`` in pixels.
    level_shapes
        ``(H, W)`` of every level, level 0 first.
    level_downsamples
        Downsample factor of every level relative to level 0 (1.0 first).
    um_per_px
        Level-0 pixel size in µm (from the TIFF resolution tags, OME metadata, an SVS
        ``MPP`` entry or the value given to :func:`open_wsi`), ``None`` when unknown.
    """

    def __init__(self, path: Path, levels: list[Any], level_shapes: list[tuple[int, int]],
                 *, um_per_px: float | None, tif: Any = None, axes: str = "YXS") -> None:
        self.path = Path(path)
        self._levels = levels  # zarr arrays / numpy arrays, (H, W, ...) per level
        self.level_shapes = [(int(h), int(w)) for h, w in level_shapes]
        h0, w0 = self.level_shapes[0]
        self.level_downsamples = [float(np.mean([h0 / h, w0 / w])) for h, w in self.level_shapes]
        self.um_per_px = None if um_per_px is None else float(um_per_px)
        self._tif = tif
        self._axes = axes

    # -- basic properties -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 ``(H, W)``."""
        return self.level_shapes[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_shapes)

    def __repr__(self) -> str:
        return (f"Wsi({str(self.path)!r}, shape={self.shape}, levels={self.level_count}, "
                f"um_per_px={self.um_per_px})")

    # -- context manager ----------------------------------------------------------------
    def close(self) -> None:
        """Close the underlying file (idempotent)."""
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        self._levels = []

    def __enter__(self) -> Wsi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------
    def best_level_for_downsample(self, downsample: float) -> int:
        """Index of the largest level whose downsample does not exceed ``downsample``."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-6)]
        return max(ok) if ok else 0

    def read_region(self, x: int, y: int, w: int, h: int, *, level: int = 0) -> np.ndarray:
        """Read an RGB region.

        Parameters
        ----------
        x, y
            Top-left corner in **level-0** pixels (may be negative or beyond the image).
        w, h
            Width and height in pixels **of** ``level``.
        level
            Pyramid level (0 = full resolution).

        Returns
        -------
        ``(h, w, 3)`` uint8; pixels outside the image are 255 (white).
        """
        if not self._levels:
            raise InputError("slide is closed", path=self.path, fix="open it again with stlib.io.wsi.open_wsi")
        if not 0 <= level < self.level_count:
            raise ValueError(f"level must be in [0, {self.level_count - 1}], got {level}")
        w, h = int(w), int(h)
        if w < 0 or h < 0:
            raise ValueError(f"w and h must be >= 0, got w={w}, h={h}")
        ds = self.level_downsamples[level]
        lx = int(np.floor(x / ds))
        ly = int(np.floor(y / ds))
        lh, lw = self.level_shapes[level]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lw), min(ly + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        try:
            idx, kept = _region_index(self._axes, slice(y0, y1), slice(x0, x1))
            block = _to_rgb(np.asarray(self._levels[level][idx]), kept)
        except InputError:
            raise
        except Exception as e:  # decoding error: corrupt or truncated tile data
            raise InputError(f"cannot decode level {level} region ({e.__class__.__name__}: {e})",
                             path=self.path, fix="the file is corrupt or truncated; download/convert it again") from e
        out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = block
        return out

    def read_level(self, level: int) -> np.ndarray:
        """A whole level as ``(H, W, 3)`` uint8 (only sensible for small levels)."""
        lh, lw = self.level_shapes[level]
        return self.read_region(0, 0, lw, lh, level=level)

    def thumbnail(self, max_px: int = 1024) -> np.ndarray:
        """An RGB thumbnail whose longer side is at most ``max_px``.

        Reads the smallest level that is still at least ``max_px`` on its longer side (or the
        smallest level when all are smaller), then reduces it by area averaging.
        """
        if max_px < 1:
            raise ValueError(f"max_px must be >= 1, got {max_px}")
        big_enough = [i for i, (h, w) in enumerate(self.level_shapes) if max(h, w) >= max_px]
        level = max(big_enough) if big_enough else self.level_count - 1
        img = self.read_level(level)
        h, w = img.shape[:2]
        scale = max_px / max(h, w)
        if scale >= 1.0:
            return img
        from skimage.transform import resize

        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        small = resize(img, (nh, nw), order=1, anti_aliasing=True, preserve_range=True)
        return np.clip(np.round(small), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# opening
# ---------------------------------------------------------------------------------------

def _um_from_tags(page: Any) -> float | None:
    tags = page.tags
    try:
        xres = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    except KeyError:
        return None
    num, den = (xres if isinstance(xres, tuple) else (xres, 1))
    if not num or not den:
        return None
    px_per_unit = num / den
    if px_per_unit <= 0:
        return None
    if unit == 3:  # centimetre
        um = 1e4 / px_per_unit
    elif unit == 2:  # inch
        um = 25400.0 / px_per_unit
    else:
        return None
    # resolution tags of 72/96 dpi or similar are "no information", not a microscope
    return um if 0.01 <= um <= 50.0 else None


def _um_from_description(tif: Any) -> float | None:
    ome = getattr(tif, "ome_metadata", None)
    if ome:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome)
        if m:
            val = float(m.group(1))
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', ome)
            u = unit.group(1) if unit else "µm"
            factor = {"nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(u, 1.0)
            return val * factor
    desc = tif.pages[0].description if tif.pages else ""
    m = re.search(r"MPP\s*=\s*([0-9.]+)", desc or "")
    if m:
        return float(m.group(1))
    return None


def _check_complete(tif: Any, pages: list[Any], path: Path) -> None:
    """Raise when a page's tile/strip data lie beyond the end of the file (truncated)."""
    size = os.path.getsize(path)
    for page in pages:
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if offsets.size == 0:
            continue
        end = int((offsets + counts).max())
        if end > size or (counts == 0).all():
            raise InputError(f"image data end at byte {end} but the file has {size} bytes (truncated)",
                             path=path, fix="download or copy the file again")


def open_wsi(path: str | os.PathLike, *, um_per_px: float | None = None, decode_workers: int | None = None) -> Wsi:
    """Open a slide for lazy reading.

    Parameters
    ----------
    path
        Pyramidal/tiled TIFF (incl. OME-TIFF, SVS-like), plain TIFF, or a small PNG/JPEG.
    um_per_px
        Level-0 pixel size in µm; overrides what the file says (needed for PNG/JPEG).
    decode_workers
        Tiled TIFFs: decode the compressed tiles of one region read in threads (tifffile's
        zarr store ``maxworkers``; the same pixels). Default: tifffile's choice, which on
        fewer than three CPUs decodes one tile after the other.

    Returns
    -------
    An open :class:`Wsi` (use it as a context manager or call ``close()``).

    Raises
    ------
    InputError
        The file is missing, not an image, truncated or otherwise unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("image file not found", path=path, fix="check the path (HEST WSIs live in hest/wsis/{id}.tif)")
    name = path.name.lower()
    if name.endswith(_RASTER_SUFFIXES):
        return _open_raster(path, um_per_px)
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:
        if not name.endswith(_TIFF_SUFFIXES):
            # unknown suffix that is not a TIFF: try a raster reader before giving up
            try:
                return _open_raster(path, um_per_px)
            except InputError:
                pass
        raise InputError(f"not a readable TIFF ({e.__class__.__name__}: {e})", path=path,
                         fix="pass a pyramidal TIFF, OME-TIFF, PNG or JPEG") from e
    try:
        if not tif.series:
            raise InputError("TIFF contains no image", path=path, fix="pass an H&E image")
        series = tif.series[0]
        levels_s = list(series.levels) if getattr(series, "levels", None) else [series]
        pages = []
        for lv in levels_s:
            pages.extend(p for p in lv.pages if p is not None)
        _check_complete(tif, pages, path)
        axes = series.axes
        shapes = []
        for lv in levels_s:
            shp = dict(zip(lv.axes, lv.shape))
            shapes.append((shp["Y"], shp["X"]))
        import zarr

        store = series.aszarr(maxworkers=decode_workers) if decode_workers else series.aszarr()
        z = zarr.open(store, mode="r")
        if len(levels_s) > 1:
            arrays = [z[str(i)] for i in range(len(levels_s))]
        else:
            arrays = [z if hasattr(z, "shape") else z["0"]]
        um = um_per_px if um_per_px is not None else (_um_from_description(tif) or _um_from_tags(series.pages[0]))
        # sanity: the level axes string must contain Y and X
        if "Y" not in axes or "X" not in axes:
            raise InputError(f"unsupported TIFF axes {axes!r}", path=path, fix="pass an RGB image")
        wsi = Wsi(path, arrays, shapes, um_per_px=um, tif=tif, axes=axes)
        # decode one pixel of the smallest level to catch corrupt data early
        wsi.read_region(0, 0, 1, 1, level=wsi.level_count - 1)
        return wsi
    except InputError:
        tif.close()
        raise
    except Exception as e:
        tif.close()
        raise InputError(f"cannot read TIFF ({e.__class__.__name__}: {e})", path=path,
                         fix="the file may be corrupt; convert it to a pyramidal TIFF") from e


def _open_raster(path: Path, um_per_px: float | None) -> Wsi:
    try:
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:
        raise InputError(f"not a readable image ({e.__class__.__name__}: {e})", path=path,
                         fix="pass a pyramidal TIFF, OME-TIFF, PNG or JPEG") from e
    return Wsi(path, [arr], [arr.shape[:2]], um_per_px=um_per_px, axes="YXS")


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------

def _halve(img: np.ndarray) -> np.ndarray:
    """2x2 area average (odd edges replicated)."""
    h, w = img.shape[:2]
    if h % 2 or w % 2:
        img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    f = img.astype(np.float32)
    out = (f[0::2, 0::2] + f[1::2, 0::2] + f[0::2, 1::2] + f[1::2, 1::2]) * 0.25
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def write_pyramidal_tiff(path: str | os.PathLike, image: np.ndarray, *, um_per_px: float,
                         tile: int = 256, min_size: int = 512, compression: str | None = "jpeg",
                         quality: int = 90, ome: bool = False) -> Path:
    """Write an RGB image as a tiled pyramidal TIFF (atomically).

    Parameters
    ----------
    path
        Output file (``.tif``; ``.ome.tif`` with ``ome=True``).
    image
        ``(H, W, 3)`` uint8, level 0.
    um_per_px
        Level-0 pixel size, written to the resolution tags (pixels per centimetre) and, for
        OME, as ``PhysicalSizeX/Y``.
    tile
        Tile edge in pixels (a multiple of 16).
    min_size
        Sub-resolution levels (each half the previous) are added while the longer side of
        the next level is at least ``min_size``.
    compression
        ``"jpeg"`` (lossy, like scanners), ``"zlib"``, ``"lzw"`` or ``None``.
    quality
        JPEG quality (1-100).
    ome
        Write OME-XML metadata (pyramid in SubIFDs either way).

    Returns
    -------
    The written path.
    """
    import tifffile

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {img.shape} dtype {img.dtype}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    if um_per_px is None or not um_per_px > 0:
        raise ValueError(f"um_per_px must be > 0, got {um_per_px}")
    levels = [img]
    while True:
        nh, nw = (levels[-1].shape[0] + 1) // 2, (levels[-1].shape[1] + 1) // 2
        if max(nh, nw) < min_size or min(nh, nw) < 1 or len(levels) >= 12:
            break
        levels.append(_halve(levels[-1]))
    kw: dict[str, Any] = {"tile": (tile, tile), "photometric": "rgb"}
    if compression == "jpeg":
        kw["compression"] = "jpeg"
        kw["compressionargs"] = {"level": int(quality)}
    elif compression:
        kw["compression"] = compression
    path = Path(path)
    big = img.nbytes > 2**31
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=big, ome=ome) as tw:
            px_per_cm = 1e4 / um_per_px
            meta: dict[str, Any] | None = None
            if ome:
                meta = {"axes": "YXS", "PhysicalSizeX": um_per_px, "PhysicalSizeY": um_per_px,
                        "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
            tw.write(levels[0], subifds=len(levels) - 1, resolution=(px_per_cm, px_per_cm),
                     resolutionunit="CENTIMETER", metadata=meta, **kw)
            for i, lv in enumerate(levels[1:], start=1):
                ds = img.shape[0] / lv.shape[0]
                r = px_per_cm / ds
                tw.write(lv, subfiletype=1, resolution=(r, r), resolutionunit="CENTIMETER", **kw)
    return path
