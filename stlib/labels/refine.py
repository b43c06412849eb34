"""H&E-guided refinement of ST-derived nucleus masks (the outlines of the training labels).

Xenium nuclei are segmented on DAPI, on a different section plane and stain, then warped
onto the H&E by a registration with a residual. Their outlines are therefore a little too large,
a little shifted and jittered relative to the haematoxylin-stained nucleus the network sees
(on the demo cohort: median IoU about 0.75 with the true H&E nucleus). A network trained on them
learns those outlines. This module moves each rasterised ST nucleus onto the haematoxylin
boundary of *its own* nucleus in the H&E tile, keeping the ST identity and class:

1. haematoxylin optical density by colour deconvolution (:func:`skimage.color.rgb2hed`,
   Ruifrok & Johnston), lightly smoothed;
2. per nucleus, a half-contrast threshold between the median haematoxylin of its core (the ST
   mask eroded by ``core_um``) and of a ring just outside the zone it may grow into
   (``grow_um`` beyond its ST outline): the boundary sits where the stain is halfway between
   nucleus and surroundings, so the threshold adapts to pale and dark nuclei and to the stain
   of each slide (no global Otsu level);
3. a marker-controlled watershed on the haematoxylin gradient (markers: the cores; background:
   everything farther than ``grow_um`` from any ST nucleus) decides which nucleus owns a pixel
   where neighbours compete; a pixel is kept if it is above its owner's threshold;
4. per nucleus, holes are filled, a one-pixel opening removes spurs and only the component on
   its core is kept;
5. guards: a nucleus whose refined area falls below ``min_keep`` or grows beyond ``max_grow``
   times its ST area keeps its ST outline (the image disagrees too much to trust the snap); a
   nucleus with no haematoxylin contrast at all (below ``min_rel_contrast`` of the tile's
   median nucleus contrast, or below an absolute floor) is a DAPI nucleus not seen in the H&E (another plane, a fold) and
   becomes ``ignore``: it is neither taught as a nucleus nor as background;
6. optionally (``unmatched_ignore``), the reverse case: an H&E nucleus without an ST nucleus (one
   the DAPI layer missed) becomes ``ignore`` rather than background (:func:`unmatched_nuclei`,
   on the same haematoxylin image).

The watershed, the colour deconvolution and the label statistics come from scikit-image and
scipy; what is written here is only the per-nucleus composition, which no library offers
(CellPose/StarDist segment from scratch; they do not snap a given instance set to an image).

Pixels already ``ignore`` (excluded regions, outside the imaged area) are left alone, and the
per-pixel class and confidence follow the refined instance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from stlib.config import RefineConfig

__all__ = ["RefineConfig", "RefineStats", "haematoxylin", "refine_instances", "refine_instances_reference",
           "refine_label_maps", "tile_haematoxylin", "unmatched_nuclei"]


@dataclass
class RefineStats:
    """What the refinement did (summable over tiles with ``+``).

    ``n``: nuclei seen; ``refined``: outline moved to the H&E boundary; ``kept_st``: guard kept
    the ST outline; ``not_visible``: no H&E contrast, set to ignore; ``area_st`` /
    ``area_refined``: pixel areas of the refined nuclei before and after; ``unmatched`` /
    ``unmatched_px``: H&E nuclei without an ST nucleus set to ignore (:func:`unmatched_nuclei`)
    and their pixels.
    """

    n: int = 0
    refined: int = 0
    kept_st: int = 0
    not_visible: int = 0
    area_st: int = 0
    area_refined: int = 0
    unmatched: int = 0
    unmatched_px: int = 0

    def __add__(self, other: RefineStats) -> RefineStats:
        return RefineStats(self.n + other.n, self.refined + other.refined, self.kept_st + other.kept_st,
                           self.not_visible + other.not_visible, self.area_st + other.area_st,
                           self.area_refined + other.area_refined, self.unmatched + other.unmatched,
                           self.unmatched_px + other.unmatched_px)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["area_ratio"] = d["area_refined"] / d["area_st"] if d["area_st"] else float("nan")
        return d


def haematoxylin(image: np.ndarray, *, smooth_px: float = 0.0) -> np.ndarray:
    """Haematoxylin optical density of an RGB uint8 image (:func:`stlib.align.haematoxylin_od`), smoothed."""
    from stlib.align import haematoxylin_od

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {img.shape}")
    h = haematoxylin_od(img)
    return ndi.gaussian_filter(h, smooth_px) if smooth_px > 0 else h


def _same_label_interior(inst: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbours carry the same label (so touching instances erode apart)."""
    m = inst > 0
    m[1:] &= inst[1:] == inst[:-1]
    m[:-1] &= inst[:-1] == inst[1:]
    m[:, 1:] &= inst[:, 1:] == inst[:, :-1]
    m[:, :-1] &= inst[:, :-1] == inst[:, 1:]
    return m


def _label_median(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Median of ``values`` per label 0..n (NaN for a label without pixels)."""
    cnt = np.bincount(labels.ravel(), minlength=n + 1)[: n + 1]
    med = np.full(n + 1, np.nan)
    have = np.flatnonzero(cnt[1:] > 0) + 1
    if have.size:
        med[have] = ndi.median(values, labels, have)
    return med


def _clean(lab: np.ndarray, core: np.ndarray) -> np.ndarray:
    """Per label: fill holes, open by one pixel, keep the component on the label's core."""
    out = np.zeros_like(lab)
    for i, sl in enumerate(ndi.find_objects(lab), 1):
        if sl is None:
            continue
        m = ndi.binary_fill_holes(lab[sl] == i)
        opened = ndi.binary_opening(m)
        if opened.any():  # thin slivers at tile borders would vanish entirely: keep them unopened
            m = opened
        cc, k = ndi.label(m)
        if k == 0:
            continue
        hits = np.bincount(cc[core[sl] == i], minlength=k + 1)
        hits[0] = 0
        keep = int(hits.argmax()) if hits.max() > 0 else int(np.bincount(cc.ravel())[1:].argmax() + 1)
        sub = out[sl]
        sub[(cc == keep) & (sub == 0)] = i
    return out


def _local_ids(inst: np.ndarray, *, fast: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """``ids, local = np.unique(inst, return_inverse=True)`` with 0 kept as background; ``n`` nuclei.

    The fast form sorts the values of the runs of equal pixels along rows instead of all
    pixels (the same result: nuclei are runs of tens of pixels).
    """
    if fast and inst.ndim == 2 and inst.size and inst.dtype.kind in "iu":
        from stlib.labels import _refine_kernels as K

        return K.local_ids(inst)  # the lines below, compiled (the same arrays; tested)
    if fast:
        flat = inst.ravel()
        starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
        ids, inv = np.unique(flat[starts], return_inverse=True)
        local = np.repeat(inv.astype(np.int32), np.diff(np.append(starts, flat.size))).reshape(inst.shape)
    else:
        ids, local = np.unique(inst, return_inverse=True)
        local = local.reshape(inst.shape).astype(np.int32)
    if ids[0] != 0:  # no background in the tile: shift so that local 0 stays background
        ids = np.concatenate([[0], ids])
        local += 1
    return ids, local, ids.size - 1


@lru_cache(maxsize=8)
def _kernel_constants(smooth_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from stlib.labels import _refine_kernels as K

    lut, hcol = K.hed_lut()
    w = K.gaussian_weights(smooth_px) if smooth_px > 0 else np.ones(1)
    return lut, hcol, w


def refine_instances(image: np.ndarray, inst: np.ndarray, *, um_per_px: float,
                     config: RefineConfig | None = None, h: np.ndarray | None = None,
                     ) -> tuple[np.ndarray, np.ndarray, RefineStats]:
    """Snap the instances ``inst`` to the haematoxylin boundaries of ``image``.

    The steps are those of the module docstring; they run as compiled kernels
    (:mod:`stlib.labels._refine_kernels`) that give the same result as the scikit-image / scipy
    composition :func:`refine_instances_reference` and release the GIL, so tiles can be refined
    in threads.

    Parameters
    ----------
    image
        (H, W, 3) RGB uint8 H&E tile.
    inst
        (H, W) instance ids (any non-negative ints, 0 = background), e.g. rasterised ST nuclei.
    um_per_px
        Resolution of the tile.
    config
        :class:`RefineConfig` (defaults when omitted).
    h
        The tile's smoothed haematoxylin (:func:`tile_haematoxylin`) when the caller already has
        it (:func:`refine_label_maps` with ``unmatched_ignore``); computed here otherwise.

    Returns
    -------
    refined
        (H, W) instance map with the *same ids* (a nucleus may lose or gain pixels, none is
        created; not-visible nuclei are removed from it).
    not_visible
        (H, W) bool, the ST pixels of nuclei without H&E contrast (callers set them ``ignore``).
    stats
        :class:`RefineStats`.
    """
    from stlib.labels import _refine_kernels as K

    cfg = config or RefineConfig()
    if not um_per_px > 0:
        raise ValueError(f"um_per_px must be positive, got {um_per_px}")
    inst = np.asarray(inst)
    img = np.asarray(image)
    if inst.ndim != 2 or img.shape[:2] != inst.shape:
        raise ValueError(f"inst {inst.shape} and image {img.shape} must share (H, W)")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {img.shape}")
    ids, local, n = _local_ids(inst)
    if n == 0:
        return inst.copy(), np.zeros(inst.shape, bool), RefineStats()
    interior = K.same_label_interior(local)
    if interior.all() or img.dtype != np.uint8:  # no pixel to measure a distance to / not RGB uint8
        return refine_instances_reference(image, inst, um_per_px=um_per_px, config=config)

    lut, hcol, w = _kernel_constants(float(cfg.smooth_um / um_per_px))
    r = max(1.0, cfg.grow_um / um_per_px)
    rc = max(1.0, cfg.core_um / um_per_px)
    rr = max(1.0, cfg.ring_um / um_per_px)
    if h is None:
        h = K.haematoxylin_smoothed(np.ascontiguousarray(img), lut, hcol, w)
    near, ring, outside, core = K.zones(local, interior, n, r, rr, rc)
    # the medians, contrasts, visibility and thresholds of refine_instances_reference, compiled
    thr, not_vis = K.thresholds(h, core, ring, outside, n, float(cfg.edge_fraction), float(cfg.min_rel_contrast),
                                float(cfg.min_contrast_od))
    out = K.segment(h, local, near, core, thr, n)
    keep_st, drop, st = K.guards(local, out, not_vis, n, float(cfg.min_keep), float(cfg.max_grow))  # _guards, compiled
    stats = RefineStats(*(int(v) for v in st))
    res, not_visible = K.guarded(local, out, keep_st, drop, ids.astype(inst.dtype, copy=False), not_vis)
    return res, not_visible, stats


def _guards(a0: np.ndarray, a1: np.ndarray, not_vis: np.ndarray, cfg: RefineConfig,
            ) -> tuple[np.ndarray, np.ndarray, RefineStats]:
    """Labels whose refined area is implausible keep their ST outline; with the not-visible
    ones they are dropped from the refined map. Returns ``keep_st``, ``drop`` and the stats."""
    keep_st = ((a1 < cfg.min_keep * a0) | (a1 > cfg.max_grow * a0)) & ~not_vis
    keep_st[0] = False
    drop = keep_st | not_vis
    refined_ids = ~drop
    refined_ids[0] = False
    stats = RefineStats(n=a0.size - 1, refined=int(refined_ids.sum()), kept_st=int(keep_st.sum()),
                        not_visible=int(not_vis.sum()), area_st=int(a0[refined_ids].sum()),
                        area_refined=int(a1[refined_ids].sum()))
    return keep_st, drop, stats


def refine_instances_reference(image: np.ndarray, inst: np.ndarray, *, um_per_px: float,
                               config: RefineConfig | None = None,
                               ) -> tuple[np.ndarray, np.ndarray, RefineStats]:
    """:func:`refine_instances` composed of scikit-image / scipy calls, as first written.

    The straightforward implementation the compiled path is tested against (same outputs) and
    timed against (``stlib bench refine`` / ``stlib bench derive``); about 10-20x slower.
    """
    cfg = config or RefineConfig()
    if not um_per_px > 0:
        raise ValueError(f"um_per_px must be positive, got {um_per_px}")
    inst = np.asarray(inst)
    if inst.ndim != 2 or np.asarray(image).shape[:2] != inst.shape:
        raise ValueError(f"inst {inst.shape} and image {np.asarray(image).shape} must share (H, W)")
    ids, local, n = _local_ids(inst, fast=False)
    if n == 0:
        return inst.copy(), np.zeros(inst.shape, bool), RefineStats()

    h = haematoxylin(image, smooth_px=cfg.smooth_um / um_per_px)
    r = max(1.0, cfg.grow_um / um_per_px)
    rc = max(1.0, cfg.core_um / um_per_px)
    rr = max(1.0, cfg.ring_um / um_per_px)

    dist, (iy, ix) = ndi.distance_transform_edt(local == 0, return_indices=True)
    owner = local[iy, ix]
    near = np.where(dist <= r, owner, 0)
    ring = np.where((dist > r) & (dist <= r + rr), owner, 0)
    core = np.where(ndi.distance_transform_edt(_same_label_interior(local)) > rc, local, 0)
    has_core = np.zeros(n + 1, bool)
    has_core[np.unique(core)] = True
    thin = (local > 0) & ~has_core[local]
    core[thin] = local[thin]  # nuclei thinner than the erosion: their whole mask is the core

    thr, not_vis = _thresholds_numpy(h, core, ring, (owner == 0) | (dist > r), n, cfg)
    above = h > thr[near]

    from skimage.filters import sobel
    from skimage.segmentation import watershed

    markers = core.copy()
    markers[near == 0] = n + 1
    owner_ws = watershed(sobel(h), markers)
    owner_ws[owner_ws == n + 1] = 0
    own = (owner_ws > 0) & ((owner_ws == near) | (owner_ws == local))
    out = np.where(above & own, owner_ws, 0)
    out = _clean(out, core)

    return _finish(ids, local, out, not_vis, cfg, inst.dtype)


def _thresholds_numpy(h: np.ndarray, core: np.ndarray, ring: np.ndarray, outside: np.ndarray, n: int,
                      cfg: RefineConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-nucleus edge threshold and "not visible" flag (numpy form; ``K.thresholds`` compiles it).

    The nucleus level is the median haematoxylin of its core, the background that of its ring (the
    tile's ``outside`` pixels where a nucleus has no ring); a nucleus whose contrast is below the
    floor (absolute, or relative to the tile's median contrast) is not visible.
    """
    fg = _label_median(h, core, n)
    bg = _label_median(h, ring, n)
    outs = h[outside]
    tile_bg = float(np.median(outs)) if outs.size else float(np.nanmin(fg[1:]))
    bg = np.where(np.isfinite(bg), bg, tile_bg)
    contrast = fg - bg
    ref_contrast = float(np.nanmedian(contrast[1:]))
    floor = cfg.min_contrast_od
    if np.isfinite(ref_contrast) and ref_contrast > 0:
        floor = max(floor, cfg.min_rel_contrast * ref_contrast)
    not_vis = ~(contrast >= floor)
    not_vis[0] = False
    thr = bg + cfg.edge_fraction * contrast
    thr[0] = np.inf
    return thr, not_vis


def _finish(ids: np.ndarray, local: np.ndarray, out: np.ndarray, not_vis: np.ndarray, cfg: RefineConfig,
            dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, RefineStats]:
    """Guards (keep the ST outline / not visible), global ids and statistics (numpy form)."""
    n = ids.size - 1
    a0 = np.bincount(local.ravel(), minlength=n + 1).astype(float)
    a1 = np.bincount(out.ravel(), minlength=n + 1).astype(float)
    keep_st, drop, stats = _guards(a0, a1, not_vis, cfg)
    res = np.where(drop[out], 0, out)
    back = keep_st[local] & (res == 0)
    res[back] = local[back]
    return ids[res].astype(dtype, copy=False), not_vis[local], stats


def refine_label_maps(image: np.ndarray, inst: np.ndarray, type_map: np.ndarray, ignore: np.ndarray,
                      conf: np.ndarray, *, um_per_px: float, config: RefineConfig | None = None,
                      reference: bool = False,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, RefineStats]:
    """:func:`refine_instances` on a tile's label maps; class and confidence follow the instance.

    ``ignore`` pixels are never changed (an excluded region stays excluded and its nuclei are
    left as rasterised); nuclei not visible in the H&E are added to ``ignore``, and with
    ``config.unmatched_ignore`` so are H&E nuclei that no ST nucleus covers
    (:func:`unmatched_nuclei`, on the haematoxylin image the refinement computes anyway). Returns
    ``(inst, type, ignore, conf, stats)`` as new arrays. ``reference=True`` runs
    :func:`refine_instances_reference` instead (same result, slower; for tests and benchmarks).
    """
    inst = np.asarray(inst)
    cfg = config or RefineConfig()
    if not reference and inst.ndim == 2 and np.shape(ignore) == inst.shape:
        from stlib.labels import _refine_kernels as K

        ign, work = K.unignored(inst, np.asarray(ignore))  # the two lines below, compiled
    else:
        ign = np.asarray(ignore).astype(bool)
        work = np.where(ign, 0, inst)
    # the haematoxylin of the unmatched-nuclei step is the refinement's own (computed once here);
    # without an ST nucleus in the tile that step has no nucleus level to compare with, so none
    h = tile_haematoxylin(image, um_per_px=um_per_px, config=cfg, reference=reference) \
        if cfg.unmatched_ignore and work.any() else None
    if reference:
        refined, not_vis, stats = refine_instances_reference(image, work, um_per_px=um_per_px, config=config)
    else:
        refined, not_vis, stats = refine_instances(image, work, um_per_px=um_per_px, config=config, h=h)
    tm, cm = np.asarray(type_map), np.asarray(conf)
    if not reference and inst.ndim == 2 and refined.dtype == inst.dtype and tm.dtype == cm.dtype == np.uint8:
        from stlib.labels import _refine_kernels as K

        # the numpy lines below in one compiled pass (the same arrays; tested)
        maps = K.follow_instances(inst, refined, ign, not_vis, tm, cm)
        return (*maps, _ignore_unmatched(h, maps[0], maps[2], stats, um_per_px, cfg))
    # per-instance class and confidence, read from the ST maps (constant over an instance)
    if reference:
        ids, pos = np.unique(inst, return_index=True)
    else:  # the same, from the runs of equal pixels
        flat = inst.ravel()
        starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
        ids, first = np.unique(flat[starts], return_index=True)
        pos = starts[first]
    cls = tm.ravel()[pos]
    cf = cm.ravel()[pos]
    new_inst = np.where(ign, inst, refined).astype(inst.dtype, copy=False)
    k = np.searchsorted(ids, new_inst)
    new_type = np.where(new_inst > 0, cls[k], 0).astype(np.uint8)
    new_conf = np.where(new_inst > 0, cf[k], 0).astype(np.uint8)
    new_ignore = (ign | not_vis).astype(np.uint8)
    new_type[not_vis] = 0
    new_conf[not_vis] = 0
    stats = _ignore_unmatched(h, new_inst, new_ignore, stats, um_per_px, cfg)
    return new_inst, new_type, new_ignore, new_conf, stats


# --------------------------------------------------------------------------------------
# H&E nuclei without an ST nucleus: ignore, not background
# --------------------------------------------------------------------------------------

def tile_haematoxylin(image: np.ndarray, *, um_per_px: float, config: RefineConfig | None = None,
                      reference: bool = False) -> np.ndarray:
    """The smoothed haematoxylin of a tile exactly as :func:`refine_instances` computes it.

    float32 (H, W): the compiled colour deconvolution and Gaussian of the refinement for an RGB
    uint8 tile, :func:`haematoxylin` (scikit-image / scipy, the same values) otherwise or with
    ``reference``. Sigma: ``config.smooth_um`` in pixels.
    """
    cfg = config or RefineConfig()
    if not um_per_px > 0:
        raise ValueError(f"um_per_px must be positive, got {um_per_px}")
    img = np.asarray(image)
    smooth_px = float(cfg.smooth_um / um_per_px)
    if reference or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        return haematoxylin(img, smooth_px=smooth_px).astype(np.float32, copy=False)
    from stlib.labels import _refine_kernels as K

    lut, hcol, w = _kernel_constants(smooth_px)
    return K.haematoxylin_smoothed(np.ascontiguousarray(img), lut, hcol, w)


def unmatched_nuclei(h: np.ndarray, inst: np.ndarray, ignore: np.ndarray, *, um_per_px: float,
                     config: RefineConfig | None = None) -> tuple[np.ndarray, int]:
    """H&E nuclei that no ST nucleus covers: dark, nucleus-sized haematoxylin blobs off the ST masks.

    A nucleus the Xenium DAPI segmentation missed (out of the section plane, too faint, merged
    away) is still a nucleus in the H&E. Left as background in the ST-derived training maps, it
    teaches the network to miss nuclei; set to ``ignore`` it teaches nothing either way. Only the
    H&E is used (on real data it is all there is):

    1. the tile's nucleus level is the median haematoxylin over its ST nucleus pixels and its
       background level the median over its other, not-ignored pixels (sampled once per µm);
    2. candidates are pixels above ``background + unmatched_edge_fraction * (nucleus - background)``
       that are neither in an ST nucleus nor ``ignore`` (the half-contrast edge of the refinement,
       measured on the tile's typical nucleus instead of each nucleus);
    3. a connected candidate blob (4-connectivity) of ``unmatched_min_um2`` to
       ``unmatched_max_um2`` µm² is an unmatched nucleus. Smaller blobs are noise or the rim of an
       ST nucleus, larger ones stroma or clumps that are not judged.

    A blob is never part of an ST nucleus (those pixels are excluded in step 2), so nuclei that the
    ST layer covers keep their labels. The connected components come from :func:`scipy.ndimage.label`.

    Parameters
    ----------
    h
        (H, W) haematoxylin optical density of the tile (:func:`tile_haematoxylin`).
    inst
        (H, W) ST instance ids after refinement (0 = background).
    ignore
        (H, W) bool / 0-1, pixels already ignored.
    um_per_px
        Resolution of the tile.
    config
        :class:`RefineConfig` (its ``unmatched_*`` fields; defaults when omitted).

    Returns
    -------
    mask
        (H, W) bool, the unmatched nuclei's pixels (all False in a tile without ST nucleus or
        without haematoxylin contrast: there is no nucleus level to compare with).
    n
        The number of unmatched nuclei.
    """
    cfg = config or RefineConfig()
    if not um_per_px > 0:
        raise ValueError(f"um_per_px must be positive, got {um_per_px}")
    h, inst = np.asarray(h), np.asarray(inst)
    ign = np.asarray(ignore).astype(bool, copy=False)
    if not h.shape == inst.shape == ign.shape or inst.ndim != 2:
        raise ValueError(f"h {h.shape}, inst {inst.shape} and ignore {ign.shape} must be the same (H, W)")
    none = np.zeros(inst.shape, bool)
    nuc = inst > 0
    free = ~nuc & ~ign
    if not nuc.any() or not free.any():
        return none, 0
    step = max(1, int(round(1.0 / um_per_px)))
    sample = h[::step, ::step][free[::step, ::step]]
    if sample.size == 0:
        sample = h[free]
    fg, bg = float(np.median(h[nuc])), float(np.median(sample))
    if not fg > bg:
        return none, 0
    cand = free & (h > bg + cfg.unmatched_edge_fraction * (fg - bg))
    lab, n = ndi.label(cand)
    if n == 0:
        return none, 0
    area = np.bincount(lab.ravel(), minlength=n + 1) * (um_per_px * um_per_px)
    ok = (area >= cfg.unmatched_min_um2) & (area <= cfg.unmatched_max_um2)
    ok[0] = False
    return ok[lab], int(ok.sum())


def _ignore_unmatched(h: np.ndarray | None, inst: np.ndarray, ignore: np.ndarray, stats: RefineStats,
                      um_per_px: float, cfg: RefineConfig) -> RefineStats:
    """Set the :func:`unmatched_nuclei` of a refined tile to ignore (in place, ``ignore`` is the
    new uint8 map; its type and confidence are 0 there already) and count them in the stats."""
    if h is None:
        return stats
    mask, n = unmatched_nuclei(h, inst, ignore, um_per_px=um_per_px, config=cfg)
    if n:
        ignore[mask] = 1
        stats = stats + RefineStats(unmatched=n, unmatched_px=int(mask.sum()))
    return stats
