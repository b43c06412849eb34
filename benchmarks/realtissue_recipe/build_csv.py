import json
import pandas as pd
runs = pd.read_csv(".bench-work/dev_runs.csv")
pp = pd.read_csv(".bench-work/dev_postproc.csv")
meta = runs.drop_duplicates("name").set_index("name")
desc = {"base": "lr 0.004, no warm-up (the earlier recipe)",
        "lr01w15": "lr 0.01, 15 warm-up steps",
        "nt0": "lr 0.004, no warm-up, NT loss weights 0",
        "um05": "lr 0.004, no warm-up, 0.5 µm/px",
        "c256": "lr 0.01, 15 warm-up steps, batch 2 x 256 px crops"}
pp = pp.drop_duplicates(["name", "model", "image", "np_thresh", "marker_thresh", "min_size"], keep="last")
out = pp.assign(recipe=pp["name"].map(desc),
                um_per_px=pp["name"].map(lambda n: 0.5 if n == "um05" else 0.25),
                steps=150, batch_size=pp["name"].map(lambda n: 2 if n == "c256" else 8),
                crop_px=pp["name"].map(lambda n: 256 if n == "c256" else 128),
                train_cpu_s=pp["name"].map(meta["train_cpu_s"]), train_wall_s=pp["name"].map(meta["train_wall_s"]),
                loadavg=pp["name"].map(meta["loadavg"]),
                model=pp["model"].map({"st": "ST-trained", "manual": "manual-trained"}),
                split="train MoNuSeg Breast + Lung (7 images), score MoNuSeg Prostate (2 images)")
# post-processing min_size of the 0.5 µm/px run: in its model px (x4 in 0.25 µm/px pixels)
out = out[["name", "recipe", "steps", "batch_size", "crop_px", "um_per_px", "model", "image", "np_thresh",
           "marker_thresh", "min_size", "bpq", "f_d", "dice", "train_cpu_s", "train_wall_s", "loadavg", "split"]]
out.to_csv("benchmarks/realtissue_recipe.csv", index=False)
print(len(out))
