"""Cache NP/HV maps of dev images for a model (whole image at model resolution, reflect-padded)."""
from scratch import WORK  # $STLIB_BENCH_WORK/realtissue_recipe_session6 (default runs/bench/...)
import sys, pickle
from pathlib import Path
import numpy as np, torch
from stlib import realtissue as rt
from stlib.infer.engine import load_inference_model, predict_tiles

D = str(WORK / "data")
DEV = ["MONUSEG_CH-5767", "MONUSEG_G9-6362"]


def dev_images():
    p = WORK / "dev_images.pkl"
    if p.is_file():
        return pickle.load(open(p, "rb"))
    imgs = [rt.to_resolution(a, 0.25) for a in rt.load_test_images(D, DEV)]
    pickle.dump(imgs, open(p, "wb"))
    return imgs


def outputs(model_path, img, tta=False):
    info = load_inference_model(model_path)
    h, w = img.shape[:2]
    H, W = -(-h // 32) * 32, -(-w // 32) * 32
    x = np.pad(img, ((0, H - h), (0, W - w), (0, 0)), mode="reflect")
    out = predict_tiles(info.model, x[None], device="cpu")
    return out["np_prob"][0, :h, :w], out["hv"][0, :, :h, :w]


if __name__ == "__main__":
    torch.set_num_threads(1)
    imgs = dev_images()
    for mp in sys.argv[1:]:
        dst = Path(mp).with_suffix(".dev.npz")
        if dst.is_file():
            continue
        arrs = {}
        for a in imgs:
            npp, hv = outputs(mp, a.image)
            arrs[f"{a.name}__np"] = npp.astype(np.float16)
            arrs[f"{a.name}__hv"] = hv.astype(np.float16)
        np.savez_compressed(dst, **arrs)
        print("cached", dst)
