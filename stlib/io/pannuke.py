"""Reader for the PanNuke dataset (3 folds, 19 tissues, 256x256 px at 40x, about 0.25 µm/px).

Official layout (as the zip files unpack)::

    {pannuke_dir}/Fold {k}/images/fold{k}/images.npy   (N, 256, 256, 3) float64 0..255
    {pannuke_dir}/Fold {k}/images/fold{k}/types.npy    (N,) tissue names
    {pannuke_dir}/Fold {k}/masks/fold{k}/masks.npy     (N, 256, 256, 6) instance ids per channel

Mask channels: Neoplastic, Inflammatory, Connective, Dead, Epithelial, Background
(:data:`stlib.constants.PANNUKE_CHANNELS`). Instance ids are unique only *within* a channel of
an image: :func:`masks_to_inst_type` makes them unique per image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stlib.constants import PANNUKE_CHANNEL_TO_CLASS, PANNUKE_CHANNELS, TARGET_UM_PER_PX_40X
from stlib.utils import InputError

__all__ = ["PanNukeFold", "images_uint8", "list_folds", "masks_to_inst_type", "pannuke_to_store", "read_fold"]

_N_CLASS_CHANNELS = len(PANNUKE_CHANNEL_TO_CLASS)  # 5 nucleus channels; channel 5 = background


def _fold_dirs(root: Path, fold: int) -> list[tuple[Path, Path]]:
    """Candidate (images folder, masks folder) pairs for a fold, official layout first."""
    k = int(fold)
    cands = []
    for top in (f"Fold {k}", f"Fold{k}", f"fold{k}", f"fold_{k}", f"Fold_{k}"):
        base = root / top
        cands += [(base / "images" / f"fold{k}", base / "masks" / f"fold{k}"),
                  (base / "images", base / "masks"), (base, base)]
    return cands


def list_folds(pannuke_dir: str | os.PathLike) -> list[int]:
    """Fold numbers present under ``pannuke_dir`` (those with an ``images.npy``), sorted."""
    root = Path(pannuke_dir)
    if not root.is_dir():
        return []
    found = set()
    for child in root.iterdir():
        m = re.fullmatch(r"[Ff]old[ _]?(\d+)", child.name)
        if m and child.is_dir():
            k = int(m.group(1))
            if any((i / "images.npy").is_file() for i, _ in _fold_dirs(root, k)):
                found.add(k)
    return sorted(found)


@dataclass
class PanNukeFold:
    """One PanNuke fold; arrays are memory-mapped read-only (``np.load(mmap_mode="r")``).

    Attributes
    ----------
    fold
        Fold number (1..3).
    images
        ``(N, H, W, 3)`` as shipped (float64 0..255 in the official release); see
        :func:`images_uint8`.
    masks
        ``(N, H, W, 6)`` instance ids per channel (see :data:`stlib.constants.PANNUKE_CHANNELS`).
    types
        ``(N,)`` tissue name per image (str).
    paths
        The files read.
    """

    fold: int
    images: np.ndarray
    masks: np.ndarray
    types: np.ndarray
    paths: dict[str, Path] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"PanNukeFold(fold={self.fold}, n={len(self)}, tissues={len(self.tissues())})"

    def tissues(self) -> pd.Series:
        """Number of images per tissue, sorted by tissue name."""
        return pd.Series(self.types).value_counts().sort_index().rename("n_images")

    def indices(self, tissue: str) -> np.ndarray:
        """Image indices of one tissue."""
        return np.flatnonzero(self.types == tissue)

    def inst_type(self, index: int | slice | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(inst, type)`` maps of the selected images; see :func:`masks_to_inst_type`."""
        m = self.masks[index]
        return masks_to_inst_type(np.asarray(m))

    def image_uint8(self, index: int | slice | np.ndarray) -> np.ndarray:
        """The selected images as uint8 RGB."""
        return images_uint8(np.asarray(self.images[index]))


def read_fold(pannuke_dir: str | os.PathLike, fold: int, *, mmap: bool = True) -> PanNukeFold:
    """Open one PanNuke fold.

    Parameters
    ----------
    pannuke_dir
        Folder holding ``Fold {k}/`` (the unpacked ``fold_{k}.zip``).
    fold
        1, 2 or 3.
    mmap
        Memory-map the arrays (random access without loading 4 GB per fold).

    Returns
    -------
    :class:`PanNukeFold`.
    """
    root = Path(pannuke_dir)
    if not root.is_dir():
        raise InputError("PanNuke folder not found", path=root,
                         fix="download fold_1.zip .. fold_3.zip (see data_manifest.yaml) and unzip them here")
    for img_dir, mask_dir in _fold_dirs(root, fold):
        if (img_dir / "images.npy").is_file():
            break
    else:
        raise InputError(f"PanNuke fold {fold} not found (expected 'Fold {fold}/images/fold{fold}/images.npy')",
                         path=root, fix=f"download fold_{fold}.zip and unzip it into {root}")
    paths = {"images": img_dir / "images.npy", "types": img_dir / "types.npy", "masks": mask_dir / "masks.npy"}
    if not paths["types"].is_file() and (mask_dir / "types.npy").is_file():
        paths["types"] = mask_dir / "types.npy"
    for key, p in paths.items():
        if not p.is_file():
            raise InputError(f"PanNuke fold {fold}: {key}.npy missing", path=p,
                             fix=f"unzip fold_{fold}.zip completely")
    mode = "r" if mmap else None
    try:
        images = np.load(paths["images"], mmap_mode=mode)
        masks = np.load(paths["masks"], mmap_mode=mode)
        types = np.load(paths["types"], allow_pickle=True)
    except (ValueError, OSError) as e:
        raise InputError(f"cannot load PanNuke fold {fold} ({e})", path=img_dir,
                         fix=f"the .npy files are corrupt or truncated: unzip fold_{fold}.zip again") from e
    types = np.asarray(types).astype(str)
    n = images.shape[0]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"images.npy has shape {images.shape}, expected (N, H, W, 3)", path=paths["images"],
                         fix="use the official PanNuke release")
    if masks.ndim != 4 or masks.shape[-1] != len(PANNUKE_CHANNELS) or masks.shape[:3] != images.shape[:3]:
        raise InputError(f"masks.npy has shape {masks.shape}, images {images.shape}: expected (N, H, W, 6) "
                         "matching the images", path=paths["masks"], fix="use the official PanNuke release")
    if types.shape != (n,):
        raise InputError(f"types.npy has shape {types.shape}, expected ({n},)", path=paths["types"],
                         fix="use the official PanNuke release")
    return PanNukeFold(fold=int(fold), images=images, masks=masks, types=types, paths=paths)


def masks_to_inst_type(masks: np.ndarray, *, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Turn PanNuke 6-channel masks into one instance map and one type map per image.

    Ids of channels 0-4 are per channel in PanNuke (two nuclei of different classes may share
    an id); here each (channel, id) pair becomes its own instance, numbered ``1..k`` per image
    in (channel, id) order. A pixel claimed by several channels goes to the **last** of them,
    the rule of PanNuke's own evaluation code (``binarize`` in TissueImageAnalytics/PanNuke-metrics
    paints the channels in order, each over the previous), so the truth of the tile store and of
    :mod:`stlib.metrics` is the same. The background channel (5) is ignored. The one PanNuke
    mask converter of stlib (:mod:`stlib.metrics` uses it for (H, W, 6) inputs).

    Parameters
    ----------
    masks
        ``(N, H, W, 6)`` or ``(H, W, 6)`` (any numeric dtype; a memmap is read ``chunk``
        images at a time).
    chunk
        Images processed per vectorised step.

    Returns
    -------
    inst
        ``int32`` ``(N, H, W)`` (or ``(H, W)``), 0 = background.
    type
        ``uint8`` same shape: stlib classes (1 Neoplastic .. 5 Epithelial, 0 background).
    """
    masks = np.asarray(masks) if not isinstance(masks, np.memmap) else masks
    single = masks.ndim == 3
    if single:
        masks = masks[None]
    if masks.ndim != 4 or masks.shape[-1] < _N_CLASS_CHANNELS:
        raise ValueError(f"masks must be (N, H, W, 6) or (H, W, 6), got {masks.shape}")
    n, h, w = masks.shape[:3]
    inst = np.zeros((n, h, w), np.int32)
    typ = np.zeros((n, h, w), np.uint8)
    class_of_channel = np.array([PANNUKE_CHANNEL_TO_CLASS[c] for c in range(_N_CLASS_CHANNELS)], np.uint8)
    for s in range(0, n, chunk):
        m = np.asarray(masks[s:s + chunk, ..., :_N_CLASS_CHANNELS])
        ids = np.rint(m).astype(np.int64)
        ids[ids < 0] = 0
        fg = ids > 0
        any_fg = fg.any(axis=-1)
        ch = _N_CLASS_CHANNELS - 1 - np.argmax(fg[..., ::-1], axis=-1)  # last channel with a nucleus
        v = np.take_along_axis(ids, ch[..., None], axis=-1)[..., 0]
        span = int(ids.max()) + 1
        b = m.shape[0]
        img = np.broadcast_to(np.arange(b, dtype=np.int64)[:, None, None], (b, h, w))
        key = (img * _N_CLASS_CHANNELS + ch) * span + v
        keys = key[any_fg]
        uniq, inv = np.unique(keys, return_inverse=True)
        img_of_uniq = uniq // (_N_CLASS_CHANNELS * span)
        start = np.searchsorted(img_of_uniq, np.arange(b))
        local = inv.ravel() - start[img_of_uniq[inv.ravel()]] + 1
        out_inst = np.zeros((b, h, w), np.int32)
        out_inst[any_fg] = local.astype(np.int32)
        out_typ = np.zeros((b, h, w), np.uint8)
        out_typ[any_fg] = class_of_channel[ch[any_fg]]
        inst[s:s + b] = out_inst
        typ[s:s + b] = out_typ
    if single:
        return inst[0], typ[0]
    return inst, typ


def images_uint8(images: np.ndarray, *, chunk: int = 256) -> np.ndarray:
    """PanNuke images as ``uint8`` RGB (rounded and clipped; ``[0, 1]`` floats are scaled by 255).

    Parameters
    ----------
    images
        ``(N, H, W, 3)`` or ``(H, W, 3)``; float (0..255 as shipped, or 0..1) or integer.
    chunk
        Images converted per step (keeps memory low on a memmap).
    """
    if images.dtype == np.uint8:
        return np.asarray(images)
    out = np.empty(images.shape, np.uint8)
    lead = images.shape[0] if images.ndim == 4 else 1
    if images.ndim != 4:
        a = np.asarray(images, np.float64)
        return _to_u8(a, a.max(initial=0) <= 1.0 and images.dtype.kind == "f")
    unit = images.dtype.kind == "f" and all(
        float(np.max(images[s:s + chunk], initial=0)) <= 1.0 for s in range(0, lead, chunk))
    for s in range(0, lead, chunk):
        out[s:s + chunk] = _to_u8(np.asarray(images[s:s + chunk], np.float64), unit)
    return out


def _to_u8(a: np.ndarray, unit: bool) -> np.ndarray:
    if unit:
        a = a * 255.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def pannuke_to_store(pannuke_dir: str | os.PathLike, out: str | os.PathLike, *,
                     folds: Sequence[int] | None = None, um_per_px: float = TARGET_UM_PER_PX_40X, chunk: int = 64,
                     exclude_tissues: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Convert PanNuke folds into a tile store (DEVELOPING.md), split ``fold{k}`` per fold.

    Manual labels are complete and certain: ``conf`` is 255 on every nucleus and ``ignore`` is
    0 everywhere; the tissue name is the ``organ`` column and ``sample`` is ``pannuke_fold{k}``.
    ``tile_id`` is ``pannuke_fold{k}_{index}`` with the image's index in its fold, so a tile of
    a restricted store names the same PanNuke image as in the full one.

    Idempotent: an existing store built from the same files with the same folds, exclusions and
    resolution (``build_key`` in its ``store.json``) is kept; any other is rebuilt. ``overwrite``
    rebuilds regardless.

    Parameters
    ----------
    pannuke_dir
        Folder with ``Fold 1/``, ``Fold 2/``, ``Fold 3/`` in the official layout.
    out
        The store folder to write.
    folds
        Folds to convert (default: all present).
    um_per_px
        Resolution recorded for the tiles (PanNuke is 40x, about 0.25 µm/px).
    exclude_tissues
        PanNuke tissue names (``types.npy``) whose images are left out: the baseline "without
        the held-out organs" (tissues from :meth:`stlib.io.manifest.Manifest.pannuke_tissues`).
        ``store.json`` records them under ``exclude_tissues``. A name that occurs in none of the
        folds is an error (a typo would silently restrict nothing).
    """
    import hashlib
    import json

    from stlib.io.tiles import TileStoreWriter
    from stlib.utils import progress, read_json

    out = Path(out)
    folds = list(folds) if folds else list_folds(pannuke_dir)
    if not folds:
        raise InputError("no PanNuke fold found", path=pannuke_dir,
                         fix="download with `stlib download pannuke --out DIR` or point data_dir at a PanNuke copy")
    data = [read_fold(pannuke_dir, k) for k in folds]
    excluded = sorted({str(t) for t in exclude_tissues})
    present = set().union(*(set(fd.types.tolist()) for fd in data))
    unknown = [t for t in excluded if t not in present]
    if unknown:
        raise InputError(f"tissue(s) {unknown} to exclude occur in no PanNuke fold (tissues: {sorted(present)})",
                         path=pannuke_dir, fix="use PanNuke's types.npy names (data_manifest.yaml pannuke.tissues_of_organ)")
    files = {f"fold{fd.fold}/{k}": [p.stat().st_size, p.stat().st_mtime_ns] for fd in data for k, p in fd.paths.items()}
    key = hashlib.sha256(json.dumps({"folds": folds, "exclude_tissues": excluded, "um_per_px": float(um_per_px),
                                     "files": files, "version": 2}, sort_keys=True).encode()).hexdigest()
    if (out / "store.json").is_file() and not overwrite and read_json(out / "store.json").get("build_key") == key:
        return out
    tile_px = int(data[0].images.shape[1])
    kept_tissues: set[str] = set()
    with TileStoreWriter(out, tile_px=tile_px, um_per_px=um_per_px, source="pannuke", overwrite=True) as w:
        for fd in data:
            keep = np.flatnonzero(~np.isin(fd.types, excluded))
            for s in progress(range(0, len(keep), chunk), desc=f"PanNuke fold {fd.fold} -> tiles"):
                idx = keep[s:s + chunk]
                imgs = images_uint8(np.asarray(fd.images[idx]))
                inst, typ = masks_to_inst_type(np.asarray(fd.masks[idx]))
                for j, i in enumerate(idx):
                    conf = np.where(inst[j] > 0, 255, 0).astype(np.uint8)
                    kept_tissues.add(str(fd.types[i]))
                    w.add(image=imgs[j], inst=inst[j], type=typ[j], conf=conf, sample=f"pannuke_fold{fd.fold}",
                          organ=str(fd.types[i]), x0=0.0, y0=0.0, split=f"fold{fd.fold}",
                          tile_id=f"pannuke_fold{fd.fold}_{int(i):05d}")
        w.close(extra={"build_key": key, "folds": [int(k) for k in folds], "exclude_tissues": excluded,
                       "tissues": sorted(kept_tissues)})
    return out
