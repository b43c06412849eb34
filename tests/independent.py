"""Test inputs defined apart from the code they test.

A test whose fixture shares the assumptions of the method under test cannot fail when the
assumption is wrong. Two such assumptions are kept out of the fixtures here:

* **Stain vectors.** :mod:`stlib.align`, :mod:`stlib.labels.refine` and the classical
  baseline deconvolve with scikit-image's Ruifrok-Johnston matrix
  (``H = [0.65, 0.70, 0.29]``, ``E = [0.07, 0.99, 0.11]``). Test images here are rendered with
  *other* H&E optical-density vectors: the reference stain matrix of Macenko et al. (ISBI
  2009, the one stain-normalisation tools default to), and a bluer haematoxylin / paler eosin
  pair of our own, each 9-30 degrees away from the vectors the code deconvolves.
* **Marker tables.** The labeler's cell types come from ``stlib/labels/markers/*.yaml``;
  expression fixtures here draw their programmes from the *panel's own annotation* in the
  10x gene lists (``hMulti.csv``, column ``Cell types``; MIT, XeniumPanelExplorer; the same
  files as ``../shared/realdata/xenium-panels``, shipped in ``stlib/data/panels``), read
  with pandas, never through the labeler.
"""

from __future__ import annotations

import io
from importlib import resources

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

# --------------------------------------------------------------------------------------------
# stain vectors (unit RGB optical-density vectors)
# --------------------------------------------------------------------------------------------


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


#: Macenko et al. 2009 reference H&E stain matrix (columns H, E)
MACENKO_H = _unit([0.5626, 0.7201, 0.4062])
MACENKO_E = _unit([0.2159, 0.8012, 0.5581])
#: a bluer haematoxylin and a paler, more orange eosin (another scanner / protocol)
BLUE_H = _unit([0.55, 0.62, 0.56])
ORANGE_E = _unit([0.12, 0.86, 0.49])
#: scikit-image's Ruifrok-Johnston vectors: what the code deconvolves (NOT for rendering)
SKIMAGE_H = _unit([0.65, 0.70, 0.29])
SKIMAGE_E = _unit([0.07, 0.99, 0.11])

STAINS = {"macenko": (MACENKO_H, MACENKO_E), "blue": (BLUE_H, ORANGE_E)}


def angle_deg(a, b) -> float:
    """Angle between two vectors in degrees."""
    return float(np.degrees(np.arccos(np.clip(np.dot(_unit(a), _unit(b)), -1, 1))))


def render_od(h_od: np.ndarray, e_od: np.ndarray, *, stain: str = "macenko", noise_sd: float = 2.0,
              seed: int = 0) -> np.ndarray:
    """Beer-Lambert RGB uint8 image from haematoxylin / eosin optical densities (base 10)."""
    hv, ev = STAINS[stain]
    od = np.asarray(h_od, float)[..., None] * hv + np.asarray(e_od, float)[..., None] * ev
    rng = np.random.default_rng(seed)
    rgb = 255.0 * 10.0 ** (-od) + rng.normal(0, noise_sd, od.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def jpeg(rgb: np.ndarray, quality: int = 70) -> np.ndarray:
    """The image after a JPEG round trip (scanners store tiles as JPEG)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def defocus(rgb: np.ndarray, mask: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Blur the pixels of ``mask`` (an out-of-focus area)."""
    blurred = ndi.gaussian_filter(rgb.astype(np.float32), (sigma, sigma, 0))
    out = np.where(mask[..., None], blurred, rgb.astype(np.float32))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# marker tables from the panel's own annotation
# --------------------------------------------------------------------------------------------

#: hMulti "Cell types" annotation -> the broad kinds of cell an expression fixture simulates
PANEL_KINDS = {
    "t_cell": ("T cells",),
    "b_cell": ("B cells",),
    "macrophage": ("Macrophages",),
    "fibroblast": ("Fibroblasts",),
    "endothelial": ("Endothelial cells",),
    "smooth_muscle": ("Smooth muscle cells",),
    "adipocyte": ("Adipocytes",),
    "glandular": ("Glandular cells", "Ductal cells"),
    "proliferation": ("Proliferation markers",),
}


def panel_table(panel: str = "hMulti") -> pd.DataFrame:
    """The 10x panel gene list as shipped (``gene`` and its annotation columns)."""
    with resources.files("stlib.data.panels").joinpath(f"{panel}.csv").open("r") as fh:
        return pd.read_csv(fh)


def panel_markers(panel: str = "hMulti", *, exclusive: bool = True) -> dict[str, list[str]]:
    """Kind -> genes the panel annotates with that kind's cell types.

    With ``exclusive`` a gene annotated with cell types of several kinds is dropped (it would
    mark two kinds at once).
    """
    t = panel_table(panel)
    col = "Cell types"
    kinds_of: dict[str, set[str]] = {}
    for gene, ann in zip(t["gene"].astype(str), t[col].fillna("")):
        types = {a.strip() for a in str(ann).split(";") if a.strip()}
        for kind, names in PANEL_KINDS.items():
            if types & set(names):
                kinds_of.setdefault(gene, set()).add(kind)
    out: dict[str, list[str]] = {k: [] for k in PANEL_KINDS}
    for gene, kinds in sorted(kinds_of.items()):
        if exclusive and len(kinds) > 1:
            continue
        for k in kinds:
            out[k].append(gene)
    return out


__all__ = ["MACENKO_H", "MACENKO_E", "BLUE_H", "ORANGE_E", "SKIMAGE_H", "SKIMAGE_E", "STAINS", "angle_deg",
           "render_od", "jpeg", "defocus", "panel_table", "panel_markers", "PANEL_KINDS"]
