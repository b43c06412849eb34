"""Dev-split recipe experiments (train Breast + Lung, score Prostate). Scratch; not shipped."""
import json, os, sys, time, resource
from dataclasses import replace
from pathlib import Path
import numpy as np, pandas as pd, torch

from stlib import realtissue as rt
from stlib.demo.realtissue import load_source_images, make_realtissue_cohort, source_sample_id
from stlib.io.cohort import cohort_table

DATA, RUN = "data/realtissue-dev", "runs/realtissue-dev"
CSV = Path(".bench-work/dev_runs.csv")
PPCSV = Path(".bench-work/dev_postproc.csv")


def prepare():
    imgs = [x for x in load_source_images("realtissue") if x.organ in {"Breast", "Lung", "Prostate"}]
    make_realtissue_cohort(DATA, imgs, seed=0, heldout_organs=("Prostate",), pannuke=None)
    sid = {x.name: source_sample_id(x.source, x.name) for x in imgs}
    train = rt.natural_sorted([sid[x.name] for x in imgs if x.organ in ("Breast", "Lung")])
    dev = rt.natural_sorted([sid[x.name] for x in imgs if x.organ == "Prostate"])
    table = cohort_table(DATA)
    table = table[table["sample"].isin(train)].assign(role="train")
    rt.st_labels(DATA, RUN, train, seed=0)
    rt.build_stores(DATA, RUN, table, um_per_px=0.25, tile_px=256, seed=0, refine_masks=True)
    return train, dev


def maps(model_path, img):
    """Whole-image NP prob and HV of one image (the model's resolution = the image's, 0.25)."""
    from stlib.infer import load_inference_model
    from stlib.infer.engine import predict_tiles
    info = load_inference_model(model_path, device="cpu")
    if abs(info.um_per_px - 0.25) > 1e-3:
        from skimage.transform import resize
        s = 0.25 / info.um_per_px
        img = np.clip(np.rint(resize(img, (round(img.shape[0] * s), round(img.shape[1] * s)), order=1,
                                     anti_aliasing=True, preserve_range=True)), 0, 255).astype(np.uint8)
    h, w = img.shape[:2]
    H, W = -(-h // 32) * 32, -(-w // 32) * 32
    pad = np.pad(img, ((0, H - h), (0, W - w), (0, 0)), mode="reflect")
    out = predict_tiles(info.model, pad[None], device="cpu", batch_size=1)
    return out["np_prob"][0, :h, :w], out["hv"][0, :, :h, :w]


PP_GRID = [dict(np_thresh=t, marker_thresh=m, min_size=s)
           for t in (0.4, 0.5) for m in (0.4, 0.5, 0.6, 0.7) for s in (10, 30)]


DEV = ["MONUSEG_CH-5767", "MONUSEG_G9-6362"]


def prepare05(um):
    import shutil
    run = f"runs/realtissue-dev-{um}"
    for sub in ("alignment", "labels"):
        if not Path(run, sub).exists():
            Path(run).mkdir(parents=True, exist_ok=True)
            shutil.copytree(Path(RUN, sub), Path(run, sub))
    table = cohort_table(DATA)
    train = [s for s in table["sample"] if s not in DEV]
    table = table[table["sample"].isin(train)].assign(role="train")
    rt.build_stores(DATA, run, table, um_per_px=um, tile_px=256, seed=0, refine_masks=True)
    return run


def up(inst, shape):
    if inst.shape == shape:
        return inst
    from skimage.transform import resize
    return resize(inst, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)


def run(name, steps=150, seed=0, um=None, **kw):
    global RUN
    if um is not None:
        RUN = prepare05(um)
    from stlib.metrics import evaluate_pair
    from stlib.model.postproc import hovernet_postprocess
    train, dev = prepare() if not DEV else (None, DEV)
    extra = kw.pop("extra", {})
    if "loss" in extra:
        from stlib.model.losses import LossWeights
        extra = {**extra, "loss": LossWeights(**extra["loss"])}
    recipe = rt.RecipeConfig(steps=steps, seed=seed, device="cpu", extra=extra, **kw)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = rt.train_pair(RUN, recipe, models_dir=f"models/exp/{name}")
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    load = os.getloadavg()[0]
    skipped = all(r.skipped for r in res.values())
    imgs = rt.load_test_images(DATA, dev)
    rows, pprows = [], []
    for k, r in res.items():
        # the default post-processing through infer_image (= stlib infer)
        per = []
        for a in imgs:
            npb, hv = maps(r.model_path, a.image)
            m = evaluate_pair(a.inst, up(hovernet_postprocess(npb, hv)[0], a.inst.shape), um_per_px=a.um_per_px)
            per.append(dict(image=a.name, **{x: m[x] for x in ("bpq", "dice", "aji", "f_d")}))
            for pp in PP_GRID:
                inst = up(hovernet_postprocess(npb, hv, **pp)[0], a.inst.shape)
                m = evaluate_pair(a.inst, inst, um_per_px=a.um_per_px)
                pprows.append(dict(name=name, model=k, image=a.name, **pp, bpq=m["bpq"], f_d=m["f_d"], dice=m["dice"]))
        for p in per:
            rows.append(dict(name=name, steps=steps, seed=seed, recipe=json.dumps({**kw, **{k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in extra.items()}}, sort_keys=True),
                             model=k, image=p["image"], bpq=p["bpq"], dice=p["dice"], aji=p["aji"], f_d=p["f_d"],
                             train_wall_s=round(wall, 1), train_cpu_s=round(cpu, 1), skipped=skipped,
                             loadavg=round(load, 2)))
    df = pd.DataFrame(rows)
    df.to_csv(CSV, mode="a", header=not CSV.is_file(), index=False)
    pp = pd.DataFrame(pprows)
    pp.to_csv(PPCSV, mode="a", header=not PPCSV.is_file(), index=False)
    print(df.groupby("model")[["bpq", "f_d", "dice"]].mean().round(3).to_string())
    g = pp.groupby(["model", "np_thresh", "marker_thresh", "min_size"])["bpq"].mean().unstack("model")
    g["mean"] = g.mean(axis=1)
    print(g.sort_values("mean", ascending=False).head(6).round(3).to_string())
    print(f"{name}: train wall {wall:.0f}s cpu {cpu:.0f}s load {load:.1f}")


if __name__ == "__main__":
    name = sys.argv[1]
    kw = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    if name == "prepare":
        t0 = time.perf_counter(); prepare(); print("prepared", time.perf_counter() - t0)
    else:
        run(name, **kw)
