"""Manually annotated H&E nucleus sets, read into one representation (and written back).

Every source becomes an :class:`AnnotatedImage`: the RGB image, an instance map (0 =
background, ids need not be contiguous), a class map in stlib's class ids or ``None`` when the
source has no classes, the pixel size (µm/px), the organ, the source name and notes on what the
reader had to do (skipped regions, nominal pixel size, ...). Classes are translated with the one
table :data:`stlib.constants.SOURCE_CLASS_MAPS`.

Readers (each raises :class:`~stlib.utils.InputError` naming the file on bad input):

* :func:`read_monuseg_xml` / :func:`read_monuseg` / :func:`read_monuseg_folder` - MoNuSeg and
  other Aperio ImageScope XML (``<Annotations MicronsPerPixel=...>``, one ``<Region>`` of
  ``<Vertex X= Y=>`` per nucleus). Regions with fewer than three vertices are skipped (noted);
  overlapping regions are resolved by "smaller wins"; ``.xml.gz`` is read too.
* :func:`read_consep_patch` / :func:`read_consep_patches` - the HoVer-Net patch export of
  CoNSeP: ``images/NAME.jpg``, ``inst/NAME.npy`` (or ``.npz``), ``type_mat/NAME.mat`` with
  ``inst_type`` (n, 1) and ``inst_centroid`` (n, 2) in the order of the sorted instance ids.
  :func:`assemble_consep` puts the 16 patches of one 1000 x 1000 image back together.
* :func:`read_consep_mat` - CoNSeP's own label files (``.mat`` with ``inst_map``, ``type_map``,
  ``inst_type``), 7 original classes or HoVer-Net's 4 merged ones.
* :func:`read_pannuke` - PanNuke folds (through :mod:`stlib.io.pannuke`).
* :func:`read_instance_folder` - folders of instance maps: ``NAME.npz`` (``inst``, optional
  ``type``, ``image``) beside ``NAME.png``/``.tif``/``.jpg``, or ``images/`` + ``masks/`` (or
  ``inst/``, ``labels/``) with instance PNG / TIFF / ``.npy`` / ``.npz``.
* :func:`read_geojson` / :func:`read_geojson_annotation` - QuPath GeoJSON (detections or
  annotations, ``classification.name`` -> class); :func:`geojson_feature` /
  :func:`write_geojson` write it (the same writer :mod:`stlib.infer` uses).
* :func:`read_annotations` - any of the above, by looking at the folder.

Writers: :func:`write_instance_folder` (``NAME.npz`` + ``NAME.png`` + ``tissue.csv``: what
``stlib metrics`` and ``stlib infer`` work with), :func:`write_geojson`.

Pixel convention (as in :mod:`stlib.labels.masks`): pixel ``(row, col)`` covers
``[col, col + 1) x [row, row + 1)`` in polygon coordinates, so a pixel belongs to a polygon when
its centre ``(col + 0.5, row + 0.5)`` lies inside. Polygon vertices of XML and GeoJSON are read
in that frame. This module rasterises with :func:`skimage.draw.polygon` itself because the I/O
layer may not import :mod:`stlib.labels` (a higher stage); the fill is scikit-image's.
"""

from __future__ import annotations

import gzip
import json
import lzma
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from stlib.constants import (CLASS_COLORS, CLASS_NAMES, EPITHELIAL_ANY, IGNORE, SOURCE_CLASS_MAPS,
                             TARGET_UM_PER_PX_40X, class_name)
from stlib.utils import InputError, atomic_path

__all__ = [
    "AnnotatedImage", "NOMINAL_UM_PER_PX", "TCGA_SITE_ORGAN", "organ_from_tcga_name", "map_classes",
    "rasterize_polygons", "instance_polygons", "read_monuseg_xml", "read_monuseg", "read_monuseg_folder",
    "read_consep_patch", "read_consep_patches", "assemble_consep", "consep_patch_origin", "read_consep_mat",
    "read_pannuke", "read_instance_folder", "read_geojson", "read_geojson_annotation", "geojson_feature",
    "geojson_features_of", "write_geojson", "write_instance_folder", "read_annotations", "detect_layout",
]

#: Pixel size assumed when a 40x source does not state it (the reader notes it).
NOMINAL_UM_PER_PX: dict[str, float] = {"monuseg": TARGET_UM_PER_PX_40X, "consep": TARGET_UM_PER_PX_40X,
                                       "pannuke": TARGET_UM_PER_PX_40X}

#: TCGA tissue-source-site codes of the MoNuSeg images in ../shared/realdata (HEST organ names).
#: The code is the two characters after ``TCGA-``; unknown codes give organ ``None`` (noted).
TCGA_SITE_ORGAN: dict[str, str] = {
    "A7": "Breast", "AR": "Breast", "E2": "Breast",      # TCGA-BRCA
    "21": "Lung", "50": "Lung",                          # TCGA-LUSC / LUAD
    "B0": "Kidney",                                      # TCGA-KIRC
    "CH": "Prostate", "G9": "Prostate",                  # TCGA-PRAD
    "NH": "Bowel",                                       # TCGA-COAD
}

_IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


# ----------------------------------------------------------------------------- representation
@dataclass
class AnnotatedImage:
    """One manually annotated image, whatever its source.

    Attributes
    ----------
    name
        Image name (file stem), unique within a set.
    image
        ``(H, W, 3)`` uint8 RGB.
    inst
        ``(H, W)`` int32 instance map, 0 = background; ids need not be contiguous.
    type
        ``(H, W)`` uint8 class map in stlib ids (0 background, 1..5, 254 epithelial of unknown
        malignancy, 255 unknown class) or ``None`` when the source has no classes.
    um_per_px
        Pixel size (µm); from the file, or the source's nominal value (then ``notes`` says so).
    organ
        HEST-style organ name (``"Breast"``, ``"Bowel"``, ...) or ``None``.
    source
        ``"monuseg"``, ``"consep"``, ``"pannuke"``, ``"folder"``, ``"geojson"``.
    path
        The annotation file (or folder) read.
    notes
        What the reader changed or assumed.
    """

    name: str
    image: np.ndarray
    inst: np.ndarray
    type: np.ndarray | None
    um_per_px: float
    organ: str | None
    source: str
    path: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)``."""
        return tuple(self.inst.shape[:2])  # type: ignore[return-value]

    @property
    def n_nuclei(self) -> int:
        """Number of instances."""
        return int(np.unique(self.inst[self.inst > 0]).size)

    def nucleus_classes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, classes)``: sorted instance ids and the majority class of each (255 without types)."""
        ids = np.unique(self.inst[self.inst > 0])
        if self.type is None or ids.size == 0:
            return ids, np.full(ids.size, IGNORE, np.uint8)
        lut = np.zeros(int(ids.max()) + 1, np.int64)
        lut[ids] = np.arange(ids.size)
        sel = self.inst > 0
        k = lut[self.inst[sel]]
        t = self.type[sel].astype(np.int64)
        counts = np.zeros((ids.size, 256), np.int64)
        np.add.at(counts, (k, t), 1)
        counts[:, 0] = 0
        return ids, counts.argmax(axis=1).astype(np.uint8)

    def crop(self, y0: int, x0: int, h: int, w: int, *, name: str | None = None) -> AnnotatedImage:
        """A rectangular part (ids kept)."""
        sl = (slice(y0, y0 + h), slice(x0, x0 + w))
        return replace(self, name=name or f"{self.name}_{y0}_{x0}", image=self.image[sl].copy(),
                       inst=self.inst[sl].copy(), type=None if self.type is None else self.type[sl].copy(),
                       notes=list(self.notes))

    def check(self) -> AnnotatedImage:
        """Validate shapes and dtypes; raise :class:`InputError` naming the file."""
        img, inst = np.asarray(self.image), np.asarray(self.inst)
        if img.ndim != 3 or img.shape[2] != 3:
            raise InputError(f"image must be RGB (H, W, 3), got shape {img.shape}", path=self.path or self.name)
        if inst.shape != img.shape[:2]:
            raise InputError(f"image is {img.shape[1]}x{img.shape[0]} px but its instance map is "
                             f"{inst.shape[1]}x{inst.shape[0]}", path=self.path or self.name,
                             fix="pair each image with the annotation of the same image (same size)")
        if self.type is not None and np.shape(self.type) != inst.shape:
            raise InputError(f"class map {np.shape(self.type)} and instance map {inst.shape} differ in size",
                             path=self.path or self.name)
        if not (self.um_per_px and float(self.um_per_px) > 0):
            raise InputError(f"pixel size must be > 0, got {self.um_per_px}", path=self.path or self.name,
                             fix="pass um_per_px")
        return self


def organ_from_tcga_name(name: str) -> str | None:
    """Organ of a TCGA image name (``TCGA-A7-A13E-...`` -> ``"Breast"``), ``None`` if unknown."""
    m = re.match(r"TCGA-([A-Z0-9]{2})-", str(name).upper())
    return TCGA_SITE_ORGAN.get(m.group(1)) if m else None


def map_classes(values: np.ndarray, source: str, *, path: str | os.PathLike = "") -> np.ndarray:
    """Source class ids -> stlib class ids with :data:`stlib.constants.SOURCE_CLASS_MAPS`.

    0 stays background. A value the table does not know raises :class:`InputError` naming the
    file (a class scheme mix-up must not pass silently).
    """
    table = SOURCE_CLASS_MAPS[source]
    v = np.asarray(values).astype(np.int64)
    lut = np.full(max(int(v.max(initial=0)), max(table, default=0)) + 1, -1, np.int64)
    lut[0] = 0
    for k, c in table.items():
        lut[k] = c
    bad = np.unique(v[(v < 0) | (lut[np.clip(v, 0, None)] < 0)])
    if bad.size:
        raise InputError(f"class id(s) {bad.tolist()} are not in the {source} class table {sorted(table)}",
                         path=path, fix="check which class scheme the file uses (see stlib.constants.SOURCE_CLASS_MAPS)")
    return lut[v].astype(np.uint8)


# ----------------------------------------------------------------------------- polygons <-> maps
def rasterize_polygons(polygons: Sequence[np.ndarray], shape: tuple[int, int], *,
                       classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Instance (and class) map of polygons given as ``(k, 2)`` arrays of ``(x, y)``.

    Instance ``i + 1`` is polygon ``i``. Overlaps: the smaller polygon wins (drawn last), as in
    :mod:`stlib.labels.masks`. A polygon that covers no pixel centre gets no pixels.

    Returns
    -------
    inst, type, n_empty
        int32 map, uint8 class map (``None`` without ``classes``) and the number of polygons
        that drew nothing.
    """
    from skimage.draw import polygon as fill

    h, w = shape
    inst = np.zeros((h, w), np.int32)
    typ = np.zeros((h, w), np.uint8) if classes is not None else None
    areas = np.array([_ring_area(p) for p in polygons]) if len(polygons) else np.zeros(0)
    empty = 0
    for i in np.argsort(-areas, kind="stable"):
        p = np.asarray(polygons[i], float)
        rr, cc = fill(p[:, 1] - 0.5, p[:, 0] - 0.5, shape=(h, w))
        if rr.size == 0:
            empty += 1
            continue
        inst[rr, cc] = i + 1
        if typ is not None:
            typ[rr, cc] = int(classes[i])
    return inst, typ, empty


def _ring_area(p: np.ndarray) -> float:
    p = np.asarray(p, float)
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def instance_polygons(inst: np.ndarray, *, ids: Iterable[int] | None = None) -> dict[int, np.ndarray]:
    """Outline of each instance as a closed ``(k, 2)`` ring of ``(x, y)`` (pixel-centre frame).

    The outline is the 0.5 iso-line of the instance mask (:func:`skimage.measure.find_contours`),
    so rasterising it again (centre rule) gives back the mask up to single pixels on thin
    necks. An instance made of several pieces keeps its largest piece.
    """
    from scipy import ndimage as ndi
    from skimage.measure import find_contours

    inst = np.asarray(inst)
    want = None if ids is None else set(int(i) for i in ids)
    out: dict[int, np.ndarray] = {}
    objs = ndi.find_objects(inst.astype(np.int64, copy=False) if inst.dtype.kind != "i" else inst)
    for k, sl in enumerate(objs):
        i = k + 1
        if sl is None or (want is not None and i not in want):
            continue
        m = np.pad(inst[sl] == i, 1)
        contours = find_contours(m.astype(np.float32), 0.5)
        if not contours:
            continue
        ring = max(contours, key=lambda c: _ring_area(c))
        y = ring[:, 0] - 1 + sl[0].start + 0.5
        x = ring[:, 1] - 1 + sl[1].start + 0.5
        xy = np.stack([x, y], axis=1)
        if not np.allclose(xy[0], xy[-1]):
            xy = np.vstack([xy, xy[:1]])
        out[i] = xy
    return out


# ----------------------------------------------------------------------------- images
def _read_image(path: Path) -> np.ndarray:
    """RGB uint8 of a PNG/JPEG/TIFF (alpha dropped, grey expanded)."""
    if not path.is_file():
        raise InputError("image not found", path=path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            a = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - any decoder error is a bad file for the user
        raise InputError(f"cannot read image: {e}", path=path) from e
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] < 3:
        raise InputError(f"expected an RGB image, got shape {a.shape}", path=path)
    a = a[..., :3]
    if a.dtype != np.uint8:
        if a.dtype.kind in "ui" and a.max(initial=0) <= 255:
            a = a.astype(np.uint8)
        else:
            raise InputError(f"expected 8-bit RGB, got {a.dtype}", path=path, fix="convert the image to 8-bit RGB")
    return np.ascontiguousarray(a)


def _image_um_per_px(path: Path) -> float | None:
    """Pixel size from a TIFF's resolution tags (or an OME/ImageJ description), else ``None``."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        from stlib.io.wsi import open_wsi

        with open_wsi(path) as w:
            return None if w.um_per_px is None else float(w.um_per_px)
    except InputError:
        return None


def _open_text(path: Path) -> bytes:
    if not path.is_file():
        raise InputError("annotation file not found", path=path)
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if path.suffix == ".xz" or raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    return raw


# ----------------------------------------------------------------------------- MoNuSeg / Aperio XML
def read_monuseg_xml(path: str | os.PathLike) -> tuple[list[np.ndarray], float | None, list[str]]:
    """Polygons of an Aperio ImageScope XML (MoNuSeg's annotation format).

    Parameters
    ----------
    path
        ``NAME.xml`` (or ``NAME.xml.gz`` / ``.xml.xz``).

    Returns
    -------
    polygons, um_per_px, notes
        One ``(k, 2)`` ``(x, y)`` array per usable region (document order), the
        ``MicronsPerPixel`` of the root element (``None`` when absent) and notes (regions
        skipped because they have fewer than three distinct vertices).

    Raises
    ------
    InputError
        Not XML, no ``<Region>`` at all, or a region whose vertex coordinates are missing or
        not finite numbers (the message names the file and the region id).
    """
    path = Path(path)
    try:
        root = ET.fromstring(_open_text(path))
    except ET.ParseError as e:
        raise InputError(f"not valid XML ({e})", path=path, fix="re-export the annotation from ImageScope") from e
    um = None
    mpp = root.attrib.get("MicronsPerPixel")
    if mpp not in (None, ""):
        try:
            um = float(mpp)
        except ValueError:
            raise InputError(f"MicronsPerPixel={mpp!r} is not a number", path=path) from None
        if not (math.isfinite(um) and um > 0):
            um = None
    regions = root.findall(".//Region")
    if not regions:
        raise InputError("no <Region> element: not an Aperio/MoNuSeg nucleus annotation", path=path)
    polys: list[np.ndarray] = []
    few = 0
    for reg in regions:
        rid = reg.attrib.get("Id", "?")
        verts = reg.findall("./Vertices/Vertex")
        try:
            xy = np.array([[float(v.attrib["X"]), float(v.attrib["Y"])] for v in verts], float).reshape(-1, 2)
        except (KeyError, ValueError) as e:
            raise InputError(f"region Id={rid} has a vertex without a numeric X/Y ({e!r})", path=path,
                             fix="repair or delete that region in the XML") from None
        if not np.isfinite(xy).all():
            raise InputError(f"region Id={rid} has a non-finite vertex coordinate", path=path,
                             fix="repair or delete that region in the XML")
        if len(np.unique(xy, axis=0)) < 3:
            few += 1
            continue
        polys.append(xy)
    notes = []
    if few:
        notes.append(f"{few} region(s) with fewer than 3 distinct vertices skipped")
    return polys, um, notes


def read_monuseg(image_path: str | os.PathLike, xml_path: str | os.PathLike, *, organ: str | None = None,
                 um_per_px: float | None = None) -> AnnotatedImage:
    """One MoNuSeg image with its XML outlines as an :class:`AnnotatedImage` (no classes).

    The pixel size comes from ``um_per_px``, else the XML's ``MicronsPerPixel``, else the
    image's TIFF tags, else MoNuSeg's nominal 40x value (noted). The organ comes from
    ``organ`` or the TCGA site code of the name. Overlapping outlines: the smaller wins.
    """
    image_path, xml_path = Path(image_path), Path(xml_path)
    polys, um_xml, notes = read_monuseg_xml(xml_path)
    img = _read_image(image_path)
    h, w = img.shape[:2]
    inst, _, n_empty = rasterize_polygons(polys, (h, w))
    if n_empty:
        notes.append(f"{n_empty} region(s) cover no pixel centre")
    out_of = sum(1 for p in polys if p[:, 0].min() >= w or p[:, 1].min() >= h or p.max() < 0)
    if out_of > max(5, 0.2 * len(polys)):
        raise InputError(f"{out_of} of {len(polys)} regions lie outside the {w}x{h} image {image_path.name}",
                         path=xml_path, fix="pair the XML with the image it annotates")
    um = um_per_px or um_xml or _image_um_per_px(image_path)
    if um is None:
        um = NOMINAL_UM_PER_PX["monuseg"]
        notes.append(f"no pixel size in the XML or image: nominal 40x ({um} µm/px) assumed")
    name = _stem(xml_path)
    organ = organ or organ_from_tcga_name(name)
    return AnnotatedImage(name=name, image=img, inst=inst, type=None, um_per_px=float(um), organ=organ,
                          source="monuseg", path=str(xml_path), notes=notes).check()


def _stem(p: Path) -> str:
    name = p.name
    for suf in (".xml.gz", ".xml.xz", ".ome.tiff", ".ome.tif", ".npy.gz"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return p.stem


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in (*_IMAGE_EXTS, *(e.upper() for e in _IMAGE_EXTS)):
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def read_monuseg_folder(root: str | os.PathLike, *, names: Sequence[str] | None = None,
                        organs: Mapping[str, str] | None = None) -> list[AnnotatedImage]:
    """Every image of a MoNuSeg-layout folder (``images/`` + ``annotations/*.xml[.gz]``).

    ``names`` restricts to those image names; ``organs`` overrides organs by name.
    """
    root = Path(root)
    ann_dir, img_dir = root / "annotations", root / "images"
    if not ann_dir.is_dir() or not img_dir.is_dir():
        raise InputError("not a MoNuSeg-layout folder (needs images/ and annotations/)", path=root)
    xmls = sorted(p for p in ann_dir.iterdir() if re.search(r"\.xml(\.gz|\.xz)?$", p.name, re.I))
    out = []
    for x in xmls:
        stem = _stem(x)
        if names is not None and stem not in set(names):
            continue
        img = _find_image(img_dir, stem)
        if img is None:
            raise InputError(f"no image for annotation {x.name}", path=img_dir, fix=f"add images/{stem}.tif")
        out.append(read_monuseg(img, x, organ=(organs or {}).get(stem)))
    if names is not None:
        missing = sorted(set(names) - {a.name for a in out})
        if missing:
            raise InputError(f"image(s) {missing} not found", path=root)
    return out


# ----------------------------------------------------------------------------- CoNSeP
def _loadmat(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError("label file not found", path=path)
    try:
        from scipy.io import loadmat

        return loadmat(path)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read .mat file: {e}", path=path) from e


def _load_inst(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError("instance map not found", path=path)
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                key = "inst" if "inst" in z else (z.files[0] if z.files else None)
                if key is None:
                    raise InputError("npz holds no array", path=path)
                a = np.asarray(z[key])
        elif path.suffix == ".npy":
            a = np.load(path)
        else:
            a = _read_label_image(path)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read instance map: {e}", path=path) from e
    if a.ndim == 3 and a.shape[2] >= 1:
        a = a[..., 0]
    if a.ndim != 2 or a.dtype.kind not in "uif":
        raise InputError(f"instance map must be a 2-D integer array, got {a.dtype} {a.shape}", path=path)
    if a.dtype.kind == "f":
        if not np.all(np.equal(np.mod(a, 1), 0)):
            raise InputError("instance map holds non-integer values", path=path)
    if a.min(initial=0) < 0:
        raise InputError("instance map has negative ids", path=path)
    return a.astype(np.int32)


def _read_label_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _types_from_list(inst: np.ndarray, inst_type: np.ndarray, source: str, path: Path) -> np.ndarray:
    """Class map from per-instance classes listed in the order of the sorted instance ids."""
    ids = np.unique(inst[inst > 0])
    t = np.asarray(inst_type).reshape(-1)
    if t.size != ids.size:
        raise InputError(f"inst_type lists {t.size} classes but the instance map has {ids.size} nuclei",
                         path=path, fix="pair the .mat with the instance map of the same patch")
    cls = map_classes(t, source, path=path)
    lut = np.zeros(int(inst.max(initial=0)) + 1, np.uint8)
    lut[ids] = cls
    return lut[inst]


def read_consep_patch(image_path: str | os.PathLike, inst_path: str | os.PathLike,
                      mat_path: str | os.PathLike | None, *, um_per_px: float | None = None,
                      organ: str = "Bowel") -> AnnotatedImage:
    """One CoNSeP patch of the HoVer-Net export (JPEG + instance ``.npy`` + ``type_mat`` ``.mat``).

    ``inst_type`` (merged classes 1 other, 2 inflammatory, 3 epithelial, 4 spindle) gives the
    class of each nucleus in sorted-id order; ``mat_path=None`` reads instances only.

    Raises
    ------
    InputError
        A ``.mat`` without ``inst_type``, an ``inst_type`` of another length than the nuclei of
        the instance map, an image of another size than its instance map.
    """
    image_path, inst_path = Path(image_path), Path(inst_path)
    img = _read_image(image_path)
    inst = _load_inst(inst_path)
    if inst.shape != img.shape[:2]:
        raise InputError(f"image {image_path.name} is {img.shape[1]}x{img.shape[0]} px but the instance map "
                         f"{inst_path.name} is {inst.shape[1]}x{inst.shape[0]}", path=image_path,
                         fix="pair each image with the instance map of the same patch")
    typ = None
    notes: list[str] = []
    if mat_path is not None:
        mat_path = Path(mat_path)
        m = _loadmat(mat_path)
        if "inst_type" not in m:
            raise InputError(f"no 'inst_type' in the .mat (keys: {sorted(k for k in m if not k.startswith('__'))})",
                             path=mat_path, fix="use the type_mat file of the HoVer-Net CoNSeP export, or pass "
                                                "mat_path=None to read instances only")
        typ = _types_from_list(inst, m["inst_type"], "consep", mat_path)
    if um_per_px is None:
        um_per_px = NOMINAL_UM_PER_PX["consep"]
        notes.append(f"CoNSeP files carry no pixel size: nominal 40x ({um_per_px} µm/px)")
    return AnnotatedImage(name=inst_path.stem, image=img, inst=inst, type=typ, um_per_px=float(um_per_px),
                          organ=organ, source="consep", path=str(inst_path), notes=notes).check()


#: CoNSeP export: 16 patches of 256 px per 1000 px image; patch k's (row, col) in a 4 x 4 grid
#: whose last row/column starts at 1000 - 256 = 744 (checked on all 27 training images: the
#: instance maps agree wherever patches overlap).
_CONSEP_GRID = [(k // 3, k % 3) for k in range(9)] + [(3, c) for c in range(3)] + [(r, 3) for r in range(3)] + [(3, 3)]


def consep_patch_origin(k: int, *, image_px: int = 1000, patch_px: int = 256) -> tuple[int, int]:
    """``(y0, x0)`` of patch number ``k`` (0..15) in its full CoNSeP image."""
    if not 0 <= k < 16:
        raise ValueError(f"CoNSeP patch number must be in 0..15, got {k}")
    starts = [0, patch_px, 2 * patch_px, image_px - patch_px]
    r, c = _CONSEP_GRID[k]
    return starts[r], starts[c]


def assemble_consep(patches: Sequence[AnnotatedImage], *, image_px: int = 1000) -> AnnotatedImage:
    """Put the 16 patches ``NAME_000`` ... ``NAME_015`` of one CoNSeP image back together.

    Instance ids are those of the full image, so nuclei cut by patch borders become whole
    again. Where patches overlap (the last row and column) the first patch's pixels stay; the
    instance maps are checked to agree there (they do on the real export).
    """
    if len(patches) != 16:
        raise InputError(f"a CoNSeP image has 16 patches, got {len(patches)}",
                         path=patches[0].path if patches else "")
    by_k = {}
    for p in patches:
        m = re.search(r"_(\d{3})$", p.name)
        if not m:
            raise InputError(f"patch name {p.name!r} does not end in _NNN", path=p.path)
        by_k[int(m.group(1))] = p
    if sorted(by_k) != list(range(16)):
        raise InputError(f"patches {sorted(by_k)} are not 000..015", path=patches[0].path)
    ps = patches[0].image.shape[0]
    img = np.zeros((image_px, image_px, 3), np.uint8)
    inst = np.full((image_px, image_px), -1, np.int64)
    typed = all(p.type is not None for p in patches)
    typ = np.zeros((image_px, image_px), np.uint8) if typed else None
    for k in range(16):
        p = by_k[k]
        y, x = consep_patch_origin(k, image_px=image_px, patch_px=ps)
        sl = (slice(y, y + ps), slice(x, x + ps))
        region = inst[sl]
        new = region < 0
        if (~new).any() and np.mean(region[~new] == p.inst[~new]) < 0.99:
            raise InputError(f"patch {p.name} does not match its neighbours where they overlap", path=p.path,
                             fix="the patches are not in the layout of the HoVer-Net CoNSeP export")
        region[new] = p.inst[new]
        img[sl][new] = p.image[new]
        if typ is not None:
            typ[sl][new] = p.type[new]
    base = re.sub(r"_\d{3}$", "", patches[0].name)
    notes = sorted({n for p in patches for n in p.notes})
    notes.append("assembled from 16 patches of 256 px")
    return AnnotatedImage(name=base, image=img, inst=inst.astype(np.int32), type=typ,
                          um_per_px=patches[0].um_per_px, organ=patches[0].organ, source="consep",
                          path=str(Path(patches[0].path).parent), notes=notes).check()


def read_consep_patches(root: str | os.PathLike, *, assemble: bool = True, images: Sequence[str] | None = None,
                        um_per_px: float | None = None) -> list[AnnotatedImage]:
    """A CoNSeP patch export (``images/*.jpg``, ``inst/*.npy|npz``, ``type_mat/*.mat``).

    Parameters
    ----------
    root
        The folder holding ``images/``, ``inst/`` and (optionally) ``type_mat/``.
    assemble
        Return one 1000 x 1000 image per original image (:func:`assemble_consep`) instead of
        the 256 px patches. Images whose 16 patches are not all present stay as patches.
    images
        Original image names to read (e.g. ``["train_1", "train_7"]``); default all.
    """
    root = Path(root)
    if not (root / "images").is_dir() or not (root / "inst").is_dir():
        raise InputError("not a CoNSeP patch folder (needs images/ and inst/)", path=root)
    insts = sorted(p for p in (root / "inst").iterdir() if p.suffix in (".npy", ".npz"))
    groups: dict[str, list[Path]] = {}
    for p in insts:
        groups.setdefault(re.sub(r"_\d{3}$", "", p.stem), []).append(p)
    if images is not None:
        missing = sorted(set(images) - set(groups))
        if missing:
            raise InputError(f"image(s) {missing} not in the patch folder", path=root)
        groups = {k: v for k, v in groups.items() if k in set(images)}
    out = []
    for base in sorted(groups, key=_natural):
        patches = []
        for ip in groups[base]:
            img = _find_image(root / "images", ip.stem)
            if img is None:
                raise InputError(f"no image for {ip.name}", path=root / "images")
            mat = root / "type_mat" / f"{ip.stem}.mat"
            patches.append(read_consep_patch(img, ip, mat if mat.is_file() else None, um_per_px=um_per_px))
        if assemble and len(patches) == 16:
            out.append(assemble_consep(patches))
        else:
            out.extend(patches)
    return out


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def read_consep_mat(image_path: str | os.PathLike, mat_path: str | os.PathLike, *,
                    classes: str = "original", um_per_px: float | None = None,
                    organ: str = "Bowel") -> AnnotatedImage:
    """CoNSeP's own label file: ``.mat`` with ``inst_map`` (and ``type_map`` / ``inst_type``).

    Parameters
    ----------
    classes
        ``"original"`` (CoNSeP's 7 classes: healthy and malignant epithelium apart) or
        ``"merged"`` (HoVer-Net's 4). Values outside the chosen table raise an error naming the
        file instead of being mapped wrongly.
    """
    image_path, mat_path = Path(image_path), Path(mat_path)
    if classes not in ("original", "merged"):
        raise ValueError(f"classes must be 'original' or 'merged', got {classes!r}")
    m = _loadmat(mat_path)
    if "inst_map" not in m:
        raise InputError(f"no 'inst_map' in the .mat (keys: {sorted(k for k in m if not k.startswith('__'))})",
                         path=mat_path, fix="for the patch export use read_consep_patch (inst/*.npy + type_mat)")
    inst = np.asarray(m["inst_map"])
    if inst.ndim != 2:
        raise InputError(f"inst_map must be 2-D, got {inst.shape}", path=mat_path)
    inst = inst.astype(np.int32)
    img = _read_image(image_path)
    if inst.shape != img.shape[:2]:
        raise InputError(f"image {image_path.name} is {img.shape[1]}x{img.shape[0]} px but inst_map is "
                         f"{inst.shape[1]}x{inst.shape[0]}", path=mat_path,
                         fix="pair each image with the label file of the same image")
    source = "consep_original" if classes == "original" else "consep"
    notes = []
    if "type_map" in m:
        typ = map_classes(np.asarray(m["type_map"]), source, path=mat_path)
        typ[inst == 0] = 0
        # every pixel of a nucleus gets its nucleus's class: class holes inside nuclei are rare
        # in the release; a nucleus pixel with type 0 would otherwise be background for NT
        if np.any((inst > 0) & (typ == 0)):
            notes.append("nucleus pixels with class 0 set to unknown (255)")
            typ[(inst > 0) & (typ == 0)] = IGNORE
    elif "inst_type" in m:
        typ = _types_from_list(inst, m["inst_type"], source, mat_path)
    else:
        raise InputError("neither 'type_map' nor 'inst_type' in the .mat", path=mat_path,
                         fix="use read_instance_folder for instance-only labels")
    if um_per_px is None:
        um_per_px = NOMINAL_UM_PER_PX["consep"]
        notes.append(f"CoNSeP files carry no pixel size: nominal 40x ({um_per_px} µm/px)")
    return AnnotatedImage(name=_stem(image_path), image=img, inst=inst, type=typ, um_per_px=float(um_per_px),
                          organ=organ, source="consep", path=str(mat_path), notes=notes).check()


# ----------------------------------------------------------------------------- PanNuke
def read_pannuke(pannuke_dir: str | os.PathLike, fold: int, *, indices: Sequence[int] | None = None,
                 um_per_px: float | None = None) -> list[AnnotatedImage]:
    """PanNuke images of one fold (:func:`stlib.io.pannuke.read_fold`) as annotated images.

    Organ = PanNuke's tissue name; classes come from the mask channels.
    """
    from stlib.io.pannuke import images_uint8, masks_to_inst_type, read_fold

    fd = read_fold(pannuke_dir, fold)
    idx = np.arange(len(fd)) if indices is None else np.asarray(indices, int)
    um = float(um_per_px or NOMINAL_UM_PER_PX["pannuke"])
    out = []
    for i in idx:
        img = images_uint8(np.asarray(fd.images[int(i)]))
        inst, typ = masks_to_inst_type(np.asarray(fd.masks[int(i)]))
        out.append(AnnotatedImage(name=f"pannuke_fold{fold}_{int(i):05d}", image=img, inst=inst, type=typ,
                                  um_per_px=um, organ=str(fd.types[int(i)]), source="pannuke",
                                  path=str(fd.paths.get("masks", pannuke_dir)),
                                  notes=[] if um_per_px else [f"PanNuke nominal 40x ({um} µm/px)"]))
    return out


# ----------------------------------------------------------------------------- instance folders
def _tissue_table(folder: Path) -> dict[str, str]:
    p = folder / "tissue.csv"
    if not p.is_file():
        return {}
    import pandas as pd

    t = pd.read_csv(p)
    if not {"name", "tissue"} <= set(t.columns):
        raise InputError("tissue.csv needs columns name,tissue", path=p)
    return dict(zip(t["name"].astype(str), t["tissue"].astype(str)))


def read_instance_folder(folder: str | os.PathLike, *, um_per_px: float | None = None,
                         source: str = "folder") -> list[AnnotatedImage]:
    """A folder of instance maps with their images.

    Two layouts: (1) flat: ``NAME.npz`` with ``inst`` (and optionally ``type``, ``image``,
    ``um_per_px``) and the image as ``NAME.png``/``.tif``/``.jpg`` unless inside the npz;
    (2) ``images/NAME.*`` with ``masks/`` (or ``inst/``, ``labels/``) ``NAME.*`` instance
    maps (16-bit PNG, TIFF, ``.npy``, ``.npz``) and optionally ``types/NAME.*`` class maps in
    stlib ids. ``tissue.csv`` (``name,tissue``) gives organs. The pixel size comes from
    ``um_per_px``, the npz, the image's TIFF tags, else it is an error (no guessing).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("folder not found", path=folder)
    tissues = _tissue_table(folder)
    out: list[AnnotatedImage] = []
    npzs = sorted(folder.glob("*.npz"))
    if npzs:
        for f in npzs:
            with np.load(f) as z:
                if "inst" not in z:
                    raise InputError("npz has no 'inst' array", path=f, fix="save the instance map as `inst`")
                inst = _load_inst(f)
                typ = np.asarray(z["type"]).astype(np.uint8) if "type" in z else None
                img = np.asarray(z["image"]).astype(np.uint8) if "image" in z else None
                um = float(z["um_per_px"]) if "um_per_px" in z else None
            ipath = None
            if img is None:
                ipath = _find_image(folder, f.stem)
                if ipath is None:
                    raise InputError("no image for this annotation", path=f, fix=f"add {f.stem}.png or an `image` array")
                img = _read_image(ipath)
            out.append(_folder_item(f.stem, img, inst, typ, um_per_px or um or (ipath and _image_um_per_px(ipath)),
                                    tissues, f, source))
        return out
    mask_dir = next((folder / d for d in ("masks", "inst", "labels") if (folder / d).is_dir()), None)
    if not (folder / "images").is_dir() or mask_dir is None:
        raise InputError("no NAME.npz files and no images/ + masks/ folders", path=folder,
                         fix="use NAME.npz (+ NAME.png) or images/ and masks/ with the same names")
    for ip in sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in _IMAGE_EXTS):
        mp = next((mask_dir / f"{ip.stem}{e}" for e in (".png", ".tif", ".tiff", ".npy", ".npz")
                   if (mask_dir / f"{ip.stem}{e}").is_file()), None)
        if mp is None:
            raise InputError(f"no instance map for image {ip.name}", path=mask_dir)
        img = _read_image(ip)
        inst = _load_inst(mp)
        typ = None
        tdir = folder / "types"
        if tdir.is_dir():
            tp = next((tdir / f"{ip.stem}{e}" for e in (".png", ".tif", ".npy", ".npz") if (tdir / f"{ip.stem}{e}").is_file()),
                      None)
            if tp is not None:
                typ = _load_inst(tp).astype(np.uint8)
        if inst.shape != img.shape[:2]:
            raise InputError(f"image {ip.name} is {img.shape[1]}x{img.shape[0]} px but its instance map "
                             f"{mp.name} is {inst.shape[1]}x{inst.shape[0]}", path=mp)
        out.append(_folder_item(ip.stem, img, inst, typ, um_per_px or _image_um_per_px(ip), tissues, mp, source))
    if not out:
        raise InputError("no image found in images/", path=folder)
    return out


def _folder_item(name: str, img: np.ndarray, inst: np.ndarray, typ: np.ndarray | None, um: float | None,
                 tissues: Mapping[str, str], path: Path, source: str) -> AnnotatedImage:
    if inst.shape != img.shape[:2]:
        raise InputError(f"image is {img.shape[1]}x{img.shape[0]} px but the instance map is "
                         f"{inst.shape[1]}x{inst.shape[0]}", path=path)
    if not um:
        raise InputError("pixel size unknown", path=path,
                         fix="pass um_per_px, store `um_per_px` in the npz, or use TIFF images with resolution tags")
    return AnnotatedImage(name=name, image=img, inst=inst, type=typ, um_per_px=float(um),
                          organ=tissues.get(name), source=source, path=str(path)).check()


def write_instance_folder(images: Iterable[AnnotatedImage], folder: str | os.PathLike, *,
                          with_image: bool = False) -> Path:
    """Write ``NAME.npz`` (``inst``, ``type`` when known, ``um_per_px``), ``NAME.png`` and ``tissue.csv``.

    The folder is what ``stlib metrics --true`` reads and what :func:`read_instance_folder` and
    :func:`stlib.evaluate.load_instance_folder` read back; the PNGs are inputs for
    ``stlib infer --um-per-px``. ``with_image`` also stores the image inside the npz.
    """
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for a in images:
        a.check()
        arrays: dict[str, Any] = {"inst": a.inst.astype(np.int32), "um_per_px": np.float64(a.um_per_px)}
        if a.type is not None:
            arrays["type"] = a.type.astype(np.uint8)
        if with_image:
            arrays["image"] = a.image
        with atomic_path(folder / f"{a.name}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)
        with atomic_path(folder / f"{a.name}.png") as tmp:
            Image.fromarray(a.image).save(tmp, format="PNG")
        rows.append(f"{a.name},{a.organ or 'unknown'}")
    with atomic_path(folder / "tissue.csv") as tmp:
        tmp.write_text("name,tissue\n" + "\n".join(rows) + "\n")
    return folder


# ----------------------------------------------------------------------------- QuPath GeoJSON
def geojson_feature(ring: np.ndarray, *, class_id: int | None = None, class_label: str | None = None,
                    measurements: Mapping[str, float] | None = None, object_type: str = "detection",
                    decimals: int = 2) -> dict[str, Any]:
    """One QuPath feature: a Polygon (level-0 px), its classification and measurements.

    ``class_id`` sets the name (unless ``class_label``) and colour from :mod:`stlib.constants`;
    ``None`` writes no classification.
    """
    props: dict[str, Any] = {"objectType": object_type}
    if class_id is not None:
        color = CLASS_COLORS.get(int(class_id), CLASS_COLORS[IGNORE])
        props["classification"] = {"name": class_label or _safe_class_name(int(class_id)),
                                   "color": [int(v) for v in color]}
    if measurements:
        props["measurements"] = dict(measurements)
    return {"type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [np.round(np.asarray(ring, float), decimals).tolist()]},
            "properties": props}


def _safe_class_name(cid: int) -> str:
    try:
        return class_name(cid)
    except ValueError:
        return f"class {cid}"


def geojson_features_of(annotated: AnnotatedImage) -> Iterator[dict[str, Any]]:
    """Features of every nucleus of an annotated image (outlines from :func:`instance_polygons`)."""
    ids, cls = annotated.nucleus_classes()
    rings = instance_polygons(annotated.inst)
    for i, c in zip(ids.tolist(), cls.tolist()):
        if i in rings:
            yield geojson_feature(rings[i], class_id=None if annotated.type is None else int(c),
                                  measurements={"id": int(i)})


def write_geojson(path: str | os.PathLike, features: Iterable[Mapping[str, Any]] | AnnotatedImage) -> Path:
    """Write a QuPath FeatureCollection (one feature per line, atomically)."""
    if isinstance(features, AnnotatedImage):
        features = geojson_features_of(features)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write('{"type": "FeatureCollection", "features": [\n')
            for i, feat in enumerate(features):
                f.write((",\n" if i else "") + json.dumps(feat, separators=(",", ":")))
            f.write("\n]}\n")
    return path


_NAME_TO_ID = {v.lower(): k for k, v in CLASS_NAMES.items() if k != 0}
_NAME_TO_ID.update({"ignore": IGNORE, class_name(EPITHELIAL_ANY).lower(): EPITHELIAL_ANY})


def read_geojson(path: str | os.PathLike) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Polygons of a QuPath GeoJSON (FeatureCollection, a list of features, or one feature).

    Returns
    -------
    polygons, classes, names
        Exterior rings ``(k, 2)`` in the file's coordinates (a MultiPolygon gives its largest
        part), the stlib class of each (from ``classification.name`` or ``class_name``,
        matched case-insensitively to :data:`stlib.constants.CLASS_NAMES`; others 255) and the
        raw names. Non-polygon features (points, lines) are skipped.
    """
    path = Path(path)
    try:
        doc = json.loads(_open_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"not valid JSON ({e})", path=path) from e
    feats = doc.get("features") if isinstance(doc, dict) and doc.get("type") == "FeatureCollection" else doc
    if isinstance(feats, dict):
        feats = [feats]
    if not isinstance(feats, list):
        raise InputError("expected a GeoJSON FeatureCollection or a list of features", path=path)
    polys, classes, names = [], [], []
    for k, f in enumerate(feats):
        g = (f or {}).get("geometry") or {}
        coords = g.get("coordinates")
        if g.get("type") == "Polygon":
            rings = [coords[0]] if coords else []
        elif g.get("type") == "MultiPolygon":
            rings = [max((p[0] for p in coords if p), key=lambda r: _ring_area(np.asarray(r, float)))] if coords else []
        else:
            continue
        if not rings:
            continue
        try:
            ring = np.asarray(rings[0], float).reshape(-1, 2)
        except (TypeError, ValueError):
            raise InputError(f"feature {k} has malformed polygon coordinates", path=path) from None
        if not np.isfinite(ring).all():
            raise InputError(f"feature {k} has a non-finite coordinate", path=path)
        if len(np.unique(ring, axis=0)) < 3:
            continue
        props = f.get("properties") or {}
        cl = props.get("classification") or {}
        name = cl.get("name") if isinstance(cl, dict) else None
        name = name or props.get("class_name") or props.get("name") or ""
        polys.append(ring)
        names.append(str(name))
        classes.append(_NAME_TO_ID.get(str(name).strip().lower(), IGNORE))
    return polys, np.asarray(classes, np.uint8), names


def read_geojson_annotation(image_path: str | os.PathLike, geojson_path: str | os.PathLike, *,
                            um_per_px: float | None = None, organ: str | None = None) -> AnnotatedImage:
    """An image with QuPath GeoJSON nucleus outlines (level-0 px of that image) as an annotated image."""
    image_path = Path(image_path)
    img = _read_image(image_path)
    polys, classes, _ = read_geojson(geojson_path)
    inst, typ, n_empty = rasterize_polygons(polys, img.shape[:2], classes=classes)
    notes = [f"{n_empty} outline(s) cover no pixel centre"] if n_empty else []
    has_classes = bool(len(classes)) and bool(np.any(classes != IGNORE))
    um = um_per_px or _image_um_per_px(image_path)
    if not um:
        raise InputError("pixel size unknown", path=image_path, fix="pass um_per_px (e.g. 0.25 for 40x)")
    return AnnotatedImage(name=_stem(image_path), image=img, inst=inst, type=typ if has_classes else None,
                          um_per_px=float(um), organ=organ, source="geojson", path=str(geojson_path),
                          notes=notes).check()


# ----------------------------------------------------------------------------- dispatcher
def detect_layout(path: str | os.PathLike) -> str:
    """Which reader a folder needs: ``monuseg``, ``consep_patches``, ``consep_mat``, ``consep_archive``
    (the official archive unpacked: ``CoNSeP/Train|Test/Images|Labels``), ``pannuke``, ``folder``."""
    p = Path(path)
    if not p.is_dir():
        raise InputError("annotation folder not found", path=p)
    if (p / "annotations").is_dir() and (p / "images").is_dir():
        return "monuseg"
    if (p / "inst").is_dir() and (p / "images").is_dir() and (p / "type_mat").is_dir():
        return "consep_patches"
    if (p / "Labels").is_dir() and (p / "Images").is_dir():
        return "consep_mat"
    if _consep_splits(p):
        return "consep_archive"
    if any(re.fullmatch(r"[Ff]old[ _]?\d+", c.name) for c in p.iterdir() if c.is_dir()):
        return "pannuke"
    return "folder"


def _consep_splits(p: Path) -> list[Path]:
    """The ``Train`` / ``Test`` folders (with ``Images`` and ``Labels``) of an unpacked CoNSeP archive."""
    root = p / "CoNSeP" if (p / "CoNSeP").is_dir() else p
    return [root / s for s in ("Train", "Test") if (root / s / "Labels").is_dir() and (root / s / "Images").is_dir()]


def _read_consep_mat_folder(p: Path, *, um_per_px: float | None = None, **kwargs: Any) -> list[AnnotatedImage]:
    """Every ``Labels/*.mat`` of a CoNSeP split with its image from ``Images/``."""
    out = []
    for mat in sorted((p / "Labels").glob("*.mat"), key=lambda q: _natural(q.stem)):
        img = _find_image(p / "Images", mat.stem)
        if img is None:
            raise InputError(f"no image for {mat.name}", path=p / "Images")
        out.append(read_consep_mat(img, mat, um_per_px=um_per_px, **kwargs))
    return out


def read_annotations(path: str | os.PathLike, *, um_per_px: float | None = None, **kwargs: Any) -> list[AnnotatedImage]:
    """Read any supported annotated set by its layout (:func:`detect_layout`).

    ``kwargs`` go to the layout's reader (e.g. ``names=`` for MoNuSeg, ``images=`` for the
    CoNSeP patch export, ``fold=`` for PanNuke, ``classes=`` for CoNSeP ``.mat`` labels).
    """
    kind = detect_layout(path)
    p = Path(path)
    if kind == "monuseg":
        return read_monuseg_folder(p, **kwargs)
    if kind == "consep_patches":
        return read_consep_patches(p, um_per_px=um_per_px, **kwargs)
    if kind == "consep_mat":
        return _read_consep_mat_folder(p, um_per_px=um_per_px, **kwargs)
    if kind == "consep_archive":  # what `stlib download consep` unpacks: every split, in order
        return [a for split in _consep_splits(p) for a in _read_consep_mat_folder(split, um_per_px=um_per_px, **kwargs)]
    if kind == "pannuke":
        fold = int(kwargs.pop("fold", 1))
        return read_pannuke(p, fold, um_per_px=um_per_px, **kwargs)
    return read_instance_folder(p, um_per_px=um_per_px, **kwargs)
