"""Append the session-6 development rows (post-processing marker modes, flips at inference) to
benchmarks/realtissue_recipe.csv. Inputs: the sweep CSVs of sweep.py and the train logs' JSON lines."""
from scratch import WORK  # $STLIB_BENCH_WORK/realtissue_recipe_session6 (default runs/bench/...)
import json, sys, glob, re
import numpy as np, pandas as pd

csv = sys.argv[1]
old = pd.read_csv(csv)
for col, val in (("postproc_mode", "hv"), ("marker_h", np.nan), ("hv_weight", np.nan), ("inference", "one pass")):
    if col not in old:
        old[col] = val
old = old[~old["name"].astype(str).str.startswith("s6_")]
meta = {}
for log in glob.glob(str(WORK / "train_*.log")):
    for line in open(log, errors="replace"):
        if line.startswith("{"):
            d = json.loads(line)
            meta[f"{d['name']}_s{d['seed']}"] = d
frames = []
for f in sys.argv[2:]:
    d = pd.read_csv(f)
    tta = "tta" in f
    net = d[d.model != "classical"].copy()
    net["run"] = net.model.str.extract(r"models/([^/]+)/")[0]
    net["model"] = net.model.str.extract(r"/(st|manual)/")[0].map({"st": "ST-trained", "manual": "manual-trained"})
    frames.append(net.assign(inference="4 flips averaged" if tta else "one pass"))
    cl = d[d.model == "classical"].drop_duplicates("image").assign(model="classical (Otsu + watershed)", run="classical")
    frames.append(cl)
new = pd.concat(frames, ignore_index=True)
new = new.rename(columns={"mode": "postproc_mode"})
new = new.drop_duplicates([c for c in ("run", "model", "image", "postproc_mode", "np_thresh", "marker_thresh",
                                       "min_size", "marker_h", "hv_weight", "inference") if c in new], keep="last")
desc = {"base": "lr 0.01, 15 warm-up steps", "gn": "lr 0.01, 15 warm-up steps, small-gn encoder (GroupNorm)"}
def recipe(run):
    if run == "classical":
        return "none (classical baseline)"
    m = re.match(r"(.+)_s(\d+)$", run)
    return f"{desc[m.group(1)]} (session 6 run, training seed {m.group(2)})"
new["name"] = "s6_" + new["run"]
new["recipe"] = new["run"].map(recipe)
new["steps"] = np.where(new["run"] == "classical", 0, 150)
new["batch_size"], new["crop_px"], new["um_per_px"] = 8, 128, 0.25
new["train_cpu_s"] = new["run"].map(lambda r: round(meta[r]["cpu_children"], 1) if r in meta else np.nan)
new["train_wall_s"] = new["run"].map(lambda r: round(meta[r]["wall"], 1) if r in meta else np.nan)
new["loadavg"] = new["run"].map(lambda r: round(meta[r]["load"], 2) if r in meta else np.nan)
new["split"] = old["split"].iloc[0]
out = pd.concat([old, new[[c for c in old.columns]]], ignore_index=True)
out.to_csv(csv, index=False)
print(len(old), "+", len(new), "rows")
