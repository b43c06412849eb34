"""Summaries of the leave-one-organ-out runs (``benchmarks/realtissue_loo.csv``) and of the
post-processing grid (``benchmarks/realtissue_loo_postproc.csv``): mean bPQ over the 9 development
images (each image scored by the fold that did not train on its organ), per recipe, seed and
network, beside Otsu + watershed on the same images; and, per post-processing setting, the mean over
images and seeds with its spread over seeds. Prints the tables; ``--out`` writes the first as CSV."""
from __future__ import annotations

import argparse

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="benchmarks/realtissue_loo.csv")
    ap.add_argument("--grid", default="benchmarks/realtissue_loo_postproc.csv")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    d = pd.read_csv(a.runs)
    cl = d[d.net == "classical"].set_index("image")["bpq"]
    nets = d[d.net != "classical"].copy()
    nets["classical"] = nets["image"].map(cl)
    nets["minus_classical"] = nets["bpq"] - nets["classical"]
    g = (nets.groupby(["name", "steps", "seed", "net"])
         .agg(n_images=("image", "nunique"), bpq=("bpq", "mean"), classical=("classical", "mean"),
              minus_classical=("minus_classical", "mean"), images_above=("minus_classical", lambda x: int((x > 0).sum())),
              f_d=("f_d", "mean"), dice=("dice", "mean"), train_cpu_s=("train_cpu_s", "mean"))
         .reset_index())
    pd.set_option("display.width", 200)
    print(g.round(3).to_string(index=False))
    print((nets.groupby(["name", "steps", "net", "fold"])["bpq"].mean().unstack("fold")
           .assign(classical=None).round(3)).to_string())
    print("classical per fold:", d[d.net == "classical"].groupby("fold")["bpq"].mean().round(3).to_dict(),
          "all:", round(cl.mean(), 3))
    if a.out:
        g.to_csv(a.out, index=False)
    try:
        p = pd.read_csv(a.grid)
    except FileNotFoundError:
        return
    p["classical"] = p["image"].map(cl)
    per_seed = p.groupby(["name", "steps", "net", "setting", "seed"])["bpq"].mean()
    s = per_seed.groupby(["name", "steps", "net", "setting"]).agg(["mean", "min", "max", "count"])
    s = s.rename(columns={"count": "n_seeds"}).sort_values("mean", ascending=False)
    print(s.round(3).to_string())


if __name__ == "__main__":
    main()
