"""Extended post-processing sweep on the dev models already trained (no training)."""
import sys
import pandas as pd
sys.path.insert(0, ".bench-work")
import exp
from stlib import realtissue as rt
from stlib.metrics import evaluate_pair
from stlib.model.postproc import hovernet_postprocess

names = sys.argv[1].split(",")
GRID_T, GRID_M, GRID_S = (0.3, 0.35, 0.4), (0.5, 0.6), (30, 80, 150)
if len(sys.argv) > 2:
    GRID_T, GRID_M, GRID_S = eval(sys.argv[2])
grid = [dict(np_thresh=t, marker_thresh=m, min_size=s) for t in GRID_T for m in GRID_M
        for s in GRID_S]
imgs = rt.load_test_images(exp.DATA, exp.DEV)
rows = []
for name in names:
    for k in ("st", "manual"):
        run = "runs/realtissue-dev-0.5" if "um05" in name else exp.RUN
        path = f"{run}/models/exp/{name}/{k}/model.pt"
        for a in imgs:
            npb, hv = exp.maps(path, a.image)
            for pp in grid:
                pp2 = dict(pp, min_size=max(1, pp["min_size"] // 4)) if "um05" in name else pp
                inst = exp.up(hovernet_postprocess(npb, hv, **pp2)[0], a.inst.shape)
                m = evaluate_pair(a.inst, inst, um_per_px=a.um_per_px)
                rows.append(dict(name=name, model=k, image=a.name, **pp, bpq=m["bpq"], f_d=m["f_d"], dice=m["dice"]))
df = pd.DataFrame(rows)
df.to_csv(exp.PPCSV, mode="a", header=False, index=False)
g = df.groupby(["name", "model", "np_thresh", "marker_thresh", "min_size"])["bpq"].mean().unstack(["name", "model"])
g["mean"] = g.mean(axis=1)
print(g.sort_values("mean", ascending=False).round(3).head(10).to_string())
