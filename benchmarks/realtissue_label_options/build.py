"""Dev cohort (Breast+Lung train, Prostate dev) + refined ST / manual stores of the training images."""
from scratch import WORK  # $STLIB_BENCH_WORK/realtissue_label_options (default runs/bench/...)
import sys
from stlib.demo.realtissue import load_source_images, make_realtissue_cohort, source_sample_id
from stlib.io.cohort import cohort_table
from stlib.realtissue import build_stores, natural_sorted, st_labels
from stlib.constants import TARGET_UM_PER_PX_40X
D, R = WORK / "data", WORK / "run"
imgs = [x for x in load_source_images("realtissue") if x.organ in {"Breast", "Lung", "Prostate"}]
make_realtissue_cohort(D, imgs, seed=0, heldout_organs=("Prostate",), pannuke=None)
sid = {x.name: source_sample_id(x.source, x.name) for x in imgs}
train = natural_sorted([sid[x.name] for x in imgs if x.organ in ("Breast", "Lung")])
print(train)
t = cohort_table(D); t = t[t["sample"].isin(train)].assign(role="train")
st_labels(D, R, train, seed=0)
print(build_stores(D, R, t, um_per_px=TARGET_UM_PER_PX_40X, tile_px=256, seed=0))
