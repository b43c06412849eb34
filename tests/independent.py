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
  with pandas, never through the labeler, and from canonical markers of the literature
  written in this file (:data:`LITERATURE_MARKERS`, :data:`LITERATURE_PROGRAMMES`), for the
  kinds and programmes the panel annotation lacks (plasma and mast cells, a breast tumour
  signature, dying cells).
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


#: Canonical markers of the literature (written here, not read from stlib). Broad-lineage genes
#: (PTPRC for every leukocyte, EPCAM/KRT8/KRT18/KRT19/CDH1 for epithelium, COL1A1/DCN for
#: fibroblasts, PECAM1/VWF for endothelium, ACTA2/MYH11/DES for smooth muscle) are textbook
#: immunohistochemistry markers; the finer lists follow the marker genes of the cell types of
#: the Tabula Sapiens atlas (Tabula Sapiens Consortium, Science 2022) and of the Human Protein
#: Atlas single-cell type atlas (Karlsson et al., Science Advances 2021). Many are not on a given
#: panel (hMulti carries no KRT8/KRT18/COL1A1/DCN/JCHAIN): :func:`fixture_markers` keeps those it has.
LITERATURE_MARKERS: dict[str, tuple[str, ...]] = {
    "epithelial": ("EPCAM", "KRT8", "KRT18", "KRT19", "CDH1", "CLDN4", "CLDN7", "KRT7", "ELF3", "MUC1"),
    "t_cell": ("PTPRC", "CD3D", "CD3E", "CD3G", "CD2", "TRAC", "CD247", "LCK", "CD8A", "CD4", "IL7R", "ZAP70"),
    "b_cell": ("PTPRC", "MS4A1", "CD19", "CD79A", "CD79B", "PAX5", "CD22", "BANK1", "CR2"),
    # plasma cells: immunoglobulin secretion and their transcription factors (BLIMP1 = PRDM1, BCMA = TNFRSF17)
    "plasma": ("PTPRC", "MZB1", "JCHAIN", "TNFRSF17", "SDC1", "PRDM1", "XBP1", "IGKC", "DERL3", "CD27", "SLAMF7"),
    "macrophage": ("PTPRC", "CD68", "CD163", "CD14", "C1QA", "C1QB", "CSF1R", "MRC1", "MARCO", "AIF1", "FCGR1A",
                   "CD86"),
    # mast cells: tryptases, carboxypeptidase A3, the IgE receptor chains, KIT (Dwyer et al., Nat Immunol 2016)
    "mast": ("PTPRC", "TPSAB1", "TPSB2", "CPA3", "MS4A2", "FCER1A", "KIT", "HDC", "CTSG", "HPGDS", "GATA2"),
    "fibroblast": ("COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "PDGFRA", "PDGFRB", "FBLN1", "DPT", "SFRP2", "THY1"),
    "endothelial": ("PECAM1", "VWF", "CDH5", "CLDN5", "KDR", "FLT1", "EMCN", "ERG", "TIE1", "CLEC14A", "EGFL7"),
    "smooth_muscle": ("ACTA2", "MYH11", "DES", "CNN1", "TAGLN", "ACTG2", "LMOD1", "MYLK"),
    "adipocyte": ("ADIPOQ", "PLIN1", "PLIN4", "LEP", "FABP4", "CIDEA", "LPL", "PPARG"),
}

#: Programmes of the literature. Breast tumour up: the HER2 amplicon (ERBB2), MYC and MDM2 gains
#: and the luminal receptor ESR1, genes of the PAM50 classifier (Parker et al., J Clin Oncol 2009)
#: and of recurrent breast-cancer amplicons. Proliferation: G2/M genes of the cell-cycle
#: expression programme (Whitfield et al., Mol Biol Cell 2002). Apoptosis: death-receptor and BH3
#: genes of the MSigDB hallmark apoptosis set (Liberzon et al., Cell Systems 2015).
LITERATURE_PROGRAMMES: dict[str, tuple[str, ...]] = {
    "tumor_up": ("ERBB2", "MYC", "MDM2", "ESR1", "CCND1", "GRB7", "FGFR1"),
    "proliferation": ("MKI67", "TOP2A", "CCNB1", "CCNB2", "UBE2C", "CENPF", "CDK1", "BIRC5", "AURKA", "TPX2"),
    "apoptosis": ("FAS", "BCL2L11", "BAX", "BBC3", "PMAIP1", "CASP3", "TNFRSF10B"),
}

#: the panel annotation's names of the fixture kinds (10x ``Cell types``; the labeler's names are
#: the keys only so that a test can say which answer is right)
_PANEL_FOR = {"epithelial": ("glandular",), "t_cell": ("t_cell",), "b_cell": ("b_cell",),
              "macrophage": ("macrophage",), "fibroblast": ("fibroblast",), "endothelial": ("endothelial",),
              "smooth_muscle": ("smooth_muscle",), "adipocyte": ("adipocyte",)}
_PANEL_PROGRAMMES = {"tumor_up": "Cancer markers", "proliferation": "Proliferation markers",
                     "apoptosis": "Pro-apoptosis markers"}


def fixture_markers(panel: str = "hMulti") -> dict[str, list[str]]:
    """Kind -> genes of the panel that mark it: the panel's own annotation plus the literature.

    Kinds are named as the labeler's vocabulary names cell types, so that a test can state the
    right answer; the genes never come from the labeler. A gene that marks two kinds in this
    table (PTPRC: every leukocyte) stays in both.
    """
    genes = set(panel_table(panel)["gene"].astype(str))
    ann = panel_markers(panel)
    tumour = set(LITERATURE_PROGRAMMES["tumor_up"]) | set(fixture_programmes(panel)["tumor_up"])
    out = {}
    for kind, lit in LITERATURE_MARKERS.items():
        own = {g for k in _PANEL_FOR.get(kind, ()) for g in ann[k]} | {g for g in lit if g in genes}
        if kind == "epithelial":  # the panel calls ERBB2 / ESR1 / PGR glandular; normal epithelium here
            own -= tumour         # carries only a little of them (the tumour signature is what it lacks)
        out[kind] = sorted(own)
    return out


def fixture_programmes(panel: str = "hMulti") -> dict[str, list[str]]:
    """Tumour-up / proliferation / apoptosis genes of the panel: its annotation plus the literature."""
    t = panel_table(panel)
    genes = set(t["gene"].astype(str))
    out = {}
    for name, lit in LITERATURE_PROGRAMMES.items():
        ann = {g for g, a in zip(t["gene"].astype(str), t["Cell types"].fillna(""))
               if _PANEL_PROGRAMMES[name] in {x.strip() for x in str(a).split(";")}}
        own = ann | {g for g in lit if g in genes}
        own.discard("KIT")  # annotated as a proliferation marker too; a mast-cell receptor here
        out[name] = sorted(own)
    return out


__all__ = ["MACENKO_H", "MACENKO_E", "BLUE_H", "ORANGE_E", "SKIMAGE_H", "SKIMAGE_E", "STAINS", "angle_deg",
           "render_od", "jpeg", "defocus", "panel_table", "panel_markers", "PANEL_KINDS", "LITERATURE_MARKERS",
           "LITERATURE_PROGRAMMES", "fixture_markers", "fixture_programmes"]
