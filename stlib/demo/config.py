"""Knobs of the synthetic cohort (:class:`DemoConfig`) and the organ / sample tables."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from stlib.constants import HEST_XENIUM_UM_PER_PX, TARGET_UM_PER_PX_40X
from stlib.utils import InputError

__all__ = ["DemoConfig", "SCALES", "PRESETS", "config_for_scale", "OrganSpec", "ORGANS", "SampleSpec", "cohort_samples",
           "FINE_TYPE_TO_CLASS", "PANNUKE_EXTRA_ORGANS"]

#: scale presets: values that differ from the DemoConfig defaults
SCALES: dict[str, dict[str, Any]] = {
    "demo": {},
    "workshop": {"n_per_organ": 2, "image_px": 2048, "pannuke_per_fold": 64, "raw_bundles": 2},
}

#: biology presets: values that differ from the DemoConfig defaults. ``realistic`` is the default
#: (the knobs' own defaults); ``easy`` is the generator before issue 12 (its programmes were built
#: from the labeler's own gene lists, every tumour cell cycled, no normal cell did, copy-number blocks
#: of x0.3-x3.0, dead cells carried a strong apoptosis signal, no type outside the labeler's
#: vocabulary, Xenium covered the whole H&E): kept so that the old numbers stay reproducible and as the
#: easy end of the robustness curves. With ``biology="legacy"`` the biology knobs below are not read;
#: the values written here only describe what the legacy programmes do.
PRESETS: dict[str, dict[str, Any]] = {
    "realistic": {},
    "easy": {"biology": "legacy", "marker_overlap": 1.0, "cnv_fold": 2.5, "cnv_subclonal_fraction": 0.0,
             "cycling_normal_fraction": 0.0, "noncycling_tumour_fraction": 0.0, "offvocab_fraction": 0.0,
             "dead_signal": 1.0, "xenium_region_fraction": 1.0},
}


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of the synthetic cohort. All are CLI options of ``stlib demo``.

    Distances are in µm unless the name says ``_px``; fractions are in [0, 1].
    """

    # -- size of the cohort ------------------------------------------------------------
    #: samples per organ of the cohort table
    n_per_organ: int = 1
    #: level-0 edge of each H&E image (px)
    image_px: int = 1024
    #: level-0 pixel size of the H&E images (µm/px; HEST Xenium WSIs are ~0.2737)
    um_per_px: float = HEST_XENIUM_UM_PER_PX
    #: number of samples that also get a raw Xenium bundle under xenium/{id}/
    raw_bundles: int = 1
    #: number of samples whose Xenium cell ids are integers (older XOA / R exports)
    int_id_samples: int = 1
    #: PanNuke-like images per fold (3 folds)
    pannuke_per_fold: int = 40
    #: PanNuke tile edge (px) and resolution (µm/px)
    pannuke_px: int = 256
    pannuke_um_per_px: float = TARGET_UM_PER_PX_40X
    #: Xenium panel whose genes are used
    panel: str = "hMulti"

    # -- tissue ------------------------------------------------------------------------
    #: multiplier of every cell density
    cell_density: float = 1.0
    #: fraction of cells that are dead (pyknotic / apoptotic)
    dead_fraction: float = 0.03
    #: fraction of cells with atypical / ambiguous expression (truth class unchanged)
    atypical_fraction: float = 0.03

    # -- biology (stlib.demo.biology; defined apart from the labeler's marker files) ----
    #: "realistic" (stlib.demo.biology) or "legacy" (the pre-issue-12 programmes; preset "easy")
    biology: str = "realistic"
    #: fraction of each type's textbook markers that the type really expresses specifically (the
    #: others are absent from it or shared with 1-3 other types). 10x's own hMulti annotation assigns
    #: only 32 % of the labeler's hMulti markers to a single cell type (median 2 types per gene); many
    #: of the shared ones are shared between related types, so 0.6 at the granularity of our types
    #: is if anything generous.
    marker_overlap: float = 0.6
    #: expression fold of an arm-level copy-number change (gain x fold, loss / fold). One extra or
    #: one lost copy of an arm changes the expression of its genes by ~1.2-1.5x on average in tumour
    #: RNA-seq (dosage is partly compensated; inferCNV-style signals are of this size).
    cnv_fold: float = 1.3
    #: fraction of a tumour's arm-level events that are subclonal (present in one spatial subclone
    #: of 30-70 % of its cells); multi-region sequencing (e.g. TRACERx) finds a quarter to a half of
    #: copy-number events subclonal.
    cnv_subclonal_fraction: float = 0.3
    #: fraction of normal cells that cycle. Ki-67 labelling indices of normal adult tissues are mostly
    #: below 5 % (crypt bases and germinal centres are the exceptions).
    cycling_normal_fraction: float = 0.03
    #: fraction of tumour cells that do not cycle. Ki-67 indices of carcinomas: median ~15-30 % in
    #: breast and lung adenocarcinoma, lower in prostate cancer, higher in colorectal cancer; 0.7
    #: means a Ki-67 index of 30 %.
    noncycling_tumour_fraction: float = 0.7
    #: fraction of cells of types outside the labeler's vocabulary (neutrophils, dendritic cells,
    #: pericytes, Schwann cells, myoepithelium): each is a few % of the cells of a carcinoma section
    #: in single-cell atlases, together ~5-10 %.
    offvocab_fraction: float = 0.08
    #: strength of any expression signal of dying cells (0 = none): RNA loss (library x (1 - 0.75 s))
    #: and a stress/apoptosis programme (8 s % of the panel transcripts). Pyknotic cells lose RNA,
    #: but no panel signature of cell death has been validated; 0.3 is a weak signal.
    dead_signal: float = 0.3
    #: fraction of the H&E field that the Xenium run imaged (cells outside have no polygon and no
    #: transcripts). A Xenium region is chosen on the slide and often leaves tissue of the H&E
    #: section outside it; 0.85 is a typical share.
    xenium_region_fraction: float = 0.85

    # -- expression --------------------------------------------------------------------
    #: median transcripts per (live) cell
    tx_per_cell_median: float = 120.0
    #: sd of log library size between cells
    library_log_sd: float = 0.45
    #: negative-binomial size (dispersion) of gene counts; larger = closer to Poisson
    nb_size: float = 4.0
    #: mean fraction of a cell's transcripts that come from its neighbours (spill-over)
    spill_fraction: float = 0.15
    #: distance scale of spill-over (µm, Gaussian weight of neighbours)
    spill_range_um: float = 8.0
    #: fraction of a cell's transcripts drawn from the ambient (tissue-average) profile
    ambient_fraction: float = 0.05
    #: fraction of panel genes with poor detection (dropout: efficiency x0.1)
    dropout_fraction: float = 0.05
    #: transcripts outside every cell (UNASSIGNED), as a fraction of assigned ones
    unassigned_fraction: float = 0.08
    #: fraction of a cell's transcripts that lie inside its DAPI nucleus
    nuclear_tx_fraction: float = 0.6
    #: cytoplasm rim around the nucleus in which the other transcripts lie (µm)
    cyto_um: float = 3.0
    #: fraction of transcripts with qv < 20
    low_qv_fraction: float = 0.08
    #: control-probe transcripts (NegControlProbe_*, BLANK_*) per transcript drawn for a cell (the
    #: scattered unassigned gene transcripts not counted; a third of the low-qv ones decode as a gene)
    control_fraction: float = 0.01

    # -- DAPI segmentation vs H&E nucleus ----------------------------------------------
    #: sd of the DAPI/H&E size ratio (dilation/erosion)
    dapi_scale_sd: float = 0.10
    #: mean DAPI/H&E size ratio (DAPI outlines are a little larger than H&E nuclei)
    dapi_scale_mean: float = 1.08
    #: centroid offset of the DAPI outline (µm, sd per axis)
    dapi_shift_um: float = 0.45
    #: vertex jitter of the DAPI outline (relative radius sd)
    dapi_jitter: float = 0.06
    #: visible nuclei without a Xenium polygon (missed by DAPI segmentation)
    missing_fraction: float = 0.05
    #: Xenium polygons without a visible H&E nucleus (out of the H&E section plane)
    extra_fraction: float = 0.03

    # -- registration ------------------------------------------------------------------
    #: max |rotation| of the true Xenium -> H&E map (degrees)
    true_rot_deg: float = 3.0
    #: smooth local warp amplitude (H&E px, sd on the grid)
    warp_px: float = 3.0
    #: warp grid nodes per axis
    warp_grid: int = 5
    #: shift error of the HEST registration (µm, magnitude)
    reg_shift_um: float = 5.0
    #: rotation error of the HEST registration (degrees, magnitude)
    reg_rot_deg: float = 1.0
    #: relative scale error of the HEST registration
    reg_scale_err: float = 0.004

    # -- scanner -----------------------------------------------------------------------
    #: optical blur sigma (px)
    blur_px: float = 0.7
    #: extra blur sigma in the out-of-focus area (px)
    defocus_px: float = 1.8
    #: fraction of the image that is out of focus
    defocus_fraction: float = 0.12
    #: RGB noise sd (0-255 scale)
    noise_sd: float = 2.5
    #: JPEG quality of the pyramidal TIFF
    jpeg_quality: int = 88
    #: per-sample jitter of stain vectors / intensities (relative)
    stain_jitter: float = 0.06

    # -- CellViT-like second opinion ---------------------------------------------------
    #: fraction of visible nuclei it finds
    cellvit_recall: float = 0.92
    #: fraction of found nuclei with the right class
    cellvit_class_acc: float = 0.8
    #: false positives per true nucleus
    cellvit_fp: float = 0.03

    # -- post-Xenium H&E ---------------------------------------------------------------
    #: strength (0..1) of the look of H&E stained *after* a Xenium run, on the HEST-layout slides
    #: only (the PanNuke-layout set stays routine H&E): paler, greyer haematoxylin, stronger eosin,
    #: softer chromatin (:func:`stlib.demo.render.post_xenium_stain`). A modelled shift, not a
    #: measured one; 0 = the slides share the PanNuke-layout set's stain distribution.
    post_xenium_stain: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every knob."""
        return dataclasses.asdict(self)

    def validate(self) -> DemoConfig:
        """Check ranges; raise :class:`InputError` naming the knob."""
        fracs = ["marker_overlap", "cnv_subclonal_fraction", "cycling_normal_fraction",
                 "noncycling_tumour_fraction", "offvocab_fraction", "dead_fraction", "atypical_fraction", "spill_fraction", "ambient_fraction", "dropout_fraction",
                 "nuclear_tx_fraction", "low_qv_fraction", "missing_fraction", "extra_fraction",
                 "defocus_fraction", "cellvit_recall", "cellvit_class_acc", "post_xenium_stain"]
        for k in fracs:
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise InputError(f"knob {k} must be in [0, 1], got {v}", fix=f"pass --{k.replace('_', '-')} in [0, 1]")
        if self.biology not in ("realistic", "legacy"):
            raise InputError(f"knob biology must be 'realistic' or 'legacy', got {self.biology!r}",
                             fix="pass --biology realistic|legacy (or --preset easy)")
        if not self.cnv_fold >= 1.0:
            raise InputError(f"knob cnv_fold must be >= 1 (a gain multiplies by it, a loss divides), got {self.cnv_fold}",
                             fix="pass --cnv-fold 1.3 for example")
        if self.dead_signal < 0:
            raise InputError(f"knob dead_signal must be >= 0, got {self.dead_signal}", fix="pass --dead-signal 0 or more")
        if not 0.05 <= self.xenium_region_fraction <= 1.0:
            raise InputError(f"knob xenium_region_fraction must be in [0.05, 1], got {self.xenium_region_fraction}",
                             fix="pass --xenium-region-fraction in [0.05, 1]")
        if self.spill_fraction + self.ambient_fraction >= 0.9:
            raise InputError("spill_fraction + ambient_fraction must be < 0.9",
                             fix="lower --spill-fraction or --ambient-fraction")
        for k in ("n_per_organ", "image_px", "pannuke_px", "tx_per_cell_median", "um_per_px",
                  "pannuke_um_per_px", "nb_size", "spill_range_um", "warp_grid", "cell_density"):
            if not getattr(self, k) > 0:
                raise InputError(f"knob {k} must be > 0, got {getattr(self, k)}")
        if self.image_px < 128 or self.pannuke_px < 64:
            raise InputError(f"image_px must be >= 128 and pannuke_px >= 64, got {self.image_px}, {self.pannuke_px}")
        if self.warp_grid < 2:
            raise InputError(f"warp_grid must be >= 2, got {self.warp_grid}")
        if not 1 <= self.jpeg_quality <= 100:
            raise InputError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        for k in ("raw_bundles", "int_id_samples", "pannuke_per_fold"):
            if getattr(self, k) < 0:
                raise InputError(f"knob {k} must be >= 0, got {getattr(self, k)}")
        return self


def config_for_scale(scale: str = "demo", preset: str = "realistic", **overrides: Any) -> DemoConfig:
    """The preset of ``scale`` (``demo`` | ``workshop``) and biology ``preset`` (``realistic`` |
    ``easy``) with ``overrides`` applied."""
    if scale not in SCALES:
        raise InputError(f"unknown scale {scale!r}", fix=f"one of {sorted(SCALES)}")
    if preset not in PRESETS:
        raise InputError(f"unknown biology preset {preset!r}", fix=f"one of {sorted(PRESETS)}")
    names = {f.name for f in fields(DemoConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise InputError(f"unknown demo knob(s) {bad}", fix=f"known knobs: {sorted(names)}")
    return DemoConfig(**{**SCALES[scale], **PRESETS[preset], **overrides}).validate()


# ---------------------------------------------------------------------------------------
# organs
# ---------------------------------------------------------------------------------------

#: tissue compartment type (stlib.demo.tissue; it sets the nucleus morphology) -> image-oriented class
#: id (1 Neoplastic ... 5 Epithelial). With the realistic biology each compartment's cells get a
#: generator type (stlib.demo.biology) whose class is the same as its compartment's.
FINE_TYPE_TO_CLASS: dict[str, int] = {
    "tumor": 1,
    "t_cell": 2, "b_cell": 2, "plasma": 2, "macrophage": 2,
    "fibroblast": 3, "endothelial": 3, "smooth_muscle": 3, "adipocyte": 3,
    "dead": 4,
    "epithelial": 5, "melanocyte": 5,
}


@dataclass(frozen=True)
class OrganSpec:
    """How one organ looks (architecture, stain, nuclei) and what its cells express."""

    name: str                      # HEST organ name
    pannuke: str                   # PanNuke tissue name
    tissue: str                    # HEST "tissue" column
    #: architecture of the normal epithelium: glands | acini | alveoli | crypts | epidermis | none
    normal: str
    #: architecture of the tumour: nests | glands | sheets
    tumour: str
    #: fraction of the area that is epithelium / tumour compartments
    epi_area: float
    fat_area: float
    immune_density: float          # scattered immune cells in stroma (relative)
    aggregate: bool                # lymphoid aggregate present
    #: haematoxylin / eosin OD vectors (RGB absorbances, normalised later) and strengths
    h_vec: tuple[float, float, float]
    e_vec: tuple[float, float, float]
    h_strength: float
    e_strength: float
    nucleus_scale: float           # multiplier of nuclear size
    #: normal epithelial programme genes (must be in the panel; missing ones are skipped)
    epi_genes: tuple[str, ...]
    #: tumour signature genes (up in tumour cells)
    tumour_up: tuple[str, ...]
    #: genes down in tumour cells (loss of differentiation)
    tumour_down: tuple[str, ...] = ()


_H = (0.65, 0.70, 0.29)
_E = (0.07, 0.99, 0.11)

ORGANS: dict[str, OrganSpec] = {
    "breast": OrganSpec("Breast", "Breast", "Breast", "glands", "nests", 0.22, 0.18, 1.0, True,
                        (0.62, 0.72, 0.30), (0.10, 0.98, 0.15), 1.0, 0.95, 1.0,
                        ("EPCAM", "KRT7", "ELF5", "FOXA1", "SCGB2A1", "ABCC11", "TBX3", "MLPH"),
                        ("ERBB2", "ESR1", "PGR", "MYC", "MDM2", "GPRC5A"), ("ELF5",)),
    "lung": OrganSpec("Lung", "Lung", "Lung", "alveoli", "glands", 0.18, 0.0, 1.3, False,
                      (0.66, 0.68, 0.32), (0.08, 0.99, 0.12), 0.95, 0.85, 1.0,
                      ("EPCAM", "KRT7", "AGER", "SFTA2", "PEBP4", "FOXJ1", "AQP3", "CAPN8"),
                      ("MET", "EGFR", "GPRC5A", "MYC", "STC1", "LY6D"), ("AGER", "FOXJ1")),
    "pancreas": OrganSpec("Pancreas", "Pancreatic", "Pancreas", "acini", "glands", 0.5, 0.05, 0.5, False,
                          (0.60, 0.74, 0.30), (0.12, 0.97, 0.18), 1.05, 1.0, 0.95,
                          ("EPCAM", "CFTR", "AMY2A", "INS", "GCG", "SST", "PPY", "CHGA", "SCGN"),
                          ("MET", "GPRC5A", "MYC", "TM4SF4", "SERPINB3"), ("AMY2A",)),
    "prostate": OrganSpec("Prostate", "Prostate", "Prostate", "glands", "glands", 0.3, 0.0, 0.7, False,
                          (0.64, 0.70, 0.31), (0.08, 0.99, 0.13), 1.0, 0.9, 0.95,
                          ("EPCAM", "AR", "KLK11", "SPDEF", "FOXA1", "NAT8", "TMC5"),
                          ("ERG", "MYC", "MYBPC1", "PCP4", "TBX3"), ("KLK11",)),
    "bowel": OrganSpec("Bowel", "Colon", "Colon", "crypts", "glands", 0.35, 0.0, 1.4, True,
                       (0.66, 0.69, 0.28), (0.06, 0.99, 0.10), 1.05, 0.9, 1.0,
                       ("EPCAM", "KRT20", "AQP8", "SLC26A3", "SLC26A2", "CLCA1", "CA4", "SPDEF"),
                       ("LGR5", "MYC", "GPX2", "EPCAM", "CDH16", "SMIM24"), ("AQP8", "SLC26A3", "CA4", "CLCA1")),
    "skin": OrganSpec("Skin", "Skin", "Skin", "epidermis", "sheets", 0.3, 0.05, 1.1, False,
                      (0.63, 0.71, 0.31), (0.11, 0.98, 0.14), 1.0, 1.05, 1.0,
                      ("COL17A1", "FGFBP1", "LY6D", "SERPINB3", "CCL27", "DST", "GPRC5A", "AQP3"),
                      ("MLANA", "EDNRB", "S100A1", "SOX2", "CD274", "GPC3"), ()),
    # PanNuke-only organs (not in the HEST demo samples)
    "kidney": OrganSpec("Kidney", "Kidney", "Kidney", "glands", "sheets", 0.5, 0.0, 0.6, False,
                        (0.64, 0.70, 0.30), (0.09, 0.98, 0.14), 1.0, 1.1, 0.95,
                        ("EPCAM", "UMOD", "CDH16", "AQP2", "SLC22A8", "FXYD2"), ("MET", "MYC", "STC2"), ()),
    "liver": OrganSpec("Liver", "Liver", "Liver", "acini", "sheets", 0.7, 0.02, 0.5, False,
                       (0.62, 0.72, 0.30), (0.10, 0.98, 0.16), 0.95, 1.15, 1.1,
                       ("HAMP", "TAT", "CYP3A4", "HPX", "KNG1", "APOA5"), ("GPC3", "MYC", "MDM2"), ()),
    "stomach": OrganSpec("Stomach", "Stomach", "Stomach", "crypts", "glands", 0.4, 0.0, 1.2, False,
                         (0.65, 0.69, 0.30), (0.07, 0.99, 0.11), 1.0, 0.95, 1.0,
                         ("EPCAM", "GKN2", "TFF2", "GHRL", "CLDN", "MUC"), ("MYC", "ERBB2", "CLDN"), ()),
    "thyroid": OrganSpec("Thyroid", "Thyroid", "Thyroid", "acini", "glands", 0.55, 0.0, 0.5, False,
                         (0.63, 0.71, 0.30), (0.08, 0.99, 0.12), 1.0, 1.0, 0.95,
                         ("EPCAM", "TFPI", "KCNK3"), ("MET", "MYC"), ()),
}

#: PanNuke-only organs (absent from the HEST demo cohort)
PANNUKE_EXTRA_ORGANS: tuple[str, ...] = ("kidney", "liver", "stomach", "thyroid")


@dataclass(frozen=True)
class SampleSpec:
    """One sample of the cohort table."""

    sample_id: str
    organ_key: str
    disease_state: str            # Cancer | Healthy
    oncotree_code: str            # "" for healthy
    role: str                     # train | held-out
    cell_id_style: str = "xoa"    # xoa | int
    raw_bundle: bool = False


_COHORT: tuple[tuple[str, str, str, str], ...] = (
    ("breast", "Cancer", "IDC", "train"),
    ("lung", "Cancer", "LUAD", "train"),
    ("pancreas", "Healthy", "", "train"),
    ("prostate", "Cancer", "PRAD", "train"),
    ("bowel", "Cancer", "COAD", "held-out"),
    ("skin", "Cancer", "SKCM", "held-out"),
)


def cohort_samples(cfg: DemoConfig) -> list[SampleSpec]:
    """The sample table for ``cfg``: one (or ``n_per_organ``) sample(s) per organ.

    With several samples per organ, every second one of a cancer organ is a healthy sample
    of that organ (so both states occur); held-out organs stay held out.
    """
    out: list[SampleSpec] = []
    for organ, disease, code, role in _COHORT:
        for k in range(cfg.n_per_organ):
            healthy = disease == "Healthy" or (k % 2 == 1)
            out.append(SampleSpec(
                sample_id=f"DEMO_{organ.upper()}_{k + 1}", organ_key=organ,
                disease_state="Healthy" if healthy else disease, oncotree_code="" if healthy else code, role=role))
    # integer ids: the first samples from the end of the train list (the healthy pancreas first)
    order = sorted(range(len(out)), key=lambda i: (out[i].disease_state != "Healthy", i))
    int_ids = set(order[: cfg.int_id_samples])
    raw = set(range(min(cfg.raw_bundles, len(out))))
    return [dataclasses.replace(s, cell_id_style="int" if i in int_ids else "xoa", raw_bundle=i in raw)
            for i, s in enumerate(out)]
