"""Per-cell expression and transcript placement from the same truth as the image.

Two biologies: the default, realistic one lives in :mod:`stlib.demo.biology` (its own cell-type
catalogue and programmes, defined apart from the labeler) and is simulated by
:func:`simulate_cell_expression`; the **legacy** one below (:data:`MARKERS`, :func:`make_programmes`,
:func:`simulate_expression`; the ``easy`` preset) is the generator before issue 12, kept so that its
numbers stay reproducible. Its gene lists were taken from the labeler's own marker sets and every
tumour cell cycles, which is why a labeler scores so well on it. Both share the count machinery
(:func:`draw_counts`: negative-binomial counts, spill-over, ambient RNA).

Legacy biology: every fine cell type has a programme over the panel genes: a shared low background plus its
marker genes (only genes that are in the panel are used). Neoplastic cells differ from the
normal epithelium of their organ **only** by the organ's tumour signature (up/down genes),
proliferation genes and copy-number-like shifts of blocks of genes that are contiguous in the
genome (GRCh38 order from ``stlib/data/gene_positions.csv``, as inferCNV-style methods see
them); melanoma cells are melanocytic programme + tumour genes + proliferation + CNV.

Dead cells get very low library sizes and the apoptosis-proxy genes of the panel (BCL2L11,
FAS) on top of a damped programme of the cell they came from. This is a **modelling choice to
make the class learnable from expression, not biology**: real Xenium data can hardly see
dead cells.

A cell's transcripts = its own negative-binomial counts + spill-over from neighbours
(Gaussian weight of distance; the realised mean fraction is the ``spill_fraction`` knob) +
ambient (tissue-average) counts; genes have per-sample detection efficiencies with a dropout
subset. Transcripts lie inside the DAPI nucleus (``overlaps_nucleus``) or in a cytoplasm rim;
unassigned transcripts and control probes are scattered; some transcripts have qv < 20 (a
third of those decoded as a wrong gene).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from stlib.demo.config import DemoConfig, OrganSpec
from stlib.io.panels import genomic_order

__all__ = ["Programmes", "make_programmes", "simulate_expression", "simulate_cell_expression", "draw_counts",
           "detection_efficiency", "cell_count_matrix", "MARKERS", "PROLIFERATION", "APOPTOSIS", "CONTROL_PROBES"]

MARKERS: dict[str, tuple[str, ...]] = {
    "epithelial": ("EPCAM", "KRT7", "FOXA1", "EHF", "AQP3", "MLPH", "TMC5"),
    "melanocyte": ("MLANA", "EDNRB", "S100A1", "KIT", "PMP22", "SNCG"),
    "t_cell": ("CD3D", "CD3E", "CD2", "TRAC", "CD247", "IL7R", "CD8A", "CD4", "NKG7", "GZMK", "CD28", "PTPRC"),
    "b_cell": ("MS4A1", "CD19", "CD79A", "BANK1", "TCL1A", "SPIB", "CXCR4", "SELL", "PTPRC"),
    "plasma": ("MZB1", "TNFRSF17", "DERL3", "PRDM1", "FKBP11", "TENT5C", "SLAMF7", "CD27"),
    "macrophage": ("CD68", "CD163", "CD14", "FCGR3A", "AIF1", "MRC1", "TREM2", "MS4A4A", "MS4A6A", "MPEG1",
                   "VSIG4", "SPI1", "LY86", "PTPRC"),
    "fibroblast": ("PDGFRA", "DPT", "OGN", "FBLN1", "CTSK", "SFRP2", "SFRP4", "FBN1", "MFAP5", "PCOLCE",
                   "COL5A2", "THBS2", "VCAN", "MEDAG", "PDGFRB"),
    "endothelial": ("PECAM1", "VWF", "CLEC14A", "ERG", "EGFL7", "RAMP2", "CD34", "CD93", "ECSCR", "SOX17",
                    "SOX18", "MMRN2", "ADGRL4", "GNG11"),
    "smooth_muscle": ("ACTA2", "MYH11", "DES", "CNN1", "ACTG2", "MYLK", "RERGL", "KCNMA1", "PLAC9", "PDGFRB"),
    "adipocyte": ("ADIPOQ", "LPL", "PPARG", "PLIN4", "CAVIN2", "CAV1", "RBP5"),
}
PROLIFERATION = ("MKI67", "TOP2A", "CDK1", "CENPF", "UBE2C", "PCNA", "CCNB2")
APOPTOSIS = ("BCL2L11", "FAS")
#: control features written next to the genes (10x-like names)
CONTROL_PROBES = tuple(f"NegControlProbe_{i:05d}" for i in (2, 3, 8, 9, 14, 16, 19, 22, 23, 24, 25, 28, 33, 35,
                                                               37, 39, 40, 41, 42, 43)) + \
    tuple(f"BLANK_{i:04d}" for i in range(1, 41))

#: relative library size per fine type
_LIB = {"tumor": 1.35, "epithelial": 1.05, "melanocyte": 0.9, "t_cell": 0.65, "b_cell": 0.75, "plasma": 1.2,
        "macrophage": 1.0, "fibroblast": 0.8, "endothelial": 0.75, "smooth_muscle": 0.85, "adipocyte": 0.55,
        "dead": 0.12}


@dataclass
class Programmes:
    """Gene programmes of one sample: a row per fine type (normalised to sum 1)."""

    genes: list[str]
    types: list[str]
    matrix: np.ndarray  # (n_types, n_genes)

    def row(self, t: str) -> np.ndarray:
        return self.matrix[self.types.index(t)]


def _idx(genes: list[str], names) -> np.ndarray:
    pos = {g: i for i, g in enumerate(genes)}
    return np.array([pos[g] for g in names if g in pos], dtype=int)


def make_programmes(genes: list[str], organ: OrganSpec, *, cancer: bool, bio_rng: np.random.Generator,
                    sample_rng: np.random.Generator) -> Programmes:
    """Programmes of every fine type for one sample.

    ``bio_rng`` draws what is shared by the cohort (background, marker strengths);
    ``sample_rng`` draws what is sample-specific (copy-number blocks of the tumour).
    """
    G = len(genes)
    base = np.exp(bio_rng.normal(np.log(0.12), 0.9, G))
    strength = np.exp(bio_rng.normal(np.log(7.0), 0.45, G))
    progs: dict[str, np.ndarray] = {}

    def with_markers(names, gain: float = 1.0) -> np.ndarray:
        w = base.copy()
        ix = _idx(genes, names)
        w[ix] += strength[ix] * gain
        return w

    for t, names in MARKERS.items():
        if t == "epithelial":
            continue
        progs[t] = with_markers(names)
    epi = with_markers(MARKERS["epithelial"] + organ.epi_genes)
    progs["epithelial"] = epi
    if organ.normal == "epidermis":  # keratinocytes: no glandular markers
        progs["epithelial"] = with_markers(organ.epi_genes + ("EPCAM",), 1.0)
    # tumour: normal epithelium (or melanocyte for melanoma) + signature + proliferation + CNV
    src = progs["melanocyte"] if organ.normal == "epidermis" else progs["epithelial"]
    tum = src.copy()
    down = _idx(genes, organ.tumour_down)
    tum[down] = base[down] * 0.5
    up = _idx(genes, organ.tumour_up)
    tum[up] += strength[up] * 1.2
    pro = _idx(genes, PROLIFERATION)
    tum[pro] += strength[pro] * 0.55
    cnv = np.ones(G)
    order = genomic_order(genes)  # panel genes with a GRCh38 position, in genome order
    n_blocks = int(sample_rng.integers(3, 6))
    for _ in range(n_blocks):
        length = int(sample_rng.integers(12, 32))
        start = int(sample_rng.integers(0, max(1, order.size - length)))
        cnv[order[start:start + length]] *= sample_rng.choice([0.3, 2.2, 3.0], p=[0.35, 0.4, 0.25])
    progs["tumor"] = tum * cnv
    # dead: apoptosis proxy on a damped background (the origin programme is mixed per cell)
    dead = base.copy()
    apo = _idx(genes, APOPTOSIS)
    dead[apo] += strength[apo] * 3.0
    progs["dead"] = dead
    if not cancer:
        progs.pop("tumor")
    types = sorted(progs)
    mat = np.stack([progs[t] / progs[t].sum() for t in types])
    return Programmes(list(genes), types, mat)


def _sample_categorical(cdf: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one category per entry of ``rows`` from the per-row CDFs ``cdf[rows]``."""
    u = rng.random(rows.size)
    out = np.empty(rows.size, dtype=np.int64)
    for r in np.unique(rows):
        m = rows == r
        out[m] = np.searchsorted(cdf[r], u[m] * cdf[r, -1], side="right")
    return np.minimum(out, cdf.shape[1] - 1)


def simulate_expression(prog: Programmes, fine_type: np.ndarray, xy_um: np.ndarray, assigned: np.ndarray,
                        rng: np.random.Generator, cfg: DemoConfig) -> dict[str, np.ndarray]:
    """Counts of every cell by source.

    Parameters
    ----------
    prog
        Programmes of the sample.
    fine_type
        Fine type per cell (all cells that carry transcripts: Xenium cells and missed nuclei).
    xy_um
        Cell centres (µm), ``(n, 2)``.
    assigned
        Whether the cell has a Xenium id (missed nuclei's transcripts become unassigned).
    rng
        Random generator.
    cfg
        Knobs (library size, dispersion, spill-over, ambient, dropout, atypical fraction).

    Returns
    -------
    dict with ``cell`` (cell index per transcript), ``gene`` (gene index), ``source``
    (0 own, 1 spill, 2 ambient), ``atypical`` (bool per cell), ``efficiency`` (per gene).
    """
    n = len(fine_type)
    G = len(prog.genes)
    tidx = np.array([prog.types.index(t) for t in fine_type], dtype=int)
    # per-sample detection efficiency with a dropout subset
    eff = np.exp(rng.normal(0, 0.3, G))
    drop = rng.random(G) < cfg.dropout_fraction
    eff[drop] *= 0.1
    # per-cell programme: own type, damped origin for dead cells, mixtures for atypical cells
    live_types = [t for t in prog.types if t != "dead"]
    P = prog.matrix[tidx].copy()
    is_dead = fine_type == "dead"
    if is_dead.any():
        present = [t for t in live_types if (fine_type == t).any()] or live_types
        origin = rng.choice(present, size=int(is_dead.sum()))
        P[is_dead] = 0.55 * P[is_dead] + 0.45 * np.stack([prog.row(t) for t in origin])
    atyp = (rng.random(n) < cfg.atypical_fraction) & ~is_dead
    if atyp.any():
        present = [t for t in live_types if (fine_type == t).any()] or live_types
        other = rng.choice(present, size=int(atyp.sum()))
        mix = rng.uniform(0.35, 0.6, int(atyp.sum()))[:, None]
        P[atyp] = (1 - mix) * P[atyp] + mix * np.stack([prog.row(t) for t in other])
    P = P * eff[None, :]
    P /= P.sum(1, keepdims=True)
    # library sizes
    lib = cfg.tx_per_cell_median * np.exp(rng.normal(0, cfg.library_log_sd, n)) * \
        np.array([_LIB[t] for t in fine_type]) / 0.95
    out = draw_counts(P, lib, xy_um, rng, cfg)
    out.update(atypical=atyp, efficiency=eff, dropout=drop)
    return out


def detection_efficiency(G: int, rng: np.random.Generator, cfg: DemoConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample detection efficiency of every gene (log-normal, sd 0.3) and the dropout subset
    (``dropout_fraction`` of the genes at x0.1)."""
    eff = np.exp(rng.normal(0, 0.3, G))
    drop = rng.random(G) < cfg.dropout_fraction
    eff[drop] *= 0.1
    return eff, drop


def draw_counts(P: np.ndarray, lib: np.ndarray, xy_um: np.ndarray, rng: np.random.Generator,
                cfg: DemoConfig) -> dict[str, np.ndarray]:
    """Transcripts of every cell from its expression profile, with spill-over and ambient RNA.

    Parameters
    ----------
    P
        (cells, genes) expression profiles, rows summing to 1 (detection efficiency applied).
    lib
        Expected transcripts per cell.
    xy_um
        Cell centres (µm); neighbours within ``3 * spill_range_um`` spill into each other.
    rng
        Random generator.
    cfg
        ``spill_fraction``, ``spill_range_um``, ``ambient_fraction``, ``nb_size``.

    Returns
    -------
    dict with ``cell``, ``gene``, ``source`` (0 own, 1 spill, 2 ambient) per transcript and the
    ``ambient_profile``.
    """
    n, G = P.shape
    # spill-over weights from neighbours
    tree = cKDTree(xy_um)
    r = cfg.spill_range_um
    pairs = tree.query_pairs(3 * r, output_type="ndarray")
    crowd = np.zeros(n)
    if len(pairs):
        d = np.linalg.norm(xy_um[pairs[:, 0]] - xy_um[pairs[:, 1]], axis=1)
        wgt = np.exp(-0.5 * (d / r) ** 2)
        np.add.at(crowd, pairs[:, 0], wgt)
        np.add.at(crowd, pairs[:, 1], wgt)
    s = np.zeros(n)
    if crowd.mean() > 0:
        s = np.clip(cfg.spill_fraction * crowd / crowd.mean(), 0, 0.6)
    a = cfg.ambient_fraction
    # own counts: negative binomial per gene
    mu = (lib * (1 - s - a))[:, None] * P
    size = cfg.nb_size
    own = rng.negative_binomial(size, size / (size + mu))
    cell_own, gene_own = np.nonzero(own)
    reps = own[cell_own, gene_own]
    cell_own = np.repeat(cell_own, reps)
    gene_own = np.repeat(gene_own, reps)
    # spill-over: the source is a neighbour drawn by weight, the gene from the source's programme
    n_sp = rng.poisson(lib * s)
    cell_sp = np.repeat(np.arange(n), n_sp)
    gene_sp = np.zeros(0, dtype=np.int64)
    if cell_sp.size and len(pairs):
        # neighbour lists as CSR
        src = np.concatenate([pairs[:, 0], pairs[:, 1]])
        dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
        w = np.concatenate([wgt, wgt])
        order = np.lexsort((dst, src))
        src, dst, w = src[order], dst[order], w[order]
        start = np.searchsorted(src, np.arange(n))
        stop = np.searchsorted(src, np.arange(n), side="right")
        cw = np.cumsum(w)
        before = np.where(start > 0, cw[np.maximum(start - 1, 0)], 0.0)
        total = np.where(stop > start, cw[np.maximum(stop - 1, 0)] - before, 0.0)
        u = rng.random(cell_sp.size)
        has = total[cell_sp] > 0
        cell_sp = cell_sp[has]
        target = before[cell_sp] + u[has] * total[cell_sp]
        k = np.searchsorted(cw, target, side="right")
        k = np.clip(k, start[cell_sp], stop[cell_sp] - 1)
        source_cell = dst[k]
        cdf = np.cumsum(P, axis=1)
        gene_sp = _sample_categorical(cdf, source_cell, rng)
    else:
        cell_sp = np.zeros(0, dtype=np.int64)
    # ambient: tissue-average profile
    amb_prof = (P * lib[:, None]).sum(0)
    amb_prof /= amb_prof.sum()
    n_amb = rng.poisson(lib * a)
    cell_amb = np.repeat(np.arange(n), n_amb)
    gene_amb = rng.choice(G, size=cell_amb.size, p=amb_prof)
    cell = np.concatenate([cell_own, cell_sp, cell_amb]).astype(np.int64)
    gene = np.concatenate([gene_own, gene_sp, gene_amb]).astype(np.int64)
    source = np.concatenate([np.zeros(cell_own.size, np.int8), np.ones(cell_sp.size, np.int8),
                             np.full(cell_amb.size, 2, np.int8)])
    return {"cell": cell, "gene": gene, "source": source, "ambient_profile": amb_prof}


def simulate_cell_expression(xy_um: np.ndarray, cell_type: Sequence[str], *, organ_key: str, cancer: bool,
                             genes: Sequence[str], cfg: DemoConfig, cohort_seed: int = 0,
                             sample_key: Sequence[int] | int = 0, origin: Sequence[str] | None = None,
                             rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Transcripts of given cells under the generator's own biology (:mod:`stlib.demo.biology`).

    Parameters
    ----------
    xy_um
        (n, 2) cell centres in µm (spill-over between neighbours depends on them).
    cell_type
        Generator type per cell: a :data:`stlib.demo.biology.CATALOGUE` name, ``"tumour_cell"`` or
        ``"dying_cell"`` (see :func:`stlib.demo.biology.assign_cell_types` to get them from tissue
        compartments, or :func:`stlib.demo.biology.types_for_classes` from truth classes).
    organ_key
        :data:`stlib.demo.config.ORGANS` key (tumour signature, copy-number events).
    cancer
        Tumour sample (the tumour programme exists only then).
    genes
        Panel genes, in the order of the returned gene indices.
    cfg
        :class:`stlib.demo.config.DemoConfig` (biology knobs, library size, dispersion, spill-over,
        ambient, dropout, atypical fraction).
    cohort_seed
        Seed of what a cohort shares (the catalogue's programmes).
    sample_key
        Seed entropy of this sample (per-sample variation, tumour signature subset, copy number).
    origin
        For ``"dying_cell"`` entries: the type the cell was (default: a present type at random).
    rng
        Generator of the per-cell draws (default: from ``sample_key``).

    Returns
    -------
    dict with per transcript ``cell`` (index into the inputs), ``gene`` (index into ``genes``),
    ``source`` (0 own, 1 spill-over, 2 ambient); per cell ``atypical``, ``cycling``, ``clone`` (0
    normal, 1 clonal tumour, 2 subclone), ``library``; and ``efficiency``, ``dropout`` (per gene),
    ``ambient_profile``, ``events`` (copy-number events: arm, sign, subclonal).
    """
    from stlib.demo.biology import make_sample_biology, per_cell_programmes

    xy_um = np.asarray(xy_um, dtype=float)
    ct = np.asarray(cell_type, dtype=object)
    if xy_um.ndim != 2 or xy_um.shape[1] != 2 or len(xy_um) != ct.size:
        raise ValueError(f"xy_um must be (n, 2) with n = len(cell_type) = {ct.size}, got {xy_um.shape}")
    key = [int(k) for k in np.atleast_1d(sample_key)]
    rng = rng if rng is not None else np.random.default_rng([*key, 11])
    present = sorted({str(t) for t in ct} | ({str(t) for t in origin} if origin is not None else set()))
    bio = make_sample_biology(genes, organ_key, cancer=cancer, cfg=cfg,
                              cohort_rng=np.random.default_rng([int(cohort_seed), 999, 12]),
                              sample_rng=np.random.default_rng([*key, 13]), types_present=present)
    org = np.asarray(origin, dtype=object) if origin is not None else ct.copy()
    pc = per_cell_programmes(bio, ct, org, cfg=cfg, rng=rng, xy_um=xy_um)
    eff, drop = detection_efficiency(len(bio.genes), rng, cfg)
    P = pc["P"] * eff[None, :]
    P /= P.sum(1, keepdims=True)
    n = ct.size
    lib = cfg.tx_per_cell_median * np.exp(rng.normal(0, cfg.library_log_sd, n)) * pc["library"]
    out: dict[str, Any] = dict(draw_counts(P, lib, xy_um, rng, cfg)) if n else {
        "cell": np.zeros(0, np.int64), "gene": np.zeros(0, np.int64), "source": np.zeros(0, np.int8),
        "ambient_profile": np.full(len(bio.genes), 1.0 / max(len(bio.genes), 1))}
    out.update(atypical=pc["atypical"], cycling=pc["cycling"], clone=pc["clone"], library=lib, efficiency=eff,
               dropout=drop, events=list(bio.events))
    return out


def cell_count_matrix(ex: Mapping[str, np.ndarray], n_cells: int, n_genes: int, *,
                      sources: Sequence[int] = (0, 1, 2)) -> Any:
    """(cells, genes) CSR matrix of the transcripts of :func:`simulate_cell_expression`."""
    import scipy.sparse as sp

    m = np.isin(ex["source"], list(sources))
    return sp.csr_matrix((np.ones(int(m.sum()), np.int32), (ex["cell"][m], ex["gene"][m])),
                         shape=(n_cells, n_genes))
