"""Cell-by-cell and function-by-function time of chapter 07 (notebooks/07_real_tissue.ipynb).

Runs the chapter's code cells in order in this process (the parameters of ``--profile`` from
params/, as ``stlib run`` injects them), in a fresh working folder, under cProfile, and writes
per cell: wall seconds, CPU seconds of this process and of its finished child processes (the two
training processes), plus the top functions by cumulative time of the whole run.

    PYTHONPATH=. nice -n 10 python benchmarks/realtissue_time/profile_ch07.py \
        --work /tmp/ch07-work --out benchmarks/realtissue_time.json

The working folder is emptied first unless ``--keep`` (a rerun then measures the resumed chapter:
cohort, labels, stores and models reused).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _cpu() -> tuple[float, float]:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def _first_line(src: str) -> str:
    for line in src.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not line.startswith("t0, c0") and not line.startswith("from ") \
                and not line.startswith("import "):
            return line[:90]
    return src.strip().splitlines()[0][:90] if src.strip() else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--work", default="/tmp/ch07-work")
    ap.add_argument("--out", default=None, help="JSON to write (default: print only)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder's data and runs (resumed chapter)")
    ap.add_argument("--top", type=int, default=60)
    ap.add_argument("--set", nargs="*", default=[], help="parameter overrides key=value (JSON values)")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve() if a.out else None
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("STLIB_NO_PROGRESS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as stlib run sets for its kernels
    import nbformat

    from stlib.config import load_params

    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    params = load_params(a.profile, "07_real_tissue", overrides=overrides, params_dir=ROOT / "params")
    for k in ("recipe_csv", "budget_csv", "heldout_csv", "manifest"):
        if k in params and params[k] and not Path(params[k]).is_absolute():
            params[k] = str(ROOT / params[k])
    work = Path(a.work)
    if work.exists() and not a.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "data_manifest.yaml").write_text((ROOT / "data_manifest.yaml").read_text())
    os.chdir(work)
    nb = nbformat.read(str(ROOT / "notebooks" / "07_real_tissue.ipynb"), as_version=4)
    ns: dict = {"__name__": "__main__"}
    load0 = os.getloadavg()
    rows = []
    prof = cProfile.Profile()
    t_all, (s_all, c_all) = time.perf_counter(), _cpu()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        src = cell.source
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = src + "\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
        t0, (s0, c0) = time.perf_counter(), _cpu()
        prof.enable()
        try:
            exec(compile(src, f"<cell {i}>", "exec"), ns)
        finally:
            prof.disable()
        t1, (s1, c1) = time.perf_counter(), _cpu()
        import matplotlib.pyplot as plt

        plt.close("all")
        rows.append({"cell": i, "first_line": _first_line(cell.source), "wall_s": round(t1 - t0, 2),
                     "cpu_self_s": round(s1 - s0, 2), "cpu_children_s": round(c1 - c0, 2),
                     "cpu_s": round(s1 - s0 + c1 - c0, 2)})
        print(f"cell {i:2d} wall {t1 - t0:7.1f} s cpu {s1 - s0:7.1f} + children {c1 - c0:6.1f} s  {rows[-1]['first_line']}",
              flush=True)
    t_end, (s_end, c_end) = time.perf_counter(), _cpu()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("cumulative").print_stats(a.top)
    funcs = []
    for (fn, line, name), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][3])[: a.top]:
        funcs.append({"function": f"{Path(fn).name}:{line}({name})", "calls": nc, "tottime_s": round(tt, 2),
                      "cumtime_s": round(ct, 2)})
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    res = {"command": "python benchmarks/realtissue_time/profile_ch07.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "commit": commit, "profile": a.profile, "resumed": bool(a.keep),
           "loadavg_before": load0, "loadavg_after": os.getloadavg(),
           "total": {"wall_s": round(t_end - t_all, 1), "cpu_self_s": round(s_end - s_all, 1),
                     "cpu_children_s": round(c_end - c_all, 1), "cpu_s": round(s_end - s_all + c_end - c_all, 1)},
           "clock": {k: [round(x, 1) for x in v] for k, v in ns.get("clock", {}).items()},
           "cells": rows, "top_functions_cumulative": funcs}
    print(json.dumps(res["total"]), res["loadavg_before"], res["loadavg_after"])
    print(buf.getvalue()[:12000])
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
