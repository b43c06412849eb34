import json, sys
def glued(p):
    out = {}
    for c in json.load(open(p))["cells"]:
        for o in c.get("outputs", []):
            md = o.get("metadata", {})
            sb = md.get("scrapbook")
            if sb:
                d = o.get("data", {})
                out[sb["name"]] = d.get("text/plain") or json.dumps(d)[:200]
    return out
a, b = glued(sys.argv[1]), glued(sys.argv[2])
timing = {"rt_train_s", "rt_train_cpu_s", "rt_total_s", "rt_cpu_s"}
same = [k for k in a if k in b and a[k] == b[k]]
diff = [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
print(f"{len(a)} / {len(b)} glued values; equal: {len(same)}; different: {len(diff)}")
for k, x, y in diff:
    print(("  (timing) " if k in timing else "  ") + f"{k}: {x} | {y}")
# every displayed table / text output, cell by cell (images left out: PNG bytes embed nothing numeric
# beyond what the tables show, and matplotlib metadata may differ)
import re
def outs(p):
    res = []
    for c in json.load(open(p))["cells"]:
        if c["cell_type"] != "code":
            continue
        t = []
        for o in c.get("outputs", []):
            d = o.get("data", {})
            for k in ("text/html", "text/plain", "text/markdown"):
                if k in d and "Styler at" not in "".join(d[k]):
                    t.append(re.sub(r"T_[0-9a-f_]+", "T_", "".join(d[k])))
            if "text" in o:
                t.append("".join(o["text"]))
        res.append((c["source"][:1] if isinstance(c["source"], list) else c["source"][:60], t))
    return res
oa, ob = outs(sys.argv[1]), outs(sys.argv[2])
for (sa, ta), (sb, tb) in zip(oa, ob):
    if ta != tb:
        print("cell output differs:", "".join(sa)[:70])
