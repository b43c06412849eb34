"""Evaluation: label quality against truth, model comparisons with effect sizes and CIs.

The metric definitions live in :mod:`stlib.metrics`; this module turns per-image values into
per-organ and pooled tables and paired comparisons, at the right unit:

* the unit of uncertainty is the slide (or an image that is its own slide), not the tile:
  :func:`hierarchical_bootstrap` resamples slides, then tiles within them;
* "pooled" always means PanNuke's rule, the mean per tissue (organ) and then over tissues
  (:func:`pooled_mean`), and the bootstrap is stratified by organ;
* a paired difference gets its CI and its test on the same statistic with the same clusters
  (:func:`paired_comparison`: bootstrap CI, cluster-wise sign-flip test); tables with several
  tests carry Holm-adjusted p-values (:func:`holm`), after the effect sizes;
* training seeds: :func:`seed_average` gives each image the mean of its scores over the seeds
  of a recipe, :func:`seed_spread` shows how much the pooled value moves between seeds.

References to score against are :class:`ReferenceSet` s: tiles of a store (demo truth, held-out
ST-derived labels), PanNuke tiles of a fold no baseline trained on (:func:`pannuke_reference`),
public annotated sets (:func:`manual_truth_folder`). It also scores derived labels against the
demo truth cell by cell.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from stlib.config import EvalConfig, SegEvalParams
from stlib.constants import IGNORE, NUCLEUS_CLASSES, TARGET_UM_PER_PX_40X
from stlib.metrics import class_scores, label_accuracy_vs_truth  # defined with the other metrics
from stlib.utils import InputError, atomic_path

#: the statistics' defaults (bootstrap resamples, CI level, permutations, PanNuke test fold): EvalConfig's
_EVAL = EvalConfig()
#: the primary endpoint (metric, model, baseline): 04_segmentation_eval's parameters
_SEG = SegEvalParams()
_PRIMARY = (_SEG.primary_metric, _SEG.primary_model, _SEG.primary_baseline)


class CI(NamedTuple):
    """A point estimate with a bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    n: int


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = _EVAL.n_bootstrap, ci: float = _EVAL.ci,
                 seed: int = 0, stat: Callable[[np.ndarray], float] = np.mean) -> CI:
    """Percentile bootstrap CI of ``stat`` over ``values``, each value an independent unit.

    Use it only where the values really are independent (one per slide, one per training
    seed). Tiles of one slide are not: use :func:`hierarchical_bootstrap` for them.
    NaNs are dropped first (e.g. mPQ of images whose truth has no class). With fewer than two
    values the interval is the point estimate itself (nothing to resample).
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    n = v.size
    if n == 0:
        return CI(float("nan"), float("nan"), float("nan"), 0)
    est = float(stat(v))
    if n < 2 or n_boot < 1:
        return CI(est, est, est, n)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boots = np.apply_along_axis(stat, 1, v[idx]) if stat is not np.mean else v[idx].mean(axis=1)
    a = (1 - ci) / 2
    lo, hi = np.quantile(boots, [a, 1 - a])
    return CI(est, float(lo), float(hi), n)


class _Design(NamedTuple):
    """Values grouped for the hierarchical statistics (NaNs dropped)."""

    values: np.ndarray
    cluster_of: list[np.ndarray]      # per stratum: the cluster index (0..K_g-1) of each value
    stratum_values: list[np.ndarray]  # per stratum: its values
    n_clusters: list[int]


def _design(values: Sequence[float] | np.ndarray, clusters: Sequence | np.ndarray | None,
            strata: Sequence | np.ndarray | None) -> _Design:
    v = np.asarray(values, dtype=float)
    n = v.size
    c = np.arange(n) if clusters is None else np.asarray(clusters)
    s = np.zeros(n, dtype=int) if strata is None else np.asarray(strata)
    if c.shape != v.shape or s.shape != v.shape:
        raise ValueError(f"values {v.shape}, clusters {c.shape} and strata {s.shape} must have one entry per value")
    keep = ~np.isnan(v)
    v, c, s = v[keep], c[keep], s[keep]
    cluster_of, stratum_values, n_clusters = [], [], []
    for g in pd.unique(s):
        m = s == g
        codes, uniq = pd.factorize(c[m])
        cluster_of.append(np.asarray(codes))
        stratum_values.append(v[m])
        n_clusters.append(len(uniq))
    return _Design(v, cluster_of, stratum_values, n_clusters)


def pooled_mean(values: Sequence[float] | np.ndarray, strata: Sequence | np.ndarray | None = None) -> float:
    """PanNuke's pooling rule: the mean over images within each stratum (tissue), then the mean
    over strata. Without strata, the plain mean. NaNs are dropped.
    """
    d = _design(values, None, strata)
    if not d.stratum_values:
        return float("nan")
    return float(np.mean([sv.mean() for sv in d.stratum_values]))


def _boot_stratum(rng: np.random.Generator, vals: np.ndarray, codes: np.ndarray, n_boot: int,
                  within: bool) -> np.ndarray:
    """Bootstrap means of one stratum: clusters with replacement, then values within each."""
    k = int(codes.max()) + 1
    draws = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot)  # (B, K): times each cluster is drawn
    total = np.zeros(n_boot)
    count = np.zeros(n_boot)
    for j in range(k):
        vj = vals[codes == j]
        m = draws[:, j]
        if within and vj.size > 1:
            w = rng.multinomial(m * vj.size, np.full(vj.size, 1.0 / vj.size))  # (B, n_j): tile counts
            total += w @ vj
        else:
            total += m * vj.sum()
        count += m * vj.size
    return total / count


def hierarchical_bootstrap(values: Sequence[float] | np.ndarray, clusters: Sequence | np.ndarray | None = None, *,
                           strata: Sequence | np.ndarray | None = None, n_boot: int = _EVAL.n_bootstrap, ci: float = _EVAL.ci,
                           seed: int = 0, resample_within: bool = True, return_replicates: bool = False
                           ) -> CI | tuple[CI, np.ndarray]:
    """Percentile CI of a pooled mean by a stratified two-stage (hierarchical) bootstrap.

    The statistic is :func:`pooled_mean` (PanNuke's rule: mean within each stratum, then over
    strata). Each replicate draws, within every stratum, as many clusters (slides, or images
    that are their own unit) as it has, with replacement, then the values (tiles) of each drawn
    cluster with replacement (Saravanan et al. 2020, "Application of the hierarchical bootstrap
    to multi-level data in neuroscience"). Strata are fixed (every organ is in every replicate).

    Tiles of one slide share stain, tissue and label quality, so their scores are correlated: a
    bootstrap over tiles treats them as independent and gives intervals too narrow for claims
    about slides. With one cluster in a stratum its between-slide variation cannot be estimated:
    the interval is then conditional on that slide (``n`` counts values; report clusters too).

    Parameters
    ----------
    values
        One value per tile / image (NaN = not scored, dropped).
    clusters
        The independent unit of each value (slide id; an image's own id when it is its own
        unit). ``None`` = every value is its own cluster (then this is an ordinary bootstrap).
    strata
        Fixed groups pooled by PanNuke's rule (organ / tissue); ``None`` = one group.
    resample_within
        Also resample values within each drawn cluster (the second stage).
    return_replicates
        Also return the bootstrap replicates of the statistic.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    d = _design(values, clusters, strata)
    if d.values.size == 0:
        out = CI(float("nan"), float("nan"), float("nan"), 0)
        return (out, np.zeros(0)) if return_replicates else out
    est = float(np.mean([sv.mean() for sv in d.stratum_values]))
    if n_boot < 1 or d.values.size < 2:
        out = CI(est, est, est, int(d.values.size))
        return (out, np.full(max(n_boot, 0), est)) if return_replicates else out
    rng = np.random.default_rng(seed)
    reps = np.mean([_boot_stratum(rng, sv, co, n_boot, resample_within)
                    for sv, co in zip(d.stratum_values, d.cluster_of)], axis=0)
    a = (1 - ci) / 2
    lo, hi = np.quantile(reps, [a, 1 - a])
    out = CI(est, float(lo), float(hi), int(d.values.size))
    return (out, reps) if return_replicates else out


def sign_flip_test(differences: Sequence[float] | np.ndarray, clusters: Sequence | np.ndarray | None = None, *,
                   strata: Sequence | np.ndarray | None = None, n_perm: int = _EVAL.n_permutations, seed: int = 0) -> float:
    """Two-sided p-value of a paired difference by flipping signs cluster by cluster.

    The statistic is the one the CI is about (:func:`pooled_mean` of the paired differences).
    Under the null hypothesis the two methods are exchangeable on every cluster (slide / image),
    so the sign of all differences of one cluster may be flipped together; the p-value is the
    share of sign patterns whose statistic is at least as far from 0 as the observed one. All
    ``2^K`` patterns are used when there are at most 2^14 of them (an exact test), otherwise
    ``n_perm`` random ones (p = (1 + hits) / (1 + n_perm)). With K clusters the smallest
    possible p is 2 / 2^K: two slides can never give p < 0.5.
    """
    d = _design(differences, clusters, strata)
    if d.values.size == 0:
        return float("nan")
    g = len(d.stratum_values)
    # statistic = sum_k eps_k * a_k with a_k = (sum of cluster k) / (G * values in its stratum)
    a = np.concatenate([np.bincount(co, weights=sv) / (g * sv.size) for sv, co in zip(d.stratum_values, d.cluster_of)])
    obs = abs(float(a.sum()))
    if np.allclose(a, 0):
        return 1.0
    k = a.size
    tol = 1e-12 * max(1.0, obs)
    if k <= 14:
        signs = 1 - 2 * ((np.arange(2 ** k)[:, None] >> np.arange(k)) & 1)
        stats = np.abs(signs @ a)
        return float(np.mean(stats >= obs - tol))
    rng = np.random.default_rng(seed)
    hits = 0
    for s in range(0, n_perm, 4096):
        signs = rng.choice((-1.0, 1.0), size=(min(4096, n_perm - s), k))
        hits += int(np.sum(np.abs(signs @ a) >= obs - tol))
    return float((1 + hits) / (1 + n_perm))


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaNs stay NaN, not counted)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


class PairedComparison(NamedTuple):
    """Difference ``a - b`` of two methods scored on the same images."""

    mean_a: float
    mean_b: float
    diff: CI
    p_value: float
    test: str
    n: int
    n_clusters: int


def paired_comparison(a: Sequence[float], b: Sequence[float], *, clusters: Sequence | None = None,
                      strata: Sequence | None = None, n_boot: int = _EVAL.n_bootstrap,
                      n_perm: int = _EVAL.n_permutations, ci: float = _EVAL.ci,
                      seed: int = 0) -> PairedComparison:
    """Paired difference ``a - b``: hierarchical bootstrap CI and sign-flip test, same statistic.

    ``a`` and ``b`` are per-image scores of two methods on the same images; ``clusters`` the
    independent unit of each image (slide), ``strata`` the groups pooled by PanNuke's rule.
    Images where either value is NaN are dropped pairwise. Means and the difference are
    :func:`pooled_mean` values; the CI is :func:`hierarchical_bootstrap` of the differences, the
    p-value :func:`sign_flip_test` of the same differences with the same clusters.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"a and b must be paired (same length), got {a.shape} and {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    c = np.arange(a.size) if clusters is None else np.asarray(clusters)
    s = None if strata is None else np.asarray(strata)[keep]
    a, b, c = a[keep], b[keep], c[keep]
    d = a - b
    diff = hierarchical_bootstrap(d, c, strata=s, n_boot=n_boot, ci=ci, seed=seed)
    p = sign_flip_test(d, c, strata=s, n_perm=n_perm, seed=seed)
    return PairedComparison(pooled_mean(a, s), pooled_mean(b, s), diff, p,
                            "sign-flip permutation by cluster (two-sided)", int(d.size), int(pd.unique(c).size))


def _cluster_col(df: pd.DataFrame, cluster: str | None) -> str | None:
    """``"auto"``: the ``slide`` column when there is one (tiles from :func:`score_tiles` always have
    it), else every image is its own unit (a table of whole images without slide ids)."""
    if cluster == "auto":
        return "slide" if "slide" in df.columns else None
    return cluster


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}")


def summarize(per_image: pd.DataFrame, metrics: Sequence[str], *, group: str = "organ",
              by: str | None = "model", cluster: str | None = "auto", n_boot: int = _EVAL.n_bootstrap, ci: float = _EVAL.ci,
              seed: int = 0) -> pd.DataFrame:
    """Per-group and pooled value of each metric with a hierarchical bootstrap CI.

    Parameters
    ----------
    per_image
        One row per image (and model), with the metric columns, ``group``, ``cluster`` and ``by``.
    metrics
        Metric columns to summarise.
    group
        Grouping column (e.g. ``organ``); a ``"pooled"`` row pools the groups by PanNuke's rule
        (mean per group, then over groups), its CI stratified by group.
    by
        Optional column that separates models / label sets.
    cluster
        Column of the independent unit (``slide``); ``None`` treats every image as independent;
        ``"auto"`` = ``slide`` when the table has it, else every image is its own unit.

    Returns
    -------
    Long table: ``by``, ``group``, ``metric``, ``mean``, ``ci_low``, ``ci_high``, ``n_images``,
    ``n_clusters``.
    """
    cluster = _cluster_col(per_image, cluster)
    _need(per_image, [*metrics, group, *([by] if by else []), *([cluster] if cluster else [])], "per_image")
    rows = []
    keys = sorted(per_image[by].unique()) if by else [None]
    for key in keys:
        sub = per_image if key is None else per_image[per_image[by] == key]
        groups = [(g, s) for g, s in sub.groupby(group, sort=True)] + [("pooled", sub)]
        for g, s in groups:
            for m in metrics:
                v = s[m].to_numpy(float)
                cl = None if cluster is None else s[cluster].astype(str).to_numpy()
                st = s[group].to_numpy() if g == "pooled" else None
                r = hierarchical_bootstrap(v, cl, strata=st, n_boot=n_boot, ci=ci, seed=seed)
                ok = ~np.isnan(v)
                row = {group: g, "metric": m, "mean": r.estimate, "ci_low": r.low, "ci_high": r.high,
                       "n_images": r.n, "n_clusters": int(pd.unique(cl[ok]).size) if cl is not None else r.n}
                if by:
                    row[by] = key
                rows.append(row)
    cols = ([by] if by else []) + [group, "metric", "mean", "ci_low", "ci_high", "n_images", "n_clusters"]
    return pd.DataFrame(rows, columns=cols)


def compare_models(per_image: pd.DataFrame, metrics: Sequence[str], *, model_a: str, model_b: str,
                   group: str = "organ", by: str = "model", image_key: str = "image", cluster: str | None = "auto",
                   n_boot: int = _EVAL.n_bootstrap, n_perm: int = _EVAL.n_permutations, ci: float = _EVAL.ci,
                   seed: int = 0) -> pd.DataFrame:
    """Paired comparison ``model_a - model_b`` per group and pooled, for each metric.

    Effect first: ``diff`` (pooled by PanNuke's rule in the ``pooled`` row) with its hierarchical
    bootstrap CI over ``cluster``; then the sign-flip p-value on the same statistic and its Holm
    adjustment over every row of the returned table (``p_holm``). Images are paired on
    ``image_key``; an image scored by only one model is an error (the comparison would not be
    paired). ``cluster`` as in :func:`summarize`.
    """
    cluster = _cluster_col(per_image, cluster)
    _need(per_image, [by, image_key, group, *metrics, *([cluster] if cluster else [])], "per_image")
    a = per_image[per_image[by] == model_a].set_index(image_key)
    b = per_image[per_image[by] == model_b].set_index(image_key)
    if a.empty or b.empty:
        raise ValueError(f"no rows for {model_a!r} or {model_b!r} in column {by!r}")
    if not a.index.is_unique or not b.index.is_unique:
        raise ValueError(f"{image_key!r} repeats within a model: average seeds first (seed_average)")
    if set(a.index) != set(b.index):
        only = sorted(set(a.index) ^ set(b.index))[:5]
        raise ValueError(f"models were not scored on the same images (e.g. {only})")
    b = b.loc[a.index]
    rows = []
    groups = [(g, idx) for g, idx in a.groupby(group, sort=True).groups.items()] + [("pooled", a.index)]
    for g, idx in groups:
        for m in metrics:
            cl = None if cluster is None else a.loc[idx, cluster].astype(str).to_numpy()
            st = a.loc[idx, group].to_numpy() if g == "pooled" else None
            r = paired_comparison(a.loc[idx, m].to_numpy(), b.loc[idx, m].to_numpy(), clusters=cl, strata=st,
                                  n_boot=n_boot, n_perm=n_perm, ci=ci, seed=seed)
            rows.append({group: g, "metric": m, "diff": r.diff.estimate, "diff_ci_low": r.diff.low,
                         "diff_ci_high": r.diff.high, model_a: r.mean_a, model_b: r.mean_b,
                         "p_value": r.p_value, "n_images": r.n, "n_clusters": r.n_clusters})
    out = pd.DataFrame(rows)
    out.insert(out.columns.get_loc("p_value") + 1, "p_holm", holm(out["p_value"].to_numpy()))
    return out


def seed_average(per_seed: pd.DataFrame, metrics: Sequence[str], *, seed_col: str = "seed",
                 keys: Sequence[str] = ("model", "reference", "image")) -> pd.DataFrame:
    """Average each image's scores over the training seeds of a model.

    The CIs of this study describe uncertainty over slides and images *given* the trained
    networks: each image gets the mean of its scores under the seeds of a recipe, and the
    spread across seeds is reported apart (:func:`seed_spread`). Other columns are kept when
    they agree across the seeds of every image (they describe the image: slide, organ, ...) and
    dropped otherwise (per-seed values that were not asked for).
    """
    _need(per_seed, [*keys, seed_col, *metrics], "per_seed")
    g = per_seed.groupby(list(keys), sort=False, dropna=False)
    other = [c for c in per_seed.columns if c not in (*keys, seed_col, *metrics)]
    const = g[other].nunique(dropna=False).le(1).all() if other else pd.Series(dtype=bool)
    agg = {m: "mean" for m in metrics} | {c: "first" for c in other if const[c]} | {seed_col: "nunique"}
    out = g.agg(agg).reset_index()
    return out.rename(columns={seed_col: "n_seeds"})


def seed_spread(per_seed: pd.DataFrame, metric: str, *, by: str = "model", seed_col: str = "seed",
                group: str = "organ") -> pd.DataFrame:
    """The pooled value (PanNuke's rule) of each training seed, and their spread per model.

    Returns one row per ``by`` value: the pooled ``metric`` of every seed (columns
    ``seed <k>``), their mean, standard deviation and range.
    """
    _need(per_seed, [by, seed_col, group, metric], "per_seed")
    rows = []
    for key, sub in per_seed.groupby(by, sort=False):
        vals = {f"seed {s}": pooled_mean(ss[metric].to_numpy(float), ss[group].to_numpy())
                for s, ss in sub.groupby(seed_col, sort=True)}
        v = np.array(list(vals.values()), float)
        rows.append({by: key, **vals, "mean": float(np.nanmean(v)), "sd": float(np.nanstd(v, ddof=1)) if v.size > 1
                     else float("nan"), "range": float(np.nanmax(v) - np.nanmin(v)), "n_seeds": int(v.size)})
    return pd.DataFrame(rows)


def cell_correct(cells: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Derived cell labels joined with the demo truth by ``cell_id``: one row per matched cell.

    Columns ``cell_id``, ``class_true``, ``class_pred`` and ``correct`` (1.0 when the derived class
    is the true one; an abstention, 255, counts as wrong, as in :func:`class_scores`). Per-cell
    values that :func:`paired_comparison` can compare between label sets with the sample (slide)
    as the unit.
    """
    for name, df in (("cells", cells), ("truth", truth)):
        if "cell_id" not in df.columns or "class" not in df.columns:
            raise ValueError(f"{name} needs columns cell_id and class")
    t = pd.DataFrame({"cell_id": truth["cell_id"].astype(str), "class_true": truth["class"].astype(int)})
    c = pd.DataFrame({"cell_id": cells["cell_id"].astype(str), "class_pred": cells["class"].astype(int)})
    m = t.merge(c, on="cell_id", how="inner")
    m["correct"] = (m["class_true"] == m["class_pred"]).astype(float)
    return m


def score_tiles(truth: Mapping[str, Sequence[np.ndarray]], preds: Sequence[tuple[np.ndarray, np.ndarray | None]], *,
                meta: pd.DataFrame, method: str, um_per_px: float = TARGET_UM_PER_PX_40X,
                with_types: bool = True) -> pd.DataFrame:
    """Per-image metrics (:func:`stlib.metrics.evaluate_pair`) of predictions against a truth batch.

    Parameters
    ----------
    truth
        ``inst``, ``type``, ``ignore`` per image (a tile-store batch or lists of arrays).
    preds
        ``(inst, type)`` per image, same order (``type`` may be None).
    meta
        One row per image, same order: ``image`` (or a store's ``tile_id``), ``slide`` (the
        independent unit; a store's ``sample`` when absent) and ``organ``; ``tissue``,
        ``source`` are kept when present.
    method
        Name of the method, written to the ``model`` column.
    with_types
        Also score classes (mPQ, per-class PQ, type accuracy): truth nuclei of class 255
        (unknown) are kept for segmentation and skipped for classes by :mod:`stlib.metrics`.

    Pixels with ``ignore == 1`` are removed from truth and prediction before scoring (excluded
    regions count for nothing, as in training).
    """
    from stlib.metrics import evaluate_pair

    if len(preds) != len(meta) or len(truth["inst"]) != len(meta):
        raise ValueError(f"truth ({len(truth['inst'])}), preds ({len(preds)}) and meta ({len(meta)}) differ in length")
    image = meta["image"] if "image" in meta else meta["tile_id"]
    slide = meta["slide"] if "slide" in meta else meta["sample"]
    extra = [c for c in ("tissue", "source") if c in meta]
    rows = []
    for i, (p_inst, p_type) in enumerate(preds):
        keep = np.asarray(truth["ignore"][i]) == 0 if "ignore" in truth else np.ones(np.shape(p_inst), bool)
        t_inst = np.where(keep, truth["inst"][i], 0)
        q_inst = np.where(keep, p_inst, 0)
        t_type = np.where(keep, truth["type"][i], 0) if with_types and "type" in truth else None
        q_type = np.where(keep, p_type, 0) if with_types and p_type is not None else None
        r = evaluate_pair(t_inst, q_inst, t_type if q_type is not None else None, q_type, um_per_px=um_per_px)
        rows.append({"model": method, "image": str(image.iloc[i]), "slide": str(slide.iloc[i]),
                     "organ": meta["organ"].iloc[i], **{c: meta[c].iloc[i] for c in extra}, **r})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- references

#: Kinds of reference: manual annotations (the primary endpoint's) and the study's own ST labels.
REFERENCE_KINDS = ("manual", "st-derived")


class ReferenceSet(NamedTuple):
    """Images with a reference segmentation that predictions are scored against.

    Attributes
    ----------
    name
        Shown in tables (``"manual truth: PanNuke fold3 (Colon, Skin)"``).
    kind
        ``"manual"`` or ``"st-derived"`` (:data:`REFERENCE_KINDS`).
    domain
        The kind of H&E: ``"post-Xenium H&E"`` (stained after a Xenium run, as the ST training
        slides) or ``"routine H&E"`` (as PanNuke and the public annotated sets).
    images_key
        References with the same key share their images, so each network segments them once.
    batch
        ``image``, ``inst``, ``type``, ``ignore``: one array per image (arrays may differ in size).
    meta
        One row per image: ``image`` (unique over all references with other images), ``slide``
        (the independent unit: the slide of a tile; an image that is its own unit repeats its
        ``image``), ``organ`` (HEST vocabulary), ``tissue`` (the source's name), ``source``.
    """

    name: str
    kind: str
    domain: str
    images_key: str
    batch: Mapping[str, Sequence[np.ndarray]]
    meta: pd.DataFrame


def _reference(name: str, kind: str, domain: str, images_key: str, batch: Mapping[str, Sequence[np.ndarray]],
               meta: pd.DataFrame) -> ReferenceSet:
    if kind not in REFERENCE_KINDS:
        raise ValueError(f"kind must be one of {REFERENCE_KINDS}, got {kind!r}")
    _need(meta, ["image", "slide", "organ"], "reference meta")
    if len(meta) != len(batch["inst"]):
        raise ValueError(f"reference {name!r}: {len(meta)} meta rows for {len(batch['inst'])} images")
    if not meta["image"].is_unique:
        raise ValueError(f"reference {name!r}: image ids repeat")
    return ReferenceSet(name, kind, domain, images_key, batch, meta.reset_index(drop=True))


def reference_from_store(store: str | Path, idx: Sequence[int] | np.ndarray, *, name: str, kind: str, domain: str,
                         images_key: str, slide: str = "sample",
                         organ_of: Mapping[str, str] | None = None) -> ReferenceSet:
    """Tiles ``idx`` of a tile store as a reference.

    ``slide="sample"`` makes the store's sample (slide) the independent unit; ``slide="image"``
    makes every tile its own unit (PanNuke, whose images come without slide ids). ``organ_of``
    renames the store's ``organ`` column into HEST organs (PanNuke tissue -> organ); the store's
    name stays in ``tissue``.
    """
    from stlib.io.tiles import TileStore

    st = TileStore(store)
    idx = np.asarray(idx, dtype=np.int64)
    m = st.meta.iloc[idx].reset_index(drop=True)
    image = images_key + "/" + m["tile_id"].astype(str)
    meta = pd.DataFrame({
        "image": image,
        "slide": image if slide == "image" else images_key + "/" + m[slide].astype(str),
        "organ": m["organ"].astype(str).map(lambda o: (organ_of or {}).get(o, o)),
        "tissue": m["organ"].astype(str), "source": Path(store).name,
    })
    batch = st.get_batch(idx, keys=["image", "inst", "type", "ignore"]) if len(idx) else \
        {"image": [], "inst": [], "type": [], "ignore": []}
    return _reference(name, kind, domain, images_key, batch, meta)


def pannuke_reference(store: str | Path, *, split: str, tissues: Sequence[str], organ_of: Mapping[str, str],
                      name: str | None = None) -> ReferenceSet:
    """Manual truth from PanNuke: the tiles of ``tissues`` in one fold (``split``, e.g. ``fold3``).

    Use a fold that no PanNuke-trained network trained on. Each image is its own unit
    (PanNuke publishes no slide ids; images of one slide may share a fold, so the interval may
    be a little narrow).
    """
    from stlib.io.tiles import TileStore

    st = TileStore(store)
    idx = st.indices(split=split, organ=list(tissues)) if tissues else np.zeros(0, np.int64)
    label = name or f"manual truth: PanNuke {split} ({', '.join(tissues)})"
    return reference_from_store(store, idx, name=label, kind="manual", domain="routine H&E",
                                images_key=f"pannuke_{split}", slide="image", organ_of=organ_of)


def _read_annotated(path: Path) -> list[dict[str, Any]]:
    """Read a manually annotated set into records (name, image, inst, type, um_per_px, organ).

    THE place where annotation readers plug in. :mod:`stlib.io.annotations` (MoNuSeg XML,
    CoNSeP, PanNuke, instance folders, QuPath GeoJSON; ``read_annotations``) is used when it is
    present; otherwise the folder must be the ``NAME.npz`` layout of :func:`load_instance_folder`.
    """
    try:
        from stlib.io import annotations as ann  # the readers of the real-tissue work (issue 10)
    except ImportError:
        ann = None
    if ann is not None and hasattr(ann, "read_annotations"):
        return [{"name": a.name, "image": a.image, "inst": a.inst, "type": a.type, "um_per_px": a.um_per_px,
                 "organ": a.organ} for a in ann.read_annotations(path)]
    batch, meta = load_instance_folder(path)
    return [{"name": meta["tile_id"].iloc[i], "image": batch["image"][i], "inst": batch["inst"][i],
             "type": batch["type"][i], "um_per_px": None, "organ": meta["organ"].iloc[i]} for i in range(len(meta))]


def manual_truth_folder(path: str | Path, *, um_per_px: float = TARGET_UM_PER_PX_40X,
                        organ_of: Mapping[str, str] | None = None,
                        name: str | None = None) -> ReferenceSet:
    """A public manually annotated set (MoNuSeg, CoNSeP, Lizard-style folders) as a reference.

    Every image is its own unit (the public sets draw their images from different slides);
    images at another resolution are resampled to ``um_per_px`` (labels by nearest neighbour).
    Classes outside stlib's table (e.g. "epithelial, malignancy unknown") count as unknown
    (255): they score segmentation, not classes. ``organ_of`` maps tissue names to HEST organs.
    """
    from skimage.transform import resize

    path = Path(path)
    if not path.exists():
        raise InputError("manual truth set not found", path=path,
                         fix="download it (stlib download ...) or point manual_truth at a local copy")
    recs = _read_annotated(path)
    key = f"manual_{path.name}"
    batch: dict[str, list] = {"image": [], "inst": [], "type": [], "ignore": []}
    rows = []
    for r in recs:
        img, inst = np.asarray(r["image"]), np.asarray(r["inst"])
        typ = np.zeros(inst.shape, np.uint8) if r["type"] is None else np.asarray(r["type"]).astype(np.uint8)
        typ = np.where(np.isin(typ, [0, *NUCLEUS_CLASSES]), typ, IGNORE).astype(np.uint8)
        um = r["um_per_px"]
        if um and abs(um / um_per_px - 1) > 0.02:
            shape = tuple(int(round(s * um / um_per_px)) for s in inst.shape)
            img = np.clip(np.rint(resize(img, shape, order=1, preserve_range=True, anti_aliasing=um < um_per_px)),
                          0, 255).astype(np.uint8)
            inst = resize(inst, shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.int32)
            typ = resize(typ, shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.uint8)
        batch["image"].append(img.astype(np.uint8))
        batch["inst"].append(inst.astype(np.int32))
        batch["type"].append(typ)
        batch["ignore"].append(np.zeros(inst.shape, np.uint8))
        organ = str(r["organ"]) if r["organ"] else "unknown"
        rows.append({"image": f"{key}/{r['name']}", "slide": f"{key}/{r['name']}",
                     "organ": (organ_of or {}).get(organ, organ), "tissue": organ, "source": path.name})
    return _reference(name or f"manual truth: {path.name}", "manual", "routine H&E", key, batch, pd.DataFrame(rows))


def restrict_reference(ref: ReferenceSet, organs: Sequence[str]) -> ReferenceSet:
    """The images of ``ref`` whose organ is in ``organs`` (e.g. the held-out organs)."""
    keep = np.flatnonzero(ref.meta["organ"].isin(list(organs)).to_numpy())
    batch = {k: [v[i] for i in keep] for k, v in ref.batch.items()}
    return ref._replace(batch=batch, meta=ref.meta.iloc[keep].reset_index(drop=True))


def heldout_references(run_dir: str | Path, *, heldout_organs: Sequence[str], heldout_tissues: Sequence[str],
                       organ_of_tissue: Mapping[str, str], pannuke_test_split: str = _EVAL.pannuke_test_split,
                       pannuke_trained_on: Sequence[str] = (), annotated: Sequence[str | Path] = (),
                       um_per_px: float = TARGET_UM_PER_PX_40X) -> list[ReferenceSet]:
    """The references of the evaluation chapters on the held-out organs, with fixed names and order.

    Manual truth first: the demo truth of the held-out slides (``tiles/st_truth``, demo only,
    post-Xenium H&E), the PanNuke tiles of ``heldout_tissues`` in ``pannuke_test_split``
    (routine H&E), every annotated set of ``annotated`` restricted to the held-out organs
    (routine H&E); then the held-out ST-derived labels (secondary). References missing on a
    profile are left out.

    Raises
    ------
    ValueError
        When ``pannuke_test_split`` is one of the folds a PanNuke network trained on.
    """
    from stlib.io.tiles import TileStore

    from stlib.layout import RunLayout

    run = RunLayout(run_dir)
    test_idx = TileStore(run.tiles_dir("st")).indices(split="test")
    refs = []
    if (run.tiles_dir("st_truth") / "store.json").is_file():
        refs.append(reference_from_store(run.tiles_dir("st_truth"), test_idx, kind="manual",
                                         domain="post-Xenium H&E", images_key="hest_test",
                                         name="manual truth: demo truth nuclei, held-out slides"))
    if (run.tiles_dir("pannuke") / "store.json").is_file() and heldout_tissues:
        if pannuke_test_split in set(pannuke_trained_on):
            raise ValueError(f"{pannuke_test_split} is a fold a PanNuke network trained on "
                             f"({sorted(set(pannuke_trained_on))}): it cannot be a test fold")
        refs.append(pannuke_reference(run.tiles_dir("pannuke"), split=pannuke_test_split, tissues=heldout_tissues,
                                      organ_of=organ_of_tissue))
    for folder in dict.fromkeys(str(a) for a in annotated):
        refs.append(restrict_reference(manual_truth_folder(folder, um_per_px=um_per_px, organ_of=organ_of_tissue),
                                       heldout_organs))
    refs.append(reference_from_store(run.tiles_dir("st"), test_idx, kind="st-derived", domain="post-Xenium H&E",
                                     images_key="hest_test", name="held-out ST-derived labels (secondary)"))
    return refs


def load_instance_folder(folder: str | Path, *, tissue_csv: str | Path | None = None) -> tuple[dict[str, list], pd.DataFrame]:
    """A folder of manual nucleus annotations as an evaluation set (MoNuSeg-style).

    Each ``NAME.npz`` holds ``inst`` (and optionally ``type``, and ``image`` (H, W, 3) uint8);
    otherwise the image is ``NAME.png`` / ``NAME.tif`` beside it. ``tissue.csv`` (columns
    ``name, tissue``) gives the organ of each image; images without one are ``unknown``.

    Returns
    -------
    (batch, meta): ``batch`` has lists ``image``, ``inst``, ``type``, ``ignore`` (images may differ
    in size); ``meta`` has ``tile_id``, ``sample`` (the folder name) and ``organ``.
    """
    from stlib.io.wsi import open_wsi

    folder = Path(folder)
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise InputError("no NAME.npz annotation found", path=folder,
                         fix="put NAME.npz (inst[, type, image]) files, with NAME.png images, in the folder")
    tissues: dict[str, str] = {}
    tcsv = Path(tissue_csv) if tissue_csv else folder / "tissue.csv"
    if tcsv.is_file():
        t = pd.read_csv(tcsv)
        tissues = dict(zip(t["name"].astype(str), t["tissue"].astype(str)))
    batch: dict[str, list] = {"image": [], "inst": [], "type": [], "ignore": []}
    rows = []
    for f in files:
        with np.load(f) as z:
            if "inst" not in z:
                raise InputError("npz has no 'inst' array", path=f, fix="save the instance map as `inst`")
            inst = np.asarray(z["inst"])
            typ = np.asarray(z["type"]) if "type" in z else np.zeros_like(inst, dtype=np.uint8)
            img = np.asarray(z["image"]) if "image" in z else None
        if img is None:
            cand = [f.with_suffix(ext) for ext in (".png", ".tif", ".tiff", ".jpg")]
            path = next((c for c in cand if c.is_file()), None)
            if path is None:
                raise InputError("no image for this annotation", path=f, fix=f"add {f.stem}.png or an `image` array")
            with open_wsi(path, um_per_px=1.0) as w:
                img = w.read_level(0)
        if img.shape[:2] != inst.shape:
            raise InputError(f"image {img.shape[:2]} and inst {inst.shape} differ in size", path=f)
        batch["image"].append(img.astype(np.uint8))
        batch["inst"].append(inst.astype(np.int32))
        batch["type"].append(typ.astype(np.uint8))
        batch["ignore"].append(np.zeros(inst.shape, np.uint8))
        rows.append({"tile_id": f.stem, "sample": folder.name, "organ": tissues.get(f.stem, "unknown")})
    return batch, pd.DataFrame(rows)


def _reference_key(ref: ReferenceSet) -> str:
    """Content hash of a reference: its name, images and truth arrays."""
    import hashlib

    h = hashlib.sha1()
    h.update(f"{ref.name}|{ref.kind}|{ref.domain}|{ref.images_key}".encode())
    h.update("\n".join(ref.meta["image"].astype(str)).encode())
    for k in ("image", "inst", "type", "ignore"):
        for a in ref.batch.get(k, []):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _scoring_key() -> str:
    """Hash of the scoring code (:mod:`stlib.metrics` and :func:`score_tiles`): cached scores of
    an older metric definition are not reused."""
    import hashlib
    import inspect

    import stlib.metrics

    return hashlib.sha1((Path(stlib.metrics.__file__).read_text() + inspect.getsource(score_tiles)).encode()).hexdigest()


def _model_key(path: Path) -> dict[str, Any]:
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def segment_and_score(models: Mapping[str, Mapping[int, Any]], references: Sequence[ReferenceSet], *,
                      um_per_px: float = TARGET_UM_PER_PX_40X, device: str = "auto", with_types: bool = True,
                      batch_size: int = 8, keep_predictions: bool = True,
                      cache_dir: str | Path | None = None) -> tuple[pd.DataFrame, dict[str, dict[str, list]]]:
    """Segment the images of every reference with every network and score them.

    Parameters
    ----------
    models
        ``{name: {seed: model}}``: a network (``torch.nn.Module``) or the path of its
        ``model.pt``, per training seed of each recipe. Paths are loaded one at a time.
    references
        :class:`ReferenceSet` s; those with the same ``images_key`` share their images, which
        each network segments once.
    keep_predictions
        Return the predictions of the first seed of each model (for figures).
    cache_dir
        Where the scores of a model file on a set of references are kept, keyed by the model
        file (path, size, time), the references' content and the scoring code: an evaluation that already scored
        the same network on the same references (another chapter, a rerun) reuses them instead
        of segmenting again. Networks given as objects are never cached.

    Returns
    -------
    (per_seed, predictions): one row per (model, seed, reference, image) with the metrics of
    :func:`score_tiles` and ``reference``, ``kind``, ``domain``; ``predictions[name][images_key]``
    the ``(inst, type)`` per image of the first seed of each model.
    """
    import hashlib
    import json

    from stlib.infer import load_inference_model, segment_tiles

    by_images: dict[str, list[ReferenceSet]] = {}
    for r in references:
        by_images.setdefault(r.images_key, []).append(r)
    ref_keys = {r.name: _reference_key(r) for r in references} if cache_dir is not None else {}
    code_key = _scoring_key() if cache_dir is not None else ""
    frames, predictions = [], {}

    def cache_path(model: Any, ref: ReferenceSet) -> Path | None:
        if cache_dir is None or not isinstance(model, (str, Path)):
            return None
        payload = {"model": _model_key(Path(model)), "ref": ref_keys[ref.name], "um": um_per_px, "types": with_types,
                   "code": code_key}
        return Path(cache_dir) / (hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest() + ".parquet")

    for name, seeds in models.items():
        for k, (seed, model) in enumerate(sorted(seeds.items())):
            want_pred = keep_predictions and k == 0
            net = None
            for key, refs in by_images.items():
                images = refs[0].batch["image"]
                if not len(images):
                    continue
                paths = [cache_path(model, r) for r in refs]
                if not want_pred and all(p is not None and p.is_file() for p in paths):
                    frames += [pd.read_parquet(p).assign(model=name, seed=int(seed)) for p in paths]
                    continue
                if net is None:
                    net = load_inference_model(model, device=device).model if isinstance(model, (str, Path)) else model
                if len({np.shape(im) for im in images}) == 1:
                    pr = segment_tiles(net, np.asarray(images), device=device, batch_size=batch_size)
                else:
                    pr = [segment_tiles(net, np.asarray(im)[None], device=device, batch_size=1)[0] for im in images]
                if want_pred:
                    predictions.setdefault(name, {})[key] = pr
                for r, path in zip(refs, paths):
                    df = score_tiles(r.batch, pr, meta=r.meta, method=name, um_per_px=um_per_px, with_types=with_types)
                    df = df.assign(seed=int(seed), reference=r.name, kind=r.kind, domain=r.domain)
                    frames.append(df)
                    if path is not None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        with atomic_path(path) as tmp:
                            df.to_parquet(tmp, index=False)
            del net
    if not frames:
        raise ValueError("nothing was scored: no model or no reference image")
    return pd.concat(frames, ignore_index=True), predictions


def nucleus_features(model, images: np.ndarray, insts: Sequence[np.ndarray], *, device: str = "auto",
                     batch_size: int = 8, branch: str | Sequence[str] = "nt") -> list[tuple[np.ndarray, np.ndarray]]:
    """Frozen per-nucleus features: a branch's last feature map (``branch`` = ``"nt"``, ``"np"`` or
    ``"hv"``; default the NT branch) averaged over each nucleus.

    ``branch`` may also be a sequence of branches: their features side by side, in that order,
    from one forward pass (the same values as one pass per branch, at a fraction of the cost).
    Returns one ``(ids, features)`` per image (``features`` is (n_nuclei, C)). The network is
    not changed (eval mode, no gradients): this is the "classification head on frozen features"
    protocol that compares label sets without retraining the whole network for each.
    """
    import torch

    from stlib.config import resolve_device
    from stlib.model.net import to_input

    dev = torch.device(resolve_device(device))
    model = model.to(dev).eval()
    branches = [branch] if isinstance(branch, str) else list(branch)
    captured: dict[str, torch.Tensor] = {}
    hooks = [model.decoders[b].head.register_forward_hook(
        lambda m, inp, out, b=b: captured.__setitem__(b, inp[0].detach())) for b in branches]
    out: list[tuple[np.ndarray, np.ndarray]] = []
    try:
        with torch.inference_mode():
            for s in range(0, len(images), batch_size):
                x = to_input(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size]))).to(dev)
                captured.clear()
                model(x)
                f = np.concatenate([captured[b].float().cpu().numpy()[..., : x.shape[-2], : x.shape[-1]]
                                    for b in branches], axis=1)
                for j in range(f.shape[0]):
                    inst = np.asarray(insts[s + j])
                    ids = np.unique(inst[inst > 0])
                    if ids.size == 0:
                        out.append((ids, np.zeros((0, f.shape[1]), np.float32)))
                        continue
                    lut = np.zeros(int(inst.max()) + 1, np.int64)
                    lut[ids] = np.arange(1, ids.size + 1)
                    lab = lut[inst].ravel()
                    cnt = np.bincount(lab, minlength=ids.size + 1)[1:]
                    feats = np.stack([np.bincount(lab, weights=f[j, c].ravel(), minlength=ids.size + 1)[1:]
                                      for c in range(f.shape[1])], axis=1) / cnt[:, None]
                    out.append((ids, feats.astype(np.float32)))
    finally:
        for h in hooks:
            h.remove()
    return out


def _nucleus_classes(inst: np.ndarray, typ: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Class of each nucleus id (majority of its pixels)."""
    from stlib.metrics import instance_types

    tid, ttype = instance_types(inst, typ)
    lut = dict(zip(np.asarray(tid).tolist(), np.asarray(ttype).tolist()))
    return np.array([lut.get(int(i), 0) for i in ids], dtype=np.int64)


def classification_head_eval(model, train_batch: Mapping[str, np.ndarray], train_types: Mapping[str, np.ndarray],
                             test_truth: Mapping[str, np.ndarray], test_meta: pd.DataFrame, *,
                             device: str = "auto", seed: int = 0,
                             um_per_px: float = TARGET_UM_PER_PX_40X) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compare label sets with a logistic classification head on frozen nucleus features.

    For each label set (``train_types[name]``: class maps of the training tiles, same nuclei),
    a multinomial logistic regression is fitted on the frozen features of the training nuclei
    (class 255 / background skipped), then (1) classifies the *true* nuclei of the test tiles
    (per-class F1 by nucleus against the truth) and (2) classifies the nuclei the network
    segments on the test tiles, giving a class map scored with PanNuke's mPQ.

    Returns
    -------
    (scores, per_image): one row per label set (accuracy, macro F1, F1 per class, mean mPQ);
    one row per (label set, test image) with ``mpq``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from stlib.infer import segment_tiles
    from stlib.metrics import pannuke_mpq

    tr = nucleus_features(model, train_batch["image"], train_batch["inst"], device=device)
    X = np.concatenate([f for _, f in tr]) if tr else np.zeros((0, 1))
    te_true = nucleus_features(model, test_truth["image"], test_truth["inst"], device=device)
    seg = segment_tiles(model, np.asarray(test_truth["image"]), device=device)
    te_pred = nucleus_features(model, test_truth["image"], [s[0] for s in seg], device=device)
    y_true = np.concatenate([_nucleus_classes(test_truth["inst"][i], test_truth["type"][i], ids)
                             for i, (ids, _) in enumerate(te_true)])
    Xt = np.concatenate([f for _, f in te_true])
    rows, per_image = [], []
    for name, types in train_types.items():
        y = np.concatenate([_nucleus_classes(train_batch["inst"][i], types[i], ids) for i, (ids, _) in enumerate(tr)])
        keep = (y > 0) & (y != IGNORE)
        scaler = StandardScaler().fit(X[keep])
        clf = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
        clf.fit(scaler.transform(X[keep]), y[keep])
        scored = (y_true > 0) & (y_true != IGNORE)
        pred = clf.predict(scaler.transform(Xt))
        sc = class_scores(y_true[scored], pred[scored])
        mpqs = []
        for i, (ids, f) in enumerate(te_pred):
            inst = seg[i][0]
            lut = np.zeros(int(inst.max()) + 1, np.uint8)
            if ids.size:
                lut[ids] = clf.predict(scaler.transform(f)).astype(np.uint8)
            r = pannuke_mpq(test_truth["inst"][i], test_truth["type"][i], inst, lut[inst])
            mpqs.append(r.mpq)
            per_image.append({"labels": name, "image": test_meta["tile_id"].iloc[i],
                              "organ": test_meta["organ"].iloc[i], "mpq": r.mpq})
        rows.append({"labels": name, "n_train_nuclei": int(keep.sum()), "n_test_nuclei": int(scored.sum()),
                     **{k: v for k, v in sc.items() if k not in ("n", "ignored_fraction")},
                     "mpq": float(np.nanmean(mpqs)) if np.isfinite(mpqs).any() else float("nan")})
    return pd.DataFrame(rows), pd.DataFrame(per_image)



# =====================================================================================
# The evaluation stage of a run folder: `stlib eval`
# =====================================================================================

def pannuke_trained_on(runs: Mapping[str, Mapping[int, str | Path]]) -> set[str]:
    """The PanNuke folds any ``pannuke*`` run of ``runs`` (``{run: {seed: model.pt}}``) trained on,
    read from the ``config.json`` beside each model: a PanNuke network is never scored on them."""
    import json

    return {s for v, seeds in runs.items() if v.startswith("pannuke") for m in seeds.values()
            for s in json.loads((Path(m).parent / "config.json").read_text())["train_splits"]}


def annotated_sets(data_dir: str | Path, extra: Sequence[str | Path] = ()) -> list[str]:
    """The public annotated sets of an evaluation: ``extra`` (e.g. ``manual_truth``), then every folder
    under ``{data_dir}/annotations/`` (where downloads and mirrors go), in name order."""
    found = sorted(str(d) for d in (Path(data_dir) / "annotations").glob("*") if d.is_dir())
    return [*map(str, extra), *found]


def study_models(run_dir: str | Path) -> dict[str, dict[int, Path]]:
    """``{run: {seed index: model.pt}}`` of the study's training runs (the recipe's ``recipes``,
    from ``models/study_runs.json``, :func:`stlib.train.read_study_runs`)."""
    from stlib.train import read_study_runs

    recipe, runs = read_study_runs(run_dir)
    return {v: seeds for v, seeds in runs.items() if v in recipe.recipes}


def heldout_organs_of_store(store: str | Path) -> list[str]:
    """Organs of a tile store's ``test`` split (the held-out organs: :func:`stlib.tiles.assign_splits`)."""
    from stlib.io.tiles import TileStore

    meta = TileStore(store).meta
    return sorted(meta.loc[meta["split"] == "test", "organ"].astype(str).unique())


def evaluate_run(run_dir: str | Path, models: Mapping[str, Mapping[int, str | Path]] | None = None, *,
                 config: EvalConfig | None = None, heldout_organs: Sequence[str] | None = None,
                 manifest: str | Path = "data_manifest.yaml", annotated: Sequence[str | Path] = (),
                 primary: tuple[str, str, str] | None = _PRIMARY, seed: int = 0,
                 device: str = "auto", name: str = "segmentation") -> Path:
    """Segment the held-out references with ``models``, score segmentation and classification, and
    write the tables to ``eval/{name}/`` of the run folder (the statistics of chapters 4-5).

    Parameters
    ----------
    run_dir
        Run folder (:class:`stlib.layout.RunLayout`): reads ``tiles/st`` (its ``test`` split),
        ``tiles/st_truth`` and ``tiles/pannuke`` when present; caches scores in ``eval/scores/``.
    models
        ``{name: {seed index: model.pt}}``; default: the study's runs (:func:`study_models`).
    config
        The statistics (:class:`stlib.config.EvalConfig`); default its defaults.
    heldout_organs
        Organs to score; default the organs of ``tiles/st``'s test split.
    manifest, annotated
        The manifest (PanNuke tissues of the held-out organs) and public annotated sets (folders).
    primary
        ``(metric, model, baseline)`` of the paired comparison on manual truth (``comparison.csv``);
        skipped when either model is not in ``models``; None: no comparison.
    seed, device, name
        Seed of the bootstrap / permutations, where the networks run, and the output folder.

    Returns
    -------
    ``eval/{name}/``, written at once (:func:`stlib.utils.atomic_dir`): ``per_seed.parquet`` (one row
    per model, seed, reference, image), ``per_image.parquet`` (seeds averaged), ``summary.csv``
    (per organ and pooled, CI over slides/images), ``comparison.csv`` and ``eval.json``.
    """
    from stlib.io.manifest import load_manifest
    from stlib.io.tiles import TileStore
    from stlib.layout import RunLayout
    from stlib.utils import atomic_dir, write_json

    cfg = config if config is not None else EvalConfig()
    run = RunLayout(run_dir)
    models = study_models(run.root) if models is None else {k: dict(v) for k, v in models.items()}
    if not models:
        raise InputError("no model to evaluate", path=run.study_runs, fix="train first or pass --model NAME=PATH")
    organs = list(heldout_organs) if heldout_organs else heldout_organs_of_store(run.tiles_dir("st"))
    man = load_manifest(manifest)
    um = TileStore(run.tiles_dir("st")).um_per_px
    refs = heldout_references(run.root, heldout_organs=organs, heldout_tissues=man.pannuke_tissues(organs),
                              organ_of_tissue=man.organ_of_pannuke_tissue(), pannuke_test_split=cfg.pannuke_test_split,
                              pannuke_trained_on=pannuke_trained_on(models), annotated=annotated, um_per_px=um)
    per_seed, _ = segment_and_score(models, refs, um_per_px=um, device=device, keep_predictions=False,
                                    cache_dir=run.eval_scores)
    metrics = [m for m in ("dice", "aji", "bpq", "mpq", "mpq_no_dead", "type_acc")
               if m in per_seed and per_seed[m].notna().any()]
    per_image = seed_average(per_seed, metrics)
    stats = {"n_boot": cfg.n_bootstrap, "ci": cfg.ci, "seed": seed}
    summary = pd.concat([summarize(df, metrics, group="organ", by="model", cluster="slide", **stats)
                         .assign(reference=ref) for ref, df in per_image.groupby("reference", sort=False)],
                        ignore_index=True)
    comparison = _primary_comparison(per_image, organs, primary, cfg, seed)
    with atomic_dir(run.eval_results(name)) as tmp:
        per_seed.to_parquet(tmp / "per_seed.parquet", index=False)
        per_image.to_parquet(tmp / "per_image.parquet", index=False)
        summary.to_csv(tmp / "summary.csv", index=False)
        comparison.to_csv(tmp / "comparison.csv", index=False)
        write_json(tmp / "eval.json", {
            "config": {k: getattr(cfg, k) for k in ("n_bootstrap", "ci", "n_permutations", "pannuke_test_split")},
            "seed": seed, "heldout_organs": organs, "primary": list(primary) if primary else None,
            "models": {k: {str(s): str(p) for s, p in v.items()} for k, v in models.items()
                       if all(isinstance(p, (str, Path)) for p in v.values())},
            "references": [{"name": r.name, "kind": r.kind, "domain": r.domain, "images": len(r.meta)} for r in refs],
            "metrics": metrics})
    return run.eval_results(name)


def _primary_comparison(per_image: pd.DataFrame, organs: Sequence[str], primary: tuple[str, str, str] | None,
                        cfg: EvalConfig, seed: int) -> pd.DataFrame:
    """``model - baseline`` on ``metric`` against manual truth on ``organs`` (empty when not computable)."""
    manual = per_image[(per_image["kind"] == "manual") & per_image["organ"].isin(list(organs))]
    if primary is None or manual.empty or not {primary[1], primary[2]} <= set(manual["model"]):
        return pd.DataFrame(columns=["organ", "metric", "diff", "diff_ci_low", "diff_ci_high", "p_value"])
    metric, a, b = primary
    return compare_models(manual, [metric], model_a=a, model_b=b, group="organ", cluster="slide",
                          n_boot=cfg.n_bootstrap, n_perm=cfg.n_permutations, ci=cfg.ci, seed=seed)


#: the primary endpoint's options of ``stlib eval`` (fields of 04_segmentation_eval's parameters)
_ENDPOINT = ("manual_truth", "primary_metric", "primary_model", "primary_baseline")


def cli_parser() -> Any:
    """The parser of ``stlib eval``; its options are generated from :class:`stlib.config.EvalConfig` (the
    statistics) and the primary-endpoint fields of :class:`stlib.config.SegEvalParams`."""
    import argparse
    from dataclasses import fields

    from stlib.config import SegEvalParams, add_config_arguments

    p = argparse.ArgumentParser(prog="stlib eval", description="Score trained networks on the held-out organs of a "
                                "run (manual truth and ST-derived labels): segmentation and classification metrics, "
                                "per-organ and pooled values with CIs over slides/images, the primary comparison; "
                                "writes RUN/eval/NAME/.")
    p.add_argument("--run-dir", required=True, help="run folder (reads tiles/, models/; writes eval/NAME/)")
    p.add_argument("--model", action="append", default=None, metavar="NAME=PATH",
                   help="a model.pt to score as NAME (repeat NAME for its seeds); default: the study's runs "
                        "(models/study_runs.json)")
    p.add_argument("--data-dir", default=None, help="data folder whose annotations/ sets are manual truth too")
    p.add_argument("--manifest", default=None, help="data manifest (default: the profile's, else data_manifest.yaml)")
    p.add_argument("--heldout-organs", nargs="*", default=None,
                   help="organs to score (default: those of tiles/st's test split)")
    p.add_argument("--name", default="segmentation", help="output folder under eval/ (default: segmentation)")
    p.add_argument("--profile", default=None,
                   help="start from this profile's 04_segmentation_eval block (default: the config defaults)")
    p.add_argument("--seed", type=int, default=None, help="seed of the bootstrap and permutations (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_config_arguments(p, EvalConfig)
    add_config_arguments(p, SegEvalParams, exclude=[f.name for f in fields(SegEvalParams) if f.name not in _ENDPOINT],
                         title="primary endpoint (04_segmentation_eval's parameters)")
    return p


def _models_of(specs: Sequence[str]) -> dict[str, dict[int, Path]]:
    """``NAME=PATH`` options -> ``{name: {seed index: path}}`` (a repeated NAME gives seeds 0, 1, ...)."""
    out: dict[str, dict[int, Path]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--model {spec!r}: expected NAME=PATH", fix="e.g. --model st=runs/demo/models/st/model.pt")
        if not Path(path).is_file():
            raise InputError("model file not found", path=path, fix="give the model.pt written by `stlib train`")
        seeds = out.setdefault(name, {})
        seeds[len(seeds)] = Path(path)
    return out


def cli_main(argv: list[str]) -> int:
    """``stlib eval --run-dir RUN [--model NAME=PATH ...] [options]``."""
    from stlib.config import SegEvalParams, build_config, given_options, load_params, make_params

    args = cli_parser().parse_args(argv)
    base = (make_params("04_segmentation_eval", load_params(args.profile, "04_segmentation_eval"))
            if args.profile else SegEvalParams())
    params = build_config(SegEvalParams, given_options(SegEvalParams, args), source="command line", base=base)
    data_dir = args.data_dir or (params.data_dir if args.profile else None)
    out = evaluate_run(args.run_dir, _models_of(args.model) if args.model else None, config=params.eval,
                       heldout_organs=args.heldout_organs, manifest=args.manifest or params.manifest,
                       annotated=annotated_sets(data_dir, params.manual_truth) if data_dir else params.manual_truth,
                       primary=(params.primary_metric, params.primary_model, params.primary_baseline),
                       seed=params.seed if args.seed is None else args.seed, device=args.device, name=args.name)
    comp = pd.read_csv(out / "comparison.csv")
    pooled = comp[comp["organ"] == "pooled"]
    msg = "" if pooled.empty else (f"; {params.primary_metric} {params.primary_model} - {params.primary_baseline} = "
                                   f"{pooled['diff'].iloc[0]:+.3f} [{pooled['diff_ci_low'].iloc[0]:+.3f}, "
                                   f"{pooled['diff_ci_high'].iloc[0]:+.3f}]")
    print(f"stlib eval: wrote {out}{msg}")
    return 0


__all__ = ["CI", "bootstrap_ci", "hierarchical_bootstrap", "pooled_mean", "sign_flip_test", "holm",
           "PairedComparison", "paired_comparison", "summarize", "compare_models", "seed_average", "seed_spread",
           "class_scores", "label_accuracy_vs_truth", "cell_correct", "score_tiles", "REFERENCE_KINDS", "ReferenceSet",
           "reference_from_store", "pannuke_reference", "manual_truth_folder", "restrict_reference", "heldout_references",
           "load_instance_folder", "segment_and_score", "nucleus_features", "classification_head_eval",
           "pannuke_trained_on", "annotated_sets", "study_models", "heldout_organs_of_store", "evaluate_run",
           "cli_parser", "cli_main"]
