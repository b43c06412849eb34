import numpy as np
import pytest
from independent import MACENKO_E, MACENKO_H

from stlib.metrics import pq
from stlib.model.baseline import classical_segmentation


def _render(inst):
    """Dark purple nuclei on pink stroma (Beer-Lambert with H&E stain vectors other than the
    ones the baseline deconvolves: Macenko's reference pair)."""
    h, e = MACENKO_H, MACENKO_E
    od = 0.15 * e[None, None] + (inst[..., None] > 0) * 0.9 * h[None, None]
    rng = np.random.default_rng(0)
    img = 255 * np.exp(-od) + rng.normal(0, 3, inst.shape + (3,))
    return np.clip(img, 0, 255).astype(np.uint8)


def _truth():
    yy, xx = np.mgrid[:128, :128]
    inst = np.zeros((128, 128), np.int32)
    for i, (cy, cx) in enumerate([(20, 20), (20, 60), (70, 30), (90, 90), (60, 100)], start=1):
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= 81] = i
    return inst


def test_classical_baseline_finds_separate_nuclei():
    truth = _truth()
    pred = classical_segmentation(_render(truth), um_per_px=0.25)
    r = pq(truth, pred)
    assert r.tp == 5 and r.fp == 0 and r.pq > 0.8


def test_classical_baseline_blank_image_and_bad_input():
    assert classical_segmentation(np.full((32, 32, 3), 240, np.uint8)).max() == 0
    with pytest.raises(ValueError, match="RGB"):
        classical_segmentation(np.zeros((32, 32), np.uint8))
