"""The release pair on the CoNSeP images that no part of this project has seen (issue 10).

The shipped real subset holds 8 of CoNSeP's 27 training images (the chapter's held-out colon set).
The other 19 were never read by a choice of this project: not by the label derivation, the recipe,
the budget, the post-processing grid (all chosen on MoNuSeg breast / lung / prostate) nor by the
held-out diagnosis (the shipped 8). They are the closest to the issue's check this repository can
make (real H&E of an organ, hospital and scanner the networks never saw, real manual outlines), run
once, after every choice was committed; nothing may be chosen on them afterwards.

Scores the shipped release pair (``models/realtissue/{st,manual}.pt``, through ``stlib infer``'s
``infer_image`` with the post-processing stored in the model files) and Otsu + watershed on every
CoNSeP image of ``--source`` that is not in the shipped subset, with the chapter's comparison
(:func:`stlib.realtissue.heldout_comparison`: 95% bootstrap CIs over images, sign-flip test,
ST / manual ratio). Writes one row per (method, image) to ``benchmarks/realtissue_unseen_consep.csv``
and the summary to ``benchmarks/realtissue_unseen_consep.json``.

    PYTHONPATH=. .venv/bin/python benchmarks/realtissue_unseen/score_consep.py \
        --source ../shared/realdata/nuclei-consep
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

OUT_CSV = Path("benchmarks/realtissue_unseen_consep.csv")
OUT_JSON = Path("benchmarks/realtissue_unseen_consep.json")
SET = "CoNSeP colon, not shipped"


def main() -> int:
    from stlib import realtissue as rt
    from stlib.demo.realtissue import load_source_images, resolve_source
    from stlib.io.annotations import read_annotations
    from stlib.utils import InputError, atomic_path, machine_info, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=os.environ.get("STLIB_REALDATA", "../shared/realdata") + "/nuclei-consep",
                    help="CoNSeP training split (HoVer-Net layout: images/, inst/, type_mat/)")
    ap.add_argument("--release", default="models/realtissue")
    ap.add_argument("--n-boot", type=int, default=2000)
    a = ap.parse_args()
    src = Path(a.source)
    if not (src / "images").is_dir():
        raise InputError("CoNSeP folder not found", path=src, fix="pass --source PATH/nuclei-consep")
    shipped = {x.name for x in read_annotations(resolve_source("realtissue") / "nuclei-consep")}
    images = [x for x in load_source_images(src) if x.name not in shipped]
    if not images:
        raise InputError("every CoNSeP image of the source is in the shipped subset", path=src)
    print(f"{len(images)} CoNSeP images not in the shipped subset ({len(shipped)} shipped)")
    methods = {"ST-trained": Path(a.release) / "st.pt", "manual-trained": Path(a.release) / "manual.pt",
               "classical (Otsu + watershed)": "classical"}
    t0, c0 = time.perf_counter(), time.process_time()
    per, _ = rt.score_images(methods, images, device="cpu")
    wall = time.perf_counter() - t0
    per["set"] = SET
    with atomic_path(OUT_CSV) as tmp:
        per.to_csv(tmp, index=False)
    held = rt.heldout_comparison(per, n_boot=a.n_boot, seed=0)
    d = held["diffs"]
    piv = per.pivot_table(index="image", columns="model", values="bpq")
    st_minus_otsu = piv["ST-trained"] - piv["classical (Otsu + watershed)"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {
        "what": "release pair (models/realtissue) and Otsu + watershed on the CoNSeP training images not in the "
                "shipped subset; real H&E and real manual outlines (CoNSeP, Graham et al. 2019), an organ, hospital "
                "and scanner the networks never saw; run once after every choice was committed",
        "source": str(src), "images": rt.natural_sorted(list(piv.index)),
        "n_images": int(piv.shape[0]), "shipped_excluded": sorted(shipped),
        "bpq": {k: round(float(v), 4) for k, v in held["pooled"].items()},
        "text": held["text"], "n_boot": a.n_boot,
        "st_minus_otsu_images_ahead": int((st_minus_otsu > 0).sum()),
        "diffs_bpq": d[(d.metric == "bpq") & (d.set == "pooled")][
            ["comparison", "diff", "diff_ci_low", "diff_ci_high", "p_value", "n_images"]].round(4).to_dict("records"),
        "release_json": str(Path(a.release) / "release.json"),
        "commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "wall_s": round(wall, 1), "cpu_s_main_process": round(time.process_time() - c0, 1),
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/realtissue_unseen/score_consep.py --source " + str(src),
    }
    write_json(OUT_JSON, doc)
    print(per.groupby("model")["bpq"].agg(["mean", "std", "count"]).round(3).to_string())
    print(held["text"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
