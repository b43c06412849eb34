"""Alignment outcomes and sample-level evidence on demo cohorts across registration errors.

Each seed gets one setting of the demo generator's HEST registration error (shift, rotation,
local warp, slide size) from SETTINGS, in order; every sample of its cohort (6 samples) is aligned
with the AlignConfig defaults, scored against the demo truth and judged by
``stlib.align.alignment_verdict``. One CSV row per sample.

    python benchmarks/align_failure_flag/cohorts.py --seeds 9100-9117 --csv benchmarks/align_failure_flag/dev.csv

``--work`` (default ``$STLIB_BENCH_WORK/align_failure_flag``, ``runs/bench/align_failure_flag`` without it) holds the
generated cohorts; they are deleted after use unless ``--keep``.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import time
from pathlib import Path

import numpy as np
import shapely

from stlib.align import Transform, align_sample, alignment_error_um, in_excluded_region
from stlib.demo import make_cohort
from stlib.io.hest import HestSample
from stlib.utils import read_json

#: (reg_shift_um, reg_rot_deg, warp_px, image_px): inside the 25 µm capture range and beyond it
SETTINGS = [
    (5, 1, 3, 1024), (15, 1, 3, 640), (25, 1, 3, 1024), (35, 1, 3, 640), (50, 1, 3, 1024), (80, 1, 3, 640),
    (10, 3, 6, 640), (20, 3, 6, 1024), (30, 3, 6, 640), (40, 3, 6, 1024), (65, 3, 6, 640),
    (3, 6, 3, 1024), (5, 10, 3, 640), (25, 4, 8, 640), (45, 2, 8, 1024), (15, 2, 8, 1024),
    (100, 1, 3, 1024), (30, 1, 3, 1024),
]

FIELDS = ["seed", "sample", "reg_shift_um", "reg_rot_deg", "warp_px", "image_px", "status", "reasons",
          "corr_before", "corr_after", "excluded_fraction", "median_residual_um", "moved_um", "n_tiles",
          "truth_median_error_um", "truth_failed", "kept_misplaced", "kept_misplaced_fraction", "align_cpu_s"]


def seeds_arg(text: str) -> list[int]:
    """``9100-9117`` or ``9100,9105``."""
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def run_seed(seed: int, setting: tuple, work: Path, *, keep: bool) -> list[dict]:
    shift, rot, warp, px = setting
    root = work / f"seed{seed}"
    make_cohort(root, seed=seed, image_px=px, pannuke_per_fold=0, raw_bundles=0,
                reg_shift_um=float(shift), reg_rot_deg=float(rot), warp_px=float(warp))
    hest, truth = root / "hest", root / "truth"
    rows = []
    for sid in sorted(p.name for p in truth.iterdir()):
        t0 = time.process_time()
        res = align_sample(hest, sid)
        cpu = time.process_time() - t0
        tf = read_json(truth / sid / "transform.json")
        nuc = HestSample(hest, sid).nuclei()
        um = Transform(np.linalg.inv(res.initial)).warp_geometries(nuc.geometry.values)
        pts = shapely.get_coordinates(shapely.centroid(um))
        err = alignment_error_um(res, tf, pts)
        xy = res.transform.apply_xy(pts)
        exc = in_excluded_region(res, xy[:, 0], xy[:, 1])
        kept = err[~exc]
        ev = res.verdict["evidence"]
        rows.append({"seed": seed, "sample": sid, "reg_shift_um": shift, "reg_rot_deg": rot, "warp_px": warp,
                     "image_px": px, "status": res.status, "reasons": "; ".join(res.verdict["reasons"]),
                     **{k: ev[k] for k in ("corr_before", "corr_after", "excluded_fraction", "median_residual_um",
                                           "moved_um", "n_tiles")},
                     "truth_median_error_um": float(np.median(err)),
                     "truth_failed": bool(np.median(err) > res.params["max_residual_um"]),
                     "kept_misplaced": int((kept > res.params["max_residual_um"]).sum()),
                     "kept_misplaced_fraction": float((kept > res.params["max_residual_um"]).mean()) if kept.size else 0.0,
                     "align_cpu_s": round(cpu, 2)})
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", required=True, type=seeds_arg, help="e.g. 9100-9117")
    ap.add_argument("--csv", required=True, help="output CSV (one row per sample)")
    ap.add_argument("--work", default=str(Path(os.environ.get("STLIB_BENCH_WORK", "runs/bench")) / "align_failure_flag"),
                    help="folder for the generated cohorts (default $STLIB_BENCH_WORK/align_failure_flag, else runs/bench/...)")
    ap.add_argument("--offset", type=int, default=0, help="start at this index of SETTINGS")
    ap.add_argument("--keep", action="store_true", help="keep the generated cohorts")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.csv)
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for k, seed in enumerate(a.seeds):
            for row in run_seed(seed, SETTINGS[(a.offset + k) % len(SETTINGS)], work, keep=a.keep):
                w.writerow(row)
                fh.flush()
                print(row["seed"], row["sample"], row["reg_shift_um"], row["status"], f"{row['corr_after']:.3f}",
                      f"{row['excluded_fraction']:.3f}", f"{row['truth_median_error_um']:.2f}", row["kept_misplaced"],
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
