"""ST-only (or manual) training on the dev split (Breast+Lung) with an option, scored on Prostate.
usage: exp.py NAME STORE SEED [loss_key=val ...]"""
from scratch import WORK  # $STLIB_BENCH_WORK/realtissue_label_options (default runs/bench/...)
import json, math, os, sys, time, resource
from dataclasses import replace
from pathlib import Path
import numpy as np
from stlib.train import TrainConfig, train
from stlib.train.checkpoint import write_postproc
from stlib.realtissue import RecipeConfig, load_test_images, score_images
name, store, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
loss = {}
for kv in sys.argv[4:]:
    k, v = kv.split("="); loss[k] = float(v)
R = str(WORK / "run"); D = str(WORK / "data")
rc = RecipeConfig(device="cpu", seed=seed, steps=int(os.environ.get("STEPS", RecipeConfig().steps)))
cfg = TrainConfig(recipe="manual" if "truth" in store else "st", run_dir=R, stores=(store,), out_dir=f"exp/{name}_s{seed}_{rc.steps}",
                  train_splits=("train", "val"), val_splits=("val",), val_max_tiles=4, encoder=rc.encoder, steps=rc.steps,
                  batch_size=rc.batch_size, crop_px=rc.crop_px, lr=rc.lr, aug_hed=rc.aug_hed, aug_scale=rc.aug_scale,
                  seed=seed, device="cpu", val_every=rc.steps, ckpt_every=rc.steps, warmup_steps=rc.warmup_steps,
                  num_workers=1, **({"loss": loss} if loss else {}))
cfg = TrainConfig.from_dict(cfg.to_dict())
import torch; torch.set_num_threads(1)
t0, c0 = time.perf_counter(), time.process_time()
r = train(cfg, resume="auto")
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
write_postproc(r.model_path, {"np_thresh": rc.np_thresh, "marker_thresh": rc.marker_thresh, "min_size": rc.min_size})
dev = load_test_images(D, ["MONUSEG_CH-5767", "MONUSEG_G9-6362"])
per, preds = score_images({name: r.model_path}, dev, device="cpu", keep_predictions=True)
from stlib.metrics import segmentation_errors, error_summary
tot = {}
for a, pi in zip(dev, preds[name]):
    for k, v in segmentation_errors(a.inst, pi).items():
        tot[k] = tot.get(k, 0) + v
rec = {"name": name, "steps": rc.steps, "store": store, "seed": seed, "loss": loss, "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
       "loadavg": os.getloadavg()[0],
       "per_image": per[["image", "bpq", "dq", "sq", "dice", "aji", "f_d"]].to_dict(orient="records"),
       "bpq": float(per["bpq"].mean()), "errors_pooled": error_summary(tot)}
with open(WORK / "results.jsonl", "a") as fh:
    fh.write(json.dumps(rec) + "\n")
print(json.dumps(rec))
