"""Leave-one-organ-out development protocol of the real-tissue chapter's recipe (issue 10).

Development data only: the 9 shipped MoNuSeg images of the chapter's training organs (Breast,
Lung, Prostate). Each fold trains on two organs (``TrainConfig.exclude_organs``) and scores the
third organ's images through :func:`stlib.realtissue.score_images` (``stlib.infer.infer_image``,
the code of ``stlib infer``: resampled, tiled, stitched, the post-processing stored in the model
file). The held-out organs of the chapter (Kidney, Bowel; all CoNSeP) are never loaded here.

Usage (from the repository root; writes under ``data/realtissue-loo``, ``runs/realtissue-loo``)::

    python benchmarks/realtissue_loo/loo.py prepare
    python benchmarks/realtissue_loo/loo.py train NAME '{"input_norm": "hed", ...}' [--seed S] [--steps N] [--nets st manual]
    python benchmarks/realtissue_loo/loo.py grid NAME [--seed S] [--steps N]   # post-processing grid on cached maps

Every trained network appends one row per (network, dev image) to ``benchmarks/realtissue_loo.csv``
with the fold, seed, steps, the recipe as JSON, bPQ / Dice / AJI / F_d, the training CPU seconds
of the process and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from stlib import realtissue as rt
from stlib.demo.realtissue import load_source_images, make_realtissue_cohort, source_sample_id
from stlib.io.cohort import cohort_table

DATA, RUN = "data/realtissue-loo", "runs/realtissue-loo"
ORGANS = ("Breast", "Lung", "Prostate")
CSV = Path("benchmarks/realtissue_loo.csv")
KEEP = ["model", "image", "organ", "bpq", "dice", "aji", "f_d"]


def prepare() -> dict[str, list[str]]:
    """The cohort of the 9 development images, ST labels of all, one tile store of all (ST + manual)."""
    imgs = [x for x in load_source_images("realtissue") if x.organ in ORGANS]
    assert not {x.organ for x in imgs} & set(rt._RT.heldout_organs)
    make_realtissue_cohort(DATA, imgs, seed=0, heldout_organs=(), pannuke=None)
    sid = {x.name: source_sample_id(x.source, x.name) for x in imgs}
    by_organ = {o: rt.natural_sorted([sid[x.name] for x in imgs if x.organ == o]) for o in ORGANS}
    table = cohort_table(DATA)
    table = table[table["sample"].isin(sum(by_organ.values(), []))].assign(role="train")
    rt.st_labels(DATA, RUN, list(table["sample"]), seed=0)
    rt.build_stores(DATA, RUN, table, um_per_px=0.25, tile_px=256, seed=0, refine_masks=True)
    return by_organ


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def train(name: str, kw: dict, seed: int, steps: int, nets: tuple[str, ...], folds: tuple[str, ...],
          snapshots: tuple[int, ...] = ()) -> None:
    """One network per (fold, net): train without the fold's organ, score its images; with ``snapshots``
    also the weights after those steps of the same run (mid-schedule: the cosine LR runs over ``steps``)."""
    from stlib.train import TrainConfig, train as train_run
    from stlib.train.checkpoint import write_postproc

    by_organ = prepare()
    pp_keys = {"np_thresh", "marker_thresh", "min_size", "postproc_mode", "marker_h", "hv_weight", "marker_dist_um"}
    rkw = {k: v for k, v in kw.items() if k in {f for f in rt.RecipeConfig.__dataclass_fields__} and k != "extra"}
    extra = {k: v for k, v in kw.items() if k not in rkw}
    recipe = rt.RecipeConfig(steps=steps, seed=seed, device="cpu", **rkw)
    for dev_organ in folds:
        dev = rt.load_test_images(DATA, by_organ[dev_organ])
        for net in nets:
            store = "tiles/rt" if net == "st" else "tiles/rt_truth"
            out = f"models/loo/{name}/s{seed}_n{steps}/{dev_organ}/{net}"
            cfg = TrainConfig(recipe=net, run_dir=RUN, stores=(store,), out_dir=out, train_splits=("train", "val"),
                              val_splits=("val",), val_max_tiles=4, encoder=recipe.encoder, steps=steps,
                              batch_size=recipe.batch_size, crop_px=recipe.crop_px, lr=recipe.lr,
                              aug_hed=recipe.aug_hed, aug_scale=recipe.aug_scale, seed=seed, device="cpu",
                              val_every=steps, ckpt_every=steps, warmup_steps=recipe.warmup_steps, num_workers=0,
                              exclude_organs=(dev_organ,), stain_norm=recipe.stain_norm,
                              channels_last_cpu=recipe.channels_last_cpu, **extra)
            c0, t0 = _cpu(), time.perf_counter()
            snaps = tuple(sorted(int(n) for n in snapshots if 0 < int(n) < steps))
            if snaps:
                cfg = replace(cfg, ckpt_every=int(np.gcd.reduce([steps, *snaps])))
            res = rt._train_job((cfg, "auto", snaps))
            cpu, wall = _cpu() - c0, time.perf_counter() - t0
            for n, path in [*((n, Path(res.out_dir) / f"model_{n}.pt") for n in snaps), (steps, res.model_path)]:
                write_postproc(path, rt.postproc_of(recipe))
                per, _ = rt.score_images({f"{net}": path}, dev, device="cpu")
                per = per[KEEP].assign(name=name, fold=dev_organ, seed=seed, steps=n, run_steps=steps, net=net,
                                       recipe=json.dumps(kw, sort_keys=True), train_cpu_s=round(cpu, 1),
                                       train_wall_s=round(wall, 1), skipped=bool(res.skipped),
                                       loadavg=round(os.getloadavg()[0], 2))
                per.to_csv(CSV, mode="a", header=not CSV.is_file(), index=False)
                print(name, dev_organ, net, seed, n, steps, per["bpq"].round(3).tolist(), f"cpu {cpu:.0f}s", flush=True)


def classical() -> None:
    by_organ = prepare()
    for o in ORGANS:
        dev = rt.load_test_images(DATA, by_organ[o])
        per, _ = rt.score_images({"classical": "classical"}, dev)
        per[KEEP].assign(name="classical", fold=o, seed=0, steps=0, net="classical").to_csv(
            CSV, mode="a", header=not CSV.is_file(), index=False)
        print(per[KEEP].to_string())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("name", nargs="?")
    ap.add_argument("kw", nargs="?", default="{}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--nets", nargs="+", default=["st", "manual"])
    ap.add_argument("--folds", nargs="+", default=list(ORGANS))
    ap.add_argument("--snapshots", nargs="*", type=int, default=[])
    ap.add_argument("--csv", default=str(CSV), help="results table (appended; one header per file)")
    a = ap.parse_args()
    CSV = Path(a.csv)
    if a.cmd == "prepare":
        t0 = time.perf_counter()
        print(prepare(), time.perf_counter() - t0)
    elif a.cmd == "classical":
        classical()
    elif a.cmd == "train":
        train(a.name, json.loads(a.kw), a.seed, a.steps, tuple(a.nets), tuple(a.folds), tuple(a.snapshots))
    else:
        sys.exit(f"unknown command {a.cmd}")
