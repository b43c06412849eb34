from scratch import WORK  # $STLIB_BENCH_WORK/realtissue_label_options (default runs/bench/...)
import pandas as pd
from stlib.config import RefineConfig
from stlib.realtissue import label_quality
pd.set_option("display.width", 250)
cfgs = {"no not-visible": RefineConfig(min_rel_contrast=0.0, min_contrast_od=0.0),
        "no not-visible, edge 0.35, core 0.5": RefineConfig(min_rel_contrast=0.0, min_contrast_od=0.0, edge_fraction=0.35, core_um=0.5)}
q = label_quality(WORK / "run_raw/tiles/rt", WORK / "run_raw/tiles/rt_truth", classical=False, refinements=cfgs)
cols = ["method", "bpq", "dq", "sq", "dice", "fn_missed", "fn_ignored", "fn_outline", "fp_extra", "fp_outline", "matched_area_ratio", "ignored_px_share"]
print(q[q["sample"] == "all"][cols].round(3).to_string(index=False))
