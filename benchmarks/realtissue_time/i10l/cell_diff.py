import json, sys, re, difflib
def outs(p):
    res = []
    for c in json.load(open(p))["cells"]:
        if c["cell_type"] != "code":
            continue
        t = []
        for o in c.get("outputs", []):
            d = o.get("data", {})
            for k in ("text/html", "text/plain"):
                if k in d and "Styler at" not in "".join(d[k]):
                    t.append(re.sub(r"T_[0-9a-f_]+", "T_", "".join(d[k])))
            if "text" in o:
                t.append("".join(o["text"]))
        res.append(("".join(c["source"]).splitlines()[:3], "\n".join(t)))
    return res
for (sa, ta), (sb, tb) in zip(outs(sys.argv[1]), outs(sys.argv[2])):
    if ta != tb:
        print("=== cell:", sa)
        for l in difflib.unified_diff(ta.splitlines(), tb.splitlines(), lineterm="", n=0):
            if not l.startswith(("---", "+++", "@@")):
                print("   ", re.sub("<.*?>", " ", l)[:160])
