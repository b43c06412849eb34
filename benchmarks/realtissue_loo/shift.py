"""Diagnostic only (never used to choose): a colour shift of the development images that does not
share the stain normalisation's assumption (Beer-Lambert mixing of two stains in optical density).
The shift acts in HSV space: hue rotation, saturation and value scaling (a white-balance / scanner
colour-response change). Each leave-one-organ-out ST network (seed 0, 150 steps) segments its fold's
images unshifted and shifted (whole-image maps as grid.py, the network's stored post-processing),
Otsu + watershed too; bPQ per (name, shift, image) is appended to ``benchmarks/realtissue_loo_shift.csv``.

    python benchmarks/realtissue_loo/shift.py base macenko
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402
import loo  # noqa: E402

OUT = Path("benchmarks/realtissue_loo_shift.csv")
SHIFTS = {"none": (0.0, 1.0, 1.0), "hue +0.04, sat x0.6, val x1.05": (0.04, 0.6, 1.05),
          "hue -0.04, sat x1.4, val x0.9": (-0.04, 1.4, 0.9)}


def shift(img: np.ndarray, dh: float, s: float, v: float) -> np.ndarray:
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(img)
    hsv[..., 0] = (hsv[..., 0] + dh) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * s, 0, 1)
    hsv[..., 2] = np.clip(hsv[..., 2] * v, 0, 1)
    return np.clip(np.rint(hsv2rgb(hsv) * 255), 0, 255).astype(np.uint8)


def main() -> None:
    from stlib import realtissue as rt
    from stlib.infer import load_inference_model
    from stlib.metrics import pq
    from stlib.model.postproc import hovernet_postprocess

    by_organ = loo.prepare()
    rows = []
    for fold in loo.ORGANS:
        imgs = rt.load_test_images(loo.DATA, by_organ[fold])
        for im in imgs:
            for sname, prm in SHIFTS.items():
                x = shift(im.image, *prm) if sname != "none" else im.image
                rows.append(dict(name="classical", shift=sname, fold=fold, image=im.name,
                                 bpq=pq(im.inst, rt._classical(x, im.um_per_px)).pq))
                for name in sys.argv[1:]:
                    mp = Path(loo.RUN) / f"models/loo/{name}/s0_n150/{fold}/st/model.pt"
                    pp = load_inference_model(mp).postproc
                    npb, hv = grid.maps(mp, x)
                    rows.append(dict(name=name, shift=sname, fold=fold, image=im.name,
                                     bpq=pq(im.inst, hovernet_postprocess(npb, hv, **pp)[0]).pq))
            print(fold, im.name, flush=True)
    d = pd.DataFrame(rows)
    d.to_csv(OUT, index=False)
    print(d.pivot_table(index="shift", columns="name", values="bpq", aggfunc="mean").round(3).to_string())


if __name__ == "__main__":
    main()
