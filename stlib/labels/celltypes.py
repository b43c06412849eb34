"""Gene expression -> fine cell types, for Xenium cells.

The chain, one function per step, each writing named slots of an AnnData (cells x panel genes):

1. :func:`qc_filter` marks cells with too few transcripts (nothing is dropped).
2. :func:`normalize` keeps raw counts in ``layers["counts"]`` and writes log-normalised values.
3. :func:`rank_score` scores marker sets per cell with a rank statistic (UCell's definition).
4. :func:`cluster` runs PCA, a kNN graph and Leiden.
5. :func:`assign_fine_types` turns scores (+ clusters) into ``obs["fine_type"]`` and a confidence.

Marker sets come from ``stlib/labels/markers/*.yaml`` through :func:`load_markers`, which keeps only
genes of the sample's panel (Xenium panels hold 260-5,000 genes and miss many textbook markers).
All slot names are in :class:`Key`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.stats import rankdata

from stlib.constants import is_control_feature

log = logging.getLogger(__name__)

__all__ = [
    "Key", "FINE_TYPES", "UNKNOWN", "load_markers", "type_allowed", "panel_coverage_table", "load_programs", "marker_coverage",
    "canonical_organ", "qc_filter", "normalize", "rank_score", "cluster", "annotate_clusters", "lineage_gate",
    "assign_fine_types",
    "refine_posteriors",
]


class Key:
    """Names of every AnnData slot written by :mod:`stlib.labels` (one place, no drift)."""

    COUNTS = "counts"  #: layers: raw counts
    LOGNORM = "lognorm"  #: layers: normalize_total(1e4) + log1p
    N_COUNTS = "n_counts"  #: obs: total counts per cell
    N_GENES = "n_genes"  #: obs: detected genes per cell
    QC_PASS = "qc_pass"  #: obs: bool, cell passes QC
    QC_REASON = "qc_reason"  #: obs: why a cell fails QC ("" when it passes)
    SCORE_PREFIX = "score_"  #: obs: rank score per signature, ``score_{name}``
    CLUSTER = "leiden"  #: obs: Leiden cluster
    FINE_TYPE = "fine_type"  #: obs: fine cell type (vocabulary :data:`FINE_TYPES` + "unknown")
    TYPE_CONFIDENCE = "type_confidence"  #: obs: confidence of fine_type in [0, 1]
    NEOPLASTIC_SCORE = "neoplastic_score"  #: obs: posterior/score of being neoplastic (candidates)
    NEOPLASTIC_CALL = "neoplastic_call"  #: obs: neoplastic / non-neoplastic / ambiguous / ""
    TUMOR_SCORE = "tumor_signature_score"  #: obs: organ tumour signature (up - down) rank score
    PROLIF_SCORE = "proliferation_score"  #: obs: proliferation rank score
    APOPTOSIS_COUNTS = "apoptosis_counts"  #: obs: counts of apoptosis proxy genes
    CNV_SCORE = "cnv_score"  #: obs: inferred copy-number signal per cell (infercnvpy projection)
    CLASS = "class"  #: obs: image-oriented class id (stlib.constants), 255 = ignore
    CONFIDENCE = "confidence"  #: obs: confidence of class in [0, 1]
    IGNORE_REASON = "ignore_reason"  #: obs: why a cell got class 255 ("" when it has a class)
    UNS = "stlib_labels"  #: uns: parameters, coverage and counts of the labelling run


#: Fine-type vocabulary of the labeler (:data:`stlib.labels.classes.FINE_TO_CLASS`); the demo generator
#: has its own catalogue (``stlib.demo.biology``) and never shares this one.
FINE_TYPES: tuple[str, ...] = (
    "tumor", "epithelial", "melanocyte", "t_cell", "b_cell", "plasma", "macrophage", "mast",
    "fibroblast", "endothelial", "smooth_muscle", "adipocyte", "dead",
    "hepatocyte", "kidney_tubule", "pancreatic_islet", "acinar", "cardiomyocyte", "glia", "neuron",
)
UNKNOWN = "unknown"

# ----------------------------------------------------------------------------------------------
# Marker sets
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _read_yaml(name: str) -> dict:
    import yaml

    with resources.files("stlib.labels").joinpath("markers", name).open("r") as fh:
        return yaml.safe_load(fh)


def canonical_organ(organ: str | None, oncotree_code: str | None = None) -> str | None:
    """Map a HEST organ name (``"Bowel"``) or an OncoTree code (``"COAD"``) to a marker-set organ.

    Returns ``None`` when neither is known (marker sets then use no organ extras).
    """
    prog = _read_yaml("programs.yaml")
    if organ is not None and not (isinstance(organ, float) and np.isnan(organ)):
        key = str(organ).strip().lower()
        if key in prog["organ_aliases"]:
            return prog["organ_aliases"][key]
    if oncotree_code is not None and not (isinstance(oncotree_code, float) and np.isnan(oncotree_code)):
        code = str(oncotree_code).strip().upper()
        if code in prog["oncotree_to_organ"]:
            return prog["oncotree_to_organ"][code]
    return None


def _all_markers(organ: str | None) -> dict[str, list[str]]:
    spec = _read_yaml("celltypes.yaml")["types"]
    out: dict[str, list[str]] = {}
    for t, entry in spec.items():
        genes = list(entry.get("markers", []))
        if organ is not None:
            genes += [g for g in entry.get("organ", {}).get(organ, []) if g not in genes]
        out[t] = genes
    return out


def type_allowed(fine_type: str, organ: str | None = None, oncotree_code: str | None = None) -> bool:
    """Whether a fine type is scored in a sample of this organ / OncoTree code (``only_in`` of
    ``markers/celltypes.yaml``: melanocytes in skin or melanoma, hepatocytes in liver ...).

    Types without ``only_in`` are always scored; with neither an organ nor a code every type is.
    """
    entry = _read_yaml("celltypes.yaml")["types"].get(fine_type, {})
    only = entry.get("only_in")
    if not only:
        return True
    org = canonical_organ(organ) if organ is not None else None
    code = None if oncotree_code is None or (isinstance(oncotree_code, float) and np.isnan(oncotree_code)) \
        else str(oncotree_code).strip().upper() or None
    if org is None and code is None:
        return True
    return (org is not None and org in only.get("organs", [])) or (code is not None and code in only.get("oncotree", []))


def _panel_set(panel_genes: Iterable[str] | AnnData) -> set[str]:
    if isinstance(panel_genes, AnnData):
        panel_genes = panel_genes.var_names
    return {str(g) for g in panel_genes}


def marker_coverage(panel_genes: Iterable[str] | AnnData, *, organ: str | None = None,
                    markers: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """How many markers of each fine type a panel carries.

    Parameters
    ----------
    panel_genes
        Gene symbols of the panel (or an AnnData: its ``var_names``).
    organ
        Organ (HEST name or canonical) whose organ-specific extras are included.
    markers
        Marker sets to check instead of the shipped YAML.

    Returns
    -------
    DataFrame with columns ``type``, ``n_markers``, ``n_in_panel``, ``fraction``, ``in_panel``
    (the kept genes joined by ``,``) and ``missing``.
    """
    panel = _panel_set(panel_genes)
    if markers is None:
        markers = _all_markers(canonical_organ(organ))
    rows = []
    for t, genes in markers.items():
        kept = [g for g in genes if g in panel]
        rows.append({"type": t, "n_markers": len(genes), "n_in_panel": len(kept),
                     "fraction": len(kept) / len(genes) if genes else 0.0,
                     "in_panel": ",".join(kept), "missing": ",".join(g for g in genes if g not in panel)})
    return pd.DataFrame(rows, columns=["type", "n_markers", "n_in_panel", "fraction", "in_panel", "missing"])


def panel_coverage_table(panels: Mapping[str, Iterable[str]], *, organ: str | None = None) -> pd.DataFrame:
    """Marker coverage of several panels side by side: markers of each fine type found in each panel.

    Parameters
    ----------
    panels
        ``{panel name: gene symbols}`` (e.g. every panel of ``stlib.io.panels``, or the files of
        ``realdata/xenium-panels``).
    organ
        Organ whose extras are counted (default: none, the organ-independent sets).

    Returns
    -------
    One row per fine type: ``n_markers`` (in the YAML) and, per panel, ``"k"`` markers present;
    a type the labeler would not score on a panel (fewer than its ``min_markers``) is marked
    ``"k (off)"``.
    """
    spec = _read_yaml("celltypes.yaml")["types"]
    allm = _all_markers(canonical_organ(organ))
    rows = []
    for t, genes in allm.items():
        row: dict[str, Any] = {"type": t, "n_markers": len(genes)}
        for name, g in panels.items():
            k = sum(1 for x in genes if x in _panel_set(g))
            own_min = spec.get(t, {}).get("min_markers", 1)
            row[name] = f"{k} (off)" if k < own_min else str(k)
        rows.append(row)
    return pd.DataFrame(rows)


def load_markers(panel_genes: Iterable[str] | AnnData, *, organ: str | None = None,
                 oncotree_code: str | None = None, types: Sequence[str] | None = None, min_markers: int = 2,
                 max_markers: int | None = None, drop_empty: bool = True) -> dict[str, list[str]]:
    """Marker genes per fine type, restricted to the genes of a panel.

    Parameters
    ----------
    panel_genes
        Gene symbols of the sample's panel (or an AnnData: its ``var_names``).
    organ
        HEST organ (``"Bowel"``, ``"Breast"``, ...) or canonical organ; adds organ extras and
        leaves out types that do not live in it (``only_in``, :func:`type_allowed`).
    oncotree_code
        OncoTree code of the sample (``only_in`` lets a type in by code, e.g. melanocytes in a
        melanoma metastasis).
    types
        Fine types to return (default: all types in ``markers/celltypes.yaml``).
    min_markers
        A type keeping fewer genes than this triggers a ``UserWarning`` (and a log line).
    max_markers
        Keep at most this many genes per type (the YAML lists them in priority order).
    drop_empty
        Leave out types with no gene in the panel.

    Returns
    -------
    ``{type: [genes in panel]}`` in YAML order.
    """
    if min_markers < 0:
        raise ValueError(f"min_markers must be >= 0, got {min_markers}")
    panel = _panel_set(panel_genes)
    org = canonical_organ(organ, oncotree_code)
    allm = _all_markers(org)
    spec = _read_yaml("celltypes.yaml")["types"]
    if types is None:
        allm = {t: g for t, g in allm.items() if type_allowed(t, org, oncotree_code)}
    if types is not None:
        unknown = [t for t in types if t not in allm]
        if unknown:
            raise ValueError(f"types: no marker set for {unknown}; known: {sorted(allm)}")
        allm = {t: allm[t] for t in types}
    out: dict[str, list[str]] = {}
    weak = []
    for t, genes in allm.items():
        kept = [g for g in genes if g in panel]
        if max_markers is not None:
            kept = kept[:max_markers]
        own_min = spec.get(t, {}).get("min_markers")
        if own_min is not None and len(kept) < own_min:
            # a parenchymal type the panel barely covers: not scored at all (a 1-2 gene set
            # would pull in any cell expressing one of them)
            log.info("load_markers: %s has %d panel markers (< %d): not scored", t, len(kept), own_min)
            continue
        if len(kept) < min_markers:
            weak.append(f"{t} ({len(kept)})")
        if kept or not drop_empty:
            out[t] = kept
    if weak:
        msg = (f"marker sets with fewer than {min_markers} genes in this panel: {', '.join(weak)}; "
               "their cells will be scored poorly or not at all")
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    return out


def load_programs(panel_genes: Iterable[str] | AnnData, *, organ: str | None = None,
                  oncotree_code: str | None = None) -> dict[str, list[str]]:
    """Tumour / proliferation / apoptosis programmes restricted to a panel.

    Returns
    -------
    ``{"tumor_up": [...], "tumor_down": [...], "proliferation": [...], "apoptosis": [...]}``;
    the tumour signature is the organ's (``"generic"`` when the organ is unknown or has none).
    """
    panel = _panel_set(panel_genes)
    prog = _read_yaml("programs.yaml")
    org = canonical_organ(organ, oncotree_code)
    tum = prog["tumor"].get(org) or prog["tumor"]["generic"]
    keep = lambda genes: [g for g in genes if g in panel]  # noqa: E731
    out = {"tumor_up": keep(tum.get("up", [])), "tumor_down": keep(tum.get("down", [])),
           "proliferation": keep(prog["proliferation"]), "apoptosis": keep(prog["apoptosis"])}
    if len(out["tumor_up"]) < 2 and org in prog["tumor"]:
        extra = [g for g in keep(prog["tumor"]["generic"]["up"]) if g not in out["tumor_up"]]
        log.info("tumour signature for %s has %d panel genes; adding generic genes %s",
                 org, len(out["tumor_up"]), extra)
        out["tumor_up"] += extra
    return out


# ----------------------------------------------------------------------------------------------
# QC and normalisation
# ----------------------------------------------------------------------------------------------


def _counts(adata: AnnData) -> Any:
    return adata.layers[Key.COUNTS] if Key.COUNTS in adata.layers else adata.X


def _row_sums(x: Any) -> np.ndarray:
    return np.asarray(x.sum(axis=1)).ravel().astype(np.float64)


def _row_nnz(x: Any) -> np.ndarray:
    if sp.issparse(x):
        return np.diff(sp.csr_matrix(x).indptr).astype(np.int64)
    return np.count_nonzero(np.asarray(x), axis=1).astype(np.int64)


def qc_filter(adata: AnnData, *, min_counts: int = 10, min_genes: int = 3,
              max_counts: float | None = None, key_added: str = Key.QC_PASS,
              copy: bool = False) -> AnnData | None:
    """Mark cells with too few (or too many) transcripts; nothing is removed.

    Counts come from ``layers["counts"]`` when present, else ``X`` (raw counts expected).
    Control probes / codewords in ``var_names`` are not counted.

    Parameters
    ----------
    adata
        Cells x genes.
    min_counts, min_genes
        A cell passes when it has at least this many transcripts and detected genes.
    max_counts
        Optional upper bound (doublets / segmentation merges).
    key_added
        Name of the boolean column written.
    copy
        Work on a copy and return it.

    Returns
    -------
    Writes ``obs["n_counts"]``, ``obs["n_genes"]``, ``obs[key_added]`` (bool) and
    ``obs["qc_reason"]`` ("" for passing cells); returns the AnnData when ``copy=True``.
    """
    if min_counts < 0 or min_genes < 0:
        raise ValueError("min_counts and min_genes must be >= 0")
    adata = adata.copy() if copy else adata
    x = _counts(adata)
    genes = np.array([not is_control_feature(g) for g in adata.var_names])
    if not genes.all():
        x = x[:, genes]
    n_counts, n_genes = _row_sums(x), _row_nnz(x)
    reason = np.full(adata.n_obs, "", dtype=object)
    reason[n_genes < min_genes] = f"n_genes<{min_genes}"
    reason[n_counts < min_counts] = f"n_counts<{min_counts}"
    if max_counts is not None:
        reason[n_counts > max_counts] = f"n_counts>{max_counts}"
    adata.obs[Key.N_COUNTS] = n_counts
    adata.obs[Key.N_GENES] = n_genes
    adata.obs[key_added] = reason == ""
    adata.obs[Key.QC_REASON] = pd.Categorical(reason.astype(str))
    log.info("qc_filter: %d / %d cells pass (min_counts=%s, min_genes=%s); wrote obs[%r, %r, %r, %r]",
             int((reason == "").sum()), adata.n_obs, min_counts, min_genes,
             Key.N_COUNTS, Key.N_GENES, key_added, Key.QC_REASON)
    return adata if copy else None


def normalize(adata: AnnData, *, target_sum: float = 1e4, layer: str = Key.LOGNORM,
              copy: bool = False) -> AnnData | None:
    """Library-size normalisation + log1p into a layer; raw counts kept in ``layers["counts"]``.

    ``X`` is left as it is. When ``layers["counts"]`` is absent, ``X`` is taken as raw counts and
    copied there first.

    Returns
    -------
    Writes ``layers["counts"]`` (if absent) and ``layers[layer]``; returns the AnnData when
    ``copy=True``.
    """
    import scanpy as sc

    adata = adata.copy() if copy else adata
    if Key.COUNTS not in adata.layers:
        adata.layers[Key.COUNTS] = adata.X.copy()
    counts = adata.layers[Key.COUNTS]
    x = counts.astype(np.float32) if sp.issparse(counts) else np.asarray(counts, dtype=np.float32)
    tmp = AnnData(x)
    sc.pp.normalize_total(tmp, target_sum=target_sum)
    sc.pp.log1p(tmp)
    adata.layers[layer] = tmp.X
    log.info("normalize: wrote layers[%r] (normalize_total %g + log1p); raw counts in layers[%r]",
             layer, target_sum, Key.COUNTS)
    return adata if copy else None


# ----------------------------------------------------------------------------------------------
# Rank-based signature score
# ----------------------------------------------------------------------------------------------


def rank_score(adata: AnnData, signatures: Mapping[str, Sequence[str]], *,
               max_rank: int | None = None, layer: str | None = None, chunk_size: int = 2000,
               key_added: str = Key.SCORE_PREFIX, copy: bool = False) -> AnnData | None:
    r"""UCell-style rank score of gene signatures, per cell.

    In each cell, genes are ranked by expression, highest first (rank 1); tied values share their
    average rank, and undetected genes (zeros) are ranked too, as one tie at the bottom. Ranks above
    ``max_rank`` become ``max_rank + 1``. For a signature of :math:`n` genes with ranks
    :math:`r_1..r_n`

    .. math:: U = \sum_i r_i - n(n+1)/2, \qquad \mathrm{score} = 1 - U / (n \cdot \mathrm{max\_rank})

    (Andreatta & Carmona 2021, UCell), clipped to [0, 1]. Written here rather than taken from
    ``pyucell`` because that port does not cap ``max_rank`` at the panel size and leaves zeros at
    ``max_rank``: on a 300-gene Xenium panel its score then mostly counts detected genes.

    Ranks are invariant to per-cell scaling and monotone transforms, so raw counts and
    log-normalised values give the same score. Computed on dense chunks of cells
    (``scipy.stats.rankdata(..., axis=1)``), no per-cell Python loop.

    Parameters
    ----------
    adata
        Cells x genes.
    signatures
        ``{name: genes}``; genes absent from ``var_names`` are ignored; a signature with no gene
        left raises ``ValueError``.
    max_rank
        Rank cap; default ``min(1500, number of genes)`` so it behaves on 280- and 5,000-gene panels.
    layer
        Expression layer (default ``layers["counts"]`` when present, else ``X``).
    chunk_size
        Cells per dense chunk (memory: ``chunk_size x n_genes`` float64).
    key_added
        Prefix of the columns written.
    copy
        Work on a copy and return it.

    Returns
    -------
    Writes ``obs[f"{key_added}{name}"]`` (float in [0, 1]) per signature and
    ``uns["stlib_labels"]["rank_score"]`` (max_rank, genes used); returns the AnnData when
    ``copy=True``.
    """
    adata = adata.copy() if copy else adata
    if not signatures:
        raise ValueError("signatures: empty mapping")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if layer is None:
        x = _counts(adata)
    else:
        if layer not in adata.layers:
            raise ValueError(f"layer {layer!r} not in adata.layers ({list(adata.layers)})")
        x = adata.layers[layer]
    keep = np.array([not is_control_feature(g) for g in adata.var_names])
    var = adata.var_names[keep]
    n_genes = int(keep.sum())
    if max_rank is None:
        max_rank = min(1500, n_genes)
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    pos = pd.Index(var)
    sig_idx: dict[str, np.ndarray] = {}
    for name, genes in signatures.items():
        idx = pos.get_indexer(list(dict.fromkeys(genes)))
        idx = idx[idx >= 0]
        if idx.size == 0:
            raise ValueError(f"signature {name!r}: none of its genes is in var_names")
        sig_idx[name] = idx
    if sp.issparse(x):
        x = sp.csr_matrix(x)
    cols = np.flatnonzero(keep)
    scores = {name: np.empty(adata.n_obs, dtype=np.float64) for name in sig_idx}
    for start in range(0, adata.n_obs, chunk_size):
        stop = min(start + chunk_size, adata.n_obs)
        block = x[start:stop]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        if cols.size != block.shape[1]:
            block = block[:, cols]
        ranks = rankdata(-block.astype(np.float64, copy=False), axis=1, method="average")
        ranks[ranks > max_rank] = max_rank + 1
        for name, idx in sig_idx.items():
            n = idx.size
            u = ranks[:, idx].sum(axis=1) - n * (n + 1) / 2.0
            scores[name][start:stop] = np.clip(1.0 - u / (n * max_rank), 0.0, 1.0)
    for name, s in scores.items():
        adata.obs[f"{key_added}{name}"] = s
    adata.uns.setdefault(Key.UNS, {})["rank_score"] = {
        "max_rank": int(max_rank), "n_genes": n_genes,
        "genes": {name: [str(g) for g in var[idx]] for name, idx in sig_idx.items()},
    }
    log.info("rank_score: max_rank=%d over %d genes; wrote obs[%s]", max_rank, n_genes,
             ", ".join(f"{key_added}{n}" for n in sig_idx))
    return adata if copy else None


# ----------------------------------------------------------------------------------------------
# Clustering
# ----------------------------------------------------------------------------------------------


def cluster(adata: AnnData, *, resolution: float = 1.0, n_pcs: int = 30, n_neighbors: int = 15,
            layer: str = Key.LOGNORM, seed: int = 0, umap: bool = False,
            neighbors_method: Literal["umap", "gauss"] = "umap",
            key_added: str = Key.CLUSTER, copy: bool = False) -> AnnData | None:
    """PCA, kNN graph and Leiden clustering (scanpy; igraph flavour).

    Parameters
    ----------
    adata
        Cells x genes with ``layers[layer]`` (run :func:`normalize` first).
    resolution
        Leiden resolution.
    n_pcs
        Principal components (capped at ``min(n_obs, n_vars) - 1``).
    n_neighbors
        Neighbours of the kNN graph.
    layer
        Log-normalised layer used for PCA.
    seed
        Random state of PCA, neighbours, Leiden and UMAP.
    umap
        Also compute a UMAP embedding.
    neighbors_method
        Connectivity kernel of ``sc.pp.neighbors``: ``"umap"`` (scanpy's default; the first call in
        a process pays ~30 s of numba compilation) or ``"gauss"`` (no compilation; fine for Leiden).
    key_added
        obs column of the clusters.

    Returns
    -------
    Writes ``obsm["X_pca"]``, ``obsp["connectivities"]``, ``obsp["distances"]``,
    ``uns["neighbors"]``, ``obs[key_added]`` (categorical) and, with ``umap=True``,
    ``obsm["X_umap"]``; returns the AnnData when ``copy=True``.
    """
    import scanpy as sc

    adata = adata.copy() if copy else adata
    if layer not in adata.layers:
        raise ValueError(f"layer {layer!r} missing: run stlib.labels.celltypes.normalize(adata) first")
    if adata.n_obs < 3:
        raise ValueError(f"cluster: need at least 3 cells, got {adata.n_obs}")
    n_comps = max(1, min(n_pcs, adata.n_obs - 1, adata.n_vars - 1))
    sc.pp.pca(adata, n_comps=n_comps, layer=layer, random_state=seed)
    sc.pp.neighbors(adata, n_neighbors=min(n_neighbors, adata.n_obs - 1), n_pcs=n_comps,
                    method=neighbors_method, random_state=seed)
    sc.tl.leiden(adata, resolution=resolution, flavor="igraph", n_iterations=2, directed=False,
                 random_state=seed, key_added=key_added)
    if umap:
        sc.tl.umap(adata, random_state=seed)
    log.info("cluster: %d PCs, %d neighbours, Leiden res %.2f -> %d clusters; wrote obs[%r], "
             "obsm['X_pca'], obsp['connectivities']%s", n_comps, n_neighbors, resolution,
             adata.obs[key_added].nunique(), key_added, ", obsm['X_umap']" if umap else "")
    return adata if copy else None


# ----------------------------------------------------------------------------------------------
# Fine types
# ----------------------------------------------------------------------------------------------


def _detected_markers(adata: AnnData, markers: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Cells x types: number of the type's markers with >= 1 count."""
    x = _counts(adata)
    pos = pd.Index(adata.var_names)
    out = np.zeros((adata.n_obs, len(markers)), dtype=np.int64)
    for j, genes in enumerate(markers.values()):
        idx = pos.get_indexer(list(genes))
        idx = idx[idx >= 0]
        if idx.size:
            out[:, j] = _row_nnz(x[:, idx])
    return out


def _gene_counts(adata: AnnData) -> Any:
    """Raw counts of the panel genes (control probes left out), CSR."""
    x = _counts(adata)
    keep = np.array([not is_control_feature(g) for g in adata.var_names])
    x = sp.csr_matrix(x, dtype=np.float64)
    return x[:, keep] if not keep.all() else x


def annotate_clusters(adata: AnnData, markers: Mapping[str, Sequence[str]], *, cluster_key: str = Key.CLUSTER,
                      layer: str = Key.LOGNORM, background_quantile: float = 0.1, min_cluster_cells: int = 10,
                      owned: float = 0.5, min_owned_markers: int = 2, min_ownership: float = 0.3,
                      min_range: float = 2.0, groups: Mapping[str, Any] | None = None,
                      lineage_gate: Mapping[str, Any] | None = None, gate_own_markers: int = 3,
                      dominance: float = 2.5, lineage_ownership: float = 0.2,
                      rival_home: float | None = 0.75) -> pd.DataFrame:
    r"""Cell type of each Leiden cluster from how much of each type's marker set it *owns*.

    For every gene, the cluster means of the log-normalised expression are put on a 0-1 scale
    between a background (the ``background_quantile`` of the means over clusters of at least
    ``min_cluster_cells`` cells: the clusters that do not express it) and the highest cluster:
    :math:`s_{cg} = \mathrm{clip}((m_{cg} - b_g) / \max(\max_{c'} m_{c'g} - b_g, r), 0, 1)` with
    :math:`r` = ``min_range`` (log-normalised units; 2 ~ a gene detected in about half of the cells at
    ~100 transcripts per cell), so a gene that no cluster really expresses is owned by none. A type's
    *ownership* of cluster :math:`c` is the mean of :math:`s_{cg}` over its markers in the panel: the
    share of the marker set the cluster expresses at (close to) full strength. Several markers must
    agree: a marker of one type that another type also expresses moves a 4-marker set by 0.25 at
    most, and a type needs ``min_owned_markers`` markers with :math:`s \ge` ``owned``. The cluster
    takes the type of highest ownership among those with ownership ``>= min_ownership`` and enough
    owned markers, else it is ``"unknown"``: no type the labeler knows explains it (an
    off-vocabulary type, a type the panel barely covers, or too little signal). Scaling to the highest cluster, not to the rest of the sample, keeps a
    marker shared by several clusters of one lineage (the epithelium of a tumour split in five
    clusters) owned by each of them.

    ``lineage_gate`` (:func:`lineage_gate`; ``None`` = no gate) applies the two lineage genes that
    flow cytometry gates on, CD45 (PTPRC, every leukocyte) and the simple-epithelium genes (EPCAM,
    E-cadherin, keratins 8/18/19, claudins 4/7), on the same 0-1 scale: an immune type qualifies for
    (and is nominated by) a cluster only when the cluster expresses a pan-immune gene with
    :math:`s \ge` ``min_ownership`` where the panel has one (types in ``exempt``, e.g. plasma
    cells, which lose CD45, are not held to this), and never when the cluster expresses the
    pan-epithelial genes at full strength (mean :math:`s \ge` ``owned``) more than the pan-immune
    ones. Tumour cells with partial lineage loss and a few aberrant immune genes (drift) otherwise
    own two immune markers and are called immune. An immune type that owns at least
    ``gate_own_markers`` of its own markers needs no CD45 (real panels often carry PTPRC where
    10x's annotation does not list it for T or B cells, and its detection varies); the epithelial
    veto holds for it all the same. Stromal types (``stromal_types``: fibroblasts,
    endothelium, muscle) never go to a cluster with full pan-epithelial expression either.
    The gate also speaks *for* a lineage: a cluster with pan-epithelial expression
    :math:`\ge` ``min_ownership`` where no type of another class qualifies takes its best epithelial
    type (``epithelial_types``) when that type's ownership reaches ``lineage_ownership`` (half of it
    with full pan-epithelial expression, :math:`\ge` ``owned``), even below ``min_ownership``: a
    tumour that lost most of its differentiation markers, or acinar cells on a panel without acinar
    markers; the lineage genes say what it is. Types the gate blocks rank below every other type.

    ``rival_home``: a qualifying type of another class is no rival when the sample has a cluster it
    takes without a conflict (its home) and it owns at most ``rival_home`` times its home ownership
    here: its markers are shared with this cluster's type (keratinocytes expressing the genes of the
    smooth-muscle cells beside them), not a second population. ``None`` = off (fourth freeze).

    ``dominance``: a cluster owning qualifying marker sets of two image classes stays unknown
    (the markers cannot tell) unless its best type owns at least ``owned`` on average and
    ``dominance`` times as many markers as every qualifying type of another class (keratinocytes,
    with eight epidermal markers, owning two or three smooth-muscle genes of the myoepithelial
    cells among them).

    Returns
    -------
    One row per cluster: ``cluster``, ``n_cells``, ``type`` (``"unknown"`` when no type
    qualifies), ``best`` (the type of highest ownership, qualifying ones first, even when ``type``
    is unknown), ``qualifying`` (comma-joined types with enough ownership and owned markers),
    ``nominated`` (the qualifying types, and the best one when its ownership reaches
    ``min_ownership``), ``ownership``, ``n_owned`` (markers with s >= ``owned``), ``runner_up``,
    ``runner_up_ownership``, ``owned_markers`` (comma-joined), ``pan_immune`` and ``pan_epithelial``
    (mean :math:`s` of the gate's genes on the panel, NaN without them), ``gated`` (comma-joined
    immune types the lineage gate kept out).
    """
    if cluster_key not in adata.obs:
        raise ValueError(f"obs[{cluster_key!r}] missing: run stlib.labels.celltypes.cluster(adata) first")
    if layer not in adata.layers:
        raise ValueError(f"layer {layer!r} missing: run stlib.labels.celltypes.normalize(adata) first")
    cats, size, scaled = _scaled_cluster_means(adata, cluster_key, layer, background_quantile, min_cluster_cells,
                                               min_range)
    n_cl = len(cats)
    var = pd.Index(adata.var_names)
    idx = {t: var.get_indexer(list(g)) for t, g in markers.items()}
    idx = {t: i[i >= 0] for t, i in idx.items() if (i >= 0).any()}
    pan_imm, pan_epi, gated_types, exempt, stromal = _lineage_gate_arrays(scaled, var, lineage_gate)
    epi_types = set((lineage_gate or {}).get("epithelial_types", ()))

    def qualifying_other(ev: Mapping[str, tuple[float, int]], best: str, qual: Any) -> bool:
        return any(qual(u) for u in ev if u != best and (groups or {}).get(u, u) != (groups or {}).get(best, best))

    gate = (pan_imm, pan_epi, gated_types, exempt, stromal)
    per_cluster, home = _cluster_evidence(scaled, idx, gate, groups, owned=owned, min_ownership=min_ownership,
                                          min_owned_markers=min_owned_markers, gate_own_markers=gate_own_markers)
    rows = []
    for c in range(n_cl):
        ev, blocked_t, order, rivals = per_cluster[c]
        qual = lambda t: ev[t][0] >= min_ownership and ev[t][1] >= min_owned_markers  # noqa: E731
        best = order[0] if order else UNKNOWN
        second = order[1] if len(order) > 1 else None
        ok = bool(order) and qual(best)
        if rival_home is not None:  # a rival that owns another cluster clearly more is that cluster's type
            rivals = [u for u in rivals if not ev[u][0] <= rival_home * home.get(u, -np.inf)]
        if ok and rivals and not (ev[best][0] >= owned and all(ev[best][1] >= dominance * ev[u][1] for u in rivals)):
            ok = False  # markers of two classes at full strength: the markers cannot tell
        # simple-epithelium expression, nothing of another class qualifying: the lineage names the type
        epi_best = max((t for t in ev if t in epi_types), key=lambda t: ev[t], default=None)
        pe = float(pan_epi[c]) if np.isfinite(pan_epi[c]) else 0.0
        lineage = (not ok and epi_best is not None and pe >= min_ownership and not qualifying_other(ev, epi_best, qual)
                   and ev[epi_best][0] >= (lineage_ownership / 2 if pe >= owned else lineage_ownership))
        if lineage:
            best, ok = epi_best, True
            second = next((t for t in order if t != best), None)
        # the types the cluster's markers nominate (those qualifying, and the best one): the only
        # types a cluster no type explains may join later (assign_fine_types)
        qualifying = [t for t in order if qual(t)]
        # the best type is nominated when it has the ownership but too few owned markers; a cluster
        # where no type reaches min_ownership nominates none (no type the labeler knows explains it)
        strong_best = bool(order) and best not in qualifying and (ev[best][0] >= min_ownership or lineage)
        nominated = [best, *qualifying] if strong_best else qualifying
        rows.append({"cluster": cats[c], "n_cells": int(size[c]), "type": best if ok else UNKNOWN, "best": best,
                     "qualifying": ",".join(qualifying), "nominated": ",".join(nominated),
                     "ownership": ev[best][0] if order else 0.0, "n_owned": ev[best][1] if order else 0,
                     "runner_up": second, "runner_up_ownership": ev[second][0] if second else 0.0,
                     "owned_markers": ",".join(var[idx[best][scaled[c, idx[best]] >= owned]]) if order else "",
                     "pan_immune": pan_imm[c], "pan_epithelial": pan_epi[c],
                     "gated": ",".join(t for t in idx if t in blocked_t)})
    return pd.DataFrame(rows)


def _cluster_evidence(scaled: np.ndarray, idx: Mapping[str, np.ndarray], gate: tuple, groups: Mapping[str, Any] | None,
                      *, owned: float, min_ownership: float, min_owned_markers: int,
                      gate_own_markers: int) -> tuple[list[tuple], dict[str, float]]:
    """Per cluster of :func:`annotate_clusters`: ownership and owned markers per type, the types the lineage
    gate blocks, the types by rank and the qualifying rivals of another class than the first; and each
    type's home ownership (the highest of a cluster it takes without a rival of another class)."""
    pan_imm, pan_epi, gated_types, exempt, stromal = gate
    per_cluster = []
    for c in range(scaled.shape[0]):
        ev = {t: (float(scaled[c, i].mean()), int((scaled[c, i] >= owned).sum())) for t, i in idx.items()}
        strong = {t for t, v in ev.items() if v[1] >= gate_own_markers}
        blocked_t = _gate_blocks(pan_imm[c], pan_epi[c], gated_types, exempt | strong, min_ownership, owned, stromal)
        if blocked_t:
            ev = {t: (v if t not in blocked_t else (min(v[0], min_ownership - 1e-9), 0)) for t, v in ev.items()}
        q = lambda t: ev[t][0] >= min_ownership and ev[t][1] >= min_owned_markers  # noqa: E731
        order = sorted(ev, key=lambda t: (-q(t), t in blocked_t, -ev[t][0], -ev[t][1]))
        rivals = ([u for u in order[1:] if q(u) and groups is not None and groups.get(u) != groups.get(order[0])]
                  if order else [])
        per_cluster.append((ev, blocked_t, order, rivals))
    home: dict[str, float] = {}
    for ev, _, order, rivals in per_cluster:
        if order and not rivals and ev[order[0]][0] >= min_ownership and ev[order[0]][1] >= min_owned_markers:
            home[order[0]] = max(home.get(order[0], -np.inf), ev[order[0]][0])
    return per_cluster, home


def _scaled_cluster_means(adata: AnnData, cluster_key: str, layer: str, background_quantile: float,
                          min_cluster_cells: int, min_range: float) -> tuple[list, np.ndarray, np.ndarray]:
    """Cluster names, sizes and the 0-1 scaled cluster means of :func:`annotate_clusters`."""
    cat = pd.Categorical(adata.obs[cluster_key])
    codes, cats = cat.codes, list(cat.categories)
    n_cl = len(cats)
    x = sp.csr_matrix(adata.layers[layer], dtype=np.float64)
    onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n_cl, len(codes)))
    size = np.asarray(onehot.sum(axis=1)).ravel()
    mean = (onehot @ x).toarray() / np.maximum(size, 1)[:, None]
    big = size >= min_cluster_cells
    ref = mean[big] if big.sum() >= 2 else mean
    bg = np.quantile(ref, background_quantile, axis=0)
    top = mean[big].max(axis=0) if big.any() else mean.max(axis=0)
    return cats, size, np.clip((mean - bg[None, :]) / np.maximum(top - bg, min_range)[None, :], 0.0, 1.0)


def lineage_gate(types: Sequence[str], type_class: Mapping[str, int], immune_class: int,
                 stromal_classes: Sequence[int] = (), epithelial_class: int | None = None) -> dict[str, Any]:
    """The lineage gate of :func:`annotate_clusters` from ``markers/celltypes.yaml: lineage_gate``.

    Parameters
    ----------
    types
        Fine types being scored.
    type_class
        Fine type -> image class (``stlib.labels.classes.FINE_TO_CLASS``).
    immune_class
        Class id of immune cells (the gated types are the ``types`` of this class).
    stromal_classes
        Class ids of the other non-epithelial lineages (connective tissue): their types never go to
        a cluster with full pan-epithelial expression either.
    epithelial_class
        Class id of epithelial cells: its types (except ``not_pan_epithelial`` of the YAML, e.g.
        melanocytes) may take a cluster on its pan-epithelial expression (``None``: none).

    Returns
    -------
    ``{"pan_immune": [...], "pan_epithelial": [...], "immune_types": [...], "stromal_types": [...],
    "epithelial_types": [...], "exempt": [...]}`` (genes not yet filtered to the panel; :func:`annotate_clusters` keeps those in it).
    """
    spec = _read_yaml("celltypes.yaml").get("lineage_gate", {})
    return {"pan_immune": list(spec.get("pan_immune", [])), "pan_epithelial": list(spec.get("pan_epithelial", [])),
            "immune_types": [t for t in types if type_class.get(t) == immune_class],
            "stromal_types": [t for t in types if type_class.get(t) in set(stromal_classes)],
            "epithelial_types": [t for t in types if epithelial_class is not None and type_class.get(t) == epithelial_class
                                 and t not in set(spec.get("not_pan_epithelial", []))],
            "exempt": list(spec.get("exempt_from_pan_immune", []))}


def _lineage_gate_arrays(scaled: np.ndarray, var: pd.Index, gate: Mapping[str, Any] | None
                         ) -> tuple[np.ndarray, np.ndarray, set[str], set[str], set[str]]:
    """Per cluster, mean 0-1 expression of the pan-immune and pan-epithelial genes (NaN: none in panel)."""
    n_cl = scaled.shape[0]
    nan = np.full(n_cl, np.nan)
    if not gate:
        return nan, nan.copy(), set(), set(), set()

    def mean_of(genes: Sequence[str]) -> np.ndarray:
        i = var.get_indexer(list(genes))
        i = i[i >= 0]
        return scaled[:, i].mean(axis=1) if i.size else np.full(n_cl, np.nan)

    return (mean_of(gate.get("pan_immune", ())), mean_of(gate.get("pan_epithelial", ())),
            set(gate.get("immune_types", ())), set(gate.get("exempt", ())), set(gate.get("stromal_types", ())))


def _gate_blocks(pan_imm: float, pan_epi: float, immune_types: set[str], exempt: set[str],
                 min_ownership: float, owned: float, stromal_types: set[str] = frozenset()) -> set[str]:
    """Types a cluster may not take: immune types without pan-immune expression; immune and stromal
    types where epithelial expression is at full strength (and, for immune types, outweighs CD45)."""
    out: set[str] = set()
    if np.isfinite(pan_imm) and pan_imm < min_ownership:
        out |= immune_types - exempt
    if np.isfinite(pan_epi) and pan_epi >= owned:
        out |= set(stromal_types)
        if not (np.isfinite(pan_imm) and pan_imm >= pan_epi):
            out |= immune_types
    return out


def refine_posteriors(counts: Any, label: np.ndarray, seed: np.ndarray, n_types: int, *,
                      contamination: float = 0.2, dispersion: float = 4.0, min_seed_cells: int = 5,
                      min_divergence: float = 0.15, prior: np.ndarray | None = None,
                      free: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    r"""Posterior of each type per cell under per-sample multinomial type profiles.

    Every type's expression profile is learned from the sample itself: the summed raw counts of
    its *seed* cells (``seed & (label == t)``), mixed with the sample's average profile
    (``contamination``: spill-over from neighbours and ambient RNA put some of every gene into
    every cell). A cell's log-likelihood under type :math:`t` is :math:`\sum_g x_g \log p_{tg}`
    (multinomial), divided by ``dispersion`` (counts are over-dispersed, so the plain multinomial
    is over-confident), plus ``log prior``. Types with fewer than ``min_seed_cells`` seeds get no
    profile (posterior 0); cells whose label is such a type keep it (posterior 1 on it), except the
    ``free`` ones (e.g. cells of clusters no type explains), which get the posterior over the profiles.
    A type whose learned profile is within ``min_divergence`` (Kullback-Leibler, nats per
    transcript) of a type with more seeds is not a population of its own (e.g. tumour cells with an
    amplified adipocyte gene scored "adipocyte" by markers): its profile is dropped and its cells
    go to the other types.

    This is a semi-supervised naive-Bayes step in the spirit of CellAssign (marker knowledge
    seeds, the whole panel decides): it picks up sample-specific genes of each type that the
    marker lists lack, and is robust to a few spilled marker transcripts.

    Returns
    -------
    ``(posterior (cells x types), has_profile (types,))``.
    """
    n = counts.shape[0]
    tot = np.asarray(counts.sum(axis=0)).ravel() + 1e-3
    amb = tot / tot.sum()
    logp = np.zeros((n_types, counts.shape[1]))
    has = np.zeros(n_types, dtype=bool)
    for t in range(n_types):
        m = seed & (label == t)
        if int(m.sum()) < min_seed_cells:
            continue
        s_t = np.asarray(counts[np.flatnonzero(m)].sum(axis=0)).ravel() + 0.5 * amb * counts.shape[1]
        logp[t] = np.log((1.0 - contamination) * s_t / s_t.sum() + contamination * amb)
        has[t] = True
    n_seed = np.bincount(label[seed], minlength=n_types) if seed.any() else np.zeros(n_types, int)
    merged = np.zeros(n_types, dtype=bool)
    for t in np.argsort(n_seed, kind="stable"):  # smallest first
        others = [u for u in np.flatnonzero(has) if u != t and n_seed[u] >= n_seed[t]]
        if not has[t] or not others:
            continue
        p_t = np.exp(logp[t])
        kl = [float((p_t * (logp[t] - logp[u])).sum()) for u in others]
        if min(kl) < min_divergence:
            has[t] = False
            merged[t] = True
    ll = np.asarray(counts @ logp.T) / dispersion
    if prior is not None:
        ll = ll + np.log(np.clip(prior, 1e-6, None))
    ll[:, ~has] = -np.inf
    post = np.zeros((n, n_types))
    if has.any():
        ll -= ll.max(axis=1, keepdims=True)
        post = np.exp(ll)
        post /= post.sum(axis=1, keepdims=True)
    keep = (~has[label] & ~merged[label]) if n else np.zeros(0, dtype=bool)
    if free is not None:  # cells not held to their (profile-less) label: posterior over the profiles
        keep &= ~np.asarray(free, dtype=bool)
    post[keep] = 0.0
    post[keep, label[keep]] = 1.0
    return post, has


def _top_two(s: np.ndarray, n_types: int) -> tuple[np.ndarray, np.ndarray]:
    """Best type per cell (argmax of the scores) and margin over the second best score."""
    order = np.argsort(-s, axis=1, kind="stable")
    best = order[:, 0]
    top = s[np.arange(len(s)), best]
    second = s[np.arange(len(s)), order[:, 1]] if n_types > 1 else np.zeros(len(s))
    return best, top - second


def _qc_mask(adata: AnnData, qc_key: str | None) -> np.ndarray | None:
    """``obs[qc_key]`` as booleans, or None when there is no QC column."""
    if qc_key is not None and qc_key in adata.obs:
        return adata.obs[qc_key].to_numpy(bool)
    return None


def _cluster_votes(codes: np.ndarray, best: np.ndarray, margin: np.ndarray, qc: np.ndarray | None,
                   n_types: int, min_margin: float) -> np.ndarray:
    """Per cluster, the fraction of its voters (confident cells; all cells when none) per type."""
    n_cl = int(codes.max()) + 1
    confident = margin >= min_margin
    if qc is not None:
        confident &= qc
    votes = np.zeros((n_cl, n_types))
    np.add.at(votes, (codes[confident], best[confident]), 1.0)
    empty = votes.sum(axis=1) == 0
    if empty.any():
        sel = np.isin(codes, np.flatnonzero(empty))
        np.add.at(votes, (codes[sel], best[sel]), 1.0)
    return votes / np.maximum(votes.sum(axis=1, keepdims=True), 1.0)


def _cluster_type_mask(column: Sequence[Any], types: list[str]) -> np.ndarray:
    """(clusters, types) mask of the comma-separated type names in an annotate_clusters column."""
    mask = np.zeros((len(column), len(types)), dtype=bool)
    for c_i, nm in enumerate(column):
        for t in str(nm).split(","):
            if t in types:
                mask[c_i, types.index(t)] = True
    return mask


def _rare_seeds(adata: AnnData, markers: Mapping[str, list[str]], types: list[str], ann: pd.DataFrame,
                cl_label: np.ndarray, codes: np.ndarray, best: np.ndarray, margin: np.ndarray,
                qc: np.ndarray, *, rare_margin: float, rare_min_detected: int,
                rare_min_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells seeding a rare type that forms no cluster of its own; also the nominated-type mask.

    Rare types form no cluster of their own (T cells among a few immune cells, basal melanocytes):
    cells whose own markers say so clearly seed their profile instead ... except in a cluster no
    type explains whose markers qualify no type at all or also qualify a type that explains another
    cluster of the sample: there the cells whose markers "say so clearly" are that population's own
    non-specific markers (acinar cells with two smooth-muscle genes next to a duct epithelium), and
    a profile seeded from them would absorb the whole cluster through its own cells.
    """
    n = len(best)
    det = _detected_markers(adata, markers)
    n_mk = np.array([len(markers[t]) for t in types])
    annotated = set(cl_label[cl_label < len(types)].tolist())
    nom = _cluster_type_mask(ann["nominated"], types)
    qual_ = _cluster_type_mask(ann["qualifying"], types)
    blocked = (cl_label == len(types)) & (~qual_.any(axis=1) | np.array(
        [bool(qual_[c_i][sorted(annotated)].any()) if annotated else False for c_i in range(len(cl_label))]))
    strong = (qc & (margin >= rare_margin) & ~blocked[codes]
              & (det[np.arange(n), best] >= np.minimum(rare_min_detected, n_mk[best])))
    # the lineage gate holds for seeds too: a cell of a cluster the gate kept from an immune type
    # (CD45-negative or epithelial) does not seed that type's profile
    gated = _cluster_type_mask(ann["gated"], types) if "gated" in ann else np.zeros_like(nom)
    rare_seed = np.zeros(n, dtype=bool)
    for t in range(len(types)):
        if t in annotated:
            continue
        m = strong & (best == t) & ~gated[codes, t]
        if m.sum() >= rare_min_cells:
            rare_seed |= m
    return rare_seed, nom


def _refine_rounds(counts: Any, label: np.ndarray, seed: np.ndarray, qc: np.ndarray, unexplained: np.ndarray,
                   nom: np.ndarray, codes: np.ndarray, n_types: int, *, refine: int, unknown_posterior: float,
                   refine_kwargs: Mapping[str, Any] | None,
                   group: np.ndarray | None = None,
                   cluster_best: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``refine`` rounds of :func:`refine_posteriors`; returns the final label and its posterior."""
    n = len(label)
    chosen = np.where(label < n_types, 1.0, 0.0)
    for _ in range(refine):
        post, has = refine_posteriors(counts, label, seed, n_types + 1, free=label == n_types,
                                      **dict(refine_kwargs or {}))
        new_label = post.argmax(axis=1)
        new_chosen = post[np.arange(n), new_label]
        # a cell of a cluster no type explains joins a type only on strong evidence, and
        # only a type that the cluster's markers nominate: the multinomial posterior is
        # over-confident, and over the whole panel an unknown population is always
        # "closest" to some profile (tumour cells to a T-cell profile)
        ok_type = nom[codes, np.minimum(new_label, n_types - 1)] & (new_label < n_types)
        # ... and a type other than the one the cluster's markers favour (``cluster_best``) only
        # when every nominated type of another class (``group``) has a profile to compete with: a
        # posterior over the profiled types alone is no evidence against a nominated type no other
        # cluster taught (keratinocytes nominating epithelium and smooth muscle, with no epithelial
        # cluster, would all join smooth muscle)
        grp = np.arange(n_types) if group is None else np.asarray(group)
        missing = nom & ~has[None, :n_types]  # clusters x types
        lab_ = np.minimum(new_label, n_types - 1)
        other_class_missing = (missing[codes] & (grp[None, :] != grp[lab_][:, None])).any(axis=1)
        favoured = (lab_ == cluster_best[codes]) if cluster_best is not None else np.zeros(n, dtype=bool)
        ok_type &= ~other_class_missing | favoured
        stay = unexplained & ((new_chosen < unknown_posterior) | ~ok_type)
        label = np.where(stay, n_types, new_label)
        chosen = np.where(stay, 0.0, new_chosen)
        seed = qc & (chosen >= 0.9) & (label < n_types)
    return label, chosen


def _neighbour_confidence(adata: AnnData, label: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Mean of the posterior and the fraction of the cell's kNN neighbours given the same type."""
    if "connectivities" in adata.obsp:
        g = sp.csr_matrix(adata.obsp["connectivities"])
        rows = np.repeat(np.arange(g.shape[0]), np.diff(g.indptr))
        agree = (label[g.indices] == label[rows]).astype(float) * g.data
        num = np.bincount(rows, weights=agree, minlength=g.shape[0])
        den = np.bincount(rows, weights=g.data, minlength=g.shape[0])
        nbr = np.where(den > 0, num / np.maximum(den, 1e-12), chosen)
    else:
        nbr = chosen
    return 0.5 * (chosen + nbr)


def _hierarchical_labels(adata: AnnData, markers: Mapping[str, list[str]], types: list[str], codes: np.ndarray,
                         best: np.ndarray, margin: np.ndarray, *, cluster_key: str, qc_key: str | None,
                         refine: int, refine_kwargs: Mapping[str, Any] | None,
                         annotate_kwargs: Mapping[str, Any] | None, unknown_posterior: float,
                         rare_margin: float, rare_min_detected: int,
                         rare_min_cells: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Steps 1-3 of the hierarchical method: cluster types, rare seeds, refinement; label, conf, refined."""
    qc = _qc_mask(adata, qc_key)
    if qc is None:
        qc = np.ones(len(best), dtype=bool)
    ann = annotate_clusters(adata, markers, cluster_key=cluster_key, **dict(annotate_kwargs or {}))
    ext = [*types, UNKNOWN]  # index len(types): no type (clusters without marker evidence)
    cl_label = np.array([ext.index(t) for t in ann["type"]], dtype=int)
    label = cl_label[codes]
    chosen = np.where(label < len(types), 1.0, 0.0)
    refined = False
    if refine > 0:
        counts = _gene_counts(adata)
        seed = qc & (label < len(types))
        rare_seed, nom = _rare_seeds(adata, markers, types, ann, cl_label, codes, best, margin, qc,
                                     rare_margin=rare_margin, rare_min_detected=rare_min_detected,
                                     rare_min_cells=rare_min_cells)
        label = np.where(rare_seed, best, label)
        seed |= rare_seed
        unexplained = cl_label[codes] == len(types)
        groups = dict(annotate_kwargs or {}).get("groups")
        group = None if groups is None else pd.factorize(np.array([str(groups.get(t, t)) for t in types]))[0]
        best_of = np.array([types.index(b) if b in types else -1 for b in ann["best"]], dtype=int)
        label, chosen = _refine_rounds(counts, label, seed, qc, unexplained, nom, codes, len(types),
                                       group=group, cluster_best=best_of,
                                       refine=refine, unknown_posterior=unknown_posterior,
                                       refine_kwargs=refine_kwargs)
        refined = True
    adata.uns.setdefault(Key.UNS, {})["annotate_clusters"] = ann.astype(
        {"cluster": str}).to_dict(orient="list")
    return label, _neighbour_confidence(adata, label, chosen), refined


def _write_fine_types(adata: AnnData, markers: Mapping[str, list[str]], types: list[str], label: np.ndarray,
                      conf: np.ndarray, *, refined: bool, min_detected: int, qc_key: str | None,
                      key_added: str) -> None:
    """Unknown for failed QC / too few detected markers / no type; write obs[key_added] and the confidence."""
    no_type = label >= len(types)
    label = np.where(no_type, 0, label)
    names = np.array(types, dtype=object)[label]
    det = _detected_markers(adata, markers)
    weak = ((det[np.arange(len(label)), label] < min_detected) & (not refined)) | no_type
    if qc_key is not None and qc_key in adata.obs:
        weak |= ~adata.obs[qc_key].to_numpy(bool)
    names[weak] = UNKNOWN
    conf = np.where(weak, 0.0, conf)
    cats = [*types, UNKNOWN]
    adata.obs[key_added] = pd.Categorical(names.astype(str), categories=cats)
    adata.obs[Key.TYPE_CONFIDENCE] = np.clip(conf, 0.0, 1.0).astype(np.float64)


def assign_fine_types(adata: AnnData, markers: Mapping[str, Sequence[str]], *,
                      method: Literal["hierarchical", "consensus", "marker", "cluster"] = "hierarchical",
                      score_prefix: str = Key.SCORE_PREFIX, cluster_key: str = Key.CLUSTER,
                      temperature: float = 0.03, min_margin: float = 0.02,
                      min_detected: int = 1, refine: int = 2,
                      refine_kwargs: Mapping[str, Any] | None = None,
                      annotate_kwargs: Mapping[str, Any] | None = None, unknown_posterior: float = 0.9,
                      rare_margin: float = 0.1, rare_min_detected: int = 3, rare_min_cells: int = 5,
                      qc_key: str | None = Key.QC_PASS, key_added: str = Key.FINE_TYPE,
                      copy: bool = False) -> AnnData | None:
    """Per-cell fine type and confidence from marker rank scores and Leiden clusters.

    Scores ``obs[f"{score_prefix}{type}"]`` are computed with :func:`rank_score` when missing.

    Methods
    -------
    ``"marker"``
        argmax of the cell's scores. Confidence = ``clip(margin / (4 * temperature), 0, 1)`` with
        margin = best - second best score.
    ``"cluster"``
        every cell of a Leiden cluster gets the cluster's majority argmax type (confident cells,
        margin >= ``min_margin``, vote; all cells when none is confident). Confidence = fraction
        of the cluster's voters agreeing.
    ``"hierarchical"`` / ``"consensus"`` (same thing; the neoplastic hierarchy itself is in
    :func:`stlib.labels.classes.neoplastic_step`)
        1. every Leiden cluster gets the type whose marker set it owns (:func:`annotate_clusters`),
           or ``"unknown"`` when no type the labeler knows explains it (``annotate_kwargs``);
        2. rare types that form no cluster of their own are seeded by cells whose own marker
           scores say so clearly (best score ahead of the second by ``rare_margin``, at least
           ``rare_min_detected`` of the type's markers detected, at least ``rare_min_cells`` cells);
        3. ``refine`` rounds of :func:`refine_posteriors`: type profiles over the whole panel are
           learned from the seed cells (first round: cells of annotated clusters + rare seeds; later
           rounds: posterior >= 0.9) and every cell takes the type of highest posterior; a cell of a
           cluster no type explains joins a type only with posterior >= ``unknown_posterior``,
           else it stays ``"unknown"`` (the unknown / other outcome, class 255).
        Confidence = mean of the posterior and the fraction of the cell's kNN neighbours
        (``obsp["connectivities"]``) given the same type. ``refine=0`` keeps the cluster types.
        The defaults were chosen on the development cohorts of :mod:`stlib.robustness` only.

    In all methods a cell becomes ``"unknown"`` (confidence 0) when it fails QC (``obs[qc_key]``)
    or when fewer than ``min_detected`` markers of its type have a count (not applied to refined
    labels, whose evidence is the whole panel).

    Returns
    -------
    Writes ``obs[key_added]`` (categorical fine type), ``obs["type_confidence"]`` (float in
    [0, 1]) and, when computed here, the score columns; returns the AnnData when ``copy=True``.
    """
    if method not in ("hierarchical", "consensus", "marker", "cluster"):
        raise ValueError(f"method must be 'hierarchical', 'consensus', 'marker' or 'cluster', got {method!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    adata = adata.copy() if copy else adata
    markers = {t: list(g) for t, g in markers.items() if len(g)}
    if not markers:
        raise ValueError("markers: no type has a gene in the panel")
    types = list(markers)
    missing = [t for t in types if f"{score_prefix}{t}" not in adata.obs]
    if missing:
        rank_score(adata, {t: markers[t] for t in missing}, key_added=score_prefix)
    s = np.column_stack([adata.obs[f"{score_prefix}{t}"].to_numpy(np.float64) for t in types])
    best, margin = _top_two(s, len(types))

    refined = False
    if method == "marker":
        label = best
        conf = np.clip(margin / (4 * temperature), 0.0, 1.0)
    else:
        if cluster_key not in adata.obs:
            raise ValueError(f"obs[{cluster_key!r}] missing: run stlib.labels.celltypes.cluster(adata) first")
        codes = pd.Categorical(adata.obs[cluster_key]).codes
        if method == "cluster":
            q = _cluster_votes(codes, best, margin, _qc_mask(adata, qc_key), len(types), min_margin)
            label = q.argmax(axis=1)[codes]
            conf = q.max(axis=1)[codes]
        else:
            label, conf, refined = _hierarchical_labels(
                adata, markers, types, codes, best, margin, cluster_key=cluster_key, qc_key=qc_key,
                refine=refine, refine_kwargs=refine_kwargs, annotate_kwargs=annotate_kwargs,
                unknown_posterior=unknown_posterior, rare_margin=rare_margin,
                rare_min_detected=rare_min_detected, rare_min_cells=rare_min_cells)

    _write_fine_types(adata, markers, types, label, conf, refined=refined, min_detected=min_detected,
                      qc_key=qc_key, key_added=key_added)
    adata.uns.setdefault(Key.UNS, {})["assign_fine_types"] = {
        "method": method, "temperature": temperature, "min_margin": min_margin,
        "min_detected": min_detected, "types": types,
        "refine": int(refine) if refined else 0,
    }
    log.info("assign_fine_types(%s): %s; wrote obs[%r, %r]", method,
             adata.obs[key_added].value_counts().to_dict(), key_added, Key.TYPE_CONFIDENCE)
    return adata if copy else None
