"""results.jsonl of exp.py -> benchmarks/realtissue_label_options.csv (one row per run and dev image)."""
from scratch import WORK  # $STLIB_BENCH_WORK/realtissue_label_options (default runs/bench/...)
import json
import sys

import pandas as pd

rows = []
for line in open(sys.argv[1] if len(sys.argv) > 1 else WORK / "results.jsonl"):
    r = json.loads(line)
    e = r.get("errors_pooled", {})
    for p in r["per_image"]:
        rows.append({"option": r["name"], "store": r["store"], "loss": json.dumps(r["loss"]), "seed": r["seed"], "steps": r.get("steps", 150),
                     **p, "mean_bpq_run": r["bpq"], "train_cpu_s": r["train_cpu_s"], "train_wall_s": r["train_wall_s"],
                     "loadavg": round(r["loadavg"], 2),
                     **{f"run_{k}": e.get(k) for k in ("fn_missed", "fn_merged", "fn_split", "fn_outline", "fp_extra",
                                                        "fp_split", "fp_merged", "fp_outline", "matched_area_ratio")},
                     "split": "train MoNuSeg Breast + Lung (7 images), score MoNuSeg Prostate (2 images)",
                     "recipe": "chapter 07 recipe (RecipeConfig defaults: 150 steps, batch 8 x 128 px, 0.25 um/px, "
                               "lr 0.01, 15 warm-up, NP >= 0.2, marker 0.5, min 100 px), ST network only"})
pd.DataFrame(rows).to_csv(sys.argv[2] if len(sys.argv) > 2 else "benchmarks/realtissue_label_options.csv", index=False)
