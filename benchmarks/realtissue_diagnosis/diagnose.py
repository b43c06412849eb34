"""Why does the release pair not beat Otsu + watershed on the held-out images? (issue 10)

Diagnostic only, never a choice: the issue asks, when the ST-trained model does not beat the
classical baseline on one's own held-out images, to find out why (labels, resolution handling,
stain, training budget). This script perturbs one factor at a time at *inference* and re-scores
the shipped release pair (``models/realtissue``) and Otsu + watershed on the chapter's 12
held-out images (MoNuSeg Kidney 3, MoNuSeg colon 1, CoNSeP 8; real H&E, real manual outlines),
through ``stlib.infer.infer_image`` as ``stlib infer`` runs it:

* ``stain``: the model's per-image Macenko normalisation replaced by none / HED;
* ``scale``: the image presented as if its pixels were 0.8x / 1.25x their size (the network
  then sees nuclei 0.8x / 1.25x as large as at its training resolution);
* ``post-processing``: NP threshold, minimum size, h-maxima height of the stored settings;
* ``image``: the image JPEG-recompressed (q 60) or blurred (Gaussian sigma 1 px), i.e. a
  lossier or softer scan (CoNSeP is a JPEG export);
* ``foreground``: the instance split given the truth's markers (watershed of each method's own
  foreground from the centroids of the manual nuclei), separating "finds the nuclear pixels"
  from "splits touching nuclei".

Nothing here was used to choose a parameter of the shipped models or the chapter: a variant that
scores higher on these images is a finding about the shift, not a setting to adopt (that would be
choosing on the test images). Writes ``benchmarks/realtissue_diagnosis.csv`` (one row per method,
variant and image) and prints per-set means.

    PYTHONPATH=. .venv/bin/python benchmarks/realtissue_diagnosis/diagnose.py [--workers 2]
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

OUT = Path("benchmarks/realtissue_diagnosis.csv")
HELDOUT_ORGANS = ("Kidney", "Bowel")

#: name -> (kind, value); kind selects what is changed, one factor at a time
VARIANTS: dict[str, tuple[str, Any]] = {
    "as shipped": ("none", None),
    "stain: none": ("stain", "none"),
    "stain: hed": ("stain", "hed"),
    "scale: nuclei 0.8x": ("scale", 0.8),
    "scale: nuclei 1.25x": ("scale", 1.25),
    "np_thresh 0.3": ("pp", {"np_thresh": 0.3}),
    "np_thresh 0.5": ("pp", {"np_thresh": 0.5}),
    "min_size 100": ("pp", {"min_size": 100}),
    "marker_h 0.1": ("pp", {"marker_h": 0.1}),
    "marker_h 0.5": ("pp", {"marker_h": 0.5}),
    "image: JPEG q60": ("jpeg", 60),
    "image: blur 1 px": ("blur", 1.0),
    "split: true markers": ("oracle", None),
}
CLASSICAL_VARIANTS = ("as shipped", "scale: nuclei 0.8x", "scale: nuclei 1.25x", "image: JPEG q60",
                      "image: blur 1 px", "split: true markers")

_MODELS: dict[str, Any] = {}


def _init(paths: dict[str, str]) -> None:
    from stlib.infer import load_inference_model

    for name, p in paths.items():
        _MODELS[name] = load_inference_model(p, device="cpu")


def _jpeg(img: np.ndarray, q: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(q))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return np.clip(np.rint(gaussian_filter(img.astype(np.float32), sigma=(sigma, sigma, 0))), 0, 255).astype(np.uint8)


def _true_marker_split(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Watershed of ``pred``'s foreground from the centroids of the true nuclei (inside it)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    fg = pred > 0
    ids = np.unique(truth[truth > 0])
    markers = np.zeros(truth.shape, np.int32)
    if ids.size:
        cy = np.asarray(ndi.center_of_mass(np.ones_like(truth), truth, ids))
        for k, (y, x) in enumerate(np.rint(cy).astype(int), 1):
            if fg[y, x]:
                markers[y, x] = k
    dist = ndi.distance_transform_edt(fg)
    out = watershed(-dist, markers, mask=fg)
    # foreground blobs without a true marker stay as they were (false positives stay false positives)
    rest = (out == 0) & fg
    if rest.any():
        lab, n = ndi.label(rest)
        out = np.where(rest, lab + out.max(), out)
    return out.astype(np.int32)


def _one(job: tuple[str, str, Any]) -> list[dict[str, Any]]:
    from stlib.infer import infer_image
    from stlib.metrics import evaluate_pair
    from stlib.model.baseline import classical_segmentation

    method, variant, a = job
    kind, val = VARIANTS[variant]
    img, um = a.image, float(a.um_per_px)
    if kind == "jpeg":
        img = _jpeg(img, val)
    elif kind == "blur":
        img = _blur(img, val)
    elif kind == "scale":
        um = um * float(val)
    t0 = time.process_time()
    if method == "classical":  # its sizes are in µm: a wrong pixel size misleads it the same way
        inst = classical_segmentation(img, um_per_px=um)
    else:
        info = copy.copy(_MODELS[method])
        info.postproc = dict(info.postproc)
        if kind == "stain":
            info.stain_norm = val
        pp = val if kind == "pp" else None
        inst = infer_image(info, img, um_per_px=um, device="cpu", workers=0, tissue_detection=False,
                           postproc_kwargs=pp).inst
    if kind == "oracle":
        inst = _true_marker_split(inst, a.inst)
    r = evaluate_pair(a.inst, inst, um_per_px=a.um_per_px)
    return [{"method": method, "variant": variant, "image": a.name, "organ": a.organ, "source": a.source,
             "cpu_s": round(time.process_time() - t0, 2), **{k: v for k, v in r.items() if np.isscalar(v)}}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--release", default="models/realtissue")
    ap.add_argument("--source", default="realtissue", help="folder of the shipped real images")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    from stlib import realtissue as rt
    from stlib.demo.realtissue import load_source_images
    from stlib.utils import map_processes

    images = [a for a in load_source_images(args.source) if a.organ in HELDOUT_ORGANS]
    print(f"{len(images)} held-out images: " + ", ".join(f"{a.name} ({a.organ}, {a.source})" for a in images),
          flush=True)
    rel = Path(args.release)
    paths = {"ST-trained": str(rel / "st.pt"), "manual-trained": str(rel / "manual.pt")}
    jobs = []
    for v in args.variants:
        for m in (*paths, "classical"):
            if m == "classical" and v not in CLASSICAL_VARIANTS:
                continue
            jobs += [(m, v, a) for a in images]
    rows = map_processes(_one, jobs, workers=args.workers, threads=1, initializer=_init, initargs=(paths,),
                         desc="diagnosis")
    df = pd.DataFrame([r for rs in rows for r in rs])
    # the post-processing stored in the release files when this ran (the "as shipped" rows used it)
    import torch

    df["release_postproc"] = json.dumps(torch.load(paths["ST-trained"], weights_only=True).get("postproc"),
                                        sort_keys=True)
    df["set"] = rt.image_sets(df.rename(columns={"method": "model"}))
    df.to_csv(args.out, index=False)
    per_set = df.groupby(["variant", "method", "set"])["bpq"].mean().unstack("set")
    per_set["pooled"] = per_set.mean(axis=1)
    pd.set_option("display.width", 200)
    print(per_set.round(3).to_string())
    print(df.groupby(["variant", "method"])[["dq", "sq", "dice", "n_pred", "n_true"]].mean().round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
