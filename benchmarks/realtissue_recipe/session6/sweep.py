"""Post-processing sweep on cached NP/HV maps of the dev images (dev split only)."""
import sys, itertools, json, os
from pathlib import Path
import numpy as np, pandas as pd
sys.path.insert(0, str(Path(__file__).resolve().parent))  # cache.py, scratch.py
from cache import dev_images
from stlib.model.postproc import hovernet_postprocess
from stlib.metrics import evaluate_pair
from stlib.model.baseline import classical_segmentation

imgs = dev_images()
out = sys.argv[1]
models = sys.argv[2:]  # model.pt paths with .dev.npz beside
grid = [dict(mode="hv", np_thresh=0.2, marker_thresh=0.5, min_size=100), dict(mode="hv", np_thresh=0.5, marker_thresh=0.4, min_size=10)]
for t in (0.2, 0.3, 0.4, 0.5):
    for ms in (60,):
        for h in (1.0, 2.0, 3.0):
            grid.append(dict(mode="distance", np_thresh=t, marker_h=h, min_size=ms))
        grid.append(dict(mode="blend", np_thresh=t, marker_h=2.0, hv_weight=0.5, min_size=ms))
if os.environ.get("GRID"):
    grid = eval(os.environ["GRID"])
rows = []
for a in imgs:
    r = evaluate_pair(a.inst, classical_segmentation(a.image, um_per_px=a.um_per_px), um_per_px=a.um_per_px)
    fg = a.inst > 0
    rows.append(dict(model="classical", image=a.name, bpq=r["bpq"], dice=r["dice"], f_d=r["f_d"]))
for mp in models:
    z = np.load(Path(mp).with_suffix(os.environ.get("SUFFIX", ".dev.npz")))
    for a in imgs:
        npp, hv = z[f"{a.name}__np"].astype(np.float32), z[f"{a.name}__hv"].astype(np.float32)
        for g in grid:
            inst, _, _ = hovernet_postprocess(npp, hv, **g)
            r = evaluate_pair(a.inst, inst, um_per_px=a.um_per_px)
            rows.append(dict(model=mp, image=a.name, **g, bpq=r["bpq"], dice=r["dice"], f_d=r["f_d"], aji=r["aji"]))
        print(mp, a.name, flush=True)
pd.DataFrame(rows).to_csv(out, index=False)
