"""Fine cell types -> image-oriented nucleus classes, with the hierarchical neoplastic step.

An H&E model sees PanNuke-like classes (:mod:`stlib.constants`): Neoplastic, Inflammatory,
Connective, Dead, Epithelial (non-neoplastic); 255 marks a nucleus whose class is unknown.
Expression says "epithelial" or "melanocytic" far more reliably than "neoplastic", so neoplasia is
decided in a second, sample-aware step (:func:`neoplastic_step`):

1. sample gate: a sample that is not a tumour (HEST ``disease_state`` / ``oncotree_code``) has no
   neoplastic cell at all;
2. in tumour samples, epithelial and melanocytic cells get a neoplastic score combining the organ
   tumour signature, proliferation and an inferred copy-number signal (infercnvpy, immune and
   stromal cells as the reference), split by a 2-component Gaussian mixture with a grey zone.

:func:`label_cells` runs the whole chain; its ``method`` switches between our hierarchy and the
ablations / baselines ("flat" = the paper's "w/o Hier", "marker", "cluster").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from stlib.constants import CONNECTIVE, DEAD, EPITHELIAL, IGNORE, INFLAMMATORY, NEOPLASTIC
from stlib.labels.celltypes import (
    UNKNOWN, Key, _counts, _row_sums, assign_fine_types, canonical_organ, cluster, load_markers,
    load_programs, normalize, qc_filter, rank_score,
)

log = logging.getLogger(__name__)

__all__ = [
    "FINE_TO_CLASS", "REFERENCE_TYPES", "CANDIDATE_TYPES", "is_tumor_sample", "load_gene_positions",
    "neoplastic_step", "dead_rule", "to_image_classes", "label_cells",
]

#: Fine type -> image class id (stlib.constants). Types not listed (and "unknown") -> IGNORE.
FINE_TO_CLASS: dict[str, int] = {
    "tumor": NEOPLASTIC,
    "t_cell": INFLAMMATORY, "b_cell": INFLAMMATORY, "plasma": INFLAMMATORY,
    "macrophage": INFLAMMATORY, "mast": INFLAMMATORY,
    "fibroblast": CONNECTIVE, "endothelial": CONNECTIVE, "smooth_muscle": CONNECTIVE,
    "adipocyte": CONNECTIVE,
    "dead": DEAD,
    "epithelial": EPITHELIAL, "melanocyte": EPITHELIAL,
}
#: Cell types used as the copy-number reference (assumed diploid).
REFERENCE_TYPES: tuple[str, ...] = (
    "t_cell", "b_cell", "plasma", "macrophage", "mast", "fibroblast", "endothelial", "smooth_muscle",
)
#: Cell types the neoplastic step may call neoplastic.
CANDIDATE_TYPES: tuple[str, ...] = ("epithelial", "melanocyte")

_NOT_TUMOR_STATES = {"healthy", "normal", "diseased", "control", "benign", "inflamed"}
_TUMOR_STATES = {"cancer", "tumor", "tumour", "malignant", "carcinoma", "neoplastic"}


def _is_missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() in ("", "nan", "None")


def is_tumor_sample(disease_state: str | None, oncotree_code: str | None = None) -> bool:
    """The sample gate: True when HEST metadata say the sample is a tumour.

    ``disease_state`` "Cancer" (or tumour/malignant) -> True; "Healthy"/"Diseased"/... -> False;
    when ``disease_state`` is missing, a non-empty ``oncotree_code`` -> True.
    """
    state = None if _is_missing(disease_state) else str(disease_state).strip().lower()
    if state in _TUMOR_STATES:
        return True
    if state in _NOT_TUMOR_STATES:
        return False
    if state is not None:
        raise ValueError(f"disease_state {disease_state!r} not understood; expected one of "
                         f"{sorted(_TUMOR_STATES | _NOT_TUMOR_STATES)}")
    return not _is_missing(oncotree_code)


@lru_cache(maxsize=1)
def _gene_positions_table() -> pd.DataFrame:
    from stlib.io.panels import gene_positions

    return gene_positions()


def load_gene_positions(adata: AnnData, *, overwrite: bool = False) -> int:
    """Write GRCh38 gene positions (``stlib/data/gene_positions.csv``) into ``adata.var``.

    Returns
    -------
    The number of positioned genes. Writes ``var["chromosome"]``, ``var["start"]``, ``var["end"]``
    (NaN / None for genes without a position) unless present and ``overwrite=False``.
    """
    if not overwrite and {"chromosome", "start", "end"} <= set(adata.var.columns):
        return int(adata.var["chromosome"].notna().sum())
    pos = _gene_positions_table().set_index("gene")
    pos = pos[~pos.index.duplicated()].reindex(adata.var_names)
    adata.var["chromosome"] = pos["chromosome"].to_numpy(object)
    adata.var["start"] = pos["start"].to_numpy(float)
    adata.var["end"] = pos["end"].to_numpy(float)
    n = int(pos["chromosome"].notna().sum())
    log.info("load_gene_positions: %d / %d genes positioned; wrote var['chromosome', 'start', 'end']",
             n, adata.n_vars)
    return n


def _robust_z(x: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    ref = x if ref is None else ref
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        return np.zeros_like(x)
    med = np.median(ref)
    mad = 1.4826 * np.median(np.abs(ref - med))
    if mad <= 1e-12:
        mad = np.std(ref) if np.std(ref) > 1e-12 else 1.0
    return (x - med) / mad


def _cnv_signal(adata: AnnData, ref_mask: np.ndarray, cand_mask: np.ndarray, *, window_size: int, step: int,
                min_positioned_genes: int, min_reference_cells: int) -> tuple[np.ndarray | None, str]:
    """Per-cell copy-number signal; (None, reason) when it cannot be computed."""
    load_gene_positions(adata)
    auto = adata.var["chromosome"].isin([f"chr{i}" for i in range(1, 23)]).to_numpy()
    if int(auto.sum()) < min_positioned_genes:
        return None, (f"only {int(auto.sum())} autosomal positioned genes (< min_positioned_genes="
                      f"{min_positioned_genes}); copy-number signal skipped")
    if int(ref_mask.sum()) < min_reference_cells:
        return None, (f"only {int(ref_mask.sum())} immune/stromal reference cells (< "
                      f"{min_reference_cells}); copy-number signal skipped")
    import infercnvpy as cnv

    sub = AnnData(X=adata.layers[Key.LOGNORM][:, auto],
                  obs=pd.DataFrame({"ref": np.where(ref_mask, "ref", "query")}, index=adata.obs_names),
                  var=adata.var.loc[auto, ["chromosome", "start", "end"]].copy())
    sub.var["start"] = sub.var["start"].astype(int)
    sub.var["end"] = sub.var["end"].astype(int)
    cnv.tl.infercnv(sub, reference_key="ref", reference_cat="ref", window_size=window_size,
                    step=step, n_jobs=1, key_added="cnv")
    m = sub.obsm["X_cnv"]
    m = m.toarray() if sp.issparse(m) else np.asarray(m)
    # Projection on the sample's shared aberration profile: mean CNV of the candidates minus that
    # of the reference. Tumour cells share clonal gains/losses; per-cell noise in small panels does
    # not line up with them, whereas mean |CNV| would count noise as signal.
    prof = m[cand_mask].mean(axis=0) - m[ref_mask].mean(axis=0)
    norm = float(np.linalg.norm(prof))
    if norm < 1e-12:
        return None, "inferred copy-number profile of the candidates is flat; copy-number signal skipped"
    return m @ (prof / norm), (f"infercnvpy window={window_size} step={step} on {int(auto.sum())} genes; "
                               "score = projection on candidates-minus-reference CNV profile")


def neoplastic_step(adata: AnnData, *, disease_state: str | None, oncotree_code: str | None = None,
                    organ: str | None = None, fine_key: str = Key.FINE_TYPE,
                    candidate_types: Sequence[str] = CANDIDATE_TYPES,
                    reference_types: Sequence[str] = REFERENCE_TYPES,
                    weights: tuple[float, float, float] = (1.0, 0.5, 1.0), use_cnv: bool = True,
                    cnv_window: int = 5, cnv_step: int = 1, min_positioned_genes: int = 100,
                    min_reference_cells: int = 30, low: float = 0.2, high: float = 0.8,
                    min_separation: float = 1.0, unimodal: Literal["neoplastic", "ambiguous"] = "neoplastic",
                    seed: int = 0, copy: bool = False) -> AnnData | None:
    """The hierarchical neoplastic step: sample gate, then neoplastic vs non-neoplastic epithelium.

    1. Gate: when :func:`is_tumor_sample` is False, no cell is neoplastic; candidates are called
       "non-neoplastic".
    2. For candidate cells (``obs[fine_key]`` in ``candidate_types``) of a tumour sample, three
       signals, each robust-z-scored (median / MAD) over the candidates: the organ tumour signature
       rank score (up genes minus lost genes, :func:`stlib.labels.celltypes.load_programs`), the
       proliferation rank score, and the copy-number signal (infercnvpy, immune and stromal cells
       as the diploid reference, ``window_size=cnv_window``, ``step=cnv_step``; each cell's CNV
       profile projected on the candidates-minus-reference mean profile, i.e. on the sample's
       shared gains/losses;
       skipped with a logged reason when the panel has fewer than ``min_positioned_genes``
       positioned autosomal genes or too few reference cells). Their weighted sum (``weights`` =
       tumour, proliferation, CNV) is the raw score.
    3. A 2-component Gaussian mixture (``seed``) on the raw score; the neoplastic score is the
       posterior of the higher component: >= ``high`` -> "neoplastic" (fine type becomes
       "tumor"), <= ``low`` -> "non-neoplastic", in between -> "ambiguous" (class 255 later).
       When the mixture is not bimodal (Ashman's D < ``min_separation``), all candidates are called
       ``unimodal`` ("neoplastic": in a cancer sample epithelium is mostly tumour; logged).

    Returns
    -------
    Writes ``obs["neoplastic_score"]`` (NaN for non-candidates / healthy samples),
    ``obs["neoplastic_call"]``, ``obs["tumor_signature_score"]``, ``obs["proliferation_score"]``,
    ``obs["cnv_score"]`` (NaN when skipped), updates ``obs[fine_key]`` ("tumor" for neoplastic
    cells) and ``uns["stlib_labels"]["neoplastic_step"]``; returns the AnnData when ``copy=True``.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    if unimodal not in ("neoplastic", "ambiguous"):
        raise ValueError(f"unimodal must be 'neoplastic' or 'ambiguous', got {unimodal!r}")
    adata = adata.copy() if copy else adata
    if fine_key not in adata.obs:
        raise ValueError(f"obs[{fine_key!r}] missing: run stlib.labels.celltypes.assign_fine_types first")
    fine = adata.obs[fine_key].astype(str).to_numpy(object)
    cand = np.isin(fine, list(candidate_types))
    n = adata.n_obs
    call = np.full(n, "", dtype=object)
    nscore = np.full(n, np.nan)
    cnv_score = np.full(n, np.nan)
    info: dict = {"tumor_sample": None, "n_candidates": int(cand.sum())}
    tumor = is_tumor_sample(disease_state, oncotree_code)
    info["tumor_sample"] = tumor
    prog = load_programs(adata.var_names, organ=organ, oncotree_code=oncotree_code)
    sigs = {k: v for k, v in {"tumor_up": prog["tumor_up"], "tumor_down": prog["tumor_down"],
                              "proliferation": prog["proliferation"]}.items() if v}
    if sigs:
        rank_score(adata, sigs, key_added="_prog_")
    t_up = adata.obs.pop("_prog_tumor_up").to_numpy() if "tumor_up" in sigs else np.zeros(n)
    t_dn = adata.obs.pop("_prog_tumor_down").to_numpy() if "tumor_down" in sigs else np.zeros(n)
    prol = adata.obs.pop("_prog_proliferation").to_numpy() if "proliferation" in sigs else np.zeros(n)
    adata.obs[Key.TUMOR_SCORE] = t_up - t_dn
    adata.obs[Key.PROLIF_SCORE] = prol

    if not tumor:
        call[cand] = "non-neoplastic"
        info["reason"] = f"sample gate: disease_state={disease_state!r}, oncotree_code={oncotree_code!r} -> not a tumour"
        log.info("neoplastic_step: %s; %d candidates non-neoplastic", info["reason"], int(cand.sum()))
    elif cand.sum() < 3:
        call[cand] = "ambiguous"
        info["reason"] = f"only {int(cand.sum())} candidate cells"
        log.warning("neoplastic_step: %s; left ambiguous", info["reason"])
    else:
        w_t, w_p, w_c = weights
        raw = w_t * _robust_z((t_up - t_dn)[cand]) + w_p * _robust_z(prol[cand])
        info["cnv"] = "disabled"
        if use_cnv and w_c != 0:
            ref = np.isin(fine, list(reference_types))
            if Key.LOGNORM not in adata.layers:
                normalize(adata)
            sig, reason = _cnv_signal(adata, ref, cand, window_size=cnv_window, step=cnv_step,
                                      min_positioned_genes=min_positioned_genes,
                                      min_reference_cells=min_reference_cells)
            info["cnv"] = reason
            if sig is None:
                log.info("neoplastic_step: %s", reason)
            else:
                cnv_score[:] = sig
                raw = raw + w_c * _robust_z(sig[cand], sig[ref])
        from sklearn.mixture import GaussianMixture

        gm = GaussianMixture(n_components=2, random_state=seed, n_init=3).fit(raw[:, None])
        means = gm.means_.ravel()
        sds = np.sqrt(gm.covariances_.ravel())
        hi = int(np.argmax(means))
        d = abs(means[0] - means[1]) / np.sqrt(0.5 * (sds[0] ** 2 + sds[1] ** 2))
        info.update(ashman_d=float(d), gmm_means=means.tolist(), gmm_weights=gm.weights_.tolist())
        if d < min_separation or gm.weights_.min() < 0.02:
            info["reason"] = f"candidate scores not bimodal (Ashman's D={d:.2f}); all called {unimodal}"
            log.warning("neoplastic_step: %s", info["reason"])
            post = np.full(int(cand.sum()), 1.0 if unimodal == "neoplastic" else 0.5)
        else:
            post = gm.predict_proba(raw[:, None])[:, hi]
            # the mixture's tails can flip (lower component wider): keep the posterior monotone
            post = np.maximum.accumulate(post[np.argsort(raw)])[np.argsort(np.argsort(raw))]
            info["reason"] = f"2-component mixture, Ashman's D={d:.2f}"
        nscore[cand] = post
        c = np.where(post >= high, "neoplastic", np.where(post <= low, "non-neoplastic", "ambiguous"))
        call[cand] = c
        log.info("neoplastic_step: %s; calls %s", info["reason"],
                 pd.Series(c).value_counts().to_dict())
    # update fine types
    fine_cat = adata.obs[fine_key]
    cats = list(fine_cat.cat.categories) if hasattr(fine_cat, "cat") else sorted(set(fine))
    if "tumor" not in cats:
        cats = ["tumor", *cats]
    new_fine = fine.copy()
    new_fine[call == "neoplastic"] = "tumor"
    adata.obs[fine_key] = pd.Categorical(new_fine.astype(str), categories=cats)
    adata.obs[Key.NEOPLASTIC_SCORE] = nscore
    adata.obs[Key.NEOPLASTIC_CALL] = pd.Categorical(call.astype(str))
    adata.obs[Key.CNV_SCORE] = cnv_score
    info.update(disease_state=None if _is_missing(disease_state) else str(disease_state),
                oncotree_code=None if _is_missing(oncotree_code) else str(oncotree_code),
                organ=canonical_organ(organ, oncotree_code), weights=list(weights), low=low, high=high,
                programs={k: v for k, v in prog.items()})
    adata.uns.setdefault(Key.UNS, {})["neoplastic_step"] = info
    log.info("neoplastic_step: wrote obs[%r, %r, %r, %r, %r], updated obs[%r]", Key.NEOPLASTIC_SCORE,
             Key.NEOPLASTIC_CALL, Key.TUMOR_SCORE, Key.PROLIF_SCORE, Key.CNV_SCORE, fine_key)
    return adata if copy else None


def dead_rule(adata: AnnData, *, max_counts: float | None = None, low_quantile: float = 0.05,
              min_apoptosis_counts: int = 1, min_apoptosis_fraction: float = 0.1,
              apoptosis_genes: Sequence[str] | None = None, fine_key: str = Key.FINE_TYPE,
              copy: bool = False) -> AnnData | None:
    """A PROXY for dead / dying cells: low transcript count plus detected apoptosis genes.

    Expression cannot really see dead cells (pyknotic nuclei have little RNA and Xenium panels
    carry at most a few apoptosis genes; STHELAR's authors call their "Dead" class unverified).
    This rule is a stand-in, not a validated signature:

    * a cell is *low-count* when ``obs["n_counts"] <= max_counts`` (default: the ``low_quantile``
      quantile of ``n_counts`` in the sample);
    * a low-count cell whose apoptosis-proxy genes (``programs.yaml``: BCL2L11, FAS, BAX, BBC3, ...;
      only those in the panel) have ``>= min_apoptosis_counts`` counts and ``>=
      min_apoptosis_fraction`` of its counts becomes fine type ``"dead"``;
    * every other low-count cell becomes ``"unknown"`` (class 255: segment it, do not classify it).

    On panels without any apoptosis gene (hBreast, hColon, hSkin) no cell is called dead and the
    low-count cells become unknown; that is logged.

    Returns
    -------
    Writes ``obs["apoptosis_counts"]`` and updates ``obs[fine_key]`` (``"dead"`` / ``"unknown"``)
    and ``obs["type_confidence"]`` (0 for the unknown low-count cells); adds
    ``uns["stlib_labels"]["dead_rule"]``; returns the AnnData when ``copy=True``.
    """
    if not 0.0 <= low_quantile <= 1.0:
        raise ValueError(f"low_quantile must be in [0, 1], got {low_quantile}")
    adata = adata.copy() if copy else adata
    if fine_key not in adata.obs:
        raise ValueError(f"obs[{fine_key!r}] missing: run stlib.labels.celltypes.assign_fine_types first")
    x = _counts(adata)
    n_counts = (adata.obs[Key.N_COUNTS].to_numpy(float) if Key.N_COUNTS in adata.obs else _row_sums(x))
    thr = float(max_counts) if max_counts is not None else float(np.quantile(n_counts, low_quantile))
    genes = list(apoptosis_genes) if apoptosis_genes is not None else load_programs(adata.var_names)["apoptosis"]
    idx = pd.Index(adata.var_names).get_indexer(genes)
    idx = idx[idx >= 0]
    apo = _row_sums(x[:, idx]) if idx.size else np.zeros(adata.n_obs)
    low = n_counts <= thr
    dead = low & (apo >= min_apoptosis_counts) & (apo >= min_apoptosis_fraction * np.maximum(n_counts, 1))
    fine = adata.obs[fine_key].astype(str).to_numpy(object)
    fine[low] = UNKNOWN
    fine[dead] = "dead"
    cats = list(adata.obs[fine_key].cat.categories) if hasattr(adata.obs[fine_key], "cat") else []
    cats += [c for c in ("dead", UNKNOWN) if c not in cats]
    cats += [c for c in sorted(set(fine)) if c not in cats]
    adata.obs[fine_key] = pd.Categorical(fine.astype(str), categories=cats)
    if Key.TYPE_CONFIDENCE in adata.obs:
        conf = adata.obs[Key.TYPE_CONFIDENCE].to_numpy(float).copy()
        conf[low & ~dead] = 0.0
        adata.obs[Key.TYPE_CONFIDENCE] = conf
    adata.obs[Key.APOPTOSIS_COUNTS] = apo
    info = {"max_counts": thr, "n_low": int(low.sum()), "n_dead": int(dead.sum()),
            "apoptosis_genes": [str(g) for g in adata.var_names[idx]], "proxy": True}
    adata.uns.setdefault(Key.UNS, {})["dead_rule"] = info
    if idx.size == 0:
        log.info("dead_rule: no apoptosis gene in the panel; %d low-count cells -> unknown", int(low.sum()))
    log.info("dead_rule (proxy): %d low-count cells (n_counts <= %.1f), %d called dead; wrote obs[%r], "
             "updated obs[%r]", int(low.sum()), thr, int(dead.sum()), Key.APOPTOSIS_COUNTS, fine_key)
    return adata if copy else None


def to_image_classes(adata: AnnData, *, min_confidence: float = 0.5, fine_key: str = Key.FINE_TYPE,
                     dead_confidence: float = 0.5, key_added: str = Key.CLASS,
                     copy: bool = False) -> AnnData | None:
    """Image-oriented class per cell from its fine type (:data:`FINE_TO_CLASS`).

    Class 255 (ignore) for: fine types an H&E model cannot be expected to see (not in the table,
    ``"unknown"``), cells the neoplastic step left ``"ambiguous"``, and cells whose confidence is
    below ``min_confidence``. Confidence = ``obs["type_confidence"]``, times the neoplastic
    step's certainty ``|2 * neoplastic_score - 1|`` for its candidates, and ``dead_confidence`` for
    dead cells (a proxy, see :func:`dead_rule`).

    Returns
    -------
    Writes ``obs[key_added]`` (uint8 class id) and ``obs["confidence"]`` (float in [0, 1]);
    returns the AnnData when ``copy=True``.
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    adata = adata.copy() if copy else adata
    if fine_key not in adata.obs:
        raise ValueError(f"obs[{fine_key!r}] missing: run stlib.labels.celltypes.assign_fine_types first")
    fine = adata.obs[fine_key].astype(str).to_numpy()
    cls = np.array([FINE_TO_CLASS.get(f, IGNORE) for f in fine], dtype=np.uint8)
    conf = (adata.obs[Key.TYPE_CONFIDENCE].to_numpy(float).copy() if Key.TYPE_CONFIDENCE in adata.obs
            else np.ones(adata.n_obs))
    if Key.NEOPLASTIC_SCORE in adata.obs:
        ns = adata.obs[Key.NEOPLASTIC_SCORE].to_numpy(float)
        has = np.isfinite(ns)
        conf[has] *= np.abs(2 * ns[has] - 1)
    if Key.NEOPLASTIC_CALL in adata.obs:
        cls[adata.obs[Key.NEOPLASTIC_CALL].astype(str).to_numpy() == "ambiguous"] = IGNORE
    conf[fine == "dead"] = dead_confidence
    cls[conf < min_confidence] = IGNORE
    adata.obs[key_added] = cls
    adata.obs[Key.CONFIDENCE] = np.clip(conf, 0.0, 1.0)
    counts = pd.Series(cls).value_counts().sort_index().to_dict()
    log.info("to_image_classes: classes %s (min_confidence=%.2f); wrote obs[%r, %r]", counts,
             min_confidence, key_added, Key.CONFIDENCE)
    return adata if copy else None


def label_cells(adata: AnnData, *, method: Literal["hierarchical", "flat", "marker", "cluster"] = "hierarchical",
                organ: str | None = None, disease_state: str | None = None,
                oncotree_code: str | None = None, panel: str | None = None, seed: int = 0,
                min_counts: int = 10, min_genes: int = 3, min_confidence: float = 0.5,
                resolution: float = 1.0, n_pcs: int = 30, n_neighbors: int = 15,
                neighbors_method: Literal["umap", "gauss"] = "umap", min_markers: int = 2,
                use_cnv: bool = True, dead: bool = True,
                markers: Mapping[str, Sequence[str]] | None = None,
                neoplastic_kwargs: Mapping | None = None, copy: bool = False) -> AnnData:
    """Whole chain: counts -> QC -> scores -> (clusters) -> fine types -> classes.

    Methods (all kept for the ablation):

    ``"hierarchical"`` (ours)
        fine types without a "tumor" type (consensus of cell scores and Leiden clusters), then
        :func:`neoplastic_step` (sample gate, tumour signature + proliferation + CNV).
    ``"flat"`` (the paper's "w/o Hier")
        "tumor" is just another fine type whose markers are the organ tumour signature plus
        proliferation; same consensus; no sample gate, no CNV.
    ``"marker"``
        flat marker set, argmax of the cell's rank scores only.
    ``"cluster"``
        flat marker set, Leiden cluster majority label.

    Parameters
    ----------
    adata
        Cells x panel genes, raw counts in ``X`` or ``layers["counts"]``.
    organ, disease_state, oncotree_code
        HEST metadata of the sample (organ picks marker extras and the tumour signature).
    panel
        Panel id (``stlib.io.panels``) used for the marker sets; default: ``var_names``.
    seed
        Seed of PCA / neighbours / Leiden / mixture: the same seed gives the same labels.
    neighbors_method
        kNN connectivity kernel for Leiden (see :func:`stlib.labels.celltypes.cluster`).
    min_confidence
        Cells below it get class 255.
    markers
        Replace the shipped marker sets (``{type: genes}``).
    neoplastic_kwargs
        Extra options for :func:`neoplastic_step`.
    copy
        Work on a copy (the input is left untouched).

    Returns
    -------
    The AnnData with ``obs["qc_pass"]``, ``obs["score_*"]``, ``obs["leiden"]`` (not for "marker"),
    ``obs["fine_type"]``, ``obs["type_confidence"]``, ``obs["neoplastic_score"]``,
    ``obs["cnv_score"]`` (hierarchical), ``obs["class"]``, ``obs["confidence"]``,
    ``layers["counts"]``, ``layers["lognorm"]`` and ``uns["stlib_labels"]`` (parameters, marker
    coverage, class counts).
    """
    if method not in ("hierarchical", "flat", "marker", "cluster"):
        raise ValueError(f"method must be 'hierarchical', 'flat', 'marker' or 'cluster', got {method!r}")
    adata = adata.copy() if copy else adata
    from stlib.io.panels import load_panel

    genes = [g for g in load_panel(panel) if g in set(adata.var_names)] if panel else list(adata.var_names)
    qc_filter(adata, min_counts=min_counts, min_genes=min_genes)
    normalize(adata)
    if markers is None:
        mk = load_markers(genes, organ=organ or canonical_organ(None, oncotree_code), min_markers=min_markers)
    else:
        mk = {t: [g for g in v if g in set(genes)] for t, v in markers.items()}
        mk = {t: v for t, v in mk.items() if v}
    mk.pop("tumor", None)
    if method != "hierarchical":
        prog = load_programs(genes, organ=organ, oncotree_code=oncotree_code)
        tum = list(dict.fromkeys(prog["tumor_up"] + prog["proliferation"]))
        if tum:
            mk = {"tumor": tum, **mk}
    rank_score(adata, mk)
    if method != "marker":
        cluster(adata, resolution=resolution, n_pcs=n_pcs, n_neighbors=n_neighbors, seed=seed,
                neighbors_method=neighbors_method)
    fine_method = {"hierarchical": "consensus", "flat": "consensus", "marker": "marker",
                   "cluster": "cluster"}[method]
    assign_fine_types(adata, mk, method=fine_method)
    if method == "hierarchical":
        neoplastic_step(adata, disease_state=disease_state, oncotree_code=oncotree_code, organ=organ,
                        use_cnv=use_cnv, seed=seed, **dict(neoplastic_kwargs or {}))
    if dead:
        dead_rule(adata)
    to_image_classes(adata, min_confidence=min_confidence)
    from stlib.labels.celltypes import marker_coverage

    cov = marker_coverage(genes, organ=organ, markers=None)
    adata.uns.setdefault(Key.UNS, {}).update({
        "method": method, "organ": None if _is_missing(organ) else str(organ),
        "disease_state": None if _is_missing(disease_state) else str(disease_state),
        "oncotree_code": None if _is_missing(oncotree_code) else str(oncotree_code),
        "panel": panel, "seed": seed, "min_confidence": min_confidence,
        "markers": {t: list(v) for t, v in mk.items()},
        "coverage": cov[["type", "n_markers", "n_in_panel", "fraction"]].to_dict(orient="list"),
        "class_counts": {str(k): int(v) for k, v in
                         pd.Series(adata.obs[Key.CLASS]).value_counts().sort_index().items()},
    })
    log.info("label_cells(%s): done; class counts %s", method, adata.uns[Key.UNS]["class_counts"])
    return adata
