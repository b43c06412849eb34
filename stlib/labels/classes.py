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

**Frozen labeler.** The defaults of this module and of :mod:`stlib.labels.celltypes` (cluster
annotation, lineage gate, rare-type seeding, posterior thresholds, the neoplastic step's evidence
rules, the apoptosis test) were chosen on the development cohorts ``stlib.robustness.DEV_SEEDS``
(seeds 101-220 of the realistic demo generator; the fifth freeze added 121-220) and on nothing else; the evaluation seeds
``stlib.robustness.EVAL_SEEDS`` were not looked at before the labeler was frozen, and
``benchmarks/label_robustness.json`` reports them. (The seeds of earlier evaluations,
``stlib.robustness.SEEN_SEEDS``, were read when they showed failures and are no longer unseen.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from stlib.config import LabelsConfig, NeoplasticConfig
from stlib.constants import CONNECTIVE, DEAD, EPITHELIAL, IGNORE, INFLAMMATORY, NEOPLASTIC
from stlib.labels.celltypes import (
    UNKNOWN, Key, _counts, _read_yaml, _row_nnz, _row_sums, assign_fine_types, canonical_organ, cluster, lineage_gate,
    load_markers, load_programs, normalize, qc_filter, rank_score,
)

log = logging.getLogger(__name__)

__all__ = [
    "FINE_TO_CLASS", "REFERENCE_TYPES", "CANDIDATE_TYPES", "Lineage", "is_tumor_sample", "load_gene_positions",
    "tumor_lineage", "lineage_table", "cnv_support", "cycling_cells", "NeoplasticConfig", "neoplastic_step", "dead_rule", "to_image_classes",
    "IgnoreReason", "LOW_COUNT_MADS", "low_count_outliers", "label_cells",
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
    # parenchymal types: hepatocytes and tubule cells are epithelia (PanNuke's liver and kidney
    # epithelium); cardiomyocytes are muscle, counted with connective tissue as PanNuke counts
    # smooth muscle; glia and neurons have no PanNuke class (IGNORE: segmented, not classified)
    "hepatocyte": EPITHELIAL, "kidney_tubule": EPITHELIAL, "pancreatic_islet": EPITHELIAL, "acinar": EPITHELIAL,
    "cardiomyocyte": CONNECTIVE,
    "glia": IGNORE, "neuron": IGNORE,
}
#: Cell types used as the copy-number reference (assumed diploid): the default of
#: :attr:`stlib.config.NeoplasticConfig.reference_types`.
REFERENCE_TYPES: tuple[str, ...] = NeoplasticConfig.reference_types
#: Cell types the neoplastic step may call neoplastic (the union over lineages).
CANDIDATE_TYPES: tuple[str, ...] = ("epithelial", "melanocyte", "hepatocyte", "kidney_tubule")
#: Types a non-neoplastic call applies to (tumour-like lineages that are not the sample's).
_EPITHELIAL_LIKE: tuple[str, ...] = ("epithelial", "melanocyte", "hepatocyte", "kidney_tubule", "pancreatic_islet",
                                     "acinar")

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


def _std_z(x: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """(x - median) / standard deviation over ``ref`` (default ``x``).

    The standard deviation, not the MAD: when one population dominates (most candidates of a
    tumour sample are tumour) the MAD is the spread of that population alone, and a signal with a
    tight majority mode would outweigh the others by an order of magnitude.
    """
    ref = x if ref is None else ref
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        return np.zeros_like(x)
    sd = float(np.std(ref))
    return (x - np.median(ref)) / (sd if sd > 1e-12 else 1.0)


def _cnv_signal(adata: AnnData, ref_mask: np.ndarray, *, window_size: int, step: int,
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
    return np.asarray(m, dtype=np.float64), (f"infercnvpy window={window_size} step={step} on "
                                             f"{int(auto.sum())} genes")


def _project(m: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """Per-cell projection of CNV profiles on the (mean of group a - mean of group b) direction.

    Tumour cells share clonal gains/losses; per-cell noise in small panels does not line up with
    them, whereas mean |CNV| would count noise as signal.
    """
    prof = m[a].mean(axis=0) - m[b].mean(axis=0)
    norm = float(np.linalg.norm(prof))
    return None if norm < 1e-12 else m @ (prof / norm)


def _mixture_posterior(feats: np.ndarray, seed: int, min_separation: float) -> tuple[np.ndarray | None, dict]:
    """Posterior of the "higher" component of a 2-Gaussian mixture (diagonal covariances).

    ``feats`` is cells x signals (each oriented so that higher = more tumour-like); the higher
    component is the one with the larger sum of means. Each signal is weighted by how well it
    separates the two components (the mixture is fitted jointly), not by a fixed weight.
    Returns None when the mixture is not bimodal: Ashman's D over the signals (root of the sum of
    squared per-signal D) below ``min_separation`` or a component below 2 % of the cells.
    """
    from sklearn.mixture import GaussianMixture

    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim == 1:
        feats = feats[:, None]
    gm = GaussianMixture(n_components=2, covariance_type="diag", random_state=seed, n_init=3).fit(feats)
    means, var = gm.means_, gm.covariances_
    hi = int(np.argmax(means.sum(axis=1)))
    d = float(np.sqrt((((means[0] - means[1]) ** 2) / (0.5 * (var[0] + var[1]))).sum()))
    info = {"ashman_d": d, "gmm_means": means.tolist(), "gmm_weights": gm.weights_.tolist()}
    if gm.weights_.min() < 0.02 or (min_separation > 0 and d < min_separation):
        return None, info
    post = gm.predict_proba(feats)[:, hi]
    # the mixture's tails can flip (lower component wider): keep the posterior monotone in the
    # combined score
    score = feats @ ((means[hi] - means[1 - hi]) / (0.5 * (var[0] + var[1])))
    order = np.argsort(score, kind="stable")
    mono = np.empty_like(post)
    mono[order] = np.maximum.accumulate(post[order])
    return mono, info


def _knn(x: np.ndarray, k: int) -> np.ndarray | None:
    """Indices of the ``k`` nearest rows of every row (itself included); None when k < 2."""
    if k < 2 or len(x) < 3:
        return None
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x))
    return NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x, return_distance=False)


def _self_train(features: np.ndarray, post: np.ndarray, *, confident: float, min_seed_cells: int,
                seed: int) -> np.ndarray | None:
    """Logistic regression trained on the confident cells of ``post``; its probability for all."""
    pos, neg = post >= confident, post <= 1.0 - confident
    if int(pos.sum()) < min_seed_cells or int(neg.sum()) < min_seed_cells:
        return None
    from sklearn.linear_model import LogisticRegression

    mu, sd = features.mean(axis=0), features.std(axis=0) + 1e-9
    f = (features - mu) / sd
    tr = pos | neg
    clf = LogisticRegression(C=0.1, class_weight=None, max_iter=500, random_state=seed)
    clf.fit(f[tr], pos[tr].astype(int))
    return clf.predict_proba(f)[:, 1]


@dataclass(frozen=True)
class Lineage:
    """What a tumour of an OncoTree code arises from (``programs.yaml: lineage``)."""

    code: str | None
    #: fine types the neoplastic step may call neoplastic (empty: no defensible lineage)
    candidates: tuple[str, ...]
    #: without a lineage: types the tumour cells resemble (their cells get no class)
    suspect: tuple[str, ...] = ()
    note: str = ""

    @property
    def defensible(self) -> bool:
        """A lineage is known: the neoplastic step can split its cells."""
        return bool(self.candidates)


def tumor_lineage(oncotree_code: str | None, organ: str | None = None) -> Lineage:
    """Lineage of a tumour from its OncoTree code (``markers/programs.yaml: lineage``).

    Carcinoma codes -> epithelium (plus the parenchymal type where one exists: hepatocytes for
    HCC, kidney tubule for renal cell carcinomas); melanoma codes -> melanocytes. Codes with no
    defensible lineage for a marker panel (GBM, ALL) and codes missing from the table (or no code)
    return ``candidates=()`` and the ``suspect`` types whose cells then get no class.
    """
    table = _read_yaml("programs.yaml").get("lineage", {})
    code = None if _is_missing(oncotree_code) else str(oncotree_code).strip().upper()
    entry = table.get(code) if code is not None else None
    if entry is None:
        why = "no OncoTree code" if code is None else f"OncoTree code {code} is not in the lineage table"
        return Lineage(code, (), tuple(_EPITHELIAL_LIKE), f"{why}: no defensible lineage")
    return Lineage(code, tuple(entry.get("candidates") or ()), tuple(entry.get("suspect") or ()),
                   str(entry.get("note", "")))


def lineage_table(codes: Sequence[str] | None = None) -> pd.DataFrame:
    """The lineage table (``programs.yaml: lineage``) as a DataFrame, for ``codes`` (default all).

    Columns: ``oncotree_code``, ``candidates`` (fine types the neoplastic step may call neoplastic;
    empty = no defensible lineage), ``suspect`` (their cells get no class then), ``note``.
    """
    table = _read_yaml("programs.yaml").get("lineage", {})
    codes = list(table) if codes is None else list(dict.fromkeys(str(c).strip().upper() for c in codes))
    rows = []
    for c in codes:
        lin = tumor_lineage(c)
        rows.append({"oncotree_code": c, "candidates": ", ".join(lin.candidates) or "(none)",
                     "suspect": ", ".join(lin.suspect), "note": lin.note})
    return pd.DataFrame(rows)


def cnv_support(var_names: Sequence[str], *, min_genes_per_arm: int = 20) -> tuple[bool, int, int, str]:
    """Whether a panel can carry a copy-number signal, and the window sized to it.

    A CNV signal averages neighbouring genes; on a targeted panel most neighbours are lineage
    markers chosen for the panel, so a window of a few genes measures lineage, not copy number.
    The panel supports CNV when the median number of its positioned genes per autosomal chromosome
    arm is at least ``min_genes_per_arm`` (hMulti: 8; Prime 5K: ~110). The window is then half the
    median arm (between 10 and 100 genes) and the step a fifth of the window.

    Returns
    -------
    ``(supported, window, step, reason)``.
    """
    from collections import Counter

    from stlib.io.panels import chromosome_arms

    arms = chromosome_arms([str(g) for g in var_names])
    per_arm = Counter(a for a in arms if a and not a.startswith(("chrX", "chrY")))
    med = float(np.median(list(per_arm.values()))) if per_arm else 0.0
    if med < min_genes_per_arm:
        return False, 0, 0, (f"panel has a median of {med:.0f} positioned genes per chromosome arm "
                             f"(< {min_genes_per_arm}): a copy-number window would mostly measure "
                             "lineage; copy-number signal off")
    window = int(np.clip(med // 2, 10, 100))
    step = max(1, window // 5)
    return True, window, step, f"median {med:.0f} genes per arm: window {window}, step {step}"


def cycling_cells(adata: AnnData, genes: Sequence[str], *, min_fraction: float = 0.06,
                  min_genes: int = 3) -> np.ndarray:
    """Cells in S/G2/M: proliferation genes hold at least ``min_fraction`` of the cell's counts and
    at least ``min_genes`` distinct ones are detected (capped at half the panel's proliferation
    genes). Cycling cells express the set together; one or two stray transcripts (spill-over from
    a dividing neighbour, background) do not qualify."""
    x = _counts(adata)
    idx = pd.Index(adata.var_names).get_indexer(list(genes))
    idx = idx[idx >= 0]
    if idx.size == 0:
        return np.zeros(adata.n_obs, dtype=bool)
    sub = x[:, idx]
    c = _row_sums(sub)
    nd = _row_nnz(sub)
    tot = _row_sums(x)
    need = min(min_genes, max(1, idx.size // 2))
    return (c >= min_fraction * np.maximum(tot, 1)) & (nd >= need) & (c > 0)


def neoplastic_step(adata: AnnData, *, disease_state: str | None, oncotree_code: str | None = None,
                    organ: str | None = None, config: NeoplasticConfig | None = None, copy: bool = False,
                    **options: object) -> AnnData | None:
    """The hierarchical neoplastic step: sample gate, lineage, then neoplastic vs non-neoplastic.

    1. Gate: when :func:`is_tumor_sample` is False, no cell is neoplastic; epithelial-like cells
       are called "non-neoplastic".
    2. Lineage (:func:`tumor_lineage`, a table over OncoTree codes): candidates are the cells of the
       tumour's lineage (``candidate_types`` overrides it); cells of other epithelial-like types are
       "non-neoplastic". Where no lineage is defensible (GBM, ALL, unknown codes) the cells of the
       ``suspect`` types are "ambiguous" (class 255) and leave the copy-number reference.
    3. Three signals, each standardised over the candidates (median / SD, :func:`_std_z`): the organ
       tumour signature rank score (up genes minus lost genes), the proliferation rank score, and a
       copy-number signal (infercnvpy, immune and stromal cells as the diploid reference) where the
       panel supports one (:func:`cnv_support`: enough genes per chromosome arm; window sized to the
       panel; ``cnv_window`` / ``cnv_step`` override it), else off with a logged message. Their
       weighted sum (``weights`` = tumour, proliferation, CNV) is the raw score. Proliferation weighs
       little per cell: most tumour cells do not cycle (Ki-67 indices of 10-40 %) and some normal
       cells do.
    4. A 2-component Gaussian mixture on the raw score averaged over each candidate's
       ``smooth_neighbors`` nearest candidates in expression space (20 PCs; 0 = no smoothing). When it is bimodal (Ashman's D >=
       ``min_separation`` and both components >= 2 % of the candidates): the CNV direction is
       re-estimated on putative tumour minus putative normal candidates, the mixture refitted, and
       (``self_train``) a logistic regression over the candidates' expression PCs + the signals is
       trained on the confident cells; its probability is the neoplastic score.
    5. When the scores are **not bimodal** the candidates are one population; ``unimodal`` decides:
       ``"evidence"`` (default) calls it neoplastic (score ``unimodal_score``) only when the
       population carries tumour evidence — its share of cycling cells (:func:`cycling_cells`) is
       at least ``min_cycling_fraction`` and ``min_cycling_ratio`` times that of the reference
       cells — and ambiguous otherwise. With ``per_cluster_evidence`` (default) a cluster of at
       least ``min_cluster_candidates`` candidates (Leiden on the candidates' expression PCs without
       proliferation genes, as in step 4) whose own cycling share disagrees takes its own call: a
       tumour and the normal epithelium beside it form separate clusters whose scores need not be
       bimodal (a signature the tumour does not carry), and the tumour's cycling share must not
       carry the normal cluster with it. In a tumour-like population a cluster with a normal-like
       share (at most ``normal_cycling_ratio`` times the reference's) is non-neoplastic (score
       ``1 - unimodal_score``); in a population without tumour evidence a tumour-like cluster is
       neoplastic. ``"ambiguous"`` always leaves it ambiguous; ``"neoplastic"`` (the old behaviour)
       always calls it neoplastic.
    6. Score >= ``high`` -> "neoplastic" (fine type becomes "tumor"), <= ``low`` -> "non-neoplastic",
       in between -> "ambiguous" (class 255 later).

    Options are the fields of :class:`NeoplasticConfig`: pass a ``config``, keyword arguments, or
    both (keyword arguments override the config's fields).

    Returns
    -------
    Writes ``obs["neoplastic_score"]`` (NaN for non-candidates / healthy samples),
    ``obs["neoplastic_call"]``, ``obs["tumor_signature_score"]``, ``obs["proliferation_score"]``,
    ``obs["cnv_score"]`` (NaN when off), updates ``obs[fine_key]`` ("tumor" for neoplastic
    cells) and ``uns["stlib_labels"]["neoplastic_step"]``; returns the AnnData when ``copy=True``.
    """
    cfg = replace(config if config is not None else NeoplasticConfig(), **options)
    adata = adata.copy() if copy else adata
    if cfg.fine_key not in adata.obs:
        raise ValueError(f"obs[{cfg.fine_key!r}] missing: run stlib.labels.celltypes.assign_fine_types first")
    fine = adata.obs[cfg.fine_key].astype(str).to_numpy(object)
    tumor = is_tumor_sample(disease_state, oncotree_code)
    lin = tumor_lineage(oncotree_code, organ)
    if cfg.candidate_types is not None:
        lin = Lineage(lin.code, tuple(cfg.candidate_types), (), "candidate types given")
    n = adata.n_obs
    call = np.full(n, "", dtype=object)
    nscore = np.full(n, np.nan)
    cnv_score = np.full(n, np.nan)
    info: dict = {"tumor_sample": tumor, "lineage": list(lin.candidates), "lineage_note": lin.note,
                  "candidate_types": list(lin.candidates)}
    prog = load_programs(adata.var_names, organ=organ, oncotree_code=oncotree_code)
    t_up, t_dn, prol = _program_scores(adata, prog)
    epithelial_like = np.isin(fine, list(_EPITHELIAL_LIKE))

    if not tumor:
        call[epithelial_like] = "non-neoplastic"
        info["n_candidates"] = 0
        info["reason"] = f"sample gate: disease_state={disease_state!r}, oncotree_code={oncotree_code!r} -> not a tumour"
        log.info("neoplastic_step: %s; %d epithelial-like cells non-neoplastic", info["reason"],
                 int(epithelial_like.sum()))
    elif not lin.defensible:
        sus = np.isin(fine, list(lin.suspect))
        call[sus] = "ambiguous"
        call[epithelial_like & ~sus] = "non-neoplastic"
        info["n_candidates"] = 0
        info["reason"] = (f"no defensible lineage ({lin.note}); {int(sus.sum())} cells of "
                          f"{sorted(lin.suspect)} left without a class")
        log.warning("neoplastic_step: %s", info["reason"])
    else:
        cand = np.isin(fine, list(lin.candidates))
        call[epithelial_like & ~cand] = "non-neoplastic"
        info["n_candidates"] = int(cand.sum())
        if cand.sum() < 3:
            call[cand] = "ambiguous"
            info["reason"] = f"only {int(cand.sum())} candidate cells"
            log.warning("neoplastic_step: %s; left ambiguous", info["reason"])
        else:
            _split_candidates(adata, fine, cand, call, nscore, cnv_score, info, t_up=t_up, t_dn=t_dn, prol=prol,
                              prog=prog, cfg=cfg)
    _write_neoplastic(adata, fine, call, nscore, cnv_score, cfg.fine_key)
    info.update(disease_state=None if _is_missing(disease_state) else str(disease_state),
                oncotree_code=None if _is_missing(oncotree_code) else str(oncotree_code),
                organ=canonical_organ(organ, oncotree_code), weights=list(cfg.weights), low=cfg.low,
                high=cfg.high, programs={k: v for k, v in prog.items()})
    adata.uns.setdefault(Key.UNS, {})["neoplastic_step"] = info
    log.info("neoplastic_step: wrote obs[%r, %r, %r, %r, %r], updated obs[%r]", Key.NEOPLASTIC_SCORE,
             Key.NEOPLASTIC_CALL, Key.TUMOR_SCORE, Key.PROLIF_SCORE, Key.CNV_SCORE, cfg.fine_key)
    return adata if copy else None


def _program_scores(adata: AnnData, prog: Mapping[str, list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank scores of the tumour up / down and proliferation programmes; writes the two obs scores."""
    n = adata.n_obs
    sigs = {k: v for k, v in {"tumor_up": prog["tumor_up"], "tumor_down": prog["tumor_down"],
                              "proliferation": prog["proliferation"]}.items() if v}
    if sigs:
        rank_score(adata, sigs, key_added="_prog_")
    t_up = adata.obs.pop("_prog_tumor_up").to_numpy() if "tumor_up" in sigs else np.zeros(n)
    t_dn = adata.obs.pop("_prog_tumor_down").to_numpy() if "tumor_down" in sigs else np.zeros(n)
    prol = adata.obs.pop("_prog_proliferation").to_numpy() if "proliferation" in sigs else np.zeros(n)
    adata.obs[Key.TUMOR_SCORE] = t_up - t_dn
    adata.obs[Key.PROLIF_SCORE] = prol
    return t_up, t_dn, prol


def _write_neoplastic(adata: AnnData, fine: np.ndarray, call: np.ndarray, nscore: np.ndarray,
                      cnv_score: np.ndarray, fine_key: str) -> None:
    """Neoplastic cells become "tumor" in ``obs[fine_key]``; write the score, call and CNV columns."""
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


def _cnv_raw_score(adata: AnnData, ref: np.ndarray, cand: np.ndarray, raw: np.ndarray, cnv_score: np.ndarray,
                   info: dict, cfg: NeoplasticConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Step 3's copy-number signal where the panel supports one: adds it to ``raw``; the CNV matrix."""
    w_c = cfg.weights[2]
    info["cnv"] = "disabled"
    cnv_m = None
    if cfg.use_cnv and w_c != 0:
        ok, win, stp, why = cnv_support(adata.var_names, min_genes_per_arm=cfg.min_genes_per_arm)
        win = cfg.cnv_window if cfg.cnv_window is not None else win
        stp = cfg.cnv_step if cfg.cnv_step is not None else stp
        if not ok and cfg.cnv_window is None:
            info["cnv"] = why
            log.info("neoplastic_step: %s", why)
        else:
            if Key.LOGNORM not in adata.layers:
                normalize(adata)
            cnv_m, reason = _cnv_signal(adata, ref, window_size=win, step=stp,
                                        min_positioned_genes=cfg.min_positioned_genes,
                                        min_reference_cells=cfg.min_reference_cells)
            info["cnv"] = reason
            sig = None if cnv_m is None else _project(cnv_m, cand, ref)
            if sig is None:
                log.info("neoplastic_step: %s", reason if cnv_m is None else "flat copy-number profile")
                cnv_m = None
            else:
                info["cnv"] += "; score = projection on candidates-minus-reference CNV profile"
                cnv_score[:] = sig
                raw = raw + w_c * _std_z(sig[cand])
    return raw, cnv_m


def _candidate_pcs(adata: AnnData, cand: np.ndarray, prog: Mapping[str, list[str]], seed: int) -> np.ndarray:
    """Expression PCs of the candidates (proliferation genes left out: cycling is a state)."""
    # the raw score is averaged over each cell's nearest candidates in expression space (tumour
    # and normal epithelium differ in many genes, so a cell's neighbours are mostly of its kind; a
    # few-gene signature is noisy cell by cell)
    x = adata.layers[Key.LOGNORM] if Key.LOGNORM in adata.layers else _counts(adata)
    x = x[np.flatnonzero(cand)]
    x = x.toarray() if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    # cycling is a state, not an identity: proliferation genes stay out of the neighbourhoods
    x = x[:, ~np.isin(np.asarray(adata.var_names), list(prog["proliferation"]))]
    from sklearn.decomposition import PCA

    k_pc = max(1, min(20, x.shape[0] - 1, x.shape[1] - 1))
    return PCA(n_components=k_pc, random_state=seed).fit_transform(x - x.mean(axis=0))


def _cnv_second_pass(post: np.ndarray, cnv_m: np.ndarray, cand: np.ndarray, base_raw: np.ndarray,
                     smooth: Callable[[np.ndarray], np.ndarray], cnv_score: np.ndarray, info: dict,
                     cfg: NeoplasticConfig) -> np.ndarray:
    """Refit on the CNV direction of putative tumour minus putative normal candidates; the posterior.

    This direction cancels what lineage expression (epithelial genes, absent from the reference) adds.
    """
    ci = np.flatnonzero(cand)
    a, b = ci[post >= cfg.refit_confident], ci[post <= 1.0 - cfg.refit_confident]
    if a.size >= cfg.min_seed_cells and b.size >= cfg.min_seed_cells:
        sig2 = _project(cnv_m, a, b)
        if sig2 is not None:
            cnv_score[:] = sig2
            raw = base_raw + cfg.weights[2] * _std_z(sig2[cand])
            post2, mix2 = _mixture_posterior(smooth(raw), cfg.seed, 0.0)
            if post2 is not None and mix2["ashman_d"] >= cfg.min_separation:
                post = post2
                info.update(mix2)
                info["cnv"] += "; refined on putative tumour-minus-normal candidates"
    return post


@dataclass(frozen=True)
class _CyclingEvidence:
    """Population evidence of a tumour: a share of cycling cells well above the reference cells'."""

    cyc: np.ndarray
    f_ref: float
    base: float
    cfg: NeoplasticConfig

    @classmethod
    def of(cls, adata: AnnData, prog: Mapping[str, list[str]], ref: np.ndarray,
           cfg: NeoplasticConfig) -> _CyclingEvidence:
        cyc = cycling_cells(adata, prog["proliferation"])
        f_ref = float(cyc[ref].mean()) if ref.sum() >= 20 else float("nan")
        base = max(f_ref, 0.01) if np.isfinite(f_ref) else float("nan")
        return cls(cyc, f_ref, base, cfg)

    def share(self, mask: np.ndarray) -> float:
        return float(self.cyc[mask].mean()) if mask.sum() >= 20 else float("nan")

    def tumour_like(self, f: float) -> bool:
        return bool(np.isfinite(f) and np.isfinite(self.base)
                    and f >= max(self.cfg.min_cycling_fraction, self.cfg.min_cycling_ratio * self.base))

    def normal_like(self, f: float) -> bool:
        return bool(np.isfinite(f) and np.isfinite(self.base) and f <= self.cfg.normal_cycling_ratio * self.base)


def _judge_split(post: np.ndarray, cand: np.ndarray, ev: _CyclingEvidence, info: dict,
                 cfg: NeoplasticConfig) -> np.ndarray | None:
    """Accept, flip or reject the mixture's split by Ashman's D and the cycling share of each side.

    A split must separate tumour from normal epithelium, not two tumour populations (subclones;
    cycling and resting cells). Returns the posterior (flipped when the low side is tumour-like) or None.
    """
    d = info["ashman_d"]
    ci = np.flatnonzero(cand)
    hi_m = np.zeros(len(cand), bool)
    hi_m[ci[post >= 0.5]] = True
    lo_m = np.zeros(len(cand), bool)
    lo_m[ci[post < 0.5]] = True
    f_hi, f_lo = ev.share(hi_m), ev.share(lo_m)
    info.update(cycling_fraction_high=f_hi, cycling_fraction_low=f_lo)
    backed = ev.tumour_like(f_hi) and ev.normal_like(f_lo)
    backed_flipped = ev.tumour_like(f_lo) and ev.normal_like(f_hi)
    if ev.tumour_like(f_hi) and ev.tumour_like(f_lo) and max(f_hi, f_lo) < 2.0 * min(f_hi, f_lo):
        info["split"] = "rejected: both components carry the same tumour evidence (cycling share)"
        post = None
    elif d >= cfg.min_separation and backed_flipped:
        info["split"] = "flipped: the low-score component carries the tumour evidence (cycling share)"
        post = 1.0 - post
    elif d >= cfg.min_separation:
        info["split"] = "accepted: bimodal"
    elif d >= cfg.min_separation_backed and (backed or backed_flipped):
        info["split"] = ("accepted: weakly bimodal, one component tumour-like and the other normal-like "
                         "(cycling share)")
        if backed_flipped:
            post = 1.0 - post
    else:
        post = None
    if "split" in info:
        log.info("neoplastic_step: split %s", info["split"])
    return post


def _candidate_clusters(pcs: np.ndarray, cand: np.ndarray, n_neighbors: int, seed: int) -> np.ndarray | None:
    """Leiden clusters of the candidates in their expression PCs without proliferation genes.

    Not the sample's clusters: those are built on every gene, so cycling and resting cells of one
    tumour fall in different clusters, and a resting tumour cluster would look normal by its
    cycling share. Returns one label per cell (``""`` for non-candidates), or None when too few.
    """
    if len(pcs) < 3:
        return None
    import scanpy as sc

    sub = AnnData(np.zeros((len(pcs), 1), dtype=np.float32))
    sub.obsm["X_pc"] = pcs
    sc.pp.neighbors(sub, n_neighbors=max(2, min(max(n_neighbors, 2), len(pcs) - 1)), use_rep="X_pc",
                    method="gauss", random_state=seed)
    sc.tl.leiden(sub, resolution=1.0, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
    out = np.full(len(cand), "", dtype=object)
    out[np.flatnonzero(cand)] = sub.obs["leiden"].astype(str).to_numpy()
    return out


def _per_cluster_posterior(cand: np.ndarray, clusters: np.ndarray, f_cand: float, ev: _CyclingEvidence, info: dict,
                           cfg: NeoplasticConfig) -> np.ndarray:
    """Step 5 per cluster: the population's call, except clusters whose own cycling share disagrees.

    When the candidates as a whole are tumour-like, every cluster is neoplastic except a cluster of at
    least ``min_cluster_candidates`` cells whose cycling share is normal-like (non-neoplastic: the
    normal epithelium beside the tumour). Otherwise every cluster is ambiguous except a big enough
    tumour-like cluster (neoplastic: a tumour among more normal epithelium).
    """
    cl = np.asarray(clusters)[cand].astype(str)
    whole = ev.tumour_like(f_cand)
    post = np.full(int(cand.sum()), cfg.unimodal_score if whole else 0.5)
    shares: dict[str, float] = {}
    changed: list[str] = []
    ci = np.flatnonzero(cand)
    for c in pd.unique(cl):
        m = cl == c
        if int(m.sum()) < cfg.min_cluster_candidates:
            continue
        full = np.zeros(len(cand), bool)
        full[ci[m]] = True
        f = float(ev.cyc[full].mean())
        shares[str(c)] = f
        if whole and ev.normal_like(f):
            post[m] = 1.0 - cfg.unimodal_score
            changed.append(str(c))
        elif not whole and ev.tumour_like(f):
            post[m] = cfg.unimodal_score
            changed.append(str(c))
    info["cluster_cycling"] = shares
    what = "neoplastic" if whole else "ambiguous"
    other = "non-neoplastic (normal-like cycling share)" if whole else "neoplastic (tumour-like cycling share)"
    info["reason"] = (f"candidates are one population (Ashman's D={info['ashman_d']:.2f}); cycling "
                      f"{100 * f_cand:.1f}% of candidates vs {100 * ev.f_ref:.1f}% of reference cells; "
                      f"{what}, except {len(changed)} of {len(shares)} candidate clusters {other}")
    log.warning("neoplastic_step: %s", info["reason"])
    return post


def _unimodal_posterior(cand: np.ndarray, f_cand: float, ev: _CyclingEvidence, info: dict,
                        cfg: NeoplasticConfig, clusters: np.ndarray | None = None) -> np.ndarray:
    """Step 5: the candidates are one population; one score for all of them per ``unimodal``."""
    evidence_ok = ev.tumour_like(f_cand)
    if cfg.unimodal == "evidence" and cfg.per_cluster_evidence and clusters is not None:
        return _per_cluster_posterior(cand, clusters, f_cand, ev, info, cfg)
    if cfg.unimodal == "neoplastic" or (cfg.unimodal == "evidence" and evidence_ok):
        value = 1.0 if cfg.unimodal == "neoplastic" else cfg.unimodal_score
        what = "neoplastic"
    else:
        value, what = 0.5, "ambiguous"
    info["reason"] = (f"candidates are one population (Ashman's D={info['ashman_d']:.2f}); cycling "
                      f"{100 * f_cand:.1f}% of candidates vs {100 * ev.f_ref:.1f}% of reference cells; "
                      f"all called {what} (unimodal={cfg.unimodal!r})")
    log.warning("neoplastic_step: %s", info["reason"])
    return np.full(int(cand.sum()), value)


def _self_trained_posterior(post: np.ndarray, feats: np.ndarray, info: dict, cfg: NeoplasticConfig) -> np.ndarray:
    """``self_train_rounds`` rounds of :func:`_self_train` on the confident cells; the posterior."""
    done = 0
    for _ in range(cfg.self_train_rounds):
        prob = _self_train(feats, post, confident=cfg.refit_confident,
                           min_seed_cells=cfg.min_seed_cells, seed=cfg.seed)
        if prob is None:
            break
        post, done = prob, done + 1
    if done:
        info["reason"] += f"; self-trained logistic regression on confident cells ({done} rounds)"
    return post


def _split_candidates(adata: AnnData, fine: np.ndarray, cand: np.ndarray, call: np.ndarray, nscore: np.ndarray,
                      cnv_score: np.ndarray, info: dict, *, t_up: np.ndarray, t_dn: np.ndarray, prol: np.ndarray,
                      prog: Mapping[str, list[str]], cfg: NeoplasticConfig) -> None:
    """Steps 3-6 of :func:`neoplastic_step` for a tumour sample with a lineage (writes in place)."""
    w_t, w_p, w_c = cfg.weights
    z_t, z_p = _std_z((t_up - t_dn)[cand]), _std_z(prol[cand])
    raw = w_t * z_t + w_p * z_p
    ref = np.isin(fine, list(cfg.reference_types))
    raw, cnv_m = _cnv_raw_score(adata, ref, cand, raw, cnv_score, info, cfg)
    pcs = _candidate_pcs(adata, cand, prog, cfg.seed)
    nbrs = _knn(pcs, cfg.smooth_neighbors)
    smooth = lambda v: v[nbrs].mean(axis=1) if nbrs is not None else v  # noqa: E731
    post, mix = _mixture_posterior(smooth(raw), cfg.seed, 0.0)
    info.update(mix)
    info["ashman_d_first_pass"] = mix["ashman_d"]
    if post is not None and mix["ashman_d"] >= cfg.min_separation and cnv_m is not None:
        post = _cnv_second_pass(post, cnv_m, cand, w_t * z_t + w_p * z_p, smooth, cnv_score, info, cfg)
    ev = _CyclingEvidence.of(adata, prog, ref, cfg)
    f_cand = ev.share(cand)
    info.update(cycling_fraction_candidates=f_cand, cycling_fraction_reference=ev.f_ref)
    if post is not None:
        post = _judge_split(post, cand, ev, info, cfg)
    if post is None:
        clusters = _candidate_clusters(pcs, cand, cfg.smooth_neighbors, cfg.seed) if cfg.per_cluster_evidence else None
        post = _unimodal_posterior(cand, f_cand, ev, info, cfg, clusters)
    else:
        info["reason"] = f"2-component mixture, Ashman's D={info['ashman_d']:.2f}"
        if cfg.self_train:
            # the cells the signals call clearly teach a classifier over the candidates' whole
            # expression (sample-specific tumour genes the signature lists lack)
            extra = [z_t, z_p] + ([_std_z(cnv_score[cand])] if cnv_m is not None else [])
            post = _self_trained_posterior(post, np.column_stack([pcs, *extra]), info, cfg)
    nscore[cand] = post
    c = np.where(post >= cfg.high, "neoplastic", np.where(post <= cfg.low, "non-neoplastic", "ambiguous"))
    call[cand] = c
    log.info("neoplastic_step: %s; calls %s", info["reason"], pd.Series(c).value_counts().to_dict())


def dead_rule(adata: AnnData, *, max_counts: float | None = None, low_quantile: float | None = 0.05,
              min_apoptosis_counts: int = 2, min_apoptosis_fraction: float = 0.1, call_dead: bool = True,
              apoptosis_alpha: float | None = LabelsConfig.apoptosis_alpha,
              apoptosis_genes: Sequence[str] | None = None, fine_key: str = Key.FINE_TYPE,
              ignore_low: bool = True, low_mads: float | None = None, copy: bool = False) -> AnnData | None:
    """A PROXY for dead / dying cells: low transcript count plus detected apoptosis genes.

    Expression cannot really see dead cells (pyknotic nuclei have little RNA and Xenium panels
    carry at most a few apoptosis genes; STHELAR's authors call their "Dead" class unverified).
    This rule is a stand-in, not a validated signature:

    * a cell is *low-count* when ``obs["n_counts"] <= max_counts`` (default: the ``low_quantile``
      quantile of ``n_counts`` in the sample);
    * a low-count cell whose apoptosis-proxy genes (``programs.yaml``: BCL2L11, FAS, BAX, BBC3, ...;
      only those in the panel) have ``>= min_apoptosis_counts`` counts and ``>=
      min_apoptosis_fraction`` of its counts becomes fine type ``"dead"``;
    * every other low-count cell becomes ``"unknown"`` (class 255: segment it, do not classify it);
    * a cell of any library size whose apoptosis-proxy transcripts are more than its library
      explains (at least ``min_apoptosis_counts``, and a one-sided Poisson test against the sample's
      rate of those genes per transcript gives p < ``apoptosis_alpha``; ``None`` = off) becomes
      ``"unknown"`` too: a dying cell keeps most of its origin's expression (a dying tumour cell
      would otherwise be called Neoplastic), and its class is not what the H&E shows. This also
      holds with ``call_dead=False``.

    ``call_dead=False`` (the default of :func:`label_cells`: Dead is *ignore* for ST training)
    calls no cell dead: the cells the proxy would call dead become ``"unknown"``, and so does every
    other low-count cell with ``ignore_low=True`` (with ``False`` they keep their type), and with
    ``low_mads`` every low-count outlier (:func:`low_count_outliers`). Two apoptosis transcripts
    are required by default: with one, any low-count cell with a stray FAS read became Dead.

    On panels without any apoptosis gene (hBreast, hColon, hSkin) no cell is called dead and the
    low-count cells become unknown; that is logged.

    Returns
    -------
    Writes ``obs["apoptosis_counts"]`` and updates ``obs[fine_key]`` (``"dead"`` / ``"unknown"``)
    and ``obs["type_confidence"]`` (0 for the unknown low-count cells); adds
    ``uns["stlib_labels"]["dead_rule"]``; returns the AnnData when ``copy=True``.
    """
    if low_quantile is not None and not 0.0 <= low_quantile <= 1.0:
        raise ValueError(f"low_quantile must be in [0, 1], got {low_quantile}")
    adata = adata.copy() if copy else adata
    if fine_key not in adata.obs:
        raise ValueError(f"obs[{fine_key!r}] missing: run stlib.labels.celltypes.assign_fine_types first")
    x = _counts(adata)
    n_counts = (adata.obs[Key.N_COUNTS].to_numpy(float) if Key.N_COUNTS in adata.obs else _row_sums(x))
    thr = (float(max_counts) if max_counts is not None
           else float(np.quantile(n_counts, low_quantile)) if low_quantile is not None else -np.inf)
    genes = list(apoptosis_genes) if apoptosis_genes is not None else load_programs(adata.var_names)["apoptosis"]
    idx = pd.Index(adata.var_names).get_indexer(genes)
    idx = idx[idx >= 0]
    apo = _row_sums(x[:, idx]) if idx.size else np.zeros(adata.n_obs)
    low = n_counts <= thr
    dead = low & (apo >= min_apoptosis_counts) & (apo >= min_apoptosis_fraction * np.maximum(n_counts, 1))
    if not ignore_low:  # only the low-count cells the proxy would call dead lose their type ...
        low = low & dead
    if low_mads is not None:  # ... and the low-count outliers of the sample (too little RNA to type)
        low = low | low_count_outliers(n_counts, low_mads)
    if not call_dead:
        dead[:] = False
    dying = _apoptosis_enriched(apo, n_counts, min_counts=min_apoptosis_counts, alpha=apoptosis_alpha)
    fine = adata.obs[fine_key].astype(str).to_numpy(object)
    fine[low | dying] = UNKNOWN
    fine[dead] = "dead"
    cats = list(adata.obs[fine_key].cat.categories) if hasattr(adata.obs[fine_key], "cat") else []
    cats += [c for c in ("dead", UNKNOWN) if c not in cats]
    cats += [c for c in sorted(set(fine)) if c not in cats]
    adata.obs[fine_key] = pd.Categorical(fine.astype(str), categories=cats)
    if Key.TYPE_CONFIDENCE in adata.obs:
        conf = adata.obs[Key.TYPE_CONFIDENCE].to_numpy(float).copy()
        conf[(low | dying) & ~dead] = 0.0
        adata.obs[Key.TYPE_CONFIDENCE] = conf
    adata.obs[Key.APOPTOSIS_COUNTS] = apo
    info = {"max_counts": thr if np.isfinite(thr) else None, "n_low": int(low.sum()), "n_dead": int(dead.sum()),
            "n_apoptosis_enriched": int(dying.sum()), "apoptosis_alpha": apoptosis_alpha,
            "apoptosis_genes": [str(g) for g in adata.var_names[idx]], "proxy": bool(call_dead)}
    adata.uns.setdefault(Key.UNS, {})["dead_rule"] = info
    if idx.size == 0:
        log.info("dead_rule: no apoptosis gene in the panel; %d low-count cells -> unknown", int(low.sum()))
    log.info("dead_rule (proxy): %d low-count cells (n_counts <= %.1f), %d called dead; wrote obs[%r], "
             "updated obs[%r]", int(low.sum()), thr, int(dead.sum()), Key.APOPTOSIS_COUNTS, fine_key)
    return adata if copy else None


def low_count_outliers(n_counts: np.ndarray, n_mads: float) -> np.ndarray:
    """Cells whose log transcript count lies more than ``n_mads`` median absolute deviations below the
    sample's median (the usual single-cell QC outlier rule, on ``log1p`` counts, unscaled MAD).

    Relative to the sample's own depth, unlike a fixed quantile, which drops the same share of every
    sample whatever its evidence.
    """
    from scipy.stats import median_abs_deviation

    lc = np.log1p(np.asarray(n_counts, dtype=np.float64))
    if lc.size == 0:
        return np.zeros(0, dtype=bool)
    return lc < np.median(lc) - n_mads * float(median_abs_deviation(lc))


def _apoptosis_enriched(apo: np.ndarray, n_counts: np.ndarray, *, min_counts: int, alpha: float | None) -> np.ndarray:
    """Cells with more apoptosis-gene transcripts than their library explains (one-sided Poisson test).

    The expected count of a cell is its library times the sample's share of apoptosis transcripts
    over all transcripts (most cells do not die, so the sample rate is the living cells' rate).
    """
    if alpha is None or apo.sum() == 0:
        return np.zeros(len(apo), dtype=bool)
    from scipy.stats import poisson

    rate = float(apo.sum()) / max(float(n_counts.sum()), 1.0)
    p = poisson.sf(apo - 1, np.maximum(n_counts, 1.0) * rate)
    return (apo >= min_counts) & (p < alpha)


def to_image_classes(adata: AnnData, *, min_confidence: float = LabelsConfig.min_confidence, fine_key: str = Key.FINE_TYPE,
                     dead_confidence: float = 0.5, key_added: str = Key.CLASS,
                     copy: bool = False) -> AnnData | None:
    """Image-oriented class per cell from its fine type (:data:`FINE_TO_CLASS`).

    Class 255 (ignore) for: fine types an H&E model cannot be expected to see (not in the table,
    ``"unknown"``), cells the neoplastic step left ``"ambiguous"``, and cells whose confidence is
    below ``min_confidence``. Confidence = ``obs["type_confidence"]``, times the neoplastic
    step's probability of the side it chose, ``max(neoplastic_score, 1 - neoplastic_score)``, for
    its candidates, and ``dead_confidence`` for dead cells (a proxy, see :func:`dead_rule`).
    An abstention costs as much as a wrong class in the evaluation, so the default bar is low:
    255 is kept for genuinely weak evidence (unknown / ambiguous / low-count cells).

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
        conf[has] *= np.maximum(ns[has], 1.0 - ns[has])
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


def _label_markers(genes: list[str], markers: Mapping[str, Sequence[str]] | None, method: str, organ: str | None,
                   oncotree_code: str | None, min_markers: int) -> dict[str, list[str]]:
    """The marker sets :func:`label_cells` scores: the shipped (or given) ones in the panel, plus a
    "tumor" set (tumour signature + proliferation) for the non-hierarchical methods."""
    if markers is None:
        mk = load_markers(genes, organ=organ or canonical_organ(None, oncotree_code), oncotree_code=oncotree_code,
                          min_markers=min_markers)
    else:
        mk = {t: [g for g in v if g in set(genes)] for t, v in markers.items()}
        mk = {t: v for t, v in mk.items() if v}
    mk.pop("tumor", None)
    if method != "hierarchical":
        prog = load_programs(genes, organ=organ, oncotree_code=oncotree_code)
        tum = list(dict.fromkeys(prog["tumor_up"] + prog["proliferation"]))
        if tum:
            mk = {"tumor": tum, **mk}
    return mk


#: low-count outliers (``low_counts="outlier"``): more than this many MADs of log1p counts below the
#: sample's median; 5 is the permissive single-cell QC default (it keeps 99.9 % of a log-normal
#: population), not tuned here
LOW_COUNT_MADS: float = 5.0


class IgnoreReason:
    """Values of ``obs["ignore_reason"]`` written by :func:`label_cells` (the first stage that left a
    cell without a class; ``""`` for cells with a class)."""

    QC = "qc"  #: fewer transcripts / genes than the QC minimum (:func:`~stlib.labels.celltypes.qc_filter`)
    NO_TYPE = "no_type"  #: no fine type explains it (unknown / other outcome of the fine-type step)
    CONFLICT = "conflict"  #: unknown, its cluster owns marker sets of two image classes (the markers cannot tell)
    NEOPLASTIC_AMBIGUOUS = "neoplastic_ambiguous"  #: the neoplastic step could not decide (or no lineage)
    LOW_COUNT = "low_count"  #: a low-count outlier, or in the low-count tail with the Dead proxy's signal (dead_rule)
    APOPTOSIS = "apoptosis"  #: apoptosis-enriched, a dying cell (:func:`dead_rule`)
    NO_IMAGE_CLASS = "no_image_class"  #: a fine type without an image class (glia, neuron)
    LOW_CONFIDENCE = "low_confidence"  #: class confidence below ``min_confidence``
    ALL: tuple[str, ...] = (QC, NO_TYPE, CONFLICT, NEOPLASTIC_AMBIGUOUS, LOW_COUNT, APOPTOSIS, NO_IMAGE_CLASS, LOW_CONFIDENCE)


def _fine_type_reasons(adata: AnnData, mk: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Ignore reasons after the fine-type step: QC failures, clusters owning marker sets of two
    classes (conflict) and the other cells without a type (no type)."""
    reason = np.full(adata.n_obs, "", dtype=object)
    unknown = adata.obs[Key.FINE_TYPE].astype(str).to_numpy() == UNKNOWN
    qc_ok = adata.obs[Key.QC_PASS].to_numpy(bool)
    reason[unknown & ~qc_ok] = IgnoreReason.QC
    reason[unknown & qc_ok] = IgnoreReason.NO_TYPE
    ann = adata.uns.get(Key.UNS, {}).get("annotate_clusters")
    if ann is not None and Key.CLUSTER in adata.obs:
        ann = pd.DataFrame(ann)
        groups = {t: FINE_TO_CLASS.get(t, IGNORE) for t in mk}
        two = [c for c, q in zip(ann["cluster"].astype(str), ann["qualifying"].astype(str))
               if len({groups.get(t) for t in q.split(",") if t}) > 1]
        conflict = adata.obs[Key.CLUSTER].astype(str).isin(two).to_numpy()
        reason[unknown & qc_ok & conflict] = IgnoreReason.CONFLICT
    return reason


def _dead_step(adata: AnnData, reason: np.ndarray, *, dead: str | bool, low_counts: str,
               apoptosis_alpha: float | None) -> None:
    """:func:`dead_rule` as ``label_cells`` runs it (``dead`` / ``low_counts`` modes); updates ``reason``."""
    dead_mode = {True: "proxy", False: "off"}.get(dead, dead) if isinstance(dead, bool) else dead
    if dead_mode not in ("ignore", "proxy", "off"):
        raise ValueError(f"dead must be 'ignore', 'proxy' or 'off', got {dead!r}")
    if dead_mode == "off":
        return
    if low_counts not in ("all", "proxy", "outlier"):
        raise ValueError(f"low_counts must be 'all', 'proxy' or 'outlier', got {low_counts!r}")
    before = adata.obs[Key.FINE_TYPE].astype(str).to_numpy()
    dead_rule(adata, call_dead=dead_mode == "proxy", apoptosis_alpha=apoptosis_alpha,
              ignore_low=dead_mode == "proxy" or low_counts == "all",
              low_mads=LOW_COUNT_MADS if dead_mode == "ignore" and low_counts == "outlier" else None)
    now_unknown = (adata.obs[Key.FINE_TYPE].astype(str).to_numpy() == UNKNOWN) & (before != UNKNOWN)
    thr = adata.uns[Key.UNS]["dead_rule"]["max_counts"]
    low = adata.obs[Key.N_COUNTS].to_numpy(float) <= (-np.inf if thr is None else thr)
    reason[now_unknown & low & (reason == "")] = IgnoreReason.LOW_COUNT
    reason[now_unknown & ~low & (reason == "")] = IgnoreReason.APOPTOSIS


def _write_ignore_reasons(adata: AnnData, reason: np.ndarray) -> None:
    """The last reasons (no image class, low confidence) and ``obs["ignore_reason"]``."""
    cls = adata.obs[Key.CLASS].to_numpy()
    fine = adata.obs[Key.FINE_TYPE].astype(str).to_numpy()
    no_class = np.array([FINE_TO_CLASS.get(f, IGNORE) == IGNORE for f in fine])
    reason[(cls == IGNORE) & no_class & (reason == "")] = IgnoreReason.NO_IMAGE_CLASS
    reason[(cls == IGNORE) & (reason == "")] = IgnoreReason.LOW_CONFIDENCE
    reason[cls != IGNORE] = ""
    adata.obs[Key.IGNORE_REASON] = pd.Categorical(reason.astype(str), categories=["", *IgnoreReason.ALL])


def label_cells(adata: AnnData, *, method: Literal["hierarchical", "flat", "marker", "cluster"] = LabelsConfig.labeler,
                organ: str | None = None, disease_state: str | None = None,
                oncotree_code: str | None = None, panel: str | None = None, seed: int = LabelsConfig.seed,
                min_counts: int = LabelsConfig.min_counts, min_genes: int = 3,
                min_confidence: float = LabelsConfig.min_confidence, resolution: float = LabelsConfig.leiden_resolution,
                n_pcs: int = 30, n_neighbors: int = 15,
                neighbors_method: Literal["umap", "gauss"] = LabelsConfig.neighbors_method, min_markers: int = 2,
                use_cnv: bool = NeoplasticConfig.use_cnv, dead: Literal["ignore", "proxy", "off"] | bool = LabelsConfig.dead,
                apoptosis_alpha: float | None = LabelsConfig.apoptosis_alpha,
                low_counts: Literal["all", "proxy", "outlier"] = LabelsConfig.low_counts,
                markers: Mapping[str, Sequence[str]] | None = None,
                neoplastic_kwargs: Mapping | None = None, fine_kwargs: Mapping | None = None,
                copy: bool = False) -> AnnData:
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
    use_cnv
        Allow the copy-number signal (it still needs a panel that supports it, :func:`cnv_support`).
    dead
        ``"ignore"`` (default: no cell is called Dead, see ``low_counts``), ``"proxy"`` (opt-in: the
        low-count + apoptosis-gene proxy of :func:`dead_rule` calls Dead) or ``"off"`` (no low-count
        rule, no apoptosis test). ``True`` / ``False`` mean proxy / off.
    low_counts
        With ``dead="ignore"``, the low-count cells without a class: ``"outlier"`` (default, fifth freeze)
        those the Dead proxy would call Dead and the outliers of :func:`low_count_outliers`; ``"proxy"``
        only the former; ``"all"`` the whole 5 % tail (fourth freeze). Under ``min_counts``: QC fails.
    apoptosis_alpha
        :func:`dead_rule`'s test for apoptosis-enriched cells (ignored; ``None`` = off; default of
        :attr:`stlib.config.LabelsConfig.apoptosis_alpha`).
    markers
        Replace the shipped marker sets (``{type: genes}``).
    neoplastic_kwargs
        Extra options for :func:`neoplastic_step`.
    fine_kwargs
        Extra options for :func:`stlib.labels.celltypes.assign_fine_types` (``annotate_kwargs`` go
        to :func:`stlib.labels.celltypes.annotate_clusters`).
    copy
        Work on a copy (the input is left untouched).

    Returns
    -------
    The AnnData with ``obs["qc_pass"]``, ``obs["score_*"]``, ``obs["leiden"]`` (not for "marker"),
    ``obs["fine_type"]``, ``obs["type_confidence"]``, ``obs["neoplastic_score"]``,
    ``obs["cnv_score"]`` (hierarchical), ``obs["class"]``, ``obs["confidence"]``,
    ``obs["ignore_reason"]`` (:class:`IgnoreReason`, ``""`` for cells with a class),
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
    mk = _label_markers(genes, markers, method, organ, oncotree_code, min_markers)
    rank_score(adata, mk)
    if method != "marker":
        cluster(adata, resolution=resolution, n_pcs=n_pcs, n_neighbors=n_neighbors, seed=seed,
                neighbors_method=neighbors_method)
    fine_method = {"hierarchical": "consensus", "flat": "consensus", "marker": "marker",
                   "cluster": "cluster"}[method]
    fk = dict(fine_kwargs or {})
    # two-class clusters stay unknown; lineage gate: immune types need pan-immune (CD45) expression and
    # lose to epithelial expression, stromal types never take a cluster with full epithelial expression
    ak = {"groups": {t: FINE_TO_CLASS.get(t, IGNORE) for t in mk},
          "lineage_gate": lineage_gate(list(mk), FINE_TO_CLASS, INFLAMMATORY, (CONNECTIVE,), EPITHELIAL),
          **dict(fk.pop("annotate_kwargs", None) or {})}
    assign_fine_types(adata, mk, method=fine_method, annotate_kwargs=ak, **fk)
    reason = _fine_type_reasons(adata, mk)  # why a cell ends up ignored: the first stage that takes its class
    if method == "hierarchical":
        neoplastic_step(adata, disease_state=disease_state, oncotree_code=oncotree_code, organ=organ,
                        use_cnv=use_cnv, seed=seed, **dict(neoplastic_kwargs or {}))
        amb = adata.obs[Key.NEOPLASTIC_CALL].astype(str).to_numpy() == "ambiguous"
        reason[amb & (reason == "")] = IgnoreReason.NEOPLASTIC_AMBIGUOUS
    _dead_step(adata, reason, dead=dead, low_counts=low_counts, apoptosis_alpha=apoptosis_alpha)
    to_image_classes(adata, min_confidence=min_confidence)
    _write_ignore_reasons(adata, reason)
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
