"""Evaluation: label quality against truth, model comparisons with effect sizes and CIs.

The metric definitions live in :mod:`stlib.metrics`; this module aggregates per-image values
into per-organ and pooled tables with bootstrap confidence intervals over images and paired
tests of the difference between two models, and scores derived labels against a truth table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from stlib.constants import IGNORE
from stlib.metrics import class_scores, label_accuracy_vs_truth  # defined with the other metrics
from stlib.utils import InputError


class CI(NamedTuple):
    """A point estimate with a bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    n: int


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = 1000, ci: float = 0.95,
                 seed: int = 0, stat: Callable[[np.ndarray], float] = np.mean) -> CI:
    """Percentile bootstrap CI of ``stat`` over ``values`` (resampling units = images).

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


class PairedComparison(NamedTuple):
    """Difference ``a - b`` of two models scored on the same images."""

    mean_a: float
    mean_b: float
    diff: CI
    p_value: float
    test: str
    n: int


def paired_comparison(a: Sequence[float], b: Sequence[float], *, n_boot: int = 1000, ci: float = 0.95,
                      seed: int = 0) -> PairedComparison:
    """Paired bootstrap CI of the mean difference and a Wilcoxon signed-rank test.

    Images where either value is NaN are dropped pairwise. The p-value is two-sided; with fewer
    than 6 pairs or all differences zero it is reported as NaN (the test has no power there).
    """
    from scipy import stats

    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"a and b must be paired (same length), got {a.shape} and {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    d = a - b
    diff = bootstrap_ci(d, n_boot=n_boot, ci=ci, seed=seed)
    p = float("nan")
    if d.size >= 6 and np.any(d != 0):
        p = float(stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue)
    return PairedComparison(float(a.mean()) if a.size else float("nan"),
                            float(b.mean()) if b.size else float("nan"), diff, p,
                            "Wilcoxon signed-rank (two-sided)", int(d.size))


def summarize(per_image: pd.DataFrame, metrics: Sequence[str], *, group: str = "organ",
              by: str | None = "model", n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per-group and pooled mean with bootstrap CI for each metric.

    Parameters
    ----------
    per_image
        One row per image (and model), with the metric columns, ``group`` and ``by``.
    metrics
        Metric columns to summarise.
    group
        Grouping column (e.g. ``organ``); a ``"pooled"`` row is added over all images.
    by
        Optional column that separates models / label sets.

    Returns
    -------
    Long table: ``by``, ``group``, ``metric``, ``mean``, ``ci_low``, ``ci_high``, ``n_images``.
    """
    missing = [c for c in [*metrics, group, *([by] if by else [])] if c not in per_image.columns]
    if missing:
        raise ValueError(f"per_image lacks columns {missing}")
    rows = []
    keys = sorted(per_image[by].unique()) if by else [None]
    for key in keys:
        sub = per_image if key is None else per_image[per_image[by] == key]
        groups = [(g, s) for g, s in sub.groupby(group, sort=True)] + [("pooled", sub)]
        for g, s in groups:
            for m in metrics:
                r = bootstrap_ci(s[m].to_numpy(), n_boot=n_boot, ci=ci, seed=seed)
                row = {group: g, "metric": m, "mean": r.estimate, "ci_low": r.low, "ci_high": r.high,
                       "n_images": r.n}
                if by:
                    row[by] = key
                rows.append(row)
    cols = ([by] if by else []) + [group, "metric", "mean", "ci_low", "ci_high", "n_images"]
    return pd.DataFrame(rows)[cols]


def compare_models(per_image: pd.DataFrame, metrics: Sequence[str], *, model_a: str, model_b: str,
                   group: str = "organ", by: str = "model", image_key: str = "image",
                   n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Paired comparison ``model_a - model_b`` per group and pooled, for each metric.

    Images are paired on ``image_key``; an image scored by only one model is an error (the
    comparison would not be paired).
    """
    a = per_image[per_image[by] == model_a].set_index(image_key)
    b = per_image[per_image[by] == model_b].set_index(image_key)
    if a.empty or b.empty:
        raise ValueError(f"no rows for {model_a!r} or {model_b!r} in column {by!r}")
    if set(a.index) != set(b.index):
        only = sorted(set(a.index) ^ set(b.index))[:5]
        raise ValueError(f"models were not scored on the same images (e.g. {only})")
    b = b.loc[a.index]
    rows = []
    groups = [(g, idx) for g, idx in a.groupby(group, sort=True).groups.items()] + [("pooled", a.index)]
    for g, idx in groups:
        for m in metrics:
            r = paired_comparison(a.loc[idx, m].to_numpy(), b.loc[idx, m].to_numpy(),
                                  n_boot=n_boot, ci=ci, seed=seed)
            rows.append({group: g, "metric": m, model_a: r.mean_a, model_b: r.mean_b,
                         "diff": r.diff.estimate, "diff_ci_low": r.diff.low, "diff_ci_high": r.diff.high,
                         "p_value": r.p_value, "n_images": r.n})
    return pd.DataFrame(rows)


def score_tiles(truth: Mapping[str, np.ndarray], preds: Sequence[tuple[np.ndarray, np.ndarray | None]], *,
                meta: pd.DataFrame, method: str, um_per_px: float = 0.25, with_types: bool = True) -> pd.DataFrame:
    """Per-tile metrics (:func:`stlib.metrics.evaluate_pair`) of predictions against a truth batch.

    Parameters
    ----------
    truth
        Batch of a tile store (``inst``, ``type``, ``ignore``), one row per tile.
    preds
        ``(inst, type)`` per tile, same order (``type`` may be None).
    meta
        Tile meta rows (``tile_id``, ``sample``, ``organ``), same order.
    method
        Name of the method, written to the ``model`` column.
    with_types
        Also score classes (mPQ, per-class PQ): truth nuclei of class 255 (unknown) are kept for
        segmentation and skipped for classes by :mod:`stlib.metrics`.

    Pixels with ``ignore == 1`` are removed from truth and prediction before scoring (excluded
    regions count for nothing, as in training).
    """
    from stlib.metrics import evaluate_pair

    if len(preds) != len(meta) or len(truth["inst"]) != len(meta):
        raise ValueError(f"truth ({len(truth['inst'])}), preds ({len(preds)}) and meta ({len(meta)}) differ in length")
    rows = []
    for i, (p_inst, p_type) in enumerate(preds):
        keep = truth["ignore"][i] == 0 if "ignore" in truth else np.ones(p_inst.shape, bool)
        t_inst = np.where(keep, truth["inst"][i], 0)
        q_inst = np.where(keep, p_inst, 0)
        t_type = np.where(keep, truth["type"][i], 0) if with_types and "type" in truth else None
        q_type = np.where(keep, p_type, 0) if with_types and p_type is not None else None
        r = evaluate_pair(t_inst, q_inst, t_type if q_type is not None else None, q_type, um_per_px=um_per_px)
        m = meta.iloc[i]
        rows.append({"model": method, "image": m["tile_id"], "sample": m["sample"], "organ": m["organ"],
                     "n_true": int(len(np.unique(t_inst)) - (1 if (t_inst == 0).any() else 0)), **r})
    return pd.DataFrame(rows)


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


def segment_and_score(models: Mapping[str, object], batch: Mapping[str, Sequence[np.ndarray]], meta: pd.DataFrame, *,
                      um_per_px: float = 0.25, device: str = "auto", with_types: bool = True,
                      batch_size: int = 8) -> tuple[pd.DataFrame, dict[str, list]]:
    """Segment every image of ``batch`` with each model and score it (:func:`score_tiles`).

    Returns
    -------
    (per_image, predictions): one row per (model, image); ``predictions[name]`` is the list of
    ``(inst, type)`` per image (for overlays).
    """
    from stlib.infer import segment_tiles

    images = batch["image"]
    same = isinstance(images, np.ndarray) or len({np.shape(im) for im in images}) == 1
    preds: dict[str, list] = {}
    frames = []
    for name, model in models.items():
        if same:
            pr = segment_tiles(model, np.asarray(images), device=device, batch_size=batch_size)
        else:
            pr = [segment_tiles(model, np.asarray(im)[None], device=device, batch_size=1)[0] for im in images]
        preds[name] = pr
        frames.append(score_tiles(batch, pr, meta=meta, method=name, um_per_px=um_per_px, with_types=with_types))
    return pd.concat(frames, ignore_index=True), preds


def nucleus_features(model, images: np.ndarray, insts: Sequence[np.ndarray], *, device: str = "auto",
                     batch_size: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    """Frozen per-nucleus features: the NT branch's last feature map averaged over each nucleus.

    Returns one ``(ids, features)`` per image (``features`` is (n_nuclei, C)). The network is
    not changed (eval mode, no gradients): this is the "classification head on frozen features"
    protocol that compares label sets without retraining the whole network for each.
    """
    import torch

    from stlib.config import resolve_device
    from stlib.model.net import to_input

    dev = torch.device(resolve_device(device))
    model = model.to(dev).eval()
    captured: list[torch.Tensor] = []
    hook = model.decoders["nt"].head.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach()))
    out: list[tuple[np.ndarray, np.ndarray]] = []
    try:
        with torch.inference_mode():
            for s in range(0, len(images), batch_size):
                x = to_input(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size]))).to(dev)
                captured.clear()
                model(x)
                f = captured[0].float().cpu().numpy()[..., : x.shape[-2], : x.shape[-1]]
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
        hook.remove()
    return out


def _nucleus_classes(inst: np.ndarray, typ: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Class of each nucleus id (majority of its pixels)."""
    from stlib.metrics import instance_types

    tid, ttype = instance_types(inst, typ)
    lut = dict(zip(np.asarray(tid).tolist(), np.asarray(ttype).tolist()))
    return np.array([lut.get(int(i), 0) for i in ids], dtype=np.int64)


def classification_head_eval(model, train_batch: Mapping[str, np.ndarray], train_types: Mapping[str, np.ndarray],
                             test_truth: Mapping[str, np.ndarray], test_meta: pd.DataFrame, *,
                             device: str = "auto", seed: int = 0, um_per_px: float = 0.25) -> tuple[pd.DataFrame, pd.DataFrame]:
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


__all__ = ["CI", "bootstrap_ci", "PairedComparison", "paired_comparison", "summarize",
           "compare_models", "class_scores", "label_accuracy_vs_truth", "score_tiles",
           "load_instance_folder", "segment_and_score", "nucleus_features", "classification_head_eval"]
