"""Real tissue in the loop (notebook 07_real_tissue): ST-derived labels on real H&E, scored against real nuclei.

The cohort (:mod:`stlib.demo.realtissue`) is real annotated H&E (MoNuSeg, CoNSeP) with a
simulated Xenium layer. This module runs the study's own pipeline on it and measures the
segmentation half of the claim against the *real manual* outlines:

1. :func:`st_labels` - per sample: the project's alignment (:func:`stlib.align.align_and_save`)
   of the simulated Xenium nuclei, then their aligned outlines as segmentation labels
   (``labels/{sample}__seg``: class unknown), and for chosen samples the full expression-derived
   classes (:func:`stlib.labels.derive.derive_sample`).
2. :func:`build_stores` - tile stores of the training samples
   (:func:`stlib.tiles.stage.build_tile_stores`): ``tiles/rt`` = ST-derived masks snapped to
   the haematoxylin boundary (:mod:`stlib.labels.refine`), ``tiles/rt_truth`` = the manual masks
   of exactly the same tiles.
3. :func:`train_pair` - the same network, recipe, budget and seed trained on each store:
   ``{models_dir}/st/model.pt`` and ``{models_dir}/manual/model.pt`` (the chapter: ``models/book``).
4. :func:`score_images` - every method on whole held-out images through
   :func:`stlib.infer.infer_image` (the code of ``stlib infer``: resampled to the model's µm/px,
   tiled, stitched) and the classical Otsu + watershed baseline, scored per image with
   :func:`stlib.metrics.evaluate_pair`; :func:`summary_tables` gives means with bootstrap CIs
   over images and paired differences; :func:`ratio_ci` the ST / manual ratio.
5. :func:`classification_experiment` - CoNSeP: logistic heads on frozen nucleus features of the
   ST network, trained on the expression-derived classes vs on the real CoNSeP types of the same
   nuclei, both scored against the real types of other images (epithelial merged:
   :func:`stlib.constants.merge_epithelial`).
6. :func:`held_out_check` - the acceptance check as a user runs it: ``stlib infer`` on each
   image, ``stlib metrics`` against the manual truth, per model.
7. The release pair - the same recipe trained longer by ``make realtissue-models``:
   :func:`pack_release` writes ``models/realtissue/`` with its provenance, :func:`load_release`
   verifies checksums and recipe, :func:`install_release` puts it at ``models/{st,manual}/model.pt``
   of the chapter's run folder; :func:`loo_budget_table` and :func:`release_decision` are the
   development budget curve and the pre-registered rule that chose its budget.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stlib.config import RealTissueParams, resolve_device
from stlib.constants import (CONNECTIVE, EPITHELIAL, IGNORE, INFLAMMATORY, TARGET_UM_PER_PX_40X, UNKNOWN_CLASSES,
                             merge_epithelial)
from stlib.layout import RunLayout
from stlib.utils import (InputError, atomic_path, cache_key, checkout_path, map_processes, progress, read_json,
                         write_json)

log = logging.getLogger("stlib.realtissue")

__all__ = ["RecipeConfig", "postproc_of", "budget_curve", "budget_summary", "first_above_classical", "image_sets", "st_labels", "build_stores", "train_pair", "score_images", "summary_tables",
           "ratio_ci", "score_workers", "to_resolution", "label_quality", "classification_experiment", "held_out_check",
           "source_label", "MERGED_CLASSES", "load_test_images", "classification_sets", "derived_class_maps", "natural_sorted",
           "Release", "recipe_of", "recipe_dict", "recipe_differences", "pack_release", "load_release", "install_release",
           "resolve_release", "source_files", "loo_budget_curve", "loo_budget_table", "release_decision", "heldout_comparison"]

#: classes a merged-epithelial truth (CoNSeP) can score: Inflammatory, Connective, Epithelial (any)
MERGED_CLASSES: tuple[int, ...] = (INFLAMMATORY, CONNECTIVE, EPITHELIAL)
SEG_LABELS = "{sample}__seg"
STORE = "rt"


def source_label(kind: str = "realtissue") -> str:
    """Caption of every figure and table of the real-tissue chapter."""
    return ("REAL H&E + REAL manual nuclei (MoNuSeg, CoNSeP; CC BY-NC-SA) with a SIMULATED Xenium layer "
            "(stlib realtissue)")


# ----------------------------------------------------------------------------- labels
def _seg_only_labels(hest: Path, sid: str, run_dir: Path, res: Any) -> Path:
    """Aligned Xenium nuclei as labels of unknown class (``labels/{sid}__seg/nuclei.parquet``)."""
    import geopandas as gpd

    from stlib.align import transform_nuclei
    from stlib.io.hest import HestSample

    out = RunLayout(run_dir).labels_dir(SEG_LABELS.format(sample=sid))
    key = cache_key({"alignment": res.inputs.get("key"), "version": 1})
    rep = out / "label_report.json"
    if rep.is_file() and (out / "nuclei.parquet").is_file() and read_json(rep).get("key") == key:
        return out
    nuc = HestSample(hest, sid).nuclei()
    nuc = nuc[~nuc.index.duplicated()]
    aligned = transform_nuclei(nuc, res)
    ids = aligned.index.astype(str)
    g = gpd.GeoDataFrame({"cell_id": ids, "class": np.full(len(ids), IGNORE, np.uint8),
                          "confidence": np.zeros(len(ids), np.float32),
                          "fine_type": np.full(len(ids), "unlabelled", object)}, geometry=aligned.geometry.values)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "nuclei.parquet") as tmp:
        g.to_parquet(tmp)
    write_json(rep, {"sample": sid, "key": key, "n_nuclei": int(len(g)),
                     "note": "segmentation labels only: aligned Xenium nuclei, class unknown (255)"})
    return out


def _st_labels_one(job: tuple[Any, ...]) -> dict[str, Any]:
    """One sample of :func:`st_labels` (alignment, segmentation labels, classes if asked): its row."""
    from stlib.align import align_and_save, truth_comparison
    from stlib.io.cohort import hest_dir
    from stlib.labels.derive import derive_sample

    data_dir, run_dir, sid, with_classes, seed, refine_alignment, labeler = job
    hest, run_dir = hest_dir(data_dir), Path(run_dir)
    truth = Path(data_dir) / "truth"
    t0 = time.perf_counter()
    res, _ = align_and_save(hest, sid, RunLayout(run_dir).alignment_root, refine=refine_alignment)
    _seg_only_labels(hest, sid, run_dir, res)
    row = {"sample": sid, "corr before": res.scores["global"]["before"]["corr"],
           "corr after": res.scores["global"]["after"]["corr"]}
    if truth.is_dir():
        tc = truth_comparison(res, hest, truth)
        row.update({"error before (µm)": tc.get("median_error_um_before"),
                    "error after (µm)": tc.get("median_error_um_after")})
    if with_classes:
        derive_sample(hest, sid, run_dir, labeler=labeler, seed=seed,
                      truth_dir=truth if truth.is_dir() else None)
    row["seconds"] = time.perf_counter() - t0
    return row


def st_labels(data_dir: str | Path, run_dir: str | Path, samples: Sequence[str], *,
              classes_for: Sequence[str] = (), seed: int = 0, refine_alignment: bool = True,
              labeler: str = "hierarchical", workers: int = 1) -> pd.DataFrame:
    """Align every sample and write its ST-derived labels.

    Parameters
    ----------
    data_dir, run_dir
        The cohort's data root and the run folder.
    samples
        Sample ids.
    classes_for
        Samples that also get expression-derived classes (:func:`stlib.labels.derive.derive_sample`
        into ``labels/{sample}/``); all get segmentation labels (``labels/{sample}__seg/``).
    refine_alignment
        Use the project's alignment refinement (notebook 01_alignment) before taking the outlines.
    workers
        Processes the samples are spread over (:func:`stlib.utils.map_processes`; each sample's
        work is independent and writes only its own folders; ``None`` = one per usable CPU, at
        most one per sample). The outputs do not depend on it (tested; rows in sample order);
        ``seconds`` is each sample's own wall time. Default 1 (this process): on chapter 07's 13
        samples of 1000 px, 2 processes took 39 CPU s where one took 22 (each worker starts
        Python, torch, and loads the compiled kernels from numba's cache, several seconds of CPU
        on a 2-core machine), so they gain no wall time there; they pay off for larger samples.
        The alignment keeps its own thread pools sized by the usable CPUs inside a worker too:
        their chunking sets the order of its floating-point sums (fewer threads would move the
        last bits of its scores).

    Returns
    -------
    One row per sample: alignment scores before / after, against the simulated true map
    (median error µm), and the time taken.
    """
    wanted = set(classes_for)
    jobs = [(str(data_dir), str(run_dir), sid, sid in wanted, seed, refine_alignment, labeler) for sid in samples]
    rows = map_processes(_st_labels_one, jobs, workers=workers, threads=1, desc="align + ST labels")
    return pd.DataFrame(rows)


def build_stores(data_dir: str | Path, run_dir: str | Path, table: pd.DataFrame, *, um_per_px: float = TARGET_UM_PER_PX_40X,
                 tile_px: int = 256, seed: int = 0, refine_masks: bool = True,
                 refinement: Any = None) -> dict[str, Path]:
    """``tiles/rt`` (ST-derived masks) and ``tiles/rt_truth`` (manual masks) of the same tiles.

    ``table`` = cohort rows (``sample``, ``organ``, ``role``) of the samples to cut, normally the
    training samples. Uses :func:`stlib.tiles.stage.build_tile_stores` (idempotent), with the main
    study's ST label path; ``refinement`` (:class:`stlib.config.RefineConfig`, default: its
    defaults) sets the mask refinement, e.g. ``unmatched_ignore``.
    """
    from stlib.io.cohort import hest_dir
    from stlib.tiles.stage import build_tile_stores

    return build_tile_stores(hest_dir(data_dir), table[["sample", "organ", "role"]], run_dir, um_per_px=um_per_px,
                             tile_px=tile_px, truth_dir=Path(data_dir) / "truth", seed=seed, name=STORE,
                             labels_name=SEG_LABELS, refine_masks=refine_masks,
                             **({} if refinement is None else {"refinement": refinement}))


# ----------------------------------------------------------------------------- training
_RT = RealTissueParams()


@dataclass(frozen=True)
class RecipeConfig:
    """The one recipe both networks share (differences = labels only); its defaults are the
    chapter's parameters (:class:`stlib.config.RealTissueParams`)."""

    steps: int = _RT.steps
    batch_size: int = _RT.batch_size
    crop_px: int = _RT.crop_px
    lr: float = _RT.lr
    encoder: str = _RT.encoder
    aug_hed: float = 0.2
    aug_scale: float = 0.1
    #: linear LR warm-up steps
    warmup_steps: int = _RT.warmup_steps
    #: post-processing stored in both model files (:func:`stlib.train.checkpoint.write_postproc`), so
    #: that ``stlib infer`` and the chapter's scoring use them
    np_thresh: float = _RT.np_thresh
    marker_thresh: float = _RT.marker_thresh
    min_size: int = _RT.min_size
    #: marker mode of the post-processing and its constants (:func:`stlib.model.postproc.hovernet_postprocess`)
    postproc_mode: str = _RT.postproc_mode
    marker_h: float = _RT.marker_h
    hv_weight: float = _RT.hv_weight
    #: "peaks" mode: minimum marker distance (model px)
    marker_dist: float = _RT.marker_dist
    #: per-image stain normalisation of the input (:mod:`stlib.model.stain`), stored in both model files
    stain_norm: str = _RT.stain_norm
    #: CPU training in channels_last layout (time only; :class:`stlib.train.TrainConfig`)
    channels_last_cpu: bool = _RT.channels_last_cpu
    seed: int = 0
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)


def train_pair(run_dir: str | Path, recipe: RecipeConfig, *, parallel: bool = True,
               models_dir: str = "models", snapshots: Sequence[int] = ()) -> dict[str, Any]:
    """Train ``models/st`` on ``tiles/rt`` and ``models/manual`` on ``tiles/rt_truth``.

    Every tile of the training samples is used (``train`` and ``val`` splits: there is no model
    selection, so nothing is held back for it); finished runs are reused (:func:`stlib.train.train`).
    On a CPU with ``parallel`` the two runs train at the same time in two single-thread processes
    (:func:`stlib.utils.map_processes`); on a GPU one after the other.

    ``models_dir`` is the folder of the two runs inside ``run_dir``; ``snapshots``: steps after
    which the weights are also kept as ``model_{step}.pt`` (:func:`budget_curve`).

    Returns
    -------
    ``{"st": TrainResult, "manual": TrainResult}``.
    """
    from stlib.train import TrainConfig

    import torch

    from stlib.train.checkpoint import comparable_config, write_postproc

    jobs = {}
    for name, store in (("st", f"tiles/{STORE}"), ("manual", f"tiles/{STORE}_truth")):
        cfg = TrainConfig(recipe=name, run_dir=str(run_dir), stores=(store,), out_dir=f"{models_dir}/{name}",
                          train_splits=("train", "val"), val_splits=("val",), val_max_tiles=4,
                          encoder=recipe.encoder, steps=recipe.steps, batch_size=recipe.batch_size,
                          crop_px=recipe.crop_px, lr=recipe.lr, aug_hed=recipe.aug_hed, aug_scale=recipe.aug_scale,
                          seed=recipe.seed, device=recipe.device, val_every=recipe.steps,
                          ckpt_every=math.gcd(recipe.steps, *[int(n) for n in snapshots]),
                          warmup_steps=recipe.warmup_steps, num_workers=1, stain_norm=recipe.stain_norm,
                          **{"channels_last_cpu": recipe.channels_last_cpu, **recipe.extra})
        ckpt = cfg.out_path() / "checkpoint.pt"
        resume = "auto"
        if ckpt.is_file():  # another profile or parameter set trained here before: start over, don't refuse
            old = torch.load(ckpt, map_location="cpu", weights_only=True).get("config", {})
            if comparable_config(old) != comparable_config(cfg.to_dict()):
                resume = "never"
        jobs[name] = (cfg, resume, tuple(sorted(int(n) for n in snapshots if 0 < int(n) < recipe.steps)))
    # on a CPU the two networks train side by side, one process per core (stlib.utils.map_processes)
    workers = 1 if resolve_device(recipe.device) != "cpu" or not parallel else None
    done = dict(zip(jobs, map_processes(_train_job, list(jobs.values()), workers=workers)))
    pp = postproc_of(recipe)
    for r in done.values():  # the recipe's post-processing travels with each model file (and its snapshots)
        for p in [r.model_path, *sorted(Path(r.out_dir).glob("model_*.pt"))]:
            write_postproc(p, pp)
    return done


def postproc_of(recipe: RecipeConfig) -> dict[str, Any]:
    """The post-processing settings of a recipe as stored in its model files (and passed to
    :func:`score_images` for network objects): the keys its marker mode uses."""
    pp: dict[str, Any] = {"np_thresh": recipe.np_thresh, "min_size": recipe.min_size, "mode": recipe.postproc_mode}
    if recipe.postproc_mode == "hv":
        pp["marker_thresh"] = recipe.marker_thresh
    elif recipe.postproc_mode == "peaks":
        pp["marker_dist"] = recipe.marker_dist
    else:
        pp["marker_h"] = recipe.marker_h
    if recipe.postproc_mode == "blend":
        pp["hv_weight"] = recipe.hv_weight
    return pp


def _train_job(job: tuple[Any, str, tuple[int, ...]]) -> Any:
    """One :func:`stlib.train.train` call (a picklable job of :func:`train_pair`), stopping after
    each snapshot step to keep the weights of its checkpoint as ``model_{step}.pt``."""
    import torch

    from stlib.train import train
    from stlib.train.loop import TrainingInterrupted

    cfg, resume, snapshots = job
    out = cfg.out_path()
    for n in snapshots:
        snap = out / f"model_{n}.pt"
        if snap.is_file() and resume == "auto":
            continue
        try:  # the run stops right after the checkpoint of step n and resumes from it bit-for-bit
            train(cfg, resume=resume, interrupt_after=n)
        except TrainingInterrupted:
            ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
            if int(ckpt["step"]) == n:
                keys = ("config", "state_dict", "class_names", "um_per_px", "tile_px", "stlib_version")
                with atomic_path(snap) as tmp:
                    torch.save({k: ckpt[k] for k in keys if k in ckpt}, tmp)
        resume = "auto"
    return train(cfg, resume=resume)


# ----------------------------------------------------------------------------- budget curve
def budget_curve(data_dir: str | Path, run_dir: str | Path, train_samples: Sequence[str],
                 dev_samples: Sequence[str], *, budgets: Sequence[int] = (150, 300, 500, 750, 1000),
                 recipe: RecipeConfig | None = None, um_per_px: float = _RT.um_per_px, tile_px: int = _RT.tile_px,
                 refine_masks: bool = True, seed: int = 0, out: str | Path | None = None,
                 refinement: Any = None) -> pd.DataFrame:
    """bPQ against the training budget, for ST-derived and manual masks, on development images.

    A *development* split of a real-tissue cohort: both networks train on ``train_samples``
    (e.g. two training organs) and are scored against the manual outlines of ``dev_samples``
    (a third training organ), never on the chapter's held-out test images. One pair of runs of
    ``max(budgets)`` steps is trained (the chapter's recipe, LR schedule over the whole run) and
    its weights are kept after each smaller budget (``model_{steps}.pt``): those points are
    snapshots of the long run, whose LR has not yet decayed, so they are a lower bound of what a
    run of that length alone would reach; the last point is a complete run. The classical
    Otsu + watershed is scored once on the same images. Finished runs and snapshots are reused
    (``run_dir/models/budget/{st,manual}``).

    Parameters
    ----------
    data_dir, run_dir
        The cohort (:func:`stlib.demo.realtissue.make_realtissue_cohort`) and a run folder of the study.
    train_samples, dev_samples
        Sample ids of the cohort; they must not overlap.
    budgets
        Training steps of each point (the largest is the run's length).
    recipe
        Everything but ``steps`` (default: the chapter's recipe).
    out
        Optional result file (``.csv``), written atomically with one row per (budget, method, image).
    refinement
        :class:`stlib.config.RefineConfig` of the ST masks (default: its defaults), see :func:`build_stores`.

    Returns
    -------
    One row per (``steps``, ``model``, ``image``): ``organ``, ``bpq``, ``dice``, ``aji``, ``f_d``,
    ``snapshot`` (True for points before the last), the pair's training wall time
    ``train_wall_s`` (both networks side by side, the whole run) and the load average when it
    finished; ``steps`` is 0 for the classical baseline.
    """
    from dataclasses import replace
    import os

    from stlib.io.cohort import cohort_table

    overlap = set(train_samples) & set(dev_samples)
    if overlap:
        raise InputError(f"development images are also training images: {sorted(overlap)}",
                         fix="give disjoint train_samples and dev_samples")
    budgets = sorted({int(n) for n in budgets})
    recipe = recipe or RecipeConfig(seed=seed)
    table = cohort_table(data_dir)
    table = table[table["sample"].isin(list(train_samples))].assign(role="train")
    st_labels(data_dir, run_dir, list(train_samples), seed=seed)
    build_stores(data_dir, run_dir, table, um_per_px=um_per_px, tile_px=tile_px, seed=seed, refine_masks=refine_masks,
                 refinement=refinement)
    dev = load_test_images(data_dir, list(dev_samples))
    keep = ["model", "image", "organ", "bpq", "dice", "aji", "f_d"]
    frames = [score_images({"classical (Otsu + watershed)": "classical"}, dev)[0][keep].assign(steps=0)]
    t0 = time.perf_counter()
    res = train_pair(run_dir, replace(recipe, steps=budgets[-1]), models_dir="models/budget", snapshots=budgets[:-1])
    wall, load = time.perf_counter() - t0, os.getloadavg()[0]
    for n in budgets:
        paths = {k: (r.model_path if n == budgets[-1] else r.out_dir / f"model_{n}.pt") for k, r in res.items()}
        if not all(Path(p).is_file() for p in paths.values()):
            log.warning("budget %d: no snapshot (the run was already past it); skipped", n)
            continue
        per, _ = score_images({"ST-trained": paths["st"], "manual-trained": paths["manual"]}, dev, device=recipe.device)
        frames.append(per[keep].assign(steps=n, snapshot=n != budgets[-1], train_wall_s=round(wall, 1),
                                       loadavg=round(load, 2)))
        log.info("budget %d: %s", n, per.groupby("model")["bpq"].mean().round(3).to_dict())
    train_organs = ", ".join(sorted(table["organ"].unique()))
    curve = pd.concat(frames, ignore_index=True).assign(train_organs=train_organs,
                                                         recipe=f"{recipe.encoder} encoder, batch {recipe.batch_size} x "
                                                                f"{recipe.crop_px} px at {um_per_px} µm/px, lr {recipe.lr}, "
                                                                f"warm-up {recipe.warmup_steps}, {describe_recipe(recipe)}")
    if out is not None:
        with atomic_path(Path(out)) as tmp:
            curve.to_csv(tmp, index=False)
    return curve


def describe_recipe(recipe: RecipeConfig) -> str:
    """The recipe's post-processing and non-default loss weights, in words (tables and captions)."""
    from stlib.model.losses import LossWeights

    loss = recipe.extra.get("loss")
    loss = loss.to_dict() if hasattr(loss, "to_dict") else dict(loss or {})
    base = LossWeights().to_dict()
    changed = {k: v for k, v in loss.items() if base.get(k) != v}
    if recipe.postproc_mode == "hv":
        text = (f"post-processing NP >= {recipe.np_thresh}, marker {recipe.marker_thresh}, "
                f"min {recipe.min_size} px")
    elif recipe.postproc_mode == "peaks":
        text = (f"post-processing NP >= {recipe.np_thresh}, markers at distance-transform peaks >= "
                f"{recipe.marker_dist:g} px apart, min {recipe.min_size} px")
    else:
        text = (f"post-processing NP >= {recipe.np_thresh}, {recipe.postproc_mode} markers (h-maxima "
                f"{recipe.marker_h} px" + (f", HV weight {recipe.hv_weight}" if recipe.postproc_mode == "blend" else "")
                + f"), min {recipe.min_size} px")
    if recipe.stain_norm != "none":
        text = f"{recipe.stain_norm} stain normalisation, " + text
    return text + (f", loss weights {changed}" if changed else "")


def budget_summary(curve: pd.DataFrame, metric: str = "bpq") -> pd.DataFrame:
    """Mean ``metric`` over the development images per (``steps``, ``model``) of a
    :func:`budget_curve` table, the classical baseline's value beside each budget, and whether the
    network is above it (``above_classical``)."""
    base = curve.loc[curve["steps"] == 0, metric].mean()
    s = (curve[curve["steps"] > 0].groupby(["steps", "model"], as_index=False)
         .agg(**{metric: (metric, "mean"), "n_images": ("image", "nunique")}))
    return s.assign(classical=base, above_classical=s[metric] > base)


def first_above_classical(summary: pd.DataFrame) -> dict[str, int | None]:
    """Per network of a :func:`budget_summary` table, the smallest budget from which it stays above
    the classical baseline at every larger budget measured (``None``: not at the largest)."""
    out: dict[str, int | None] = {}
    for m, s in summary.sort_values("steps").groupby("model"):
        above = s["above_classical"].to_numpy(bool)
        steps = s["steps"].to_numpy()
        out[str(m)] = next((int(steps[i]) for i in range(len(steps)) if above[i:].all()), None)
    return out


# ----------------------------------------------------------------------------- scoring
def load_test_images(data_dir: str | Path, samples: Sequence[str]) -> list[Any]:
    """Held-out samples of a real-tissue cohort as annotated images: the cohort's H&E (as the
    pipeline sees it) with the real manual nuclei of ``truth/`` rasterised at its level 0."""
    import geopandas as gpd

    from stlib.io.annotations import AnnotatedImage
    from stlib.io.cohort import hest_dir
    from stlib.io.hest import HestSample
    from stlib.labels.masks import rasterize_instances

    out = []
    meta = {s["sample_id"]: s for s in read_json(Path(data_dir) / "cohort.json")["samples"]}
    for sid in samples:
        s = HestSample(hest_dir(data_dir), sid)
        with s.wsi() as w:
            img = w.read_level(0)
        t = gpd.read_parquet(Path(data_dir) / "truth" / sid / "nuclei.parquet")
        t = t[t["visible"].to_numpy(bool)]
        cls = t["class"].to_numpy().astype(np.uint8)
        inst, typ = rasterize_instances(t.geometry.values, shape=img.shape[:2], classes=cls,
                                        ids=t["source_id"].to_numpy() if "source_id" in t.columns else None)
        has = bool(meta.get(sid, {}).get("has_classes", True))
        out.append(AnnotatedImage(name=sid, image=img, inst=inst, type=typ if has else None,
                                  um_per_px=float(s.pixel_size_um), organ=s.organ,
                                  source=str(meta.get(sid, {}).get("source", "realtissue")),
                                  path=str(s.path("wsi"))))
    return out


def _classical(image: np.ndarray, um_per_px: float) -> np.ndarray:
    from stlib.model.baseline import classical_segmentation

    return classical_segmentation(image, um_per_px=um_per_px)


#: held-out scoring workers: one worker's peak memory (the models, one whole image, its network
#: outputs and maps; ~1 GiB measured on 1000 px images) plus headroom, to cap workers by memory
SCORE_WORKER_BYTES = 2 * 1024 ** 3


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - non-Linux
        return None
    return None  # pragma: no cover


def score_workers(n_images: int, device: str = "auto", workers: int | None = None) -> int:
    """Processes :func:`score_images` spreads the images over.

    ``workers`` given: that many (at most one per image). Default: 1 on a GPU (the network runs
    there; one process keeps it busy); on a CPU one single-thread process per usable core, at most
    one per image, and at most as many as the available memory holds at :data:`SCORE_WORKER_BYTES`
    each. No fixed cap at 2: the small network uses a second torch thread poorly, so separate
    single-thread processes scale with the cores until memory or the number of images stops them.
    """
    from stlib.utils import usable_cpus

    if workers is not None:
        return max(1, min(int(workers), max(1, n_images)))
    if resolve_device(device) != "cpu":
        return 1
    mem = _available_bytes()
    by_mem = usable_cpus() if mem is None else max(1, mem // SCORE_WORKER_BYTES)
    return max(1, min(usable_cpus(), n_images, by_mem))


class _Scorer:
    """Every method of :func:`score_images` ready to run on one image (model files read once)."""

    def __init__(self, methods: Mapping[str, Any], device: str, model_um_per_px: float | None,
                 postproc: Mapping[str, Any] | None, keep_predictions: bool) -> None:
        from stlib.infer import load_inference_model

        self.device, self.model_um_per_px, self.postproc = device, model_um_per_px, postproc
        self.keep = keep_predictions
        self.methods: dict[str, tuple[Any, bool]] = {}
        for name, m in methods.items():
            from_file = isinstance(m, (str, Path)) and not (isinstance(m, str) and m == "classical")
            if from_file:  # read the model file once, not once per image (the same weights and settings)
                m = load_inference_model(m, device=device)
            self.methods[name] = (m, from_file)

    def run(self, name: str, a: Any) -> np.ndarray:
        """Instance map of method ``name`` on annotated image ``a``."""
        from stlib.infer import infer_image

        m, from_file = self.methods[name]
        if isinstance(m, str) and m == "classical":
            return _classical(a.image, a.um_per_px)
        if callable(m) and not hasattr(m, "state_dict"):
            return m(a.image, a.um_per_px)
        # segmentation only: the scores need the instances, which do not depend on the NT branch
        res = infer_image(m, a.image, um_per_px=a.um_per_px, device=self.device, workers=0,
                          tissue_detection=False, classify=False,
                          model_um_per_px=None if from_file else self.model_um_per_px,
                          postproc_kwargs=None if from_file else self.postproc)
        return res.inst

    def score(self, name: str, a: Any) -> tuple[dict[str, Any], np.ndarray | None]:
        """The row of (method, image) and the prediction (when kept); an error names both."""
        from stlib.metrics import evaluate_pair

        try:
            inst = self.run(name, a)
            r = evaluate_pair(a.inst, inst, um_per_px=a.um_per_px)
        except InputError as e:
            raise InputError(f"scoring {name!r} on image {a.name!r}: {e}", path=getattr(a, "path", None) or None,
                             sample=a.name) from e
        except Exception as e:
            raise RuntimeError(f"image {a.name!r}: scoring {name!r} failed: {type(e).__name__}: {e}") from e
        row = {"model": name, "image": a.name, "organ": a.organ, "source": a.source, "n_true": a.n_nuclei,
               **{k: v for k, v in r.items() if np.isscalar(v)}}
        return row, (inst if self.keep else None)


_SCORER: _Scorer | None = None  # the worker process's scorer (set once per process by _score_init)


def _score_init(*args: Any) -> None:
    global _SCORER
    _SCORER = _Scorer(*args)


def _score_one(a: Any) -> list[tuple[dict[str, Any], np.ndarray | None]]:
    """All methods on one image, in a :func:`score_images` worker process."""
    assert _SCORER is not None, "_score_init did not run in this process"
    return [_SCORER.score(name, a) for name in _SCORER.methods]


def score_images(methods: Mapping[str, Any], images: Sequence[Any], *, device: str = "auto",
                 model_um_per_px: float | None = None, keep_predictions: bool = False,
                 postproc: Mapping[str, Any] | None = None, workers: int | None = None
                 ) -> tuple[pd.DataFrame, dict[str, list[np.ndarray]]]:
    """Score each method on each whole image against its manual instances.

    Parameters
    ----------
    methods
        name -> ``model.pt`` path or network module (run through :func:`stlib.infer.infer_image`,
        i.e. exactly as ``stlib infer`` runs it), or ``"classical"`` (Otsu + watershed at the
        image's own resolution), or a callable ``f(image, um_per_px) -> inst``.
    images
        :class:`~stlib.io.annotations.AnnotatedImage` list (the truth).
    model_um_per_px
        Resolution of network modules given as objects (paths carry their own).
    postproc
        Post-processing of network modules given as objects (model files carry their own,
        :func:`stlib.train.checkpoint.write_postproc`); default HoVer-Net's.
    workers
        Processes the images are spread over (:func:`stlib.utils.map_processes`, one torch thread
        each; every process reads each model file once and runs every method on its images);
        default :func:`score_workers` (on a CPU one per usable core, capped by the images and the
        memory; on a GPU 1). ``1`` = everything in this process. The results do not depend on it
        (the same rows in the same order, the same instance maps; tested). Methods that cannot be
        pickled (e.g. a lambda) are scored in this process.

    Returns
    -------
    (per_image, predictions): one row per (method, image) with ``model``, ``image``, ``organ``,
    ``source``, ``n_true`` and the metrics of :func:`stlib.metrics.evaluate_pair` (``dice``, ``aji``,
    ``pq``, ``bpq``, ``f_d``, ...); predictions per method when ``keep_predictions``.
    """
    import pickle

    images = list(images)
    n = score_workers(len(images), device, workers)
    args = (dict(methods), device, model_um_per_px, postproc, keep_predictions)
    if n > 1:
        try:
            pickle.dumps(args[0])
        except Exception as e:  # e.g. a lambda: run here, one process
            log.info("score_images: methods cannot be sent to worker processes (%s); scoring in this process", e)
            n = 1
    if n > 1:
        per_image = map_processes(_score_one, images, workers=n, threads=1, initializer=_score_init,
                                  initargs=args, desc=f"score {len(methods)} methods")
    else:
        scorer = _Scorer(*args)
        per_image = [[] for _ in images]
        for name in scorer.methods:  # method by method, as before (progress per method)
            for k, a in enumerate(progress(images, desc=f"score {name}")):
                per_image[k].append(scorer.score(name, a))
    rows, preds = [], {}
    for j, name in enumerate(methods):  # method-major order, whichever way the images were run
        for res in per_image:
            row, inst = res[j]
            rows.append(row)
            if keep_predictions:
                preds.setdefault(name, []).append(inst)
    return pd.DataFrame(rows), preds


def summary_tables(per_image: pd.DataFrame, *, metrics: Sequence[str] = ("bpq", "dice", "aji"),
                   pairs: Sequence[tuple[str, str]] = (), n_boot: int = 1000, seed: int = 0,
                   group: str = "organ") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Means with 95% bootstrap CIs over images (per group and pooled) and paired differences."""
    from stlib.evaluate import compare_models, summarize

    s = summarize(per_image, list(metrics), group=group, by="model", n_boot=n_boot, seed=seed)
    comps = [compare_models(per_image, list(metrics), model_a=a, model_b=b, group=group, n_boot=n_boot,
                            seed=seed).assign(comparison=f"{a} - {b}") for a, b in pairs]
    return s, (pd.concat(comps, ignore_index=True) if comps else pd.DataFrame())


def ratio_ci(a: Sequence[float], b: Sequence[float], strata: Sequence[Any] | None = None, *, n_boot: int = 2000,
             ci: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Ratio ``pooled(a) / pooled(b)`` of paired per-image values, with a paired bootstrap CI.

    ``pooled`` is the chapter's pooling rule (:func:`stlib.evaluate.pooled_mean`): the mean over
    the images of each stratum (set, e.g. MoNuSeg kidney / CoNSeP), then the mean over strata, so
    the ratio describes the same pooled values as the chapter's other numbers. The bootstrap
    resamples images (the independent unit) with replacement within each stratum, the same images
    for ``a`` and ``b`` (paired); strata are fixed. Without ``strata``: plain means over images.

    Returns
    -------
    ``(ratio, ci_low, ci_high)``; NaNs where a value of the pair is missing are dropped.
    """
    from stlib.evaluate import pooled_mean

    a, b = np.asarray(a, float), np.asarray(b, float)
    st = np.zeros(a.size, int) if strata is None else np.asarray(pd.factorize(pd.Series(list(strata)))[0])
    if not a.shape == b.shape == st.shape:
        raise ValueError(f"a, b and strata must have one value per image, got {a.shape}, {b.shape}, {st.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b, st = a[keep], b[keep], st[keep]
    den = pooled_mean(b, st) if a.size else 0.0
    if not a.size or den == 0:
        return float("nan"), float("nan"), float("nan")
    est = pooled_mean(a, st) / den
    rng = np.random.default_rng(seed)
    num_r, den_r = np.zeros(n_boot), np.zeros(n_boot)
    groups = np.unique(st)
    for g in groups:  # per stratum: images drawn with replacement (multinomial counts), paired for a and b
        ga, gb = a[st == g], b[st == g]
        w = rng.multinomial(ga.size, np.full(ga.size, 1.0 / ga.size), size=n_boot) / ga.size
        num_r += w @ ga / groups.size
        den_r += w @ gb / groups.size
    r = num_r / np.maximum(den_r, 1e-12)
    lo, hi = np.quantile(r, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(est), float(lo), float(hi)


# ----------------------------------------------------------------------------- classification
def to_resolution(ann: Any, um_per_px: float) -> Any:
    """An annotated image resampled to ``um_per_px`` (bilinear image, nearest labels)."""
    from dataclasses import replace

    from skimage.transform import resize

    s = float(ann.um_per_px) / float(um_per_px)
    if abs(s - 1) < 1e-3:
        return ann
    h, w = ann.shape
    shape = (max(1, int(round(h * s))), max(1, int(round(w * s))))
    img = resize(ann.image, shape, order=1, anti_aliasing=s < 1, preserve_range=True)
    inst = resize(ann.inst, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    typ = None if ann.type is None else resize(ann.type, shape, order=0, anti_aliasing=False,
                                               preserve_range=True).astype(np.uint8)
    return replace(ann, image=np.clip(np.rint(img), 0, 255).astype(np.uint8), inst=inst, type=typ,
                   um_per_px=float(um_per_px), notes=[*ann.notes, f"resampled to {um_per_px} µm/px"])


_FEATURE_MODEL: Any = None  # the network of a _features worker process (set once per process)


def _features_init(model: Any) -> None:
    global _FEATURE_MODEL
    _FEATURE_MODEL = model


def _features_one(item: tuple[np.ndarray, np.ndarray, str]) -> tuple[np.ndarray, np.ndarray]:
    """NP- and NT-branch features of one image, from one forward pass (NP channels first)."""
    from stlib.evaluate import nucleus_features

    img, inst, device = item
    return nucleus_features(_FEATURE_MODEL, img[None], [inst], device=device, branch=("np", "nt"))[0]


def _features(model: Any, images: Sequence[np.ndarray], insts: Sequence[np.ndarray], device: str,
              workers: int | None = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Frozen per-nucleus features: NP- and NT-branch features of the network, averaged per nucleus.

    One forward pass per image gives both branches (the same values as one pass per branch).
    ``workers`` > 1 (``None``: :func:`score_workers`) spreads the images over single-thread
    processes (the network sent once to each), in order; see :func:`classification_experiment`
    for why the default is this process.
    """
    items = [(img, inst, device) for img, inst in zip(images, insts)]
    n = 1 if workers == 1 else score_workers(len(items), device, workers)
    try:
        return map_processes(_features_one, items, workers=n, threads=1,
                             initializer=_features_init, initargs=(model,))
    finally:
        _features_init(None)  # this process's reference, when it ran the images itself


def _majority(inst: np.ndarray, typ: np.ndarray, ids: np.ndarray) -> np.ndarray:
    from stlib.metrics import instance_types

    tid, tt = instance_types(inst, typ)
    lut = dict(zip(np.asarray(tid).tolist(), np.asarray(tt).tolist()))
    return np.array([lut.get(int(i), 0) for i in ids], np.int64)


def classification_experiment(model: Any, train_images: Sequence[Any], test_images: Sequence[Any],
                              label_sets: Mapping[str, Sequence[np.ndarray]], *, device: str = "auto",
                              seed: int = 0, workers: int | None = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Label sets compared with a classification head on frozen features (CoNSeP protocol).

    Parameters
    ----------
    model
        The (segmentation) network whose frozen features describe each nucleus.
    train_images, test_images
        Annotated images at the model's resolution (:func:`to_resolution`); features are pooled
        over the *manual* nuclei of the training images, so every label set sees the same nuclei.
    label_sets
        name -> one class map per training image (stlib ids; 255 = not used for training). Each set
        trains its own multinomial logistic regression, in the merged space it is scored in.
    workers
        Processes of the feature pass (``None``: :func:`score_workers`). Default 1, this process
        with its torch threads: worker processes run one torch thread each, which moves the last
        float bits of the features (~3e-7, as another core count does), and the logistic heads
        turn that into a few other predicted nuclei (chapter 07, 8 CoNSeP test images: the
        accuracy of 3 moved by 0.001-0.003). Worth it only where such a shift does not matter.

    Returns
    -------
    (per_image, confusion): per (label set, test image) the accuracy and macro F1 over the test
    image's typed nuclei, in the merged space Inflammatory / Connective / Epithelial (neoplastic or
    not) (:func:`stlib.constants.merge_epithelial`), with the number of nuclei; and the pooled
    confusion counts (truth x prediction) per label set.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    feats = _features(model, [a.image for a in [*train_images, *test_images]],
                      [a.inst for a in [*train_images, *test_images]], device, workers)
    tr, te = feats[:len(train_images)], feats[len(train_images):]
    X = np.concatenate([f for _, f in tr])
    Xt = np.concatenate([f for _, f in te])
    y_true = np.concatenate([merge_epithelial(_majority(a.inst, a.type, ids)) for a, (ids, _) in zip(test_images, te)])
    img_of = np.concatenate([np.full(len(ids), k) for k, (ids, _) in enumerate(te)])
    rows, conf = [], []
    for name, maps in label_sets.items():
        if len(maps) != len(train_images):
            raise ValueError(f"label set {name!r} has {len(maps)} maps for {len(train_images)} images")
        # every label set is learnt in the space it is scored in: Neoplastic, Epithelial and
        # "epithelial, neoplastic or not" are one class (Epithelial)
        y = merge_epithelial(np.concatenate([_majority(a.inst, m, ids) for a, m, (ids, _) in zip(train_images, maps, tr)]))
        keep = (y > 0) & ~np.isin(y, UNKNOWN_CLASSES)
        if len(np.unique(y[keep])) < 2:
            raise InputError(f"label set {name!r} has fewer than two classes on the training nuclei")
        scaler = StandardScaler().fit(X[keep])
        clf = LogisticRegression(max_iter=3000, class_weight="balanced", random_state=seed)
        clf.fit(scaler.transform(X[keep]), y[keep])
        pred = merge_epithelial(clf.predict(scaler.transform(Xt)).astype(np.int64))
        scored = np.isin(y_true, MERGED_CLASSES)
        for k, a in enumerate(test_images):
            m = scored & (img_of == k)
            t, p = y_true[m], pred[m]
            f1s = []
            for c in MERGED_CLASSES:
                tp, fp, fn = np.sum((t == c) & (p == c)), np.sum((t != c) & (p == c)), np.sum((t == c) & (p != c))
                if tp + fp + fn:
                    f1s.append(2 * tp / (2 * tp + fp + fn))
            rows.append({"labels": name, "image": a.name, "organ": a.organ, "n_nuclei": int(m.sum()),
                         "accuracy": float(np.mean(t == p)) if m.any() else float("nan"),
                         "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
                         "n_train_nuclei": int(keep.sum())})
        cm = pd.crosstab(pd.Categorical(y_true[scored], categories=MERGED_CLASSES),
                         pd.Categorical(pred[scored], categories=sorted({*MERGED_CLASSES, *np.unique(pred).tolist()})),
                         dropna=False)
        conf.append(cm.assign(labels=name))
    return pd.DataFrame(rows), pd.concat(conf)


def derived_class_maps(run_dir: str | Path, data_dir: str | Path, sample: str, ann: Any) -> np.ndarray:
    """Expression-derived classes of a sample painted onto its *manual* nuclei.

    Each real nucleus carries the cell id of its simulated Xenium cell (``truth/{sample}``:
    ``source_id`` -> ``cell_id``); the class the labels stage derived for that cell
    (``labels/{sample}/cells.parquet``) becomes the nucleus's class; nuclei without a Xenium cell
    or without a derived class are 255.
    """
    import geopandas as gpd

    t = gpd.read_parquet(Path(data_dir) / "truth" / sample / "nuclei.parquet")
    t = t[t["visible"].to_numpy(bool)]
    cells = pd.read_parquet(RunLayout(run_dir).cells_parquet(sample))
    cls = dict(zip(cells["cell_id"].astype(str), cells["class"].astype(int)))
    lut = np.full(int(ann.inst.max(initial=0)) + 1, IGNORE, np.uint8)
    for sid, cid in zip(t["source_id"].to_numpy(), t["cell_id"].astype(str)):
        if 0 < sid < lut.size:
            lut[sid] = cls.get(cid, IGNORE)
    out = lut[ann.inst]
    out[ann.inst == 0] = 0
    return out


def classification_sets(run_dir: str | Path, data_dir: str | Path, images: Mapping[str, Any],
                        train_ids: Sequence[str], test_ids: Sequence[str], um_per_px: float
                        ) -> tuple[list[Any], list[Any], dict[str, list[np.ndarray]]]:
    """Training and test images at ``um_per_px`` and the two label sets of the training nuclei.

    ``images``: sample id -> annotated image (with real classes). Label sets: the
    expression-derived classes (:func:`derived_class_maps`) and the real types, both on the same
    manual nuclei.
    """
    from dataclasses import replace

    train = [to_resolution(images[s], um_per_px) for s in train_ids]
    test = [to_resolution(images[s], um_per_px) for s in test_ids]
    derived = [to_resolution(replace(images[s], type=derived_class_maps(run_dir, data_dir, s, images[s])),
                             um_per_px).type for s in train_ids]
    return train, test, {"expression-derived classes (ST)": derived,
                         "real CoNSeP types": [merge_epithelial(a.type) for a in train]}


def natural_sorted(names: Sequence[str]) -> list[str]:
    """Names sorted with their numbers as numbers (``train_2`` before ``train_10``)."""
    import re

    return sorted(names, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])


# ----------------------------------------------------------------------------- the user's check
def held_out_check(models: Mapping[str, str | Path], images: Sequence[Any], out_dir: str | Path, *,
                   classical: bool = True, device: str = "cpu") -> pd.DataFrame:
    """The acceptance check exactly as a user runs it: ``stlib infer`` + ``stlib metrics``.

    Writes each image as ``out_dir/truth/NAME.png`` with its manual ``NAME.npz``, runs
    ``stlib infer --model M --input NAME.png --um-per-px U`` into ``out_dir/pred_{model}/`` and
    ``stlib metrics --true truth --pred pred_{model}``; the classical baseline's maps are written
    beside them and scored by the same command. Returns one row per (model, image) with the
    metrics of the JSON (``pq`` there is the binary PQ of the whole image = bPQ).
    """
    from stlib.infer import cli_main as infer_cli
    from stlib.io.annotations import write_instance_folder
    from stlib.metrics import cli_main as metrics_cli

    out = Path(out_dir)
    truth = write_instance_folder(images, out / "truth")
    runs = {k: str(v) for k, v in models.items()}
    if classical:
        runs["classical"] = "classical"
    rows = []
    for name, model in runs.items():
        pred = out / f"pred_{name}"
        pred.mkdir(parents=True, exist_ok=True)
        for a in images:
            if model == "classical":
                with atomic_path(pred / f"{a.name}.npz") as tmp:
                    with open(tmp, "wb") as fh:
                        np.savez_compressed(fh, inst=_classical(a.image, a.um_per_px))
            else:
                infer_cli(["--model", model, "--input", str(truth / f"{a.name}.png"), "--out", str(pred),
                           "--um-per-px", str(a.um_per_px), "--device", device, "--workers", "0",
                           "--no-tissue-detection"])
        um = float(np.median([a.um_per_px for a in images]))
        metrics_cli(["--true", str(truth), "--pred", str(pred), "--json", str(out / f"metrics_{name}.json"),
                     "--um-per-px", f"{um}"])
        doc = read_json(out / f"metrics_{name}.json")
        for img, rec in doc["per_image"].items():
            organ = next((a.organ for a in images if a.name == img), None)
            rows.append({"model": name, "image": img, "organ": organ, **{k: v for k, v in rec.items()
                                                                          if not isinstance(v, (dict, list))}})
    return pd.DataFrame(rows)


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)``."""
    t0 = time.perf_counter()
    r = fn(*args, **kwargs)
    return r, time.perf_counter() - t0


# ----------------------------------------------------------------------------- command line
def budget_main(argv: Sequence[str] | None = None) -> int:
    """``python -m stlib.realtissue budget``: the development budget curve into a CSV.

    Builds (or reuses) the real-tissue cohort of ``--source`` in ``--data-dir``, trains on the
    images of ``--train-organs``, scores on those of ``--dev-organs`` (never the chapter's
    held-out organs: refused) and writes :func:`budget_curve`'s table to ``--out``.
    """
    import argparse

    from stlib.demo.realtissue import load_source_images, make_realtissue_cohort, source_sample_id

    ap = argparse.ArgumentParser(prog="python -m stlib.realtissue budget", description=budget_main.__doc__)
    ap.add_argument("--source", default=_RT.source)
    ap.add_argument("--data-dir", default="data/realtissue-dev")
    ap.add_argument("--run-dir", default="runs/realtissue-dev")
    ap.add_argument("--train-organs", nargs="+", default=["Breast", "Lung"])
    ap.add_argument("--dev-organs", nargs="+", default=["Prostate"])
    ap.add_argument("--budgets", nargs="+", type=int, default=[150, 300, 500, 750, 1000])
    ap.add_argument("--batch-size", type=int, default=_RT.batch_size)
    ap.add_argument("--crop-px", type=int, default=_RT.crop_px)
    ap.add_argument("--lr", type=float, default=_RT.lr)
    ap.add_argument("--warmup-steps", type=int, default=_RT.warmup_steps)
    ap.add_argument("--np-thresh", type=float, default=_RT.np_thresh)
    ap.add_argument("--marker-thresh", type=float, default=_RT.marker_thresh)
    ap.add_argument("--min-size", type=int, default=_RT.min_size)
    ap.add_argument("--postproc-mode", choices=["hv", "distance", "blend", "peaks"], default=_RT.postproc_mode)
    ap.add_argument("--marker-h", type=float, default=_RT.marker_h)
    ap.add_argument("--hv-weight", type=float, default=_RT.hv_weight)
    ap.add_argument("--um-per-px", type=float, default=_RT.um_per_px)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/realtissue_budget.csv")
    ap.add_argument("--unmatched-ignore", action=argparse.BooleanOptionalAction, default=None,
                    help="H&E nuclei without an ST nucleus: ignore (RefineConfig.unmatched_ignore; default: its default)")
    a = ap.parse_args(list(argv) if argv is not None else None)
    held = set(_RT.heldout_organs)
    if held & set(a.dev_organs) or held & set(a.train_organs):
        raise InputError(f"the chapter's held-out organs {sorted(held)} are test organs, never development data",
                         fix="choose train and dev organs among the training organs")
    imgs = [x for x in load_source_images(a.source) if x.organ in set(a.train_organs) | set(a.dev_organs)]
    make_realtissue_cohort(a.data_dir, imgs, seed=a.seed, heldout_organs=tuple(a.dev_organs), pannuke=None)
    sid = {x.name: source_sample_id(x.source, x.name) for x in imgs}
    train = natural_sorted([sid[x.name] for x in imgs if x.organ in a.train_organs])
    dev = natural_sorted([sid[x.name] for x in imgs if x.organ in a.dev_organs])
    recipe = RecipeConfig(batch_size=a.batch_size, crop_px=a.crop_px, lr=a.lr, warmup_steps=a.warmup_steps,
                          np_thresh=a.np_thresh, marker_thresh=a.marker_thresh, min_size=a.min_size,
                          postproc_mode=a.postproc_mode, marker_h=a.marker_h, hv_weight=a.hv_weight,
                          seed=a.seed, device="cpu")
    from stlib.config import RefineConfig

    refinement = None if a.unmatched_ignore is None else RefineConfig(unmatched_ignore=a.unmatched_ignore)
    curve = budget_curve(a.data_dir, a.run_dir, train, dev, budgets=a.budgets, recipe=recipe, um_per_px=a.um_per_px,
                         seed=a.seed, out=a.out, refinement=refinement)
    print(budget_summary(curve).to_string(index=False))
    return 0


def label_quality(st_store: str | Path, truth_store: str | Path, *, classical: bool = True,
                  refinements: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The ST-derived training masks scored as if they were a prediction, against the manual ones.

    ``st_store`` and ``truth_store`` are the two stores of :func:`build_stores` (the same tiles).
    Per tile, the ST nuclei (``ignore`` pixels of the ST map count as neither nucleus nor
    background) are scored against the manual nuclei (the truth's own ``ignore`` pixels removed
    from both) with :func:`stlib.metrics.segmentation_errors`; with ``classical`` the classical
    Otsu + watershed on the same tile is scored the same way. Counts are summed per image (a
    nucleus cut by a tile border counts once per tile) and summarised with
    :func:`stlib.metrics.error_summary`: bPQ, DQ, SQ, Dice, each error kind and the bPQ it costs.
    This says whether a network trained on the ST masks can beat Otsu + watershed at all, and
    which label error dominates.

    ``refinements`` (name -> :class:`stlib.config.RefineConfig`) needs an *unrefined* ST store
    (``build_stores(..., refine_masks=False)``): each tile's ST maps are then also refined with
    each config (:func:`stlib.labels.refine.refine_label_maps`) and scored as method
    ``"ST refined: {name}"``, so refinement settings can be compared without training.

    Returns
    -------
    One row per (``method``, ``sample``) plus one per method for all images pooled
    (``sample == "all"``), with ``organ``, ``n_tiles`` and ``ignored_px_share`` (the share of tile
    pixels ``ignore`` in the method's map).
    """
    from stlib.io.tiles import TileStore
    from stlib.metrics import ERROR_FIELDS, error_summary, segmentation_errors

    from stlib.labels.refine import refine_label_maps

    st, tr = TileStore(st_store), TileStore(truth_store)
    if not np.array_equal(st.meta[["sample", "x0", "y0"]].to_numpy(), tr.meta[["sample", "x0", "y0"]].to_numpy()):
        raise InputError("the ST and truth stores hold different tiles", path=tr.path, fix="build them together")
    if refinements and st.info.get("refinement") is not None:
        raise InputError("the ST store is already refined", path=st.path, fix="build it with refine_masks=False")
    um = float(st.um_per_px)
    sums: dict[tuple[str, str], dict[str, float]] = {}
    organ = dict(zip(st.meta["sample"].astype(str), st.meta["organ"].astype(str)))
    for i in progress(range(len(st)), desc="label quality"):
        a, b = st[i], tr[i]
        keep = np.asarray(b["ignore"]) == 0
        truth = np.where(keep, b["inst"], 0)
        preds = {"ST-derived masks": (np.where(keep, a["inst"], 0), (np.asarray(a["ignore"]) > 0) & keep)}
        if classical:
            preds["classical (Otsu + watershed)"] = (np.where(keep, _classical(np.asarray(a["image"]), um), 0), None)
        for rname, cfg in (refinements or {}).items():
            ri, _, rig, _, _ = refine_label_maps(a["image"], a["inst"], a["type"], a["ignore"], a["conf"], um_per_px=um,
                                                 config=cfg)
            preds[f"ST refined: {rname}"] = (np.where(keep, ri, 0), (np.asarray(rig) > 0) & keep)
        for name, (inst, ign) in preds.items():
            acc = sums.setdefault((name, str(st.meta["sample"][i])), {k: 0.0 for k in (*ERROR_FIELDS, "n_tiles",
                                                                                       "ignored_px", "px")})
            for k, v in segmentation_errors(truth, inst, pred_ignore=ign).items():
                acc[k] += v
            acc["n_tiles"] += 1
            acc["ignored_px"] += 0 if ign is None else int(ign.sum())
            acc["px"] += truth.size
    rows = []
    for method in dict.fromkeys(m for m, _ in sums):
        per = {s: c for (m, s), c in sums.items() if m == method}
        pooled = {k: sum(c[k] for c in per.values()) for k in next(iter(per.values()))}
        for s, c in [*sorted(per.items()), ("all", pooled)]:
            rows.append({"method": method, "sample": s, "organ": organ.get(s, ", ".join(sorted(set(organ.values())))),
                         "n_tiles": int(c["n_tiles"]), "ignored_px_share": c["ignored_px"] / max(c["px"], 1),
                         **error_summary(c)})
    return pd.DataFrame(rows)


def labels_main(argv: Sequence[str] | None = None) -> int:
    """``python -m stlib.realtissue labels``: how good the ST-derived training masks are.

    Builds (or reuses) the development cohort of ``--source`` (``--train-organs``; the chapter's
    held-out organs are refused), its ST labels and refined tile stores as :func:`budget_curve`
    does, and writes :func:`label_quality`'s table (ST masks and Otsu + watershed against the
    manual masks of the same training tiles) to ``--out`` (CSV) and a JSON beside it with the
    command and the machine.
    """
    import argparse
    import datetime as _dt
    import sys

    from stlib.demo.realtissue import load_source_images, make_realtissue_cohort, source_sample_id
    from stlib.io.cohort import cohort_table

    ap = argparse.ArgumentParser(prog="python -m stlib.realtissue labels", description=labels_main.__doc__)
    ap.add_argument("--source", default=_RT.source)
    ap.add_argument("--data-dir", default="data/realtissue-dev")
    ap.add_argument("--run-dir", default="runs/realtissue-dev")
    ap.add_argument("--train-organs", nargs="+", default=["Breast", "Lung"])
    ap.add_argument("--dev-organs", nargs="+", default=["Prostate"], help="cohort roles only; not scored here")
    ap.add_argument("--um-per-px", type=float, default=_RT.um_per_px)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/realtissue_label_quality.csv")
    ap.add_argument("--sweep", action="store_true",
                    help="also score refinement settings (RefineConfig variants) on unrefined stores built in "
                         "RUN_DIR-raw; their rows go to OUT with the suffix _sweep.csv")
    a = ap.parse_args(list(argv) if argv is not None else None)
    held = set(_RT.heldout_organs)
    if held & (set(a.train_organs) | set(a.dev_organs)):
        raise InputError(f"the chapter's held-out organs {sorted(held)} are test organs, never development data",
                         fix="choose organs among the training organs")
    imgs = [x for x in load_source_images(a.source) if x.organ in set(a.train_organs) | set(a.dev_organs)]
    make_realtissue_cohort(a.data_dir, imgs, seed=a.seed, heldout_organs=tuple(a.dev_organs), pannuke=None)
    train = natural_sorted([source_sample_id(x.source, x.name) for x in imgs if x.organ in a.train_organs])
    table = cohort_table(a.data_dir)
    table = table[table["sample"].isin(train)].assign(role="train")
    st_labels(a.data_dir, a.run_dir, train, seed=a.seed)
    paths = build_stores(a.data_dir, a.run_dir, table, um_per_px=a.um_per_px, seed=a.seed)
    t0 = time.process_time()
    q = label_quality(paths["st"], paths["truth"])
    out = Path(a.out)
    with atomic_path(out) as tmp:
        q.to_csv(tmp, index=False)
    from stlib.utils import machine_info

    write_json(out.with_suffix(".json"), {
        "command": "python -m stlib.realtissue labels " + " ".join(sys.argv[2:] if argv is None else argv),
        "data": f"{source_label()}; training images of {', '.join(a.train_organs)} (development split)",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "cpu_s": round(time.process_time() - t0, 1),
        "machine": machine_info(), "pooled": q[q["sample"] == "all"].to_dict(orient="records")})
    cols = ["method", "bpq", "dq", "sq", "dice", "fn_missed", "fn_ignored", "fn_merged", "fn_split", "fn_outline",
            "fp_extra", "fp_split", "fp_merged", "fp_outline", "matched_area_ratio"]
    print(q[q["sample"] == "all"][cols].round(3).to_string(index=False))
    if a.sweep:
        raw = f"{a.run_dir}-raw"
        st_labels(a.data_dir, raw, train, seed=a.seed)
        rp = build_stores(a.data_dir, raw, table, um_per_px=a.um_per_px, seed=a.seed, refine_masks=False)
        sw = label_quality(rp["st"], rp["truth"], classical=False, refinements=_refine_grid())
        with atomic_path(out.with_name(out.stem + "_sweep.csv")) as tmp:
            sw.to_csv(tmp, index=False)
        print(sw[sw["sample"] == "all"][cols].round(3).to_string(index=False))
    return 0


def _refine_grid() -> dict[str, Any]:
    """The refinement settings ``labels --sweep`` scores: the default and one knob changed at a time."""
    from stlib.config import RefineConfig

    grid = {"default": RefineConfig()}
    for k, vals in {"edge_fraction": (0.35, 0.4, 0.6), "grow_um": (1.0, 2.5), "smooth_um": (0.25, 1.0),
                    "core_um": (0.5,), "min_rel_contrast": (0.0, 0.1), "unmatched_ignore": (True,)}.items():
        for v in vals:
            grid[f"{k}={v}"] = RefineConfig(**{k: v})
    return grid


def image_sets(per_image: pd.DataFrame) -> np.ndarray:
    """The chapter's sets of a per-image table: ``CoNSeP colon`` or ``{organ} (MoNuSeg)``."""
    return np.where(per_image["source"] == "consep", "CoNSeP colon", per_image["organ"] + " (MoNuSeg)")


def heldout_main(argv: Sequence[str] | None = None) -> int:
    """``python -m stlib.realtissue heldout``: score a pair of networks on the held-out images.

    Runs ``MODELS/st/model.pt``, ``MODELS/manual/model.pt`` (as ``stlib infer`` does) and the
    classical Otsu + watershed on every image of the chapter's held-out organs of ``--source``
    and writes one row per (method, image) to ``--out`` (CSV). Meant to be run once, for a recipe
    chosen on development data (:func:`budget_curve`).
    """
    import argparse

    from stlib.demo.realtissue import load_source_images

    ap = argparse.ArgumentParser(prog="python -m stlib.realtissue heldout", description=heldout_main.__doc__)
    ap.add_argument("--source", default=_RT.source)
    ap.add_argument("--models", required=True, help="folder holding st/model.pt and manual/model.pt")
    ap.add_argument("--heldout-organs", nargs="+", default=list(_RT.heldout_organs))
    ap.add_argument("--out", required=True)
    a = ap.parse_args(list(argv) if argv is not None else None)
    models = {"ST-trained": Path(a.models) / "st" / "model.pt", "manual-trained": Path(a.models) / "manual" / "model.pt"}
    for p in models.values():
        if not p.is_file():
            raise InputError("model file not found", path=p, fix="train the pair first (python -m stlib.realtissue budget)")
    tests = [x for x in load_source_images(a.source) if x.organ in set(a.heldout_organs)]
    t0 = time.perf_counter()
    per, _ = score_images({**models, "classical (Otsu + watershed)": "classical"}, tests, device="cpu")
    per = per.assign(set=image_sets(per), models=str(a.models), score_wall_s=round(time.perf_counter() - t0, 1))
    with atomic_path(Path(a.out)) as tmp:
        per.to_csv(tmp, index=False)
    print(per.groupby(["set", "model"])["bpq"].mean().round(3).to_string())
    return 0


# ----------------------------------------------------------------------------- the release pair
#: the two networks of a release folder (``{net}.pt``) and its provenance file
RELEASE_NETS: tuple[str, ...] = ("st", "manual")
RELEASE_JSON = "release.json"
#: fields of :class:`RecipeConfig` that may differ between a release and the chapter: the release's own
#: budget, and where it ran (everything else, the seed included, must be the chapter's)
RELEASE_FREE_FIELDS: tuple[str, ...] = ("steps", "device")
#: model-file config keys that must match the recipe a release is packed as (see :func:`pack_release`)
_MODEL_RECIPE_KEYS = ("steps", "batch_size", "crop_px", "lr", "encoder", "aug_hed", "aug_scale", "warmup_steps",
                      "stain_norm", "channels_last_cpu", "seed")


def recipe_of(p: Any) -> RecipeConfig:
    """The chapter's :class:`RecipeConfig` from its parameters (:class:`stlib.config.RealTissueParams`
    or a mapping of the same fields): the one place notebook, release packing and loading build it."""
    get = (lambda k: p[k]) if isinstance(p, Mapping) else (lambda k: getattr(p, k))
    keys = ("steps", "batch_size", "crop_px", "lr", "encoder", "warmup_steps", "np_thresh", "marker_thresh",
            "min_size", "postproc_mode", "marker_h", "hv_weight", "marker_dist", "stain_norm", "channels_last_cpu",
            "seed", "device")
    return RecipeConfig(**{k: get(k) for k in keys})


def recipe_dict(recipe: RecipeConfig) -> dict[str, Any]:
    """A recipe as plain JSON-able values (``extra`` objects by their ``to_dict``)."""
    from dataclasses import asdict

    d = asdict(recipe)
    d["extra"] = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in recipe.extra.items()}
    return d


def recipe_differences(recorded: Mapping[str, Any], recipe: RecipeConfig,
                       free: Sequence[str] = RELEASE_FREE_FIELDS) -> dict[str, tuple[Any, Any]]:
    """``{field: (recorded, wanted)}`` where a recorded recipe (``release.json``) is not ``recipe``,
    ignoring ``free`` fields; floats compare with a relative tolerance of 1e-9."""
    want = recipe_dict(recipe)
    out = {}
    for k in sorted(set(want) | set(recorded)):
        if k in free:
            continue
        a, b = recorded.get(k), want.get(k)
        same = (math.isclose(float(a), float(b), rel_tol=1e-9)
                if isinstance(a, (int, float)) and isinstance(b, (int, float))
                and not isinstance(a, bool) and not isinstance(b, bool) else a == b)
        if not same:
            out[k] = (a, b)
    return out


def _sha256(path: str | Path) -> str:
    from stlib.io.download import sha256_file

    return sha256_file(path)


def _model_doc(path: Path) -> dict[str, Any]:
    import torch

    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise InputError(f"cannot read the model file ({e})", path=path,
                         fix="restore it (git checkout) or rebuild the release: make realtissue-models") from e
    if not isinstance(doc, Mapping) or "state_dict" not in doc or "config" not in doc:
        raise InputError("not an stlib model file (needs 'config' and 'state_dict')", path=path)
    return dict(doc)


def _cast_state(doc: dict[str, Any], dtype: str) -> dict[str, Any]:
    """``doc`` with every floating tensor of its ``state_dict`` stored as ``dtype`` (integers kept)."""
    import torch

    dt = {"float32": torch.float32, "float16": torch.float16}[dtype]
    sd = {k: (v.to(dt) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in doc["state_dict"].items()}
    return {**doc, "state_dict": sd}


def source_files(source: str | Path, names: Sequence[str]) -> dict[str, Path]:
    """The files of a source folder that belong to the named images (file name = the image's name
    plus suffixes, e.g. ``images/NAME.tif`` and ``annotations/NAME.xml.gz``; CoNSeP patches
    ``NAME_000.jpg`` ...), as ``{path relative to the source: path}``, in name order."""
    from stlib.demo.realtissue import resolve_source

    root = resolve_source(source)
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        stem = f.name.split(".")[0]
        if any(stem == n or (stem.startswith(n + "_") and stem[len(n) + 1:].isdigit()) for n in names):
            out[f.relative_to(root).as_posix()] = f
    return out


@dataclass
class Release:
    """A release folder as :func:`load_release` found it.

    ``ok`` False means the chapter must skip its release section; ``reason`` says why in words.
    ``models``: net (``st``, ``manual``) -> its file in the folder; ``doc``: ``release.json``.
    """

    path: Path
    ok: bool
    reason: str = ""
    doc: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Path] = field(default_factory=dict)

    @property
    def steps(self) -> int | None:
        """Training steps of the pair (``None`` when the folder could not be read)."""
        s = self.doc.get("recipe", {}).get("steps")
        return None if s is None else int(s)

    @property
    def postproc(self) -> dict[str, Any]:
        """The post-processing stored in the pair's model files (what ``stlib infer`` applies to them)."""
        return dict(self.doc.get("postproc") or {})

    @property
    def postproc_choice(self) -> dict[str, Any] | None:
        """How that post-processing was chosen for the release budget (:func:`set_release_postproc`), or
        None when it is the training recipe's own."""
        return self.doc.get("postproc_choice")


def pack_release(models_dir: str | Path, out_dir: str | Path, *, recipe: RecipeConfig, command: str,
                 commit: str, source: str | Path, train_images: Sequence[str], training: Mapping[str, Any],
                 train_organs: Sequence[str] = (), dtype: str = "float32", notes: Sequence[str] = ()) -> Path:
    """Pack a trained pair (``models_dir/{st,manual}/model.pt``) into a release folder with provenance.

    Writes ``out_dir/{st,manual}.pt`` (the model files, floating weights stored as ``dtype``;
    :func:`install_release` loads them back as float32 model files), ``release.json`` and a
    ``README.md`` with the licence terms (the weights were trained on CC BY-NC-SA images: they are
    under the same non-commercial terms). The folder is replaced atomically.

    Parameters
    ----------
    models_dir
        Folder of the two trained runs (``st/model.pt``, ``manual/model.pt``, as :func:`train_pair` writes).
    recipe
        The recipe they were trained with; checked against each model file's training config and
        post-processing (a pair of another recipe is refused).
    command, commit
        The exact command that trained them and the git commit of the code it ran.
    source, train_images, train_organs
        The real-image source folder and the names (and organs) of the images that trained them:
        their files' sha256 go into ``release.json``.
    training
        Measurements of the training run (e.g. ``cpu_s``, ``wall_s``, ``loadavg``); ``machine``
        defaults to :func:`stlib.utils.machine_info` of this machine.
    dtype
        ``"float32"`` or ``"float16"`` storage of the weights.

    Returns
    -------
    ``out_dir``.

    Raises
    ------
    InputError
        A model file is missing or unreadable, or was trained with another recipe than ``recipe``.
    """
    import datetime as _dt

    import torch

    from stlib.utils import atomic_dir, machine_info

    if dtype not in ("float32", "float16"):
        raise InputError(f"dtype must be float32 or float16, got {dtype!r}")
    models_dir = Path(models_dir)
    want_pp = postproc_of(recipe)
    docs = {}
    for net in RELEASE_NETS:
        path = models_dir / net / "model.pt"
        if not path.is_file():
            raise InputError("model file not found", path=path, fix="train the pair first (make realtissue-models)")
        doc = _model_doc(path)
        cfg = doc["config"]
        bad = {k: (cfg.get(k), getattr(recipe, k)) for k in _MODEL_RECIPE_KEYS
               if not (cfg.get(k) == getattr(recipe, k) or (isinstance(cfg.get(k), float)
                                                            and math.isclose(cfg.get(k), getattr(recipe, k))))}
        if dict(doc.get("postproc") or {}) != want_pp:
            bad["postproc"] = (doc.get("postproc"), want_pp)
        if bad:
            raise InputError(f"the model was trained with another recipe than the one given: {bad} (file, given)",
                             path=path, fix="pack it with the recipe it was trained with")
        docs[net] = doc
    files = source_files(source, train_images)
    missing = [n for n in train_images if not any(Path(k).name.split(".")[0].startswith(n) for k in files)]
    if missing:
        raise InputError(f"no files of the training images {missing} in the source", path=Path(str(source)),
                         fix="give the source folder the pair was trained from")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        sums = {}
        for net, doc in docs.items():
            with atomic_path(tmp / f"{net}.pt") as t:
                torch.save(_cast_state(doc, dtype), t)
            sums[f"{net}.pt"] = _sha256(tmp / f"{net}.pt")
        train_meta = {"cpu_s": None, "wall_s": None, **dict(training)}
        if "machine" not in train_meta:  # packing runs where the pair was trained, right after it
            train_meta["machine"] = machine_info()
            train_meta["machine_note"] = "this machine when the pair was packed (its load average: at packing time)"
        rel = {
            "format": 1,
            "what": "the real-tissue chapter's pair of networks (ST-derived masks / manual masks), trained for "
                    f"{recipe.steps} steps with the chapter's recipe; notebooks/07_real_tissue.ipynb installs and "
                    "scores them",
            "command": command, "commit": commit, "recipe": recipe_dict(recipe), "postproc": want_pp,
            "dtype": dtype, "files": sums, "training": train_meta,
            "train_images": {"source": Path(str(source)).as_posix(), "names": list(train_images),
                             "organs": sorted(set(train_organs)),
                             "files": {k: _sha256(v) for k, v in files.items()}},
            "licence": "CC BY-NC-SA 4.0 (non-commercial, share-alike): weights trained on MoNuSeg images "
                       "(Kumar et al., IEEE TMI 2017 and 2020); see README.md",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "notes": list(notes),
        }
        write_json(tmp / RELEASE_JSON, rel)
        (tmp / "README.md").write_text(_release_readme(rel))
        tmp.chmod(0o755)  # a folder of the repository, not a private temporary one
    return out_dir


def _release_readme(rel: Mapping[str, Any]) -> str:
    r = rel["recipe"]
    t = rel["training"]
    cpu = f"{t['cpu_s']:.0f} CPU s" if t.get("cpu_s") else "CPU time not recorded"
    return f"""# Release pair of the real-tissue chapter (weights: CC BY-NC-SA 4.0, NOT under the MIT licence)

Two HoVer-Net-style networks ({r['encoder']} encoder) of `notebooks/07_real_tissue.ipynb`, the same recipe
and seed, trained for {r['steps']} steps on the same tiles of {len(rel['train_images']['names'])} real
MoNuSeg images ({', '.join(rel['train_images']['names'])}):

* `st.pt`: trained on the ST-derived masks (simulated Xenium nuclei, aligned and snapped by the study's pipeline);
* `manual.pt`: trained on the manual masks of the same tiles.

`make book` checks their sha256 and recipe, installs them as `runs/realtissue/models/{{st,manual}}/model.pt`
(float32 model files that `stlib infer` reads) and scores them on the chapter's held-out images.
`release.json` holds the provenance: the exact command, the git commit of the code, the recipe, the
training time ({cpu}, on the machine recorded there), the sha256 of every file and of every training
image file, the date.

{_release_postproc_text(rel)}
Reproduce: `make realtissue-models` (a clean clone; the whole chapter run with the release's steps, about half
an hour of CPU for 1500 steps, minutes on a GPU).

## Licence and attribution

The weights were trained on images and manual outlines of MoNuSeg (Kumar N. et al., *IEEE TMI* 36(7),
2017; Kumar N. et al., *IEEE TMI* 39(5), 2020), licensed CC BY-NC-SA 4.0. The weights are a work
derived from them and are shared under the same terms: **non-commercial use only, share-alike,
with attribution** of MoNuSeg. The MIT licence of the repository covers the code only.
"""


def _release_postproc_text(rel: Mapping[str, Any]) -> str:
    pp = ", ".join(f"{k} {v}" for k, v in sorted((rel.get("postproc") or {}).items()))
    c = rel.get("postproc_choice")
    if not c:
        return f"Post-processing stored in both files (the recipe's): {pp}.\n"
    cur = ", ".join(f"{k} {v}" for k, v in sorted(c["current"].items()))
    cb = "not in the grid" if c.get("current_bpq") is None else f"{c['current_bpq']:.3f}"
    return (f"Post-processing stored in both files: {pp}, chosen for this budget on the development images "
            f"({c['grid_csv']}, {c['n_pairs']} network x image pairs, mean bPQ {c['chosen_bpq']:.3f}; the training "
            f"recipe's setting {cur}: {cb}) by the rule: {c['rule']}. The weights are those trained "
            f"(`weights_sha256` in release.json).\n")


def resolve_release(path: str | Path) -> Path:
    """A release folder as given, or, when a relative path is not found from the working directory,
    relative to the stlib checkout (so ``"models/realtissue"`` finds the shipped pair from anywhere)."""
    return checkout_path(path)


def load_release(release_dir: str | Path, recipe: RecipeConfig, *, steps: int | None = None) -> Release:
    """Find, verify and check a release folder against the chapter's recipe.

    Returns a :class:`Release` with ``ok`` False and a ``reason`` when there is no folder (or an
    empty path), when its recorded recipe differs from ``recipe`` in anything but
    :data:`RELEASE_FREE_FIELDS`, or when ``steps`` is given and differs from the release's.

    Raises
    ------
    InputError
        A file of the folder is missing or its sha256 is not the recorded one (a corrupted or
        replaced file): the error names the file.
    """
    if not str(release_dir):
        return Release(Path("."), False, "no release folder is set (release_dir is empty)")
    path = resolve_release(release_dir)
    if not (path / RELEASE_JSON).is_file():
        return Release(path, False, f"no release pair at {path} ({RELEASE_JSON} not found)")
    doc = read_json(path / RELEASE_JSON)
    models = {}
    for net in RELEASE_NETS:
        f = path / f"{net}.pt"
        want = (doc.get("files") or {}).get(f.name)
        if want is None:
            raise InputError(f"{RELEASE_JSON} records no checksum for {f.name}", path=path / RELEASE_JSON,
                             fix="restore the folder (git checkout) or rebuild it: make realtissue-models")
        if not f.is_file():
            raise InputError("release model file missing", path=f,
                             fix="restore the folder (git checkout) or rebuild it: make realtissue-models")
        got = _sha256(f)
        if got != want:
            raise InputError(f"release model file corrupted or replaced: sha256 {got[:12]}... is not the recorded "
                             f"{want[:12]}...", path=f,
                             fix="restore it (git checkout -- the file; with git-lfs: git lfs pull) or rebuild the "
                                 "release: make realtissue-models")
        models[net] = f
    rel = Release(path, True, "", doc, models)
    diff = recipe_differences(doc.get("recipe") or {}, recipe)
    if diff:
        what = "; ".join(f"{k}: release {a!r}, chapter {b!r}" for k, (a, b) in diff.items())
        return Release(path, False, f"the release pair at {path} was trained with another recipe ({what})", doc, models)
    if steps is not None and rel.steps != int(steps):
        return Release(path, False, f"the release pair at {path} has {rel.steps} steps, the chapter expects {steps} "
                                    "(release_steps)", doc, models)
    return rel


#: training artefacts of a run folder that an installed release model replaces (they belonged to another run)
_STALE = ("checkpoint.pt", "metrics.csv", "metrics.json", "config.json")


#: the rule that picks the release pair's post-processing (issue 10, session 9), written down before
#: its grid (``benchmarks/realtissue_loo/grid.py --grid release``) was run
RELEASE_POSTPROC_RULE = (
    "the post-processing setting with the highest mean bPQ over every (network, development image) pair of the "
    "leave-one-organ-out networks at the release budget (ST-trained and manual-trained, the 9 MoNuSeg breast / "
    "lung / prostate images, each scored by the fold that never saw its organ); the recipe's own setting is kept "
    "unless the best one is ahead of it by more than {tol}")


def _pp_key(pp: Mapping[str, Any]) -> str:
    """A post-processing setting as the grid's ``setting`` column writes it (the types of a model file's)."""
    from stlib.train.checkpoint import postproc_values

    return json.dumps(postproc_values(pp), sort_keys=True)


def choose_release_postproc(grid_csv: str | Path, current: Mapping[str, Any], *, steps: int,
                            nets: Sequence[str] = RELEASE_NETS, tol: float = 0.005) -> dict[str, Any]:
    """Apply :data:`RELEASE_POSTPROC_RULE` to a post-processing grid of the LOO development networks.

    Parameters
    ----------
    grid_csv
        Rows ``steps, net, image, setting, bpq`` (``benchmarks/realtissue_release_postproc.csv``).
    current
        The recipe's setting (:func:`postproc_of`): kept unless another is ahead by more than ``tol``.
    steps
        The release budget (rows of other budgets are ignored).

    Returns
    -------
    ``postproc`` (the chosen setting), ``rule``, ``chosen_bpq``, ``best`` / ``best_bpq``, ``current`` /
    ``current_bpq`` (None when the grid lacks it), ``n_pairs`` (network x image pairs per setting), ``nets``,
    ``steps``, ``grid_csv`` and its ``grid_sha256``, and ``table`` (one row per setting: mean over all pairs and
    per network, sorted best first).

    Raises
    ------
    InputError
        No rows for ``steps`` and ``nets``, a network missing, or settings scored on different
        (network, image) pairs (an unfinished grid): the rule needs every setting on the same pairs.
    """
    path = Path(grid_csv)
    if not path.is_file():
        raise InputError("post-processing grid not found", path=path,
                         fix="run benchmarks/realtissue_loo/grid.py --grid release (after loo.py train ... --steps N)")
    d = pd.read_csv(path)
    d = d[(d["steps"] == int(steps)) & d["net"].isin(list(nets))]
    missing = sorted(set(nets) - set(d["net"]))
    if d.empty or missing:
        raise InputError(f"the grid has no rows of {missing or list(nets)} at {steps} steps", path=path,
                         fix="score every network of the release budget: grid.py NAME --steps N --nets st manual "
                             "--grid release")
    d = d.drop_duplicates(["setting", "net", "image"], keep="last")
    pairs = d.groupby("setting")[["net", "image"]].apply(lambda g: frozenset(zip(g["net"], g["image"])))
    if pairs.nunique() != 1:
        raise InputError("the grid's settings were scored on different (network, image) pairs (unfinished run?)",
                         path=path, fix="rerun grid.py for the missing folds / networks")
    table = (d.groupby("setting")["bpq"].mean().rename("bpq").to_frame()
             .join(d.pivot_table(index="setting", columns="net", values="bpq", aggfunc="mean")))
    table = table.reset_index().sort_values(["bpq", "setting"], ascending=[False, True], ignore_index=True)
    best = table.iloc[0]
    key = _pp_key(current)
    cur = table[table["setting"] == key]
    cur_bpq = float(cur["bpq"].iloc[0]) if len(cur) else None
    keep = cur_bpq is not None and float(best["bpq"]) - cur_bpq <= tol
    chosen = key if keep else str(best["setting"])
    return {"postproc": json.loads(chosen), "rule": RELEASE_POSTPROC_RULE.format(tol=tol),
            "chosen_bpq": cur_bpq if keep else float(best["bpq"]), "best": json.loads(best["setting"]),
            "best_bpq": float(best["bpq"]), "current": json.loads(key), "current_bpq": cur_bpq,
            "n_pairs": len(next(iter(pairs))), "nets": list(nets), "steps": int(steps),
            "grid_csv": path.as_posix(), "grid_sha256": _sha256(path), "table": table}


def _weights_sha256(doc: Mapping[str, Any]) -> str:
    """sha256 of a model file's weights alone (names, dtypes, shapes and bytes of ``state_dict``): equal
    before and after a change of the file's post-processing, unlike the file's own sha256."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(doc["state_dict"]):
        v = doc["state_dict"][k]
        h.update(k.encode())
        if hasattr(v, "detach"):
            a = v.detach().cpu().contiguous()
            h.update(f"{a.dtype}{tuple(a.shape)}".encode())
            h.update(a.numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


def set_release_postproc(release_dir: str | Path, choice: Mapping[str, Any]) -> Path:
    """Give a release folder the post-processing chosen for its budget (:func:`choose_release_postproc`).

    The two model files get ``choice["postproc"]`` (what ``stlib infer`` applies); their weights are
    not touched (``release.json`` records the weights' own sha256, ``weights_sha256``, checked equal
    before and after the files are rewritten). ``release.json`` gets the new file checksums, ``postproc`` and ``postproc_choice``
    (the rule, the grid file and its sha256, the chosen / best / recipe settings and their mean bPQ,
    the date); the training ``recipe`` stays as trained. The folder is replaced atomically;
    idempotent.
    """
    import datetime as _dt

    import torch

    from stlib.utils import atomic_dir

    path = resolve_release(release_dir)
    doc = read_json(path / RELEASE_JSON)
    pp = json.loads(_pp_key(choice["postproc"]))
    record = {k: v for k, v in choice.items() if k != "table"}
    if doc.get("postproc") == pp and (doc.get("postproc_choice") or {}).get("grid_sha256") == record.get("grid_sha256"):
        return path
    files, weights = {}, {}
    models = {}
    for net in RELEASE_NETS:
        f = path / f"{net}.pt"
        m = _model_doc(f)
        before = _weights_sha256(m)
        m["postproc"] = pp
        models[net] = m
        weights[net] = before
    with atomic_dir(path) as tmp:
        for old in path.iterdir():
            if old.is_file() and old.suffix != ".pt" and old.name not in (RELEASE_JSON, "README.md"):
                (tmp / old.name).write_bytes(old.read_bytes())
        for net, m in models.items():
            torch.save(m, tmp / f"{net}.pt")
            after = _weights_sha256(_model_doc(tmp / f"{net}.pt"))
            if after != weights[net]:  # pragma: no cover - torch.save round trip
                raise RuntimeError(f"{net}.pt: the weights changed while its post-processing was set")
            files[f"{net}.pt"] = _sha256(tmp / f"{net}.pt")
        doc["files"] = files
        doc["weights_sha256"] = {f"{n}.pt": w for n, w in weights.items()}
        doc["postproc"] = pp
        doc["postproc_choice"] = {**record, "postproc": pp,
                                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        write_json(tmp / RELEASE_JSON, doc)
        (tmp / "README.md").write_text(_release_readme(doc))
        tmp.chmod(0o755)
    return path


def install_release(release: Release, models_dir: str | Path) -> dict[str, Path]:
    """Install a verified release as ``models_dir/{st,manual}/model.pt``: float32 model files that
    ``stlib infer`` reads like any other, with ``release.json`` beside each.

    Idempotent (a file already installed from the same release is kept). Training artefacts of an
    earlier run in those folders (checkpoint, metrics, snapshots) are removed: the folder then
    holds the release model only.
    """
    import torch

    if not release.ok:
        raise InputError(f"not a usable release: {release.reason}", path=release.path)
    out = {}
    for net, src in release.models.items():
        dst_dir = Path(models_dir) / net
        dst = dst_dir / "model.pt"
        stamp = dst_dir / RELEASE_JSON
        sha = release.doc["files"][src.name]
        if dst.is_file() and stamp.is_file() and read_json(stamp).get("installed_from_sha256") == sha:
            out[net] = dst
            continue
        dst_dir.mkdir(parents=True, exist_ok=True)
        for f in [*(dst_dir / n for n in _STALE), *dst_dir.glob("model_*.pt")]:
            if f.is_file():
                log.info("install_release: removing %s (another run's artefact)", f)
                f.unlink()
        doc = _cast_state(_model_doc(src), "float32")
        with atomic_path(dst) as tmp:
            torch.save(doc, tmp)
        write_json(stamp, {**release.doc, "installed_from": str(src), "installed_from_sha256": sha})
        out[net] = dst
    return out


NET_NAMES = {"st": "ST-trained", "manual": "manual-trained", "classical": "classical (Otsu + watershed)"}


def loo_budget_curve(loo_csv: str | Path, budget_csv: str | Path, *, base_name: str = "macenko",
                     base_steps: int = 150) -> pd.DataFrame:
    """The development budget curve on the leave-one-organ-out protocol (benchmarks/realtissue_loo/),
    in :func:`budget_curve`'s form (one row per ``steps``, ``model``, ``image``; ``steps`` 0 = Otsu +
    watershed; ``snapshot`` True for weights taken before the end of a longer run).

    From ``loo_csv``: the classical baseline and the rows of ``base_name`` at ``base_steps`` (separate
    runs of that length); from ``budget_csv``: the longer run (``run_steps``) and its snapshots.
    """
    a, b = pd.read_csv(loo_csv), pd.read_csv(budget_csv)
    keep = ["steps", "net", "image", "organ", "bpq", "dice", "f_d", "seed"]
    otsu = a[a["net"] == "classical"].drop_duplicates("image").assign(snapshot=False)
    base = a[(a["name"] == base_name) & (a["steps"] == base_steps) & (a["net"] != "classical")].assign(snapshot=False)
    b = b[b["net"] != "classical"]
    run_steps = b["run_steps"] if "run_steps" in b else b["steps"].max()
    long = b.assign(snapshot=(b["steps"] < run_steps).to_numpy())
    cols = [c for c in keep if c in a.columns and c in b.columns] + ["snapshot"]
    curve = pd.concat([otsu[cols].assign(steps=0), base[cols], long[cols]], ignore_index=True)
    return curve.assign(model=curve["net"].map(NET_NAMES).fillna(curve["net"]))


def loo_budget_table(loo_csv: str | Path, budget_csv: str | Path, *, base_name: str = "macenko",
                     base_steps: int = 150) -> pd.DataFrame:
    """:func:`loo_budget_curve` summarised: one row per (``steps``, ``net``) with the mean bPQ over the
    images, ``n_images``, the number of images above Otsu + watershed (``above_otsu``, ``"k / n"``),
    whether the point is a snapshot of a longer run, the Otsu mean of the same images and the seeds."""
    curve = loo_budget_curve(loo_csv, budget_csv, base_name=base_name, base_steps=base_steps)
    otsu = curve[curve["steps"] == 0].set_index("image")["bpq"]
    rows = []
    for (steps, net), g in curve[curve["steps"] > 0].groupby(["steps", "net"]):
        above = (g["bpq"].to_numpy() > g["image"].map(otsu).to_numpy()).sum()
        rows.append({"steps": int(steps), "net": str(net), "bpq": float(g["bpq"].mean()),
                     "n_images": int(g["image"].nunique()), "above_otsu": f"{int(above)} / {len(g)}",
                     "snapshot": bool(g["snapshot"].iloc[0]), "otsu": float(otsu.reindex(g["image"]).mean()),
                     "seeds": ", ".join(str(s) for s in sorted(g["seed"].unique()))})
    return pd.DataFrame(rows).sort_values(["steps", "net"], ignore_index=True)


def release_decision(table: pd.DataFrame, *, long_steps: int, base_steps: int = 150, net: str = "st") -> dict[str, Any]:
    """The pre-registered rule of the release pair on a :func:`loo_budget_table`.

    Adopt the ``long_steps`` release pair if, on the LOO dev protocol (9 images, seed 0), the ST
    network's mean bPQ at ``long_steps`` is not below its ``base_steps`` mean. Returns ``{"adopt": bool
    or None, "long": bPQ, "base": bPQ, "complete": bool, "n_long": images, "n_base": images}``; ``adopt``
    is None (no decision) while the long run has scored fewer images than the base runs (an unfinished
    run is not the protocol).
    """
    t = table.set_index(["steps", "net"])
    long, base = float(t.loc[(long_steps, net), "bpq"]), float(t.loc[(base_steps, net), "bpq"])
    n_long, n_base = int(t.loc[(long_steps, net), "n_images"]), int(t.loc[(base_steps, net), "n_images"])
    complete = n_long == n_base
    return {"adopt": bool(long >= base) if complete else None, "long": long, "base": base, "complete": complete,
            "n_long": n_long, "n_base": n_base}


def heldout_comparison(per_image: pd.DataFrame, *, st: str = "ST-trained", manual: str = "manual-trained",
                       classical: str = "classical (Otsu + watershed)", metrics: Sequence[str] = ("bpq", "dice", "aji"),
                       n_boot: int = 1000, seed: int = 0,
                       extra_pairs: Sequence[tuple[str, str]] = (), alpha: float = 0.05) -> dict[str, Any]:
    """The chapter's held-out comparison of a pair on a per-image table (``set`` column = stratum);
    ``extra_pairs``: further paired differences to compute (e.g. ST - untrained).

    Means with 95% bootstrap CIs over images per set and pooled (:func:`summary_tables`), the paired
    differences ST - manual and ST - classical, the ST / manual bPQ ratio with its paired
    bootstrap CI (:func:`ratio_ci`), and the verdicts on the two bars of the claim (above Otsu +
    watershed: CI of ST - classical above 0 *and* its sign-flip test over images at p < ``alpha``;
    at least 0.9x manual: ratio CI above 0.9; else "not distinguishable" or "below").

    Why both for the first bar: the bootstrap resamples images within each set, so a set of one
    image (MoNuSeg colon here) contributes no spread to the pooled CI although it carries a set's
    weight; the sign-flip test flips that image too. Where the two disagree the verdict says so
    ("ahead of, but not significantly above") instead of claiming more than the images allow.

    Returns
    -------
    ``{"summary", "diffs", "ratio": (r, lo, hi), "pooled": {model: bPQ}, "verdict_classical",
    "verdict_ratio", "text": {...}}`` where ``text`` holds the formatted values the chapter glues.
    """
    summary, diffs = summary_tables(per_image, metrics=metrics, group="set", n_boot=n_boot, seed=seed,
                                    pairs=[(st, manual), (st, classical), *extra_pairs])
    piv = per_image.pivot_table(index="image", columns="model", values="bpq")
    sets = per_image.drop_duplicates("image").set_index("image")["set"].reindex(piv.index)
    ratio = ratio_ci(piv[st], piv[manual], sets, n_boot=max(n_boot, 1), seed=seed)
    pooled = diffs[(diffs.metric == "bpq") & (diffs.set == "pooled")].set_index("comparison")
    m = summary[(summary.metric == "bpq") & (summary.set == "pooled")].set_index("model")["mean"]
    c = pooled.loc[f"{st} - {classical}"]
    p = float(c["p_value"])
    if c.diff_ci_low > 0:
        verdict_classical = ("above" if p < alpha else
                             f"ahead of, but not significantly above (bootstrap 95% CI above 0, sign-flip p = {p:.2g} "
                             "over images),")
    elif c.diff_ci_high < 0:
        verdict_classical = ("below" if p < alpha else
                             f"behind, but not significantly below (bootstrap 95% CI below 0, sign-flip p = {p:.2g} "
                             "over images),")
    else:
        verdict_classical = "not distinguishable (95% CI of the difference includes 0) from"
    verdict_ratio = ("at least" if ratio[1] >= 0.9 else "below" if ratio[2] < 0.9
                     else "not distinguishable (95% CI includes 0.9) from")

    def fmt(row: pd.Series) -> str:
        return f"{row['diff']:+.3f} [{row.diff_ci_low:+.3f}, {row.diff_ci_high:+.3f}]"

    text = {"st": f"{m[st]:.3f}", "manual": f"{m[manual]:.3f}", "classical": f"{m[classical]:.3f}",
            "diff_manual": fmt(pooled.loc[f"{st} - {manual}"]), "diff_classical": fmt(c),
            "p_classical": f"{c['p_value']:.3g}", "ratio": f"{ratio[0]:.2f} [{ratio[1]:.2f}, {ratio[2]:.2f}]",
            "n": int(piv.shape[0]), "verdict_classical": verdict_classical, "verdict_ratio": verdict_ratio}
    return {"summary": summary, "diffs": diffs, "ratio": ratio, "pooled": m.to_dict(),
            "verdict_classical": verdict_classical, "verdict_ratio": verdict_ratio, "text": text}


def _glued_numbers(path: str | Path, keys: Sequence[str]) -> dict[str, float]:
    """Numbers an executed notebook glued (``myst_nb.glue``) under ``keys``. A few lines of their own:
    :func:`stlib.run.read_glued` reads all values but belongs to a later stage than this module."""
    import nbformat

    out: dict[str, float] = {}
    for cell in nbformat.read(str(path), as_version=4).cells:
        for o in cell.get("outputs", []):
            name = ((o.get("metadata") or {}).get("scrapbook") or {}).get("name")
            text = next((v for k, v in (o.get("data") or {}).items() if k.endswith("text/plain")), None)
            if name in keys and text is not None:
                try:
                    out[name] = float(str(text).strip().strip("'\""))
                except ValueError:
                    pass
    return out


def _parse_time_log(path: str | Path) -> dict[str, float]:
    """CPU (user + system) and wall seconds from a GNU ``/usr/bin/time -v`` log."""
    import re

    text = Path(path).read_text(errors="replace")
    out: dict[str, float] = {}
    u = re.search(r"User time \(seconds\):\s*([\d.]+)", text)
    s = re.search(r"System time \(seconds\):\s*([\d.]+)", text)
    if u and s:
        out["cpu_s"] = round(float(u.group(1)) + float(s.group(1)), 1)
    w = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*([\d:.]+)", text)
    if w:
        parts = [float(x) for x in w.group(1).split(":")]
        out["wall_s"] = round(sum(v * 60 ** i for i, v in enumerate(reversed(parts))), 1)
    return out


def release_main(argv: Sequence[str] | None = None) -> int:
    """``python -m stlib.realtissue release``: pack a trained pair into the release folder.

    Reads the chapter's recipe from ``--profile`` (+ ``-p key=value``, e.g. ``steps=1500``), checks
    that ``--models/{st,manual}/model.pt`` were trained with it, and writes ``--out`` with the
    provenance (``release.json``): ``--command`` (the exact training command), the git commit
    (``--commit``, default: ``git rev-parse HEAD`` of the working directory), training time from
    the chapter's executed notebook (``--executed``: its glued training wall / CPU seconds) and/or a
    ``/usr/bin/time -v`` log (``--time-log``: CPU and wall seconds of the whole run), the machine,
    the load average (``--loadavg``) and the sha256 of the training images of ``source``.
    """
    import argparse
    import subprocess

    from stlib.config import load_params
    from stlib.demo.realtissue import load_source_images

    ap = argparse.ArgumentParser(prog="python -m stlib.realtissue release", description=release_main.__doc__)
    ap.add_argument("--models", required=True, help="folder holding st/model.pt and manual/model.pt")
    ap.add_argument("--out", default=_RT.release_dir)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--command", required=True, help="the exact command that trained the pair")
    ap.add_argument("--commit", default=None, help="git commit of the training code (default: HEAD here)")
    ap.add_argument("--executed", default=None, help="the training run's executed 07_real_tissue.ipynb")
    ap.add_argument("--time-log", default=None, help="a /usr/bin/time -v log of the training run")
    ap.add_argument("--loadavg", default=None, help="load average during training (text, e.g. '3.9 (mean of 1-min "
                                                    "samples)')")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--postproc-grid", default=None,
                    help="LOO post-processing grid of the release budget (default: the profile's release_postproc_csv; "
                         "'' = keep the recipe's post-processing); applied by choose_release_postproc's rule")
    a = ap.parse_args(list(argv) if argv is not None else None)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in a.param)}
    params = load_params(a.profile, "07_real_tissue", overrides=overrides)
    recipe = recipe_of(params)
    commit = a.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
    training: dict[str, Any] = {}
    if a.time_log:
        t = _parse_time_log(a.time_log)
        training.update({"run_cpu_s": t.get("cpu_s"), "run_wall_s": t.get("wall_s"),
                         "run_time_note": "the whole chapter run (cohort, labels, tiles, training, scoring), "
                                          "from /usr/bin/time -v"})
    if a.executed:
        g = _glued_numbers(a.executed, ("rt_train_cpu_s", "rt_train_s"))
        training.update({"cpu_s": g.get("rt_train_cpu_s"), "wall_s": g.get("rt_train_s"),
                         "time_note": "training of the pair (both networks side by side, one process each), "
                                      "from the chapter's clock"})
    for net in RELEASE_NETS:
        mj = Path(a.models) / net / "metrics.json"
        if mj.is_file():
            training[f"{net}_train_wall_s"] = (read_json(mj).get("final") or {}).get("elapsed_s")
    if a.loadavg:
        training["loadavg"] = a.loadavg
    heldout = set(params["heldout_organs"])
    imgs = [x for x in load_source_images(params["source"], images=list(params["images"]) or None)
            if x.organ not in heldout]
    out = pack_release(a.models, a.out, recipe=recipe, command=a.command, commit=commit, source=params["source"],
                       train_images=natural_sorted([x.name for x in imgs]), train_organs=[x.organ for x in imgs],
                       training=training, dtype=a.dtype, notes=a.note)
    grid = a.postproc_grid if a.postproc_grid is not None else params["release_postproc_csv"]
    if grid and Path(grid).is_file() and (pd.read_csv(grid)["steps"] == recipe.steps).any():
        choice = choose_release_postproc(grid, postproc_of(recipe), steps=recipe.steps)
        set_release_postproc(out, choice)
        print(f"post-processing for {recipe.steps} steps: {choice['postproc']} (dev mean bPQ {choice['chosen_bpq']:.3f})")
    elif grid:
        print(f"NOTE: {grid} holds no development grid for {recipe.steps} steps: the release keeps the recipe's "
              "post-processing (run benchmarks/realtissue_loo/loo.py + grid.py --grid release for this budget, then "
              "python -m stlib.realtissue release-postproc)")
    print(f"release pair written to {out}")
    print(Path(out, RELEASE_JSON).read_text())
    return 0


def release_postproc_main(argv: Sequence[str] | None = None) -> int:
    """``python -m stlib.realtissue release-postproc``: give an existing release folder the post-processing
    that :data:`RELEASE_POSTPROC_RULE` picks from the LOO grid of its budget (weights untouched)."""
    import argparse

    from stlib.config import load_params

    ap = argparse.ArgumentParser(prog="python -m stlib.realtissue release-postproc",
                                 description=release_postproc_main.__doc__)
    ap.add_argument("--release", default=_RT.release_dir)
    ap.add_argument("--grid", default=_RT.release_postproc_csv)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--dry-run", action="store_true", help="print the grid's ranking and the choice, change nothing")
    a = ap.parse_args(list(argv) if argv is not None else None)
    path = resolve_release(a.release)
    doc = read_json(path / RELEASE_JSON)
    params = load_params(a.profile, "07_real_tissue", overrides={"steps": int(doc["recipe"]["steps"])})
    choice = choose_release_postproc(a.grid, postproc_of(recipe_of(params)), steps=int(doc["recipe"]["steps"]))
    with pd.option_context("display.width", 200, "display.max_colwidth", 120):
        print(choice["table"].round(4).to_string(index=False))
    print(f"rule: {choice['rule']}")
    print(f"chosen: {choice['postproc']} (mean bPQ {choice['chosen_bpq']:.4f}; recipe's {choice['current']}: "
          f"{choice['current_bpq']})")
    if not a.dry_run:
        set_release_postproc(path, choice)
        print(f"{path}: post-processing set; release.json updated")
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m stlib.realtissue budget ...`
    import sys

    commands = {"budget": budget_main, "heldout": heldout_main, "labels": labels_main, "release": release_main,
                "release-postproc": release_postproc_main}
    if sys.argv[1:2] == [] or sys.argv[1] not in commands:
        sys.exit("usage: python -m stlib.realtissue {budget,heldout,labels,release,release-postproc} [--help]")
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
