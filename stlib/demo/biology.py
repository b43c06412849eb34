"""The demo generator's own cell biology: a cell-type catalogue and expression programmes.

**Defined apart from the labeler.** Nothing here is read from ``stlib/labels/markers/*.yaml``
and ``stlib.labels`` never imports this module (``tests/test_demo_biology.py`` checks both
ways): the catalogue was written for the generator from the literature and from the 10x panel
annotations, with its own type names, its own tumour signatures and types that the labeler does
not know (:data:`OFF_VOCABULARY`). The labeler's accuracy on a cohort drawn from it therefore
tests the labeler, not an assumption the two share. Textbook markers do overlap (both follow the
same literature, as real annotation and real biology do); how many of a type's markers are
really specific is the ``marker_overlap`` knob.

What a sample's expression is made of (all per gene of the panel, weights before normalisation):

* a low background expressed by every type, with a type-specific jitter (types differ a little
  on every gene, not only on markers);
* a family programme shared by related types (epithelium, lymphoid, myeloid, mesenchymal,
  vascular, neural crest): neighbouring types are alike, as in tissue;
* the type's textbook markers; each is specific with probability ``marker_overlap``, else it is
  either not expressed by the type or expressed by one to three other types too (mostly related
  types of the same family, sometimes any type);
* a few "private" genes per type that no marker list names (biology the labeler cannot know);
* a per-sample perturbation of every programme (biological and batch variation).

Tumour cells start from the normal lineage of their organ and differ from it by the organ's
tumour signature (:data:`TUMOUR_SIGNATURES`; each gene present in a given tumour with probability
0.75), a sample-specific drift of 15 % of the genes, partial loss of lineage markers, and arm-level
copy-number changes (:func:`copy_number_events`: organ-typical and random arms, gain x
``cnv_fold`` / loss / ``cnv_fold``, some subclonal). Cycling is a per-cell state (any type), not a
tumour property: ``cycling_normal_fraction`` of normal cells and ``1 - noncycling_tumour_fraction``
of tumour cells add the proliferation programme. Dead cells keep their origin's programme;
``dead_signal`` scales both their RNA loss and a weak apoptosis/stress programme (0 = none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stlib.constants import CONNECTIVE, DEAD, EPITHELIAL, INFLAMMATORY, NEOPLASTIC

__all__ = ["CellType", "CATALOGUE", "OFF_VOCABULARY", "FAMILY_GENES", "TUMOUR_SIGNATURES", "PROLIFERATION_GENES",
           "STRESS_GENES", "ORGAN_CELL_TYPES", "TUMOUR_TYPE", "DEAD_TYPE", "copy_number_events", "SampleBiology",
           "make_sample_biology", "per_cell_programmes", "assign_cell_types", "types_for_classes", "type_class",
           "realised_marker_specificity"]


@dataclass(frozen=True)
class CellType:
    """One entry of the generator's catalogue."""

    name: str
    #: truth class (stlib.constants): what the cell is, whatever any labeler calls it
    cls: int
    #: family whose shared programme the type expresses (key of :data:`FAMILY_GENES`)
    family: str
    #: textbook markers (specific with probability ``marker_overlap``)
    markers: tuple[str, ...]
    #: transcripts per cell relative to an average cell
    library: float = 1.0
    #: a type outside the vocabulary of a PanNuke-oriented marker labeler (neutrophils, dendritic
    #: cells, pericytes, Schwann cells, myoepithelium): these make the ``offvocab_fraction`` knob
    offvocab: bool = False


#: genes shared within a family (expressed by every member at a moderate level)
FAMILY_GENES: dict[str, tuple[str, ...]] = {
    "epithelium": ("EPCAM", "CDH1", "KRT8", "KRT18", "KRT19", "CLDN4", "CLDN7", "ELF3", "EHF", "SPINT2",
                   "TACSTD2", "MAL2", "TMC5", "ESRP1", "GRHL2", "KRT7", "MALL", "C15orf48"),
    "squamous": ("KRT5", "KRT14", "KRT15", "KRT6A", "TP63", "DSP", "PKP1", "SFN", "AQP3", "DST", "FHL2"),
    "lymphoid": ("PTPRC", "CXCR4", "CORO1A", "LCP1", "CD52", "CD37", "RAC2", "ARHGDIB", "CYTIP", "DUSP2",
                 "GPR183", "CD69", "SELL"),
    "myeloid": ("PTPRC", "LYZ", "TYROBP", "FCER1G", "SPI1", "AIF1", "LCP1", "CD74", "HLA-DRA", "LY86", "FGL2",
                "C1orf162", "IGSF6", "CYBB", "PLCG2"),
    "mesenchymal": ("COL1A1", "COL1A2", "COL3A1", "SPARC", "VIM", "COL5A2", "FBN1", "PCOLCE", "CAV1", "TCF4",
                    "VCAN", "SRPX", "PLAC9", "CRISPLD2", "BASP1", "COL6A1", "COL6A2"),
    "vascular": ("CAV1", "CAVIN1", "CAVIN2", "GNG11", "TCF4", "MEF2C", "IFITM3", "SPARCL1", "EGFL7", "RAMP2"),
    "neural_crest": ("PMP22", "S100B", "SOX10", "SNCA", "S100A1", "GPM6B", "ERBB3", "MPZL1"),
    "hepatic": ("APOA1", "APOC3", "TTR", "SERPINA1", "HP", "FGB", "ALB", "APOH"),
    "renal": ("PAX8", "PAX2", "CDH16", "FXYD2", "HNF1B", "GATM", "SLC3A1"),
}

_C = CellType
#: the generator's cell types (truth class, family, textbook markers)
CATALOGUE: dict[str, CellType] = {t.name: t for t in [
    # --- epithelium and parenchyma --------------------------------------------------------
    _C("breast_luminal", EPITHELIAL, "epithelium",
       ("ESR1", "PGR", "FOXA1", "GATA3", "ANKRD30A", "SCGB2A1", "MLPH", "TBX3", "AR", "ELF5", "KIT", "ABCC11",
        "AGR3", "SPDEF", "MUC1", "PIP", "AZGP1", "TFF1", "KRT23", "S100A14"), 1.05),
    _C("myoepithelial", EPITHELIAL, "squamous",
       ("KRT5", "KRT14", "KRT17", "ACTA2", "MYH11", "CNN1", "ACTG2", "MYLK", "OXTR", "TP63", "KRT6B",
        "SEMA3C", "COL17A1", "MME", "CDH3"), 0.9, offvocab=True),
    _C("keratinocyte", EPITHELIAL, "squamous",
       ("KRT1", "KRT10", "KRT2", "LY6D", "SERPINB3", "SERPINB5", "FGFBP1", "CCL27", "KRTDAP", "DMKN",
        "CALML5", "CLCA2", "SERPINB2", "COL17A1", "DSG3", "DSC3", "LGALS7"), 1.0),
    _C("alveolar_t1", EPITHELIAL, "epithelium",
       ("AGER", "RTKN2", "EMP2", "HOPX", "PDPN", "SCEL", "CLIC5", "GPRC5A", "CAV1", "KRT7", "SFTA2", "UPK3B"), 0.9),
    _C("alveolar_t2", EPITHELIAL, "epithelium",
       ("SFTPC", "SFTPB", "SFTPA1", "SFTPA2", "NAPSA", "LAMP3", "ABCA3", "SLC34A2", "PEBP4", "SFTA2", "LPCAT1",
        "CAPN8", "PGC", "STEAP4"), 1.1),
    _C("airway_epithelium", EPITHELIAL, "epithelium",
       ("FOXJ1", "C20orf85", "CAPS", "TPPP3", "SNTN", "CCDC78", "CFAP53", "SCGB1A1", "SCGB3A1", "CYP2F1",
        "BPIFB1", "MUC5B", "C1orf194", "CCDC39"), 1.0),
    _C("acinar", EPITHELIAL, "epithelium",
       ("PRSS1", "CPA1", "CPA2", "CELA3A", "CELA3B", "CTRB1", "CTRB2", "PNLIP", "CEL", "REG1A", "SPINK1",
        "AMY2A", "GP2", "CTRC", "PLA2G1B"), 1.2),
    _C("pancreatic_duct", EPITHELIAL, "epithelium",
       ("CFTR", "SOX9", "MUC1", "SLC4A4", "SPP1", "ANXA4", "ONECUT1", "KRT19", "TFF1", "BICC1", "ALDH1A3"), 1.0),
    _C("islet", EPITHELIAL, "epithelium",
       ("INS", "GCG", "SST", "PPY", "CHGA", "CHGB", "SCGN", "PCSK1", "PCSK2", "NKX2-2", "ISL1", "GHRL",
        "HEPACAM2"), 1.0),
    _C("prostate_luminal", EPITHELIAL, "epithelium",
       ("KLK3", "KLK2", "MSMB", "ACPP", "NKX3-1", "AR", "TMPRSS2", "KLK11", "SPDEF", "TMEFF2", "FOLH1",
        "HOXB13", "AZGP1", "NEFH", "RDH11"), 1.05),
    _C("colonocyte", EPITHELIAL, "epithelium",
       ("CA1", "CA2", "CA4", "AQP8", "SLC26A3", "SLC26A2", "GUCA2A", "GUCA2B", "CEACAM7", "MS4A12", "KRT20",
        "CDHR5", "FABP1", "PHGR1", "LGALS4", "CDX1", "CDX2", "SATB2"), 1.0),
    _C("goblet", EPITHELIAL, "epithelium",
       ("MUC2", "CLCA1", "TFF3", "SPINK4", "ZG16", "FCGBP", "ITLN1", "REG4", "AGR2", "SPDEF", "ATOH1"), 1.1),
    _C("crypt_stem", EPITHELIAL, "epithelium",
       ("LGR5", "ASCL2", "OLFM4", "SMOC2", "RGMB", "EPHB2", "SOX9", "CDCA7", "GPX2"), 1.0),
    _C("hepatocyte", EPITHELIAL, "hepatic",
       ("CYP3A4", "CYP2E1", "TAT", "HPX", "KNG1", "APOA5", "CFHR1", "CFHR3", "ADH4", "ADH1B", "AHSG", "CPS1",
        "ARG1", "HAMP", "CYP2A7", "CYP2B6", "HMGCS2", "TF", "FGA", "FGG"), 1.3),
    _C("proximal_tubule", EPITHELIAL, "renal",
       ("LRP2", "CUBN", "SLC34A1", "SLC22A6", "SLC22A8", "SLC5A12", "NAT8", "BBOX1", "TMEM174", "DPEP1",
        "MIOX", "PDZK1IP1", "ALDOB", "PCK1", "GLYATL1"), 1.1),
    _C("distal_tubule", EPITHELIAL, "renal",
       ("UMOD", "SLC12A1", "SLC12A3", "CALB1", "PVALB", "KCNJ1", "TMEM52B", "AQP2", "FOXI1", "KCNK3"), 1.0),
    _C("gastric_pit", EPITHELIAL, "epithelium",
       ("TFF1", "TFF2", "MUC5AC", "GKN1", "GKN2", "PSCA", "MUC6", "PGC", "LIPF", "CLDN18", "VSIG1"), 1.0),
    _C("thyrocyte", EPITHELIAL, "epithelium",
       ("TG", "TPO", "TSHR", "NKX2-1", "FOXE1", "DIO1", "IYD", "SLC26A4", "TFPI", "KCNK3"), 1.0),
    _C("melanocyte", EPITHELIAL, "neural_crest",
       ("MLANA", "PMEL", "TYR", "DCT", "TYRP1", "MITF", "KIT", "EDNRB", "GPNMB", "CAPN3", "TRPM1", "QPCT",
        "PCSK2"), 0.9),
    # --- immune ---------------------------------------------------------------------------
    _C("cd4_t", INFLAMMATORY, "lymphoid",
       ("CD3D", "CD3E", "CD3G", "CD2", "CD5", "CD6", "CD7", "TRAC", "CD247", "CD4", "IL7R", "CD28", "CCR7",
        "LEF1", "TCF7", "CD40LG", "ICOS"), 0.65),
    _C("cd8_t", INFLAMMATORY, "lymphoid",
       ("CD3D", "CD3E", "CD2", "TRAC", "CD8A", "CD8B", "GZMK", "GZMA", "CCL5", "NKG7", "PRF1", "CD247",
        "CXCR3", "LAG3"), 0.65),
    _C("treg", INFLAMMATORY, "lymphoid",
       ("FOXP3", "IL2RA", "CTLA4", "TNFRSF9", "IKZF2", "CD4", "CD3E", "TIGIT", "TNFRSF4", "BATF"), 0.65),
    _C("nk_cell", INFLAMMATORY, "lymphoid",
       ("NKG7", "GNLY", "KLRD1", "KLRC1", "KLRB1", "KLRF1", "PRF1", "GZMB", "FCGR3A", "NCAM1", "FGFBP2"), 0.6),
    _C("b_cell", INFLAMMATORY, "lymphoid",
       ("MS4A1", "CD19", "CD79A", "CD79B", "BANK1", "PAX5", "CD22", "TCL1A", "FCRLA", "BLK", "SPIB", "CR2",
        "FCER2", "VPREB3", "ADAM28"), 0.75),
    _C("plasma", INFLAMMATORY, "lymphoid",
       ("MZB1", "JCHAIN", "IGKC", "TNFRSF17", "DERL3", "PRDM1", "SLAMF7", "XBP1", "FKBP11", "TENT5C", "CD27",
        "POU2AF1", "SDC1", "IGHG1"), 1.2),
    _C("macrophage", INFLAMMATORY, "myeloid",
       ("CD68", "CD163", "C1QA", "C1QB", "C1QC", "MRC1", "MS4A4A", "MS4A6A", "MS4A7", "VSIG4", "MARCO", "APOE",
        "TREM2", "CSF1R", "FCGR1A", "LILRB4", "MPEG1", "FOLR2"), 1.0),
    _C("monocyte", INFLAMMATORY, "myeloid",
       ("CD14", "FCN1", "S100A8", "S100A9", "S100A12", "VCAN", "CCR2", "CD300E", "LILRA5", "MNDA", "FCGR3A"),
       0.8),
    _C("mast_cell", INFLAMMATORY, "myeloid",
       ("CPA3", "TPSAB1", "TPSB2", "MS4A2", "KIT", "HPGDS", "HDC", "CTSG", "GATA2", "SIGLEC6", "IL1RL1",
        "SLC18A2", "VWA5A"), 0.9),
    _C("neutrophil", INFLAMMATORY, "myeloid",
       ("CSF3R", "FCGR3B", "CXCR2", "CXCR1", "S100A8", "S100A9", "S100A12", "FPR1", "AQP9", "CMTM2", "PROK2",
        "G0S2", "CLEC4E", "MMP9", "RETN", "CSF3"), 0.5, offvocab=True),
    _C("dendritic", INFLAMMATORY, "myeloid",
       ("CLEC9A", "XCR1", "CD1C", "FCER1A", "CLEC10A", "LAMP3", "CCR7", "CD1A", "CD1E", "IRF8", "IL3RA",
        "LILRA4", "CD83", "HLA-DQB2", "FLT3", "CSF2RA"), 0.8, offvocab=True),
    # --- stroma ---------------------------------------------------------------------------
    _C("fibroblast", CONNECTIVE, "mesenchymal",
       ("DCN", "LUM", "PDGFRA", "DPT", "OGN", "FBLN1", "SFRP2", "SFRP4", "CTSK", "MFAP5", "PI16", "MEDAG",
        "APCDD1", "C7", "CFD", "GSN", "CCDC80", "ASPN", "THY1", "CXCL12", "IGF1", "MAMDC2", "PRG4"), 0.8),
    _C("myofibroblast", CONNECTIVE, "mesenchymal",
       ("POSTN", "COL11A1", "CTHRC1", "ACTA2", "TAGLN", "MMP11", "INHBA", "COL10A1", "FAP", "THBS2", "TNC",
        "LRRC15", "SULF1", "PDGFRB"), 0.85),
    _C("pericyte", CONNECTIVE, "mesenchymal",
       ("RGS5", "PDGFRB", "KCNJ8", "ABCC9", "NOTCH3", "HIGD1B", "MCAM", "CSPG4", "STEAP4", "NDUFA4L2",
        "COX4I2", "RERGL"), 0.75, offvocab=True),
    _C("smooth_muscle_cell", CONNECTIVE, "mesenchymal",
       ("ACTA2", "MYH11", "DES", "CNN1", "ACTG2", "TAGLN", "MYLK", "LMOD1", "SYNPO2", "KCNMB1", "PLN",
        "CASQ2", "SMTN", "KCNMA1"), 0.85),
    _C("endothelium", CONNECTIVE, "vascular",
       ("PECAM1", "VWF", "CDH5", "CLDN5", "CLEC14A", "ERG", "KDR", "FLT1", "TIE1", "TEK", "PLVAP", "SOX17",
        "SOX18", "ECSCR", "MMRN2", "ADGRL4", "ACKR1", "SELE", "AQP1", "CD93", "CD34", "EMCN"), 0.75),
    _C("lymphatic_endothelium", CONNECTIVE, "vascular",
       ("LYVE1", "PROX1", "PDPN", "CCL21", "MMRN1", "FLT4", "RELN", "TFF3", "STAB2", "TBX1"), 0.7),
    _C("adipocyte_cell", CONNECTIVE, "mesenchymal",
       ("ADIPOQ", "PLIN1", "PLIN4", "LEP", "CIDEA", "CIDEC", "LPL", "PPARG", "FABP4", "CD36", "GPAM", "PCK1",
        "RBP4", "TRARG1", "RBP5"), 0.55),
    _C("schwann", CONNECTIVE, "neural_crest",
       ("MPZ", "PLP1", "NGFR", "CDH19", "GFRA3", "SCN7A", "MBP", "PRX", "NRXN1", "L1CAM", "GAP43", "S100B",
        "SOX10"), 0.7, offvocab=True),
]}

#: names of the types outside the labeler vocabulary (the ``offvocab_fraction`` knob draws these)
OFF_VOCABULARY: tuple[str, ...] = tuple(t for t, c in CATALOGUE.items() if c.offvocab)

#: tumour signatures of the generator (genes up in the organ's carcinoma / melanoma relative to its
#: normal lineage, and differentiation genes lost in it). Written for the generator from reviews of
#: tumour-versus-normal expression (TCGA tumour/normal contrasts, single-cell atlases); each gene is
#: present in a given tumour with probability 0.75 (tumours differ).
TUMOUR_SIGNATURES: dict[str, dict[str, tuple[str, ...]]] = {
    "breast": {"lineage": ("breast_luminal",),
               "up": ("ERBB2", "GRB7", "CCND1", "MYC", "TPD52", "SCD", "FASN", "CEACAM6", "AGR2", "MUCL1",
                      "S100P", "KRT81", "MDM2", "GPRC5A", "CDH3", "STC2"),
               "down": ("ELF5", "KIT", "SFRP1", "OXTR", "KRT5", "KRT14")},
    "lung": {"lineage": ("alveolar_t2", "alveolar_t1"),
             "up": ("CEACAM5", "CEACAM6", "LCN2", "SLC2A1", "LAMC2", "MMP7", "TFF1", "AGR2", "MET", "EGFR", "STC1",
                    "LY6D", "CXCL14", "MUC5AC"),
             "down": ("AGER", "RTKN2", "HOPX", "SFTPC", "EMP2")},
    "pancreas": {"lineage": ("pancreatic_duct",),
                 "up": ("CEACAM5", "CEACAM6", "MSLN", "S100P", "TFF1", "CLDN18", "LAMC2", "MUC4", "MUC5AC", "AGR2",
                        "KRT17", "TSPAN8", "SERPINB5", "CTSE", "TM4SF4", "GPRC5A"),
                 "down": ("SLC4A4", "ONECUT1")},
    "prostate": {"lineage": ("prostate_luminal",),
                 "up": ("AMACR", "FOLH1", "PCA3", "TRPM8", "SPON2", "ERG", "TDRD1", "GOLM1", "MYO6", "MYBPC1",
                        "PCP4", "TBX3", "MYC"),
                 "down": ("MSMB", "KRT5", "KRT15", "TP63")},
    "bowel": {"lineage": ("colonocyte", "crypt_stem"),
              "up": ("LGR5", "ASCL2", "OLFM4", "SMOC2", "RNF43", "AXIN2", "EPHB2", "CEACAM5", "CEACAM6", "MYC",
                     "TSPAN8", "CDH17", "REG4", "MMP7", "LCN2", "CDH3", "SMIM24", "EPCAM"),
              "down": ("CA1", "CA4", "AQP8", "SLC26A3", "GUCA2A", "GUCA2B", "CLCA1", "MS4A12", "CEACAM7",
                       "SLC26A2")},
    "skin": {"lineage": ("melanocyte",),
             "up": ("PRAME", "MIA", "CSPG4", "SOX4", "MAGEA4", "BIRC7", "CCND1", "MYC", "GDF15", "SERPINE2",
                    "CD274", "SOX2", "GPC3"),
             "down": ("KIT",)},
    "kidney": {"lineage": ("proximal_tubule",),
               "up": ("CA9", "NDUFA4L2", "ANGPTL4", "EGLN3", "VEGFA", "CD70", "MET", "KRT7", "AMACR", "STC2"),
               "down": ("LRP2", "CUBN", "SLC34A1")},
    "liver": {"lineage": ("hepatocyte",),
              "up": ("GPC3", "AFP", "AKR1B10", "SPINK1", "MDK", "TOP2A", "MYC", "MDM2"),
              "down": ("CYP2E1", "CYP3A4", "TAT", "HAMP")},
    "stomach": {"lineage": ("gastric_pit",),
                "up": ("CLDN18", "CEACAM5", "CEACAM6", "MUC13", "ERBB2", "MYC", "CDH17", "LGALS4"),
                "down": ("GKN1", "GKN2", "TFF2")},
    "thyroid": {"lineage": ("thyrocyte",),
                "up": ("LGALS3", "FN1", "KRT19", "CITED1", "HMGA2", "MET", "MYC"),
                "down": ("TPO", "DIO1", "TG")},
}

#: G2/M and S-phase genes of cycling cells (any type)
PROLIFERATION_GENES: tuple[str, ...] = (
    "MKI67", "TOP2A", "CDK1", "CCNB1", "CCNB2", "CENPF", "UBE2C", "BIRC5", "PCNA", "TYMS", "MCM2", "MCM7", "RRM2",
    "AURKA", "TPX2", "CDC20", "PTTG1", "ZWINT", "NUSAP1", "HMGB2", "CENPA", "KIFC1", "FOXM1")
#: apoptosis / stress response genes of dying cells (scaled by ``dead_signal``)
STRESS_GENES: tuple[str, ...] = (
    "BCL2L11", "FAS", "BAX", "BBC3", "PMAIP1", "CASP3", "CDKN1A", "GADD45A", "DDIT3", "TNFRSF10B", "BAK1",
    "APAF1", "ATF3", "JUN")

#: tissue compartment type (stlib.demo.tissue) -> generator types and their weights, per organ
#: (``"*"`` = any organ). Tumour cells take their organ's tumour lineage.
ORGAN_CELL_TYPES: dict[str, dict[str, dict[str, float]]] = {
    "*": {
        "t_cell": {"cd4_t": 0.5, "cd8_t": 0.35, "treg": 0.07, "nk_cell": 0.08},
        "b_cell": {"b_cell": 1.0},
        "plasma": {"plasma": 1.0},
        "macrophage": {"macrophage": 0.75, "monocyte": 0.15, "mast_cell": 0.10},
        "fibroblast": {"fibroblast": 0.85, "myofibroblast": 0.15},
        "endothelial": {"endothelium": 0.9, "lymphatic_endothelium": 0.1},
        "smooth_muscle": {"smooth_muscle_cell": 1.0},
        "adipocyte": {"adipocyte_cell": 1.0},
        "melanocyte": {"melanocyte": 1.0},
    },
    "breast": {"epithelial": {"breast_luminal": 1.0}},
    "lung": {"epithelial": {"alveolar_t1": 0.45, "alveolar_t2": 0.45, "airway_epithelium": 0.10}},
    "pancreas": {"epithelial": {"acinar": 0.65, "pancreatic_duct": 0.25, "islet": 0.10}},
    "prostate": {"epithelial": {"prostate_luminal": 1.0}},
    "bowel": {"epithelial": {"colonocyte": 0.6, "goblet": 0.28, "crypt_stem": 0.12}},
    "skin": {"epithelial": {"keratinocyte": 1.0}},
    "kidney": {"epithelial": {"proximal_tubule": 0.65, "distal_tubule": 0.35}},
    "liver": {"epithelial": {"hepatocyte": 1.0}},
    "stomach": {"epithelial": {"gastric_pit": 1.0}},
    "thyroid": {"epithelial": {"thyrocyte": 1.0}},
}
#: in tumours the stroma is activated: more myofibroblasts (cancer-associated fibroblasts)
_CANCER_FIBROBLAST = {"fibroblast": 0.6, "myofibroblast": 0.4}
#: off-vocabulary types and the compartment types they replace (their morphology is alike)
_OFFVOCAB_DONORS: dict[str, tuple[str, ...]] = {
    "neutrophil": ("t_cell", "macrophage"), "dendritic": ("macrophage", "t_cell", "b_cell"),
    "pericyte": ("fibroblast",), "schwann": ("fibroblast",), "myoepithelial": ("epithelial",),
}
#: relative share of each off-vocabulary type (where its donors exist)
_OFFVOCAB_SHARE = {"neutrophil": 0.25, "dendritic": 0.2, "pericyte": 0.25, "schwann": 0.1, "myoepithelial": 0.2}
#: organs whose glands have a basal / myoepithelial layer
_MYOEPITHELIAL_ORGANS = ("breast", "prostate", "skin")

#: share of a cycling cell's panel transcripts on proliferation genes
_CYCLING_SHARE = 0.10
#: share of a dying cell's panel transcripts on stress genes at dead_signal = 1
_STRESS_SHARE = 0.08

#: names used for the tumour cells of each organ
TUMOUR_TYPE = "tumour_cell"
DEAD_TYPE = "dying_cell"


def type_class(name: str) -> int:
    """Truth class id of a generator type (tumour cells: Neoplastic, dying cells: Dead)."""
    if name == TUMOUR_TYPE:
        return NEOPLASTIC
    if name == DEAD_TYPE:
        return DEAD
    return CATALOGUE[name].cls


# ------------------------------------------------------------------------------------------
# cell types of a field
# ------------------------------------------------------------------------------------------

def _weights(organ_key: str, tissue_type: str, cancer: bool) -> dict[str, float]:
    if tissue_type == "fibroblast" and cancer:
        return _CANCER_FIBROBLAST
    table = ORGAN_CELL_TYPES.get(organ_key, {})
    if tissue_type in table:
        return table[tissue_type]
    if tissue_type in ORGAN_CELL_TYPES["*"]:
        return ORGAN_CELL_TYPES["*"][tissue_type]
    if tissue_type == "epithelial":  # an organ without an entry: a generic gland
        return {"pancreatic_duct": 1.0}
    raise KeyError(f"no generator type for tissue type {tissue_type!r} in organ {organ_key!r}")


def assign_cell_types(tissue_types: Sequence[str], organ_key: str, *, cancer: bool, offvocab_fraction: float,
                      rng: np.random.Generator, xy: np.ndarray | None = None,
                      vessel_xy: np.ndarray | None = None) -> np.ndarray:
    """Generator cell type of every nucleus from its compartment type (what and where it is).

    Parameters
    ----------
    tissue_types
        Compartment types of :mod:`stlib.demo.tissue` (``"epithelial"``, ``"t_cell"``, ``"tumor"``,
        ``"dead"``...).
    organ_key
        Key of :data:`stlib.demo.config.ORGANS`.
    cancer
        Tumour sample (more activated fibroblasts).
    offvocab_fraction
        Fraction of all cells turned into off-vocabulary types (:data:`OFF_VOCABULARY`), taken
        from compartments where such cells sit (pericytes next to vessels, myoepithelium in
        glands, neutrophils and dendritic cells among immune cells); capped by what exists.
    rng
        Random generator.
    xy, vessel_xy
        Cell positions and endothelial positions (pericytes are taken from the fibroblasts
        nearest to vessels when given).

    Returns
    -------
    Array of generator type names (``"tumour_cell"`` for tumour, ``"dying_cell"`` for dead cells).
    """
    tt = np.asarray(tissue_types, dtype=object)
    n = tt.size
    out = np.empty(n, dtype=object)
    for t in np.unique(tt):
        m = tt == t
        if t == "tumor":
            out[m] = TUMOUR_TYPE
            continue
        if t == "dead":
            out[m] = DEAD_TYPE
            continue
        w = _weights(organ_key, t, cancer)
        names = np.array(list(w), dtype=object)
        p = np.array(list(w.values()), float)
        out[m] = rng.choice(names, size=int(m.sum()), p=p / p.sum())
    if offvocab_fraction <= 0 or n == 0:
        return out
    want = int(round(offvocab_fraction * n))
    shares = {k: v for k, v in _OFFVOCAB_SHARE.items()
              if k != "myoepithelial" or organ_key in _MYOEPITHELIAL_ORGANS}
    total = sum(shares.values())
    for name, share in shares.items():
        k = int(round(want * share / total))
        donors = np.flatnonzero(np.isin(tt, _OFFVOCAB_DONORS[name]) & ~np.isin(out, OFF_VOCABULARY))
        if k <= 0 or donors.size == 0:
            continue
        k = min(k, int(0.5 * donors.size))  # never more than half of a compartment
        if name == "pericyte" and xy is not None and vessel_xy is not None and len(vessel_xy):
            from scipy.spatial import cKDTree

            d, _ = cKDTree(vessel_xy).query(xy[donors])
            pick = donors[np.argsort(d, kind="stable")[:k]]
        else:
            pick = rng.choice(donors, size=k, replace=False)
        out[pick] = name
    return out


def types_for_classes(classes: Sequence[int], organ_key: str, *, cancer: bool,
                      rng: np.random.Generator) -> np.ndarray:
    """Generator types for cells known only by their truth class (e.g. annotated real H&E).

    Each class draws from the organ's compartments: Neoplastic -> tumour cells (normal
    epithelium in a healthy sample), Inflammatory -> the immune mix, Connective -> the stromal
    mix (fibroblasts, endothelium, smooth muscle), Dead -> dying cells, Epithelial -> the
    organ's normal epithelium.
    """
    from stlib.constants import CLASS_NAMES

    cls = np.asarray(classes, dtype=int)
    tissue = np.empty(cls.size, dtype=object)
    mix = {
        NEOPLASTIC: (("tumor",) if cancer else ("epithelial",), (1.0,)),
        INFLAMMATORY: (("t_cell", "b_cell", "plasma", "macrophage"), (0.5, 0.2, 0.1, 0.2)),
        CONNECTIVE: (("fibroblast", "endothelial", "smooth_muscle"), (0.65, 0.25, 0.10)),
        DEAD: (("dead",), (1.0,)),
        EPITHELIAL: (("epithelial",), (1.0,)),
    }
    for c in np.unique(cls):
        if int(c) not in mix:
            raise ValueError(f"class {c} has no generator types; classes are {sorted(CLASS_NAMES)}")
        names, p = mix[int(c)]
        m = cls == c
        tissue[m] = rng.choice(np.array(names, dtype=object), size=int(m.sum()), p=np.array(p) / sum(p))
    return assign_cell_types(tissue, organ_key, cancer=cancer, offvocab_fraction=0.0, rng=rng)


# ------------------------------------------------------------------------------------------
# copy number
# ------------------------------------------------------------------------------------------

#: common arm-level events per organ (+ gain, - loss; a bare chromosome = both arms). From the
#: recurrent arm-level SCNAs of TCGA pan-cancer analyses (Beroukhim et al. 2010, Taylor et al. 2018)
_TYPICAL_EVENTS: dict[str, tuple[str, ...]] = {
    "breast": ("+1q", "+8q", "-16q", "+17q", "+20q", "-8p", "-17p", "-11q"),
    "lung": ("+1q", "+5p", "+7p", "+8q", "-3p", "-8p", "-9p", "-13q"),
    "pancreas": ("-9p", "-18q", "-17p", "+7p", "-6q", "+1q"),
    "prostate": ("-8p", "+8q", "-13q", "-16q", "-6q", "-10q"),
    "bowel": ("+7", "+8q", "+13", "+20q", "-8p", "-17p", "-18", "-4q"),
    "skin": ("+6p", "+7", "+8q", "+1q", "-9p", "-10", "-6q", "-11q"),
    "kidney": ("+7", "+17", "-3p", "+5q", "-14q"),
    "liver": ("+1q", "+8q", "-8p", "-17p", "-4q", "+6p"),
    "stomach": ("+8q", "+20q", "+7", "-18q", "-4q", "+13"),
    "thyroid": ("-22", "+5", "+12"),
}


def copy_number_events(organ_key: str, rng: np.random.Generator, *, n_min: int = 4,
                       n_extra_mean: float = 3.0) -> list[tuple[str, int]]:
    """Arm-level copy-number events of one tumour: ``[(arm, +1 | -1), ...]``.

    About 60 % are drawn from the organ's recurrent events, the rest from random autosomal arms;
    4 + Poisson(3) events (capped at 12), in the range of carcinomas' arm-level aneuploidy
    (Taylor et al. 2018: median ~6-10 arm events in most carcinoma types).
    """
    from stlib.io.panels import CENTROMERE_MB

    n = min(n_min + int(rng.poisson(n_extra_mean)), 12)
    typical = list(_TYPICAL_EVENTS.get(organ_key, ()))
    rng.shuffle(typical)
    # acrocentric chromosomes (13, 14, 15, 21, 22) carry no protein-coding genes on their p arms
    arms_all = [f"chr{c}{a}" for c in range(1, 23) for a in ("p", "q")
                if f"chr{c}" in CENTROMERE_MB and not (a == "p" and c in (13, 14, 15, 21, 22))]
    out: dict[str, int] = {}
    for k in range(n):
        if typical and rng.random() < 0.6:
            ev = typical.pop()
            sign = 1 if ev[0] == "+" else -1
            body = ev[1:]
            arms = [f"chr{body}"] if body[-1] in "pq" else [f"chr{body}p", f"chr{body}q"]
            arms = [a for a in arms if not (a.endswith("p") and a[3:-1] in ("13", "14", "15", "21", "22"))]
        else:
            arms = [arms_all[int(rng.integers(len(arms_all)))]]
            sign = 1 if rng.random() < 0.55 else -1
        for a in arms:
            out.setdefault(a, sign)
    return list(out.items())


# ------------------------------------------------------------------------------------------
# programmes of one sample
# ------------------------------------------------------------------------------------------

@dataclass
class SampleBiology:
    """Expression programmes of one sample (weights over the panel genes)."""

    genes: list[str]
    types: list[str]
    #: (n_types, n_genes) programme weights (not normalised)
    matrix: np.ndarray
    #: proliferation programme added to cycling cells (weights)
    proliferation: np.ndarray
    #: stress programme of dying cells (weights, x dead_signal)
    stress: np.ndarray
    #: per-gene multiplier of each copy-number state: (n_states, n_genes); state 0 = diploid,
    #: 1 = clonal events, 2 = clonal + subclonal events
    cnv: np.ndarray
    #: events: list of (arm, sign, subclonal)
    events: list[tuple[str, int, bool]] = field(default_factory=list)
    library: dict[str, float] = field(default_factory=dict)

    def row(self, t: str) -> np.ndarray:
        """Programme of type ``t``."""
        return self.matrix[self.types.index(t)]


def _index(genes: Sequence[str]) -> dict[str, int]:
    return {g: i for i, g in enumerate(genes)}


def _cohort_programmes(genes: list[str], marker_overlap: float, rng: np.random.Generator
                       ) -> dict[str, np.ndarray]:
    """Programmes of every catalogue type shared by the whole cohort (drawn with the cohort rng)."""
    G = len(genes)
    pos = _index(genes)
    base = np.exp(rng.normal(np.log(0.08), 1.0, G))
    names = list(CATALOGUE)
    listed = {g for t in CATALOGUE.values() for g in t.markers} | {g for v in FAMILY_GENES.values() for g in v}
    unlisted = np.array([i for i, g in enumerate(genes) if g not in listed], dtype=int)
    prog: dict[str, np.ndarray] = {}
    for t in names:
        prog[t] = base * np.exp(rng.normal(0.0, 0.35, G))
    for fam, fam_genes in FAMILY_GENES.items():
        ix = np.array([pos[g] for g in fam_genes if g in pos], dtype=int)
        if ix.size == 0:
            continue
        strength = np.exp(rng.normal(np.log(1.5), 0.5, ix.size))
        for t in names:
            if CATALOGUE[t].family == fam:
                prog[t][ix] += strength * np.exp(rng.normal(0.0, 0.3, ix.size))
    # markers: specific with probability marker_overlap; else absent from the type or shared
    shared: list[tuple[str, int, float]] = []
    for t in names:
        ix = np.array([pos[g] for g in CATALOGUE[t].markers if g in pos], dtype=int)
        if ix.size == 0:
            continue
        strength = np.exp(rng.normal(np.log(5.0), 0.5, ix.size))
        specific = rng.random(ix.size) < marker_overlap
        absent = ~specific & (rng.random(ix.size) < 0.5)
        prog[t][ix[~absent]] += strength[~absent]
        for g, s in zip(ix[~specific & ~absent], strength[~specific & ~absent]):
            shared.append((t, int(g), float(s)))
    for t, g, s in shared:
        # a non-specific marker is mostly shared with related types (T and NK cells, macrophages and
        # dendritic cells, smooth muscle and myofibroblasts, the epithelia of one organ ...): 70 % go
        # to types of the same family, the rest to types of any family
        kin = [u for u in names if u != t and CATALOGUE[u].family == CATALOGUE[t].family]
        others = [u for u in names if u != t]
        pool = kin if kin and rng.random() < 0.7 else others
        for u in rng.choice(pool, size=min(int(rng.integers(1, 4)), len(pool)), replace=False):
            prog[str(u)][g] += s * rng.uniform(0.3, 1.0)
    # private genes: biology that no marker list names
    if unlisted.size:
        for t in names:
            k = min(4, unlisted.size)
            ix = rng.choice(unlisted, size=k, replace=False)
            prog[t][ix] += np.exp(rng.normal(np.log(2.0), 0.4, k))
    return prog


def make_sample_biology(genes: Sequence[str], organ_key: str, *, cancer: bool, cfg: Any,
                        cohort_rng: np.random.Generator, sample_rng: np.random.Generator,
                        types_present: Sequence[str] | None = None) -> SampleBiology:
    """Programmes of one sample.

    Parameters
    ----------
    genes
        Panel genes (order of the count matrix).
    organ_key
        Organ (:data:`stlib.demo.config.ORGANS` key).
    cancer
        Tumour sample: adds the tumour programme and copy-number states.
    cfg
        :class:`stlib.demo.config.DemoConfig` (``marker_overlap``, ``cnv_fold``,
        ``cnv_subclonal_fraction``).
    cohort_rng
        Generator seeded per cohort (draws what every sample shares: the catalogue's programmes).
    sample_rng
        Generator seeded per sample (per-sample variation, the tumour's signature subset, drift
        and copy-number events).
    types_present
        Restrict the matrix to these types (default: the whole catalogue).
    """
    genes = list(genes)
    G = len(genes)
    pos = _index(genes)
    prog = _cohort_programmes(genes, float(cfg.marker_overlap), cohort_rng)
    names = list(types_present) if types_present is not None else list(CATALOGUE)
    names = [t for t in names if t in CATALOGUE]
    # per-sample variation of every programme
    mats = {t: prog[t] * np.exp(sample_rng.normal(0.0, 0.25, G)) for t in CATALOGUE}
    library = {t: CATALOGUE[t].library for t in CATALOGUE}
    rows = {t: mats[t] for t in names}
    events: list[tuple[str, int, bool]] = []
    cnv = np.ones((3, G))
    if cancer:
        sig = TUMOUR_SIGNATURES.get(organ_key) or TUMOUR_SIGNATURES["breast"]
        lineage = list(sig["lineage"])
        w = sample_rng.dirichlet(np.ones(len(lineage)) * 2.0) if len(lineage) > 1 else np.ones(1)
        tum = sum(wi * mats[t] for wi, t in zip(w, lineage))
        tum = tum.copy()
        # partial loss of lineage markers (dedifferentiation)
        lin_ix = np.array(sorted({pos[g] for t in lineage for g in CATALOGUE[t].markers if g in pos}), dtype=int)
        if lin_ix.size:
            lost = lin_ix[sample_rng.random(lin_ix.size) < 0.3]
            tum[lost] *= sample_rng.uniform(0.2, 0.6, lost.size)
        up = np.array([pos[g] for g in sig["up"] if g in pos], dtype=int)
        up = up[sample_rng.random(up.size) < 0.75]
        tum[up] += np.exp(sample_rng.normal(np.log(3.0), 0.5, up.size))
        down = np.array([pos[g] for g in sig["down"] if g in pos], dtype=int)
        tum[down] *= sample_rng.uniform(0.1, 0.4, down.size)
        # sample-specific drift: 15 % of genes change by a log-normal factor (sd 0.8: |log2 FC| > 1 for
        # ~40 % of them). Tumour-versus-normal comparisons (TCGA) find thousands of DE genes, 5-15 %
        # of genes at |log2 FC| > 1; this is at the low end.
        drift = sample_rng.random(G) < 0.15
        tum[drift] *= np.exp(sample_rng.normal(0.0, 0.8, int(drift.sum())))
        rows[TUMOUR_TYPE] = tum
        library[TUMOUR_TYPE] = 1.25 * float(np.mean([CATALOGUE[t].library for t in lineage]))
        # copy-number states
        from stlib.io.panels import chromosome_arms

        arm = chromosome_arms(genes)
        fold = float(cfg.cnv_fold)
        for a, s in copy_number_events(organ_key, sample_rng):
            sub = bool(sample_rng.random() < float(cfg.cnv_subclonal_fraction))
            events.append((a, s, sub))
            m = arm == a
            f = fold ** s
            cnv[2, m] *= f
            if not sub:
                cnv[1, m] *= f
    # a dying cell keeps the programme of what it was; the matrix row is only a placeholder
    prolif = np.zeros(G)
    ix = np.array([pos[g] for g in PROLIFERATION_GENES if g in pos], dtype=int)
    prolif[ix] = np.exp(cohort_rng.normal(np.log(4.0), 0.4, ix.size))
    stress = np.zeros(G)
    ix = np.array([pos[g] for g in STRESS_GENES if g in pos], dtype=int)
    stress[ix] = np.exp(cohort_rng.normal(np.log(4.0), 0.4, ix.size))
    types = list(rows)
    return SampleBiology(genes=genes, types=types, matrix=np.stack([rows[t] for t in types]),
                         proliferation=prolif, stress=stress, cnv=cnv, events=events, library=library)


def per_cell_programmes(bio: SampleBiology, cell_type: Sequence[str], origin: Sequence[str], *,
                        cfg: Any, rng: np.random.Generator, xy_um: np.ndarray | None = None
                        ) -> dict[str, np.ndarray]:
    """Per-cell programme weights (cells x genes), library factors and per-cell states.

    Parameters
    ----------
    bio
        Programmes of the sample (:func:`make_sample_biology`).
    cell_type
        Generator type per cell (``"tumour_cell"``, ``"dying_cell"`` or a catalogue type).
    origin
        What a dying cell was (a generator type; ignored for the others).
    cfg
        ``cycling_normal_fraction``, ``noncycling_tumour_fraction``, ``dead_signal``,
        ``atypical_fraction``.
    rng
        Random generator.
    xy_um
        Cell positions: subclones are spatially coherent when given.

    Returns
    -------
    dict with ``P`` (cells x genes weights), ``library`` (relative library size per cell),
    ``cycling``, ``clone`` (0 normal, 1 clonal tumour, 2 subclone), ``atypical`` (bool).
    """
    ct = np.asarray(cell_type, dtype=object)
    orig = np.asarray(origin, dtype=object)
    n = ct.size
    is_dead = ct == DEAD_TYPE
    src = np.where(is_dead, orig, ct)
    # a dying cell whose origin has no row (e.g. tumour in a healthy sample) takes a present type
    avail = set(bio.types)
    bad = ~np.isin(src, list(avail))
    if bad.any():
        fallback = [t for t in bio.types if t != TUMOUR_TYPE] or bio.types
        src[bad] = rng.choice(np.array(fallback, dtype=object), size=int(bad.sum()))
    tidx = np.array([bio.types.index(t) for t in src], dtype=int)
    P = bio.matrix[tidx].copy()
    lib = np.array([bio.library.get(t, 1.0) for t in src], float)
    # copy number: tumour cells (and dying tumour cells) are clonal, a spatial subclone carries more
    clone = np.zeros(n, np.int8)
    tum = src == TUMOUR_TYPE
    if tum.any():
        clone[tum] = 1
        if any(sub for *_, sub in bio.events):
            frac = rng.uniform(0.3, 0.7)
            if xy_um is not None and tum.sum() > 3:
                axis = rng.normal(size=2)
                proj = xy_um[tum] @ (axis / np.linalg.norm(axis))
                proj = proj + rng.normal(0, 0.15 * (np.ptp(proj) + 1e-9), proj.size)
                sub = proj >= np.quantile(proj, 1 - frac)
            else:
                sub = rng.random(int(tum.sum())) < frac
            ci = np.flatnonzero(tum)
            clone[ci[sub]] = 2
        P[tum] *= bio.cnv[clone[tum]]
    P /= P.sum(1, keepdims=True)
    # cycling: a state of any cell; a cycling cell spends ~10 % of its panel transcripts on
    # G2/M / S-phase genes (panels carry a handful of them)
    p_cyc = np.where(tum, 1.0 - float(cfg.noncycling_tumour_fraction), float(cfg.cycling_normal_fraction))
    cycling = (rng.random(n) < p_cyc) & ~is_dead
    if cycling.any() and bio.proliferation.sum() > 0:
        P[cycling] += _CYCLING_SHARE * bio.proliferation[None, :] / bio.proliferation.sum()
    # dying cells: RNA loss and a weak stress programme, both x dead_signal (0 = indistinguishable)
    s = float(cfg.dead_signal)
    if is_dead.any() and s > 0:
        if bio.stress.sum() > 0:
            P[is_dead] += s * _STRESS_SHARE * bio.stress[None, :] / bio.stress.sum()
        lib[is_dead] *= 1.0 - 0.75 * min(s, 1.0)
    # atypical cells: a mixture with another present type (doublet-like / transitional states)
    atyp = (rng.random(n) < float(cfg.atypical_fraction)) & ~is_dead
    if atyp.any():
        present = [t for t in bio.types if (src == t).any()] or bio.types
        other = rng.choice(np.array(present, dtype=object), size=int(atyp.sum()))
        mix = rng.uniform(0.35, 0.6, int(atyp.sum()))[:, None]
        rows_o = bio.matrix[[bio.types.index(t) for t in other]]
        P[atyp] = (1 - mix) * P[atyp] / P[atyp].sum(1, keepdims=True) + mix * rows_o / rows_o.sum(1, keepdims=True)
    P /= P.sum(1, keepdims=True)
    return {"P": P, "library": lib, "cycling": cycling, "clone": clone, "atypical": atyp,
            "source_type": src.astype(str)}


def realised_marker_specificity(bio: SampleBiology, markers: Mapping[str, Sequence[str]],
                                mapping: Mapping[str, str], *, fold: float = 3.0) -> dict[str, float]:
    """Fraction of a labeler's markers (per labeler type) that the mapped generator type expresses
    at least ``fold`` times above the median of the other types: what ``marker_overlap`` means
    once the programmes are drawn. ``mapping``: labeler type -> generator type. For reports only.
    """
    pos = _index(bio.genes)
    out: dict[str, float] = {}
    for lt, gt in mapping.items():
        if gt not in bio.types:
            continue
        ix = [pos[g] for g in markers.get(lt, []) if g in pos]
        if not ix:
            continue
        own = bio.row(gt)[ix]
        others = np.stack([bio.row(t)[ix] for t in bio.types if t != gt and t != TUMOUR_TYPE])
        out[lt] = float(np.mean(own >= fold * np.median(others, axis=0)))
    return out
