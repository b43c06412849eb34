"""Per-image stain normalisation of H&E input (training tiles and ``stlib infer`` alike).

A network trained on a few sources sees one scanner's and one lab's colours; a classical
Otsu threshold adapts to each image by construction. This module gives the network the same
kind of per-image adaptation: each image's stain content is described by two optical-density
(OD) vectors (haematoxylin, eosin) and a robust maximum concentration of each
(:func:`fit_stain`), and the image is re-synthesised with a fixed reference stain matrix and
reference maxima (:func:`apply_stain`). Modes (:data:`STAIN_NORMS`):

* ``"none"``: the image as it is (every model file without the field behaves like this);
* ``"hed"``: the fixed colour-deconvolution vectors of Ruifrok & Johnston (2001), only the
  per-image concentration scale is adapted (robust intensity normalisation per stain);
* ``"macenko"``: the stain vectors are estimated per image as well (Macenko et al. 2009: the
  plane of the two largest principal axes of the tissue pixels' OD, the robust extreme angles
  in that plane as the two stain directions), then the concentrations are rescaled as in ``"hed"``.

Written by hand (numpy): scikit-image has colour deconvolution with fixed vectors
(``skimage.color.rgb2hed``) but no per-image stain estimation; the few lines are kept here so
training (:mod:`stlib.train.data`) and inference (:mod:`stlib.infer`) share them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stlib.utils import InputError

#: input normalisation modes a model file may name (``config["stain_norm"]``; absent = ``"none"``)
STAIN_NORMS: tuple[str, ...] = ("none", "hed", "macenko")

#: reference OD directions (rows: haematoxylin, eosin) of Ruifrok & Johnston (2001), unit length
REF_VECTORS = np.array([(0.65, 0.70, 0.29), (0.07, 0.99, 0.11)], np.float64)
REF_VECTORS = REF_VECTORS / np.linalg.norm(REF_VECTORS, axis=1, keepdims=True)
#: reference robust maximum (99th percentile over tissue pixels) of each stain's concentration in
#: OD units along :data:`REF_VECTORS`; round values of the order of those of the shipped MoNuSeg images
#: of the development organs Breast, Lung, Prostate (Macenko H 1.8-3.0, E 0.95-1.5; any fixed value works:
#: it only sets the output's overall darkness)
REF_MAX_CONC = np.array([2.5, 1.0], np.float64)
#: total OD (sum over R, G, B) above which a pixel counts as stained tissue (glass: ~0.1). A per-channel
#: rule (all channels above a threshold) would drop eosin-only stroma, whose blue OD is small
OD_TISSUE = 0.3
_MIN_TISSUE_PX = 500


@dataclass(frozen=True)
class StainStats:
    """The stain description of one image: OD vectors ``matrix`` (2, 3), rows haematoxylin,
    eosin (unit length), and ``max_conc`` (2,), the 99th percentile of each stain's
    concentration over the image's tissue pixels."""

    matrix: np.ndarray
    max_conc: np.ndarray


def _od(rgb: np.ndarray) -> np.ndarray:
    """Optical density of uint8 RGB pixels, ``(N, 3)`` float64 (``+1`` keeps black finite)."""
    return -np.log((np.asarray(rgb, np.float64).reshape(-1, 3) + 1.0) / 256.0)


def check_stain_norm(mode: str) -> str:
    """``mode`` if known, else :class:`~stlib.utils.InputError`."""
    if mode not in STAIN_NORMS:
        raise InputError(f"unknown stain normalisation {mode!r}", fix=f"one of {list(STAIN_NORMS)}")
    return mode


def fit_stain(rgb: np.ndarray, mode: str = "macenko", *, max_px: int = 250_000, percentile: float = 1.0
              ) -> StainStats | None:
    """Stain vectors and robust maximum concentrations of an RGB image (or a stack of tiles).

    Parameters
    ----------
    rgb
        ``(..., 3)`` uint8 RGB (one image, a thumbnail, or several tiles of one image).
    mode
        ``"hed"`` (fixed vectors) or ``"macenko"`` (vectors estimated); ``"none"`` returns None.
    max_px
        At most this many tissue pixels are used (an even stride over them: deterministic).
    percentile
        Robust extreme angle (percent) of the Macenko estimate.

    Returns
    -------
    :class:`StainStats`, or None for ``"none"``. An image with fewer than 500 tissue pixels
    keeps the reference vectors and maxima (it is then left unchanged by :func:`apply_stain`
    up to the projection on the two stains).
    """
    check_stain_norm(mode)
    if mode == "none":
        return None
    od = _od(rgb)
    od = od[od.sum(axis=1) > OD_TISSUE]
    if len(od) < _MIN_TISSUE_PX:
        return StainStats(REF_VECTORS.copy(), REF_MAX_CONC.copy())
    if len(od) > max_px:
        od = od[:: int(np.ceil(len(od) / max_px))]
    matrix = REF_VECTORS
    if mode == "macenko":
        _, vecs = np.linalg.eigh(np.cov(od.T))
        plane = vecs[:, 1:3]  # the two largest principal axes (eigh sorts ascending)
        plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # pointing into positive OD
        ang = np.arctan2(od @ plane[:, 1], od @ plane[:, 0])
        lo, hi = np.percentile(ang, [percentile, 100 - percentile])
        v = np.stack([plane @ np.array([np.cos(a), np.sin(a)]) for a in (lo, hi)])
        v = v * np.where(v.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        # haematoxylin absorbs red more than eosin does: the vector with the larger red OD share is H
        matrix = v if v[0, 0] >= v[1, 0] else v[::-1]
        if not np.isfinite(matrix).all() or abs(np.dot(matrix[0], matrix[1])) > 0.995:
            matrix = REF_VECTORS  # degenerate (one stain only): keep the reference directions
    conc = od @ np.linalg.pinv(matrix)  # (N, 2) least-squares concentrations
    mx = np.percentile(conc, 99, axis=0)
    mx = np.where(mx > 1e-3, mx, REF_MAX_CONC)
    return StainStats(np.array(matrix, np.float64), np.asarray(mx, np.float64))


def apply_stain(rgb: np.ndarray, stats: StainStats | None) -> np.ndarray:
    """``rgb`` (uint8, ``(..., 3)``) re-synthesised with the reference stains.

    Each pixel's OD is decomposed on ``stats.matrix``; the concentrations are scaled so that the
    image's robust maxima become :data:`REF_MAX_CONC` and recombined with :data:`REF_VECTORS`
    (Beer-Lambert). ``stats`` None returns ``rgb`` unchanged.
    """
    if stats is None:
        return rgb
    rgb = np.asarray(rgb)
    conc = _od(rgb) @ np.linalg.pinv(stats.matrix)
    conc *= (REF_MAX_CONC / stats.max_conc)[None]
    out = 256.0 * np.exp(-(conc @ REF_VECTORS)) - 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(rgb.shape)


def normalise_image(rgb: np.ndarray, mode: str) -> np.ndarray:
    """:func:`apply_stain` with the image's own :func:`fit_stain` (``"none"``: unchanged)."""
    return apply_stain(rgb, fit_stain(rgb, mode))
