"""Refine the raw ST store with a RefineConfig into run/tiles/NAME (same tiles, same splits)."""
from scratch import WORK  # $STLIB_BENCH_WORK/realtissue_label_options (default runs/bench/...)
import sys
from stlib.config import RefineConfig
from stlib.io.tiles import TileStore, TileStoreWriter
from stlib.labels.refine import refine_label_maps
name = sys.argv[1]; kw = {k: float(v) for k, v in (a.split("=") for a in sys.argv[2:])}
cfg = RefineConfig(**kw)
st = TileStore(WORK / "run_raw/tiles/rt")
ref = TileStore(WORK / "run/tiles/rt")
assert list(st.meta["tile_id"]) == list(ref.meta["tile_id"])
with TileStoreWriter(WORK / "run" / "tiles" / name, tile_px=int(st.info["tile_px"]), um_per_px=float(st.um_per_px), source="realtissue", overwrite=True) as w:
    for i in range(len(st)):
        a = st[i]; m = st.meta.iloc[i]
        inst, typ, ign, conf, _ = refine_label_maps(a["image"], a["inst"], a["type"], a["ignore"], a["conf"], um_per_px=float(st.um_per_px), config=cfg)
        w.add(image=a["image"], inst=inst, type=typ, ignore=ign, conf=conf, sample=m["sample"], organ=m["organ"], x0=m["x0"], y0=m["y0"],
              split=ref.meta["split"].iloc[i], align_score=m["align_score"], source=m["source"], tile_id=m["tile_id"])
print("ok", name, len(st), cfg)
