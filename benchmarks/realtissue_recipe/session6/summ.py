import sys, pandas as pd
df = pd.concat([pd.read_csv(f).assign(src=f) for f in sys.argv[1:]])
cl = df[df.model == "classical"].drop_duplicates("image")
print("classical", cl.bpq.mean().round(3), cl.dice.mean().round(3))
net = df[df.model != "classical"].copy()
net["net"] = net.model.str.extract(r"/(st|manual)/")[0]
net["run"] = net.model.str.extract(r"models/([^/]+)/")[0]
keys = ["mode", "np_thresh", "min_size", "marker_thresh", "marker_h", "hv_weight"]
for k in keys:
    if k not in net: net[k] = float("nan")
net[keys] = net[keys].fillna(-1)
g = net.groupby(keys + ["run", "net"])[["bpq"]].mean().unstack(["run", "net"])
g.columns = [f"{r}:{n}" for _, r, n in g.columns]
g["mean"] = g.mean(axis=1)
g["min"] = g.drop(columns="mean").min(axis=1)
print(g.sort_values("mean", ascending=False).round(3).head(25).to_string())
for m in ("hv", "distance", "blend"):
    print(m, "best:"); print(g.xs(m, level="mode").sort_values("mean", ascending=False).round(3).head(3).to_string())
