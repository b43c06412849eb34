from scratch import WORK  # $STLIB_BENCH_WORK/realtissue_label_options (default runs/bench/...)
from stlib.io.cohort import cohort_table
from stlib.realtissue import build_stores, natural_sorted, st_labels
from stlib.constants import TARGET_UM_PER_PX_40X
D, R = WORK / "data", WORK / "run_raw"
t = cohort_table(D); t = t[t["organ"].isin(["Breast", "Lung"])].assign(role="train")
train = natural_sorted(t["sample"])
st_labels(D, R, train, seed=0)
print(build_stores(D, R, t, um_per_px=TARGET_UM_PER_PX_40X, tile_px=256, seed=0, refine_masks=False))
