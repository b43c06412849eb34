"""Dev split: train MoNuSeg Breast+Lung pair (150 steps, chapter recipe), cache models per seed/variant."""
from scratch import WORK  # $STLIB_BENCH_WORK/realtissue_recipe_session6 (default runs/bench/...)
import sys, time, os, json, resource
from dataclasses import replace
from pathlib import Path
import numpy as np
from stlib import realtissue as rt
from stlib.demo.realtissue import load_source_images, make_realtissue_cohort, source_sample_id
from stlib.io.cohort import cohort_table

D, R = str(WORK / "data"), str(WORK / "run")
def main():
    name = sys.argv[1]
    seed = int(sys.argv[2])
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    imgs = [x for x in load_source_images("realtissue") if x.organ in {"Breast", "Lung", "Prostate"}]
    make_realtissue_cohort(D, imgs, seed=0, heldout_organs=("Prostate",), pannuke=None)
    sid = {x.name: source_sample_id(x.source, x.name) for x in imgs}
    train = rt.natural_sorted([sid[x.name] for x in imgs if x.organ in ("Breast", "Lung")])
    table = cohort_table(D)
    table = table[table["sample"].isin(train)].assign(role="train")
    rt.st_labels(D, R, train, seed=0)
    rt.build_stores(D, R, table, um_per_px=0.25, tile_px=256, seed=0)
    rkw = {k: extra.pop(k) for k in list(extra) if k in rt.RecipeConfig.__dataclass_fields__}
    recipe = rt.RecipeConfig(seed=seed, device="cpu", extra=extra, **rkw)
    t0 = time.perf_counter(); c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = rt.train_pair(R, recipe, models_dir=f"models/{name}_s{seed}", parallel=os.environ.get("PAR", "1") == "1")
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"name": name, "seed": seed, "wall": time.perf_counter() - t0,
                      "cpu_children": c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime,
                      "load": os.getloadavg()[0]}))


if __name__ == '__main__':
    main()
