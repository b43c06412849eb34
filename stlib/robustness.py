"""How well the labeler holds on cohorts whose biology it does not share (``stlib robustness``).

The labeler (:mod:`stlib.labels`) is frozen: its parameters were chosen on the development cohorts
:data:`DEV_SEEDS` only. Here it labels synthetic cohorts drawn by :mod:`stlib.demo` with its own
biology (:mod:`stlib.demo.biology`, never imported by the labeler) at evaluation seeds it was not
tuned on, and the labels are scored against the generator's truth, cell by cell:

* :func:`label_cohort`: one cohort, expression only (no image is rendered: the cells, classes and
  transcripts are exactly those of the written cohort, see :func:`stlib.demo.sample.simulate_sample`),
  labelled with :func:`stlib.labels.classes.label_cells`; one row per Xenium cell;
* :func:`score_cells`: the acceptance numbers (class accuracy over labelled cells, per-class F1,
  share of cells ignored, Neoplastic calls in healthy samples);
* :func:`robustness_sweep`: the scores against each biology knob, over several seeds;
* ``stlib robustness``: writes ``benchmarks/label_robustness.json`` (sweep + acceptance at the
  defaults over many evaluation seeds + the easy preset).

Module stage: evaluation (it imports :mod:`stlib.demo`, :mod:`stlib.labels` and :mod:`stlib.evaluate`).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from stlib.constants import CLASS_NAMES, CONNECTIVE, EPITHELIAL, IGNORE, INFLAMMATORY, NEOPLASTIC
from stlib.layout import RunLayout

__all__ = ["DEV_SEEDS", "SEEN_SEEDS", "EVAL_SEEDS", "KNOB_GRID", "label_cohort", "score_cells", "score_by_sample",
           "robustness_sweep", "acceptance_table", "outside_region_background", "region_check", "edge_gap_grid",
           "region_border_grid", "cli_main"]

#: cohort seeds on which the labeler's parameters were chosen (and nothing else); the labeler was
#: frozen before any evaluation seed was labelled. 101-106: the first freeze; 107-120 were added
#: when the first evaluation showed failures (the second freeze); the third freeze (lineage gate,
#: per-cluster tumour evidence, apoptosis-enriched cells ignored) and the fourth (CD45 waived for
#: types with strong evidence of their own, epithelial lineage naming a cluster, dominant type
#: winning a two-class conflict) were chosen on 101-120 again; so were the tiles' region_border_um
#: (tile check on 101-118, the failure reproduced on 117; :func:`region_border_grid` on 104-118).
#: 121-220 were added for the fifth freeze (issue 12: the ignored share's tail; the rival's home in a
#: two-class conflict, low-count outliers instead of a fixed tail): the reasons for ignoring were
#: read on 101-107 and 161-167, the freeze checked on 101-107 and 161-163 (and the easy preset on 101)
DEV_SEEDS: tuple[int, ...] = tuple(range(101, 221))
#: evaluation seeds of earlier benchmarks whose results were read and led to a new freeze, so they
#: are no longer unseen: never report them as an evaluation again. 1000-1019: the first freeze's
#: evaluation; 2000-2019: the second freeze's (19 of 20 passed; seed 2013 failed); 5000-5019: the
#: third freeze's (17 of 20 passed; 5007, 5008 and 5011 ignored more than 30 % of their cells);
#: 6000-6019: the fourth freeze's (20 of 20 passed the cell checks, but training tiles at the H&E
#: image edge marked true nuclei outside the Xenium region as background, fixed in
#: :func:`stlib.labels.masks.coverage_region`); 7000-7019: the fourth freeze with that fix (20 of 20
#: passed the cell checks; 3 training tiles still taught an outside-region nucleus as background);
#: 8000-8019: the fourth freeze with the region-border fix of the tiles (19 of 20 passed the cell checks:
#: one cohort ignored 33.5 % of its cells; the tile check passed; the cohort was not read, the cause
#: was looked for on development seeds, which led to the fifth freeze)
SEEN_SEEDS: tuple[int, ...] = (tuple(range(1000, 1020)) + tuple(range(2000, 2020)) + tuple(range(5000, 5020))
                               + tuple(range(6000, 6020)) + tuple(range(7000, 7020)) + tuple(range(8000, 8020)))
#: evaluation seeds of the committed benchmark (fifth freeze of the cell labeler, with the image-edge
#: coverage fix and the region-border fix of the training tiles, chosen on development seeds; never
#: used to choose a parameter, never labelled before the freeze)
EVAL_SEEDS: tuple[int, ...] = tuple(range(9000, 9020))
#: knob values of the robustness curves (the default of each knob is among them)
KNOB_GRID: dict[str, tuple[float, ...]] = {
    "marker_overlap": (0.3, 0.45, 0.6, 0.8, 1.0),
    "cnv_fold": (1.0, 1.15, 1.3, 1.5, 2.0),
    "cnv_subclonal_fraction": (0.0, 0.3, 0.6, 1.0),
    "cycling_normal_fraction": (0.0, 0.03, 0.1, 0.2),
    "noncycling_tumour_fraction": (0.0, 0.4, 0.7, 0.9),
    "offvocab_fraction": (0.0, 0.08, 0.15, 0.25),
    "dead_signal": (0.0, 0.3, 1.0),
    "xenium_region_fraction": (0.5, 0.85, 1.0),
}
#: the four classes scored when Dead is ignored (the default for ST training)
FOUR_CLASSES: tuple[int, ...] = (NEOPLASTIC, INFLAMMATORY, CONNECTIVE, EPITHELIAL)


def _sample_adata(sd: Any) -> Any:
    """Cells x genes of a simulated sample, as :meth:`stlib.io.hest.HestSample.cells` reads them."""
    from stlib.constants import MIN_QV, is_control_feature
    from stlib.io.xenium import counts_from_transcripts

    tx = sd.transcripts
    cid = tx["cell_id"].to_numpy()
    assigned = (cid != "UNASSIGNED") & (cid != -1) if cid.dtype == object else cid != -1
    names = tx["feature_name"].to_numpy().astype(str)
    u, inv = np.unique(names, return_inverse=True)
    gene = ~np.array([is_control_feature(x) for x in u], bool)[inv]
    keep = assigned & gene & (tx["qv"].to_numpy() >= MIN_QV)
    t = pd.DataFrame({"cell_id": pd.Series(cid[keep]).astype(str).to_numpy(), "feature_name": names[keep]})
    return counts_from_transcripts(t, sample=sd.spec.sample_id)


def label_cohort(cfg: Any = None, seed: int = 0, *, samples: Sequence[str] | None = None,
                 labeler: str = "hierarchical", label_kwargs: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Label one synthetic cohort (expression only) and join the truth.

    Parameters
    ----------
    cfg
        :class:`stlib.demo.DemoConfig` (default: the demo scale, realistic preset).
    seed
        Cohort seed.
    samples
        Sample ids to keep (default all).
    labeler
        ``method`` of :func:`stlib.labels.classes.label_cells`.
    label_kwargs
        Extra options of :func:`~stlib.labels.classes.label_cells`.

    Returns
    -------
    One row per Xenium cell: ``sample``, ``organ``, ``disease_state``, ``cell_id``, ``true_class``,
    ``true_type`` (generator type), ``pred_class``, ``pred_type``, ``confidence``, ``ignore_reason``
    (:class:`stlib.labels.classes.IgnoreReason`, ``""`` for labelled cells), ``n_counts``.
    """
    from stlib.demo.config import ORGANS, cohort_samples, config_for_scale
    from stlib.demo.sample import simulate_sample
    from stlib.io.panels import load_panel
    from stlib.labels.classes import label_cells

    cfg = cfg if cfg is not None else config_for_scale("demo")
    genes = load_panel(cfg.panel)
    rows = []
    for idx, spec in enumerate(cohort_samples(cfg)):
        if samples is not None and spec.sample_id not in samples:
            continue
        sd = simulate_sample(spec, cfg, seed=seed, index=idx, genes=genes, render=False)
        ad = _sample_adata(sd)
        organ = ORGANS[spec.organ_key].name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            label_cells(ad, method=labeler, organ=organ, disease_state=spec.disease_state,
                        oncotree_code=spec.oncotree_code or None, seed=0, neighbors_method="gauss",
                        **dict(label_kwargs or {}))
        truth = sd.truth.set_index("cell_id")
        ids = ad.obs_names.astype(str)
        rows.append(pd.DataFrame({
            "sample": spec.sample_id, "organ": organ, "disease_state": spec.disease_state, "cell_id": ids,
            "true_class": truth["class"].reindex(ids).to_numpy().astype(int),
            "true_type": truth["fine_type"].reindex(ids).to_numpy(),
            "pred_class": ad.obs["class"].to_numpy().astype(int),
            "pred_type": ad.obs["fine_type"].astype(str).to_numpy(),
            "confidence": ad.obs["confidence"].to_numpy(float),
            "ignore_reason": ad.obs["ignore_reason"].astype(str).to_numpy(),
            "n_counts": ad.obs["n_counts"].to_numpy(float),
        }))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def score_cells(cells: pd.DataFrame, *, classes: Sequence[int] = FOUR_CLASSES) -> dict[str, float]:
    """Acceptance numbers of labelled cells against the truth.

    ``accuracy``: fraction of *labelled* cells (class != 255) whose class is right (a truly Dead
    cell given any class counts as wrong). ``accuracy_all``: the same over all cells, ignore
    counted as wrong. ``ignored_fraction``: share of cells labelled 255. ``f1_<Class>``: F1 over
    labelled cells for each class in ``classes`` present in the truth of the labelled cells (NaN
    otherwise); ``min_f1`` their minimum. ``neoplastic_in_healthy``: Neoplastic calls in samples
    whose disease state is not a cancer. With an ``ignore_reason`` column (:func:`label_cohort`),
    ``ignored_<reason>``: the share of all cells ignored for each
    :class:`~stlib.labels.classes.IgnoreReason` (they sum to ``ignored_fraction``).
    """
    t = cells["true_class"].to_numpy(int)
    p = cells["pred_class"].to_numpy(int)
    lab = p != IGNORE
    out: dict[str, float] = {"n": int(len(t)), "n_labelled": int(lab.sum()),
                             "accuracy": float(np.mean(t[lab] == p[lab])) if lab.any() else float("nan"),
                             "accuracy_all": float(np.mean(t == p)) if len(t) else float("nan"),
                             "ignored_fraction": float(np.mean(~lab)) if len(t) else float("nan")}
    f1s = []
    for c in classes:
        tp = int(np.sum(lab & (t == c) & (p == c)))
        fp = int(np.sum(lab & (t != c) & (p == c)))
        fn = int(np.sum(lab & (t == c) & (p != c)))
        present = bool(np.any(lab & (t == c)))
        f1 = 2 * tp / (2 * tp + fp + fn) if present and (2 * tp + fp + fn) else float("nan")
        out[f"f1_{CLASS_NAMES[c]}"] = f1
        if present:
            f1s.append(f1)
    out["min_f1"] = float(np.min(f1s)) if f1s else float("nan")
    healthy = ~cells["disease_state"].astype(str).str.lower().isin(["cancer", "tumor", "tumour", "malignant"])
    out["neoplastic_in_healthy"] = int(np.sum(healthy.to_numpy() & (p == NEOPLASTIC)))
    if "ignore_reason" in cells.columns and len(t):  # share of all cells ignored for each reason
        from stlib.labels.classes import IgnoreReason

        r = cells["ignore_reason"].astype(str).to_numpy()
        for k in IgnoreReason.ALL:
            out[f"ignored_{k}"] = float(np.mean(~lab & (r == k)))
    return out


def score_by_sample(cells: pd.DataFrame, **kw: Any) -> pd.DataFrame:
    """:func:`score_cells` per sample (one row each)."""
    return pd.DataFrame([{"sample": s, "organ": g["organ"].iloc[0], "disease_state": g["disease_state"].iloc[0],
                          **score_cells(g, **kw)} for s, g in cells.groupby("sample", sort=False)])


def _score_cohort(cfg: Any, seed: int, samples: Sequence[str] | None,
                  label_kwargs: Mapping[str, Any] | None) -> dict[str, float]:
    """:func:`score_cells` of one cohort (a picklable unit of work for :func:`_map_cohorts`)."""
    return score_cells(label_cohort(cfg, seed, samples=samples, label_kwargs=label_kwargs))


def _map_cohorts(jobs: Sequence[tuple[Any, int]], *, samples: Sequence[str] | None,
                 label_kwargs: Mapping[str, Any] | None, n_jobs: int, progress: bool, desc: str) -> list[dict]:
    """Score ``(cfg, seed)`` cohorts in order, in ``n_jobs`` spawned processes when ``n_jobs > 1``.

    Cohorts are independent and each is single-threaded for most of its time (generation, rank
    scores), so a process pool is the simple way to use several cores; processes are spawned, not
    forked (numba / OpenMP state does not survive a fork).
    """
    from stlib.utils import progress as _progress

    if n_jobs <= 1 or len(jobs) <= 1:
        return [_score_cohort(c, s, samples, label_kwargs)
                for c, s in (_progress(list(jobs), desc=desc) if progress else jobs)]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=mp.get_context("spawn")) as ex:
        futs = [ex.submit(_score_cohort, c, s, samples, label_kwargs) for c, s in jobs]
        return [f.result() for f in (_progress(futs, desc=desc) if progress else futs)]


def robustness_sweep(seeds: Sequence[int], *, knobs: Mapping[str, Sequence[float]] | None = None,
                     base: Any = None, label_kwargs: Mapping[str, Any] | None = None,
                     samples: Sequence[str] | None = None, progress: bool = True, n_jobs: int = 1) -> pd.DataFrame:
    """Scores against each biology knob, one knob at a time from ``base`` (default: the realistic
    defaults), for every seed. One row per (knob, value, seed) with the :func:`score_cells` numbers;
    ``n_jobs`` cohorts are labelled at once (separate processes)."""
    from stlib.demo.config import config_for_scale

    base = base if base is not None else config_for_scale("demo")
    knobs = dict(knobs if knobs is not None else KNOB_GRID)
    jobs = [(k, v, s) for k, vals in knobs.items() for v in vals for s in seeds]
    scores = _map_cohorts([(dataclasses.replace(base, **{k: v}).validate(), s) for k, v, s in jobs],
                          samples=samples, label_kwargs=label_kwargs, n_jobs=n_jobs, progress=progress,
                          desc="robustness")
    rows = [{"knob": k, "value": float(v), "default": float(getattr(base, k)), "seed": int(s), **sc}
            for (k, v, s), sc in zip(jobs, scores)]
    return pd.DataFrame(rows)


def acceptance_table(seeds: Sequence[int], *, cfg: Any = None, label_kwargs: Mapping[str, Any] | None = None,
                     samples: Sequence[str] | None = None, progress: bool = True, n_jobs: int = 1) -> pd.DataFrame:
    """:func:`score_cells` of whole cohorts, one row per seed (the acceptance distribution); ``n_jobs``
    cohorts are labelled at once (separate processes)."""
    seeds = [int(s) for s in seeds]
    scores = _map_cohorts([(cfg, s) for s in seeds], samples=samples, label_kwargs=label_kwargs, n_jobs=n_jobs,
                          progress=progress, desc="cohorts")
    return pd.DataFrame([{"seed": s, **sc} for s, sc in zip(seeds, scores)])


def outside_region_background(run_dir: Any, truth_dir: Any, *, store: str = "st",
                              details: bool = False) -> dict[str, Any]:
    """Check the training tiles: no true nucleus outside the Xenium region may be background.

    The ST tile store and the truth store built on the same tiles (``build_tile_stores`` with
    ``truth_dir``) are compared pixel by pixel: a pixel of a true visible nucleus whose centre lies
    outside the Xenium region (truth column ``in_xenium_region``) must not be ``inst == 0`` with
    ``ignore == 0`` in the ST store.

    Returns
    -------
    ``n_outside_nuclei`` (true nuclei outside the region reaching some tile), ``n_background_nuclei``
    (those with at least one background pixel in an ST tile) and ``n_background_pixels``; with
    ``details``, also ``background_nuclei``: ``"{sample}:{truth row}"`` of each such nucleus (the row
    of the visible truth nuclei, as :func:`diagnose_background` reads them).
    """
    from pathlib import Path

    import geopandas as gpd

    from stlib.io.tiles import TileStore

    st = TileStore(RunLayout(run_dir).tiles_dir(store))
    tr = TileStore(RunLayout(run_dir).tiles_dir(f"{store}_truth"))
    outside_ids: dict[str, np.ndarray] = {}
    for sid in st.meta["sample"].unique():
        t = gpd.read_parquet(Path(truth_dir) / sid / "nuclei.parquet")
        t = t[t["visible"].to_numpy(bool)] if "visible" in t.columns else t
        inside = t["in_xenium_region"].to_numpy(bool) if "in_xenium_region" in t.columns else np.ones(len(t), bool)
        outside_ids[sid] = np.flatnonzero(~inside) + 1  # truth instance ids = row position + 1
    seen: set[tuple[str, int]] = set()
    bad: set[tuple[str, int]] = set()
    n_px = 0
    for i in range(len(st)):
        sid = st.meta["sample"].iloc[i]
        ids = outside_ids.get(sid)
        if ids is None or ids.size == 0:
            continue
        a, b = st[i], tr[i]
        m = np.isin(b["inst"], ids)
        if not m.any():
            continue
        seen.update((sid, int(k)) for k in np.unique(b["inst"][m]))
        viol = m & (a["inst"] == 0) & (a["ignore"] == 0)
        if viol.any():
            n_px += int(viol.sum())
            bad.update((sid, int(k)) for k in np.unique(b["inst"][viol]))
    out: dict[str, Any] = {"n_outside_nuclei": len(seen), "n_background_nuclei": len(bad), "n_background_pixels": n_px}
    if details:
        out["background_nuclei"] = [f"{sid}:{k - 1}" for sid, k in sorted(bad)]
    return out


def region_check(seeds: Sequence[int], workdir: Any, *, cfg: Any = None, refine_masks: bool = True,
                 progress: bool = True, keep: str = "none", labeler: str = "hierarchical") -> pd.DataFrame:
    """The whole label pipeline on written cohorts, then :func:`outside_region_background`.

    For each seed: write the cohort (``cfg``, default the realistic demo scale), align and label
    every sample (:func:`stlib.labels.derive.derive_sample`), build the tile stores with the truth on
    the same tiles, and count true nuclei outside the Xenium region that a training tile marks as
    background. One row per seed (with ``background_nuclei``, see :func:`outside_region_background`).

    ``keep``: which cohorts stay under ``workdir/seed{s}`` afterwards (``"none"``, ``"failing"``: those
    with a background nucleus, to diagnose them, or ``"all"``). ``labeler``: of
    :class:`stlib.config.LabelsConfig`; the check does not depend on it (the ST instance, ignore and
    refinement maps are drawn from the nucleus outlines, the alignment and the Xenium region, never
    from a class), so ``"marker"`` gives the same counts about three times faster.
    """
    import dataclasses as _dc
    import shutil
    from pathlib import Path

    from stlib.demo import make_cohort
    from stlib.demo.config import config_for_scale
    from stlib.io import cohort
    from stlib.labels import derive
    from stlib.tiles.stage import build_tile_stores
    from stlib.utils import progress as _progress

    cfg = cfg if cfg is not None else config_for_scale("demo")
    cfg = _dc.replace(cfg, pannuke_per_fold=0, raw_bundles=0)
    rows = []
    for s in (_progress(list(seeds), desc="region check") if progress else seeds):
        root = Path(workdir) / f"seed{s}"
        data = make_cohort(root / "data", seed=int(s), config=cfg)
        hest = cohort.hest_dir(data)
        table = cohort.cohort_table(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for sid in table["sample"]:
                derive.derive_sample(hest, sid, root / "run", truth_dir=data / "truth", neighbors_method="gauss",
                                     align=True, labeler=labeler)
            build_tile_stores(hest, table, root / "run", truth_dir=data / "truth", refine_masks=refine_masks)
        row = {"seed": int(s), "xenium_region_fraction": cfg.xenium_region_fraction,
               **outside_region_background(root / "run", data / "truth", details=True)}
        rows.append(row)
        if keep == "none" or (keep == "failing" and row["n_background_nuclei"] == 0):
            shutil.rmtree(root, ignore_errors=True)
    return pd.DataFrame(rows)


def edge_gap_grid(seeds: Sequence[int], workdir: Any, *, slopes: Sequence[float] = (0.05, 0.1, 0.2),
                  pads: Sequence[float] = (0.0, 0.5, 1.0), cfg: Any = None, progress: bool = True) -> pd.DataFrame:
    """Choose :func:`stlib.labels.masks.coverage_region`'s image-edge parameters on development cohorts.

    For each seed (development seeds only): write the cohort and align every sample under
    ``workdir/seed{s}`` (kept, so a rerun reuses them; the alignment is the one the labels use), then build the Xenium region in H&E px
    (:func:`stlib.labels.derive.imaged_region`) for every ``edge_slope`` x ``edge_pad_um`` and without
    the edge step (``slope`` NaN: the region before the fix), and measure it against the truth:

    * ``n_bad``: true visible nuclei outside the Xenium region whose outline overlaps the region
      (more than half a level-0 px^2; the geometric counterpart of :func:`outside_region_background`,
      which needs the tile stores);
    * ``n_in_kept`` of ``n_in``: true nuclei inside the region with a Xenium polygon that lie wholly in
      the region (the labelled cells a training tile can still teach: what the region costs);
    * ``area``: share of the image in the region.

    One row per (seed, sample, slope, pad).
    """
    from pathlib import Path

    import geopandas as gpd
    import shapely

    from stlib.align import align_and_save, load_alignment
    from stlib.config import AlignConfig
    from stlib.demo import make_cohort
    from stlib.demo.config import config_for_scale
    from stlib.io import cohort
    from stlib.io.hest import HestSample
    from stlib.labels import derive
    from stlib.utils import InputError
    from stlib.utils import progress as _progress

    bad_seeds = sorted(set(int(s) for s in seeds) - set(DEV_SEEDS))
    if bad_seeds:
        raise InputError(f"seeds {bad_seeds} are not development seeds", fix=f"choose parameters on {DEV_SEEDS}")
    cfg = cfg if cfg is not None else config_for_scale("demo")
    cfg = dataclasses.replace(cfg, pannuke_per_fold=0, raw_bundles=0)
    grid = [(float("nan"), float("nan"))] + [(float(k), float(p)) for k in slopes for p in pads]
    rows = []
    for seed in (_progress(list(seeds), desc="edge grid") if progress else seeds):
        root = Path(workdir) / f"seed{seed}"
        data = make_cohort(root / "data", seed=int(seed), config=cfg)
        hest = cohort.hest_dir(data)
        for sid in cohort.cohort_table(data)["sample"]:
            layout = RunLayout(root / "run")
            if not layout.alignment_json(sid).is_file():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    align_and_save(hest, sid, layout.alignment_root, config=AlignConfig())
            s = HestSample(hest, sid)
            res = load_alignment(layout.alignment_json(sid))
            with s.wsi() as w:
                H, W = w.shape
            img = shapely.box(0, 0, W, H)
            t = gpd.read_parquet(data / "truth" / sid / "nuclei.parquet")
            t = t[t["visible"].to_numpy(bool)]
            inside = t["in_xenium_region"].to_numpy(bool)
            g_out = shapely.intersection(t.geometry.values[~inside], img)
            g_in = shapely.intersection(t.geometry.values[inside & t["has_polygon"].to_numpy(bool)], img)
            for k, p in grid:
                kw = {"edge_slope": None} if np.isnan(k) else {"edge_slope": k, "edge_pad_um": p}
                reg = derive.imaged_region(s, res, **kw)
                R = shapely.union_all(reg.geometry.values) if len(reg) else shapely.Polygon()
                rows.append({"seed": int(seed), "sample": sid, "slope": k, "pad_um": p, "n_out": int(len(g_out)),
                             "n_bad": int(np.sum(shapely.area(shapely.intersection(g_out, R)) > 0.5)),
                             "n_in": int(len(g_in)), "n_in_kept": int(np.sum(
                                 shapely.area(shapely.intersection(g_in, R)) >= 0.999 * shapely.area(g_in))),
                             "area": float(R.area / (H * W))})
    return pd.DataFrame(rows)


def region_border_grid(seeds: Sequence[int], workdir: Any, *,
                       borders_um: Sequence[float] = (0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0),
                       cfg: Any = None, progress: bool = True) -> pd.DataFrame:
    """Choose the tiles' ``region_border_um`` (:func:`stlib.labels.masks.known_background_region`) on
    development cohorts.

    For each seed (development seeds only): the cohort under ``workdir/seed{s}`` (written and aligned
    when its ``run/labels/{sample}/coverage.parquet`` is missing, else reused, e.g. as
    :func:`region_check` keeps it), and for every border width:

    * ``n_bad``: true visible nuclei outside the Xenium region that overlap the region where background
      is still taught (more than half a level-0 px^2; the geometric counterpart of
      :func:`outside_region_background`);
    * ``min_gap_um``: the smallest distance from such a nucleus to that region (negative: the depth
      of the deepest overlap), i.e. the safety left;
    * ``lost``: the share of the region (within the image) whose background is no longer taught (what
      the border costs; ST nuclei there keep their labels).

    Also ``semi_axis_p99_um`` / ``semi_axis_max_um``: the largest centroid-to-outline distance of the
    visible true nuclei (how far a nucleus centred at the region's edge reaches in). One row per
    (seed, sample, border).
    """
    import json
    from pathlib import Path

    import geopandas as gpd
    import shapely

    from stlib.labels.masks import known_background_region
    from stlib.utils import InputError
    from stlib.utils import progress as _progress

    bad_seeds = sorted(set(int(s) for s in seeds) - set(DEV_SEEDS))
    if bad_seeds:
        raise InputError(f"seeds {bad_seeds} are not development seeds", fix=f"choose parameters on {DEV_SEEDS}")
    rows = []
    for seed in (_progress(list(seeds), desc="border grid") if progress else seeds):
        root = Path(workdir) / f"seed{seed}"
        _ensure_regions(root, int(seed), cfg)
        meta = json.loads((root / "data" / "cohort.json").read_text())
        for st in meta["samples"]:
            sid = st["sample_id"]
            H, W = st["shape"]
            um = float(st["um_per_px"])
            t = gpd.read_parquet(root / "data" / "truth" / sid / "nuclei.parquet")
            t = t[t["visible"].to_numpy(bool)]
            g_out = t.geometry.values[~t["in_xenium_region"].to_numpy(bool)]
            cen = shapely.centroid(t.geometry.values)
            reach = np.array([np.hypot(*(shapely.get_coordinates(g) - shapely.get_coordinates(c)).T).max()
                              for g, c in zip(t.geometry.values, cen)]) * um
            region = gpd.read_parquet(RunLayout(root / "run").coverage_parquet(sid)).geometry.values
            R = shapely.intersection(shapely.union_all(region), shapely.box(0, 0, W, H))
            for b in borders_um:
                known = known_background_region(region, W, H, b / um)
                K = R if known is None else shapely.union_all(known)
                gap = shapely.distance(g_out, K)
                over = shapely.area(shapely.intersection(g_out, K))
                for j in np.flatnonzero(gap == 0):  # depth of an overlap: its farthest point inside
                    q = shapely.get_coordinates(shapely.intersection(g_out[j], K))
                    gap[j] = -float(shapely.distance(shapely.points(q), K.boundary).max()) if len(q) else 0.0
                rows.append({"seed": int(seed), "sample": sid, "border_um": float(b), "n_out": int(len(g_out)),
                             "n_bad": int(np.sum(over > 0.5)),
                             "min_gap_um": float(gap.min() * um) if len(gap) else float("nan"),
                             "lost": float(1.0 - K.area / R.area) if R.area > 0 else float("nan"),
                             "semi_axis_p99_um": float(np.quantile(reach, 0.99)),
                             "semi_axis_max_um": float(reach.max())})
    return pd.DataFrame(rows)


def _ensure_regions(root: Any, seed: int, cfg: Any = None) -> None:
    """Write the cohort ``root/data`` and each sample's alignment and Xenium region
    (``root/run/labels/{sample}/coverage.parquet``, as :func:`stlib.labels.derive.derive_sample` writes
    it) unless they are there."""
    import json

    from stlib.align import align_and_save, load_alignment
    from stlib.config import AlignConfig
    from stlib.demo import make_cohort
    from stlib.demo.config import config_for_scale
    from stlib.io import cohort
    from stlib.io.hest import HestSample
    from stlib.labels import derive
    from stlib.utils import atomic_path

    layout = RunLayout(root / "run")
    data = root / "data"
    if (data / "cohort.json").is_file():
        sids = [s["sample_id"] for s in json.loads((data / "cohort.json").read_text())["samples"]]
        if all(layout.coverage_parquet(sid).is_file() for sid in sids):
            return
    cfg = cfg if cfg is not None else config_for_scale("demo")
    cfg = dataclasses.replace(cfg, pannuke_per_fold=0, raw_bundles=0)
    data = make_cohort(data, seed=int(seed), config=cfg)
    hest = cohort.hest_dir(data)
    for sid in cohort.cohort_table(data)["sample"]:
        if layout.coverage_parquet(sid).is_file():
            continue
        if not layout.alignment_json(sid).is_file():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                align_and_save(hest, sid, layout.alignment_root, config=AlignConfig())
        reg = derive.imaged_region(HestSample(hest, sid), load_alignment(layout.alignment_json(sid)))
        layout.labels_dir(sid).mkdir(parents=True, exist_ok=True)
        with atomic_path(layout.coverage_parquet(sid)) as tmp:
            reg.to_parquet(tmp)


def _summary(df: pd.DataFrame, cols: Sequence[str]) -> dict[str, dict[str, float]]:
    return {c: {"min": float(df[c].min()), "median": float(df[c].median()), "max": float(df[c].max())}
            for c in cols if c in df.columns}


def _grid_in_workdir(grid: Any, seeds: Sequence[int], workdir: Any) -> pd.DataFrame:
    """``grid(seeds, folder)`` in ``workdir``, or in a temporary folder deleted afterwards (None)."""
    import tempfile

    if workdir is not None:
        return grid(seeds, workdir)
    with tempfile.TemporaryDirectory() as tmp:
        return grid(seeds, tmp)


def _edge_grid_cli(args: Any, argv: list[str]) -> int:
    """``stlib robustness --edge-grid SEEDS``: :func:`edge_gap_grid`, summed over samples per setting."""
    from stlib.labels.masks import EDGE_PAD_UM, EDGE_SLOPE
    from stlib.utils import machine_info, write_json

    t0 = time.time()
    rows = _grid_in_workdir(edge_gap_grid, args.edge_grid, args.workdir)
    key = rows.assign(slope=rows["slope"].fillna(-1.0), pad_um=rows["pad_um"].fillna(-1.0))
    per_seed = key.groupby(["slope", "pad_um", "seed"])[["n_out", "n_bad", "n_in", "n_in_kept"]].sum().reset_index()
    tot = per_seed.groupby(["slope", "pad_um"]).agg(
        n_out=("n_out", "sum"), n_bad=("n_bad", "sum"), seeds_failing=("n_bad", lambda v: int(np.sum(v > 0))),
        n_in=("n_in", "sum"), n_in_kept=("n_in_kept", "sum")).reset_index()
    tot["area"] = key.groupby(["slope", "pad_um"])["area"].mean().to_numpy()
    res = {"command": "stlib robustness " + " ".join(argv),
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 1),
           "machine": machine_info(), "seeds": list(args.edge_grid),
           "what": "coverage_region's image-edge step on development cohorts: true nuclei outside the Xenium region "
                   "overlapping the region (n_bad), labelled nuclei wholly kept (n_in_kept of n_in), share of the image "
                   "kept (area); slope -1 = without the edge step (before the fix)",
           "chosen": {"edge_slope": EDGE_SLOPE, "edge_pad_um": EDGE_PAD_UM},
           "totals": tot.to_dict(orient="records"), "rows": rows.to_dict(orient="records")}
    write_json(args.out, res)
    print(tot.to_string(index=False))
    return 0


def _border_grid_cli(args: Any, argv: list[str]) -> int:
    """``stlib robustness --border-grid SEEDS``: :func:`region_border_grid`, summed over samples per width."""
    from stlib.config import TilesConfig
    from stlib.utils import machine_info, write_json

    t0 = time.time()
    rows = _grid_in_workdir(region_border_grid, args.border_grid, args.workdir)
    per_seed = rows.groupby(["border_um", "seed"]).agg(n_bad=("n_bad", "sum"), min_gap_um=("min_gap_um", "min"))
    tot = rows.groupby("border_um").agg(n_out=("n_out", "sum"), n_bad=("n_bad", "sum"),
                                        min_gap_um=("min_gap_um", "min"), lost=("lost", "mean")).reset_index()
    tot["seeds_failing"] = per_seed.groupby("border_um")["n_bad"].apply(lambda v: int(np.sum(v > 0))).to_numpy()
    res = {"command": "stlib robustness " + " ".join(argv),
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 1),
           "machine": machine_info(), "seeds": list(args.border_grid),
           "what": "the tiles' region_border_um on development cohorts: true nuclei outside the Xenium region "
                   "overlapping the region where background is still taught (n_bad), the smallest distance of "
                   "any of them to it (min_gap_um, negative = depth of an overlap), share of the region whose "
                   "background is no longer taught (lost); the nuclei's largest semi-axis (semi_axis_*_um)",
           "chosen": {"region_border_um": TilesConfig().region_border_um},
           "semi_axis_um": {"p99_max_over_samples": float(rows["semi_axis_p99_um"].max()),
                            "max": float(rows["semi_axis_max_um"].max())},
           "totals": tot.to_dict(orient="records"), "rows": rows.to_dict(orient="records")}
    write_json(args.out, res)
    print(tot.to_string(index=False))
    return 0


def cli_main(argv: list[str]) -> int:
    """``stlib robustness [--seeds ...] [--sweep-seeds ...] [--out benchmarks/label_robustness.json]``."""
    from stlib.utils import machine_info
    from stlib.demo.config import config_for_scale
    from stlib.utils import write_json

    ap = argparse.ArgumentParser(prog="stlib robustness", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=list(EVAL_SEEDS),
                    help="evaluation cohort seeds at the realistic defaults (never the development seeds)")
    ap.add_argument("--easy-seeds", type=int, nargs="*", default=[0, 1, 2], help="cohort seeds of the easy preset")
    ap.add_argument("--sweep-seeds", type=int, nargs="*", default=list(EVAL_SEEDS[:3]),
                    help="seeds of every point of the robustness curves")
    ap.add_argument("--no-sweep", action="store_true", help="skip the robustness curves")
    ap.add_argument("--jobs", type=int, default=1, help="cohorts labelled at once (one process each)")
    ap.add_argument("--sweep-ends", action="store_true",
                    help="curves at the two ends of each knob's grid only (the default point is the acceptance run)")
    ap.add_argument("--out", default="benchmarks/label_robustness.json")
    ap.add_argument("--region-only", action="store_true",
                    help="only the outside-region check on written cohorts (--seeds), whole pipeline")
    ap.add_argument("--workdir", default=None, help="scratch folder of --region-only (default: a temp folder)")
    ap.add_argument("--edge-grid", type=int, nargs="*", default=None, metavar="DEV_SEED",
                    help="only the choice of coverage_region's image-edge parameters on these development seeds "
                         "(edge_gap_grid; cohorts kept under --workdir)")
    ap.add_argument("--border-grid", type=int, nargs="*", default=None, metavar="DEV_SEED",
                    help="only the choice of the tiles' region_border_um on these development seeds "
                         "(region_border_grid; cohorts kept under --workdir)")
    ap.add_argument("--labeler", default="hierarchical",
                    help="labeler of --region-only (the tile check does not depend on it; marker is faster)")
    ap.add_argument("--keep", choices=["none", "failing", "all"], default="none",
                    help="cohorts of --region-only kept under --workdir (failing: those with a background nucleus)")
    args = ap.parse_args(argv)
    if args.edge_grid is not None:
        return _edge_grid_cli(args, argv)
    if args.border_grid is not None:
        return _border_grid_cli(args, argv)
    bad = sorted(set(args.seeds) & set(DEV_SEEDS)) + sorted(set(args.sweep_seeds) & set(DEV_SEEDS))
    if bad:
        from stlib.utils import InputError

        raise InputError(f"seeds {bad} are development seeds of the labeler", fix="evaluate on other seeds")
    seen = sorted((set(args.seeds) | set(args.sweep_seeds)) & set(SEEN_SEEDS))
    if seen:
        warnings.warn(f"seeds {seen} were read before the labeler's last freeze (SEEN_SEEDS): "
                      "their scores are not an unseen evaluation", UserWarning, stacklevel=2)
    t0 = time.time()
    if args.region_only:
        import tempfile

        if args.keep != "none" and args.workdir is not None:
            reg = region_check(args.seeds, args.workdir, keep=args.keep, labeler=args.labeler)
        else:
            with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                reg = region_check(args.seeds, tmp, labeler=args.labeler)
        res = {"command": "stlib robustness " + " ".join(argv),
               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 1),
               "machine": machine_info(), "labeler": args.labeler,
               "what": "true nuclei outside the Xenium region that a training tile marks "
                       "as background (whole pipeline, default knobs)",
               "per_seed": reg.to_dict(orient="records"),
               "total_background_nuclei": int(reg["n_background_nuclei"].sum()),
               "total_outside_nuclei": int(reg["n_outside_nuclei"].sum())}
        write_json(args.out, res)
        print(f"stlib robustness: region check on {len(reg)} cohorts: {res['total_background_nuclei']} of "
              f"{res['total_outside_nuclei']} outside-region nuclei marked background -> {args.out}")
        return 0
    acc = acceptance_table(args.seeds, n_jobs=args.jobs)
    easy = acceptance_table(args.easy_seeds, cfg=config_for_scale("demo", "easy"), n_jobs=args.jobs)
    easy_proxy = acceptance_table(args.easy_seeds, cfg=config_for_scale("demo", "easy"),
                                  label_kwargs={"dead": "proxy"}, n_jobs=args.jobs)
    knobs = {k: (v[0], v[-1]) for k, v in KNOB_GRID.items()} if args.sweep_ends else KNOB_GRID
    sweep = pd.DataFrame() if args.no_sweep else robustness_sweep(args.sweep_seeds, knobs=knobs, n_jobs=args.jobs)
    from stlib.labels.classes import IgnoreReason

    cols = ["accuracy", "accuracy_all", "ignored_fraction", "min_f1", "f1_Neoplastic", "f1_Inflammatory",
            "f1_Connective", "f1_Epithelial", "neoplastic_in_healthy", *(f"ignored_{k}" for k in IgnoreReason.ALL)]
    res = {
        "command": "stlib robustness " + " ".join(argv),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 1),
        "machine": machine_info(), "dev_seeds": list(DEV_SEEDS), "seen_seeds": list(SEEN_SEEDS),
        "defaults": {k: getattr(config_for_scale("demo"), k) for k in KNOB_GRID},
        "acceptance": {"seeds": args.seeds, "per_seed": acc.to_dict(orient="records"), "summary": _summary(acc, cols)},
        "easy": {"seeds": args.easy_seeds, "per_seed": easy.to_dict(orient="records"), "summary": _summary(easy, cols),
                 "dead_proxy": {"per_seed": easy_proxy.to_dict(orient="records"),
                                "summary": _summary(easy_proxy, cols)}},
        "sweep": {"seeds": args.sweep_seeds, "knobs": {k: list(v) for k, v in knobs.items()},
                  "rows": sweep.to_dict(orient="records")},
    }
    write_json(args.out, res)
    s = res["acceptance"]["summary"]
    print(f"stlib robustness: {len(args.seeds)} cohorts at the defaults: accuracy min {s['accuracy']['min']:.3f} "
          f"median {s['accuracy']['median']:.3f}; min F1 min {s['min_f1']['min']:.3f}; ignored max "
          f"{s['ignored_fraction']['max']:.3f} -> {args.out}")
    return 0
