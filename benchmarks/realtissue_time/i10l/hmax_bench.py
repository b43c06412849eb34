import time, json, numpy as np, scipy.ndimage as ndi
from stlib import realtissue as rt
from stlib.model import postproc as P
D = "/tmp/i10l/work/data/realtissue"
from stlib.io import cohort
t = cohort.cohort_table(D)
ids = t.loc[t.role == "held-out", "sample"].tolist()
imgs = rt.load_test_images(D, ids)
maps = []
for a in imgs:
    blob = a.inst > 0
    maps.append(ndi.gaussian_filter(ndi.distance_transform_edt(blob), 1.0) * blob)
P._h_maxima_by_object(maps[0][:64, :64], 0.25)  # compile / load the cache first
out = {}
for ref in (True, False):
    c0 = time.process_time()
    res = [P._h_maxima_by_object(m, 0.25, reference=ref) for m in maps]
    out["reference (skimage h_maxima per object)" if ref else "compiled reconstruction per object"] = round(time.process_time() - c0, 3)
    if ref: r0 = res
same = all(np.array_equal(a, b) for a, b in zip(r0, res))
n_obj = sum(int(ndi.label(m > 0, structure=np.ones((3, 3)))[1]) for m in maps)
print(json.dumps({"images": len(maps), "objects": n_obj, "cpu_s": out, "identical": same}))
