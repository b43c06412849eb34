"""Cache NP/HV with flip TTA (mean of identity, h-flip, v-flip, both) and with per-image stain standardisation."""
import sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).resolve().parent))  # cache.py, scratch.py
from cache import dev_images
from stlib.infer.engine import load_inference_model, predict_tiles


def run(model, x):
    h, w = x.shape[:2]
    H, W = -(-h // 32) * 32, -(-w // 32) * 32
    xp = np.pad(x, ((0, H - h), (0, W - w), (0, 0)), mode="reflect")
    o = predict_tiles(model, xp[None], device="cpu")
    return o["np_prob"][0, :h, :w], o["hv"][0, :, :h, :w]


def tta(model, x):
    nps, hvs = [], []
    for fh in (False, True):
        for fv in (False, True):
            y = x[:, ::-1] if fh else x
            y = y[::-1] if fv else y
            npp, hv = run(model, np.ascontiguousarray(y))
            if fh:
                npp, hv = npp[:, ::-1], hv[:, :, ::-1] * np.array([-1, 1])[:, None, None]
            if fv:
                npp, hv = npp[::-1], hv[:, ::-1] * np.array([1, -1])[:, None, None]
            nps.append(npp); hvs.append(hv)
    return np.mean(nps, 0), np.mean(hvs, 0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    imgs = dev_images()
    for mp in sys.argv[1:]:
        model = load_inference_model(mp).model
        dst = Path(mp).with_suffix(".devtta.npz")
        if not dst.is_file():
            arrs = {}
            for a in imgs:
                npp, hv = tta(model, a.image)
                arrs[f"{a.name}__np"] = npp.astype(np.float16); arrs[f"{a.name}__hv"] = hv.astype(np.float16)
            np.savez_compressed(dst, **arrs)
            print("cached", dst, flush=True)
