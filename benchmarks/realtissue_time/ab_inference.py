"""A/B check of CPU inference settings on chapter 07's held-out images: instance maps and scores of
every network of a finished chapter-07 run folder with the network in the default memory layout (A)
and in channels_last (B, :data:`stlib.infer.engine.CPU_CHANNELS_LAST`), CPU seconds of each.

    PYTHONPATH=. nice -n 10 python benchmarks/realtissue_time/ab_inference.py --work /tmp/ch07-work \
        --out benchmarks/realtissue_time_ab_inference.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="working folder of profile_ch07.py (data/realtissue, runs/realtissue)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    out = Path(a.out).resolve() if a.out else None
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("STLIB_NO_PROGRESS", "1")
    import numpy as np
    import torch

    from stlib import realtissue as rt
    from stlib.infer import engine
    from stlib.io import cohort
    from stlib.model.net import HoVerNet

    os.chdir(a.work)
    table = cohort.cohort_table("data/realtissue")
    tests = rt.load_test_images("data/realtissue", table.loc[table.role == "held-out", "sample"].tolist())
    torch.manual_seed(0)
    methods = {"ST-trained": "runs/realtissue/models/st/model.pt", "manual-trained": "runs/realtissue/models/manual/model.pt",
               "untrained": HoVerNet(encoder="small")}
    pp = rt.postproc_of(rt.RecipeConfig())
    res, cpu = {}, {}
    for variant, flag in (("A default layout", False), ("B channels_last", True), ("A default layout (again)", False)):
        engine.CPU_CHANNELS_LAST = flag
        t0 = time.process_time()
        res[variant] = rt.score_images(methods, tests, device="cpu", model_um_per_px=0.25, keep_predictions=True,
                                       postproc=pp)
        cpu[variant] = round(time.process_time() - t0, 1)
        print(variant, cpu[variant], os.getloadavg(), flush=True)
    (pa, preds_a), (pb, preds_b) = res["A default layout"], res["B channels_last"]
    same_maps = {m: [bool(np.array_equal(x, y)) for x, y in zip(preds_a[m], preds_b[m])] for m in preds_a}
    diff_px = {m: [int((x != y).sum()) for x, y in zip(preds_a[m], preds_b[m])] for m in preds_a}
    cols = ["bpq", "dice", "aji", "pq", "f_d"]
    d = (pa[cols] - pb[cols]).abs().max().to_dict()
    out_d = {"command": "python benchmarks/realtissue_time/ab_inference.py " + " ".join(sys.argv[1:] if argv is None else argv),
             "torch_threads": torch.get_num_threads(), "loadavg_after": os.getloadavg(),
             "n_images": len(tests), "cpu_s_score_images_3_networks": cpu,
             "identical_instance_maps": {m: all(v) for m, v in same_maps.items()},
             "pixels_differing_per_image": diff_px, "max_abs_metric_difference": d,
             "mean_bpq": {v: r[0].groupby("model")["bpq"].mean().round(4).to_dict() for v, r in res.items()}}
    print(json.dumps(out_d, indent=1))
    if out:
        out.write_text(json.dumps(out_d, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
