"""Chapter 07's parallel paths give the serial path's results: held-out scoring over worker
processes (stlib.realtissue.score_images) - same rows, same order, same instance maps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stlib.io.annotations import AnnotatedImage
from stlib.utils import InputError


def _image(name: str, seed: int, size: int = 96) -> AnnotatedImage:
    """Pink background with dark blobs of random size and place (not the method's assumptions:
    no ellipse fitting, no distance rule; only something for both paths to segment)."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (232, 188, 214)
    inst = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for k in range(1, 1 + int(rng.integers(4, 12))):
        cy, cx, r = rng.uniform(6, size - 6), rng.uniform(6, size - 6), rng.uniform(3, 7)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        inst[m] = k
        img[m] = rng.integers(40, 120, 3)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return AnnotatedImage(name=name, image=img, inst=inst, type=None, um_per_px=0.5, organ="Kidney",
                          source="monuseg", path=f"{name}.png")


@pytest.fixture(scope="module")
def setup():
    import torch

    from stlib.model.net import HoVerNet

    torch.manual_seed(0)
    net = HoVerNet(encoder="small")  # untrained: a deterministic, not trivial, map
    images = [_image(f"img_{k}", k) for k in range(5)]
    methods = {"untrained": net, "classical": "classical"}
    return {"net": net, "images": images, "methods": methods}


def test_parallel_scoring_equals_serial(setup):
    from stlib import realtissue as rt

    kw = dict(device="cpu", model_um_per_px=0.5, keep_predictions=True,
              postproc={"np_thresh": 0.5, "min_size": 10, "mode": "distance", "marker_h": 1.0})
    ser, sp = rt.score_images(setup["methods"], setup["images"], workers=1, **kw)
    par, pp = rt.score_images(setup["methods"], setup["images"], workers=2, **kw)
    pd.testing.assert_frame_equal(ser, par)
    # order: method-major, images in the order given, whichever process ran them
    assert ser["model"].tolist() == ["untrained"] * 5 + ["classical"] * 5
    assert ser["image"].tolist() == [a.name for a in setup["images"]] * 2
    assert set(sp) == set(pp) == {"untrained", "classical"}
    for name in sp:
        assert len(sp[name]) == len(pp[name]) == 5
        for a, b in zip(sp[name], pp[name]):
            np.testing.assert_array_equal(a, b)
    assert any(p.max() > 0 for p in sp["classical"])  # something was segmented
    # no predictions kept: none returned (and none sent back by the workers)
    par2, p2 = rt.score_images(setup["methods"], setup["images"][:2], workers=2, **{**kw, "keep_predictions": False})
    assert p2 == {} and par2["bpq"].tolist() == ser[ser.image.isin(["img_0", "img_1"])]["bpq"].tolist()


def test_parallel_scoring_error_names_the_image(setup):
    from dataclasses import replace

    from stlib import realtissue as rt

    images = list(setup["images"][:3])
    images[1] = replace(images[1], name="broken_image", image=images[1].image[..., 0])  # grey: not RGB
    for workers in (1, 2):
        with pytest.raises((InputError, RuntimeError), match="broken_image"):
            rt.score_images({"classical": "classical"}, images, device="cpu", workers=workers)


def test_score_workers():
    from stlib import realtissue as rt
    from stlib.utils import usable_cpus

    assert rt.score_workers(12, "cpu", workers=3) == 3
    assert rt.score_workers(2, "cpu", workers=8) == 2
    assert rt.score_workers(1, "cpu") == 1
    assert 1 <= rt.score_workers(12, "cpu") <= min(12, usable_cpus())
    assert rt.score_workers(12, "cuda:0") == 1  # the network on the GPU: one process


def test_unpicklable_method_runs_in_this_process(setup):
    from stlib import realtissue as rt

    from stlib.model.baseline import classical_segmentation

    f = lambda image, um: classical_segmentation(image, um_per_px=um)  # noqa: E731 - a lambda on purpose
    a, _ = rt.score_images({"f": f}, setup["images"][:2], device="cpu", workers=2)
    b, _ = rt.score_images({"f": "classical"}, setup["images"][:2], device="cpu", workers=1)
    pd.testing.assert_frame_equal(a, b)


def test_features_one_pass_and_parallel_equal_two_serial_passes(setup):
    """The classification features: NP and NT branches from one forward pass equal one pass per
    branch, and the images spread over worker processes give the same features in the same order.
    Both sides run one torch thread (the workers' setting): the thread count alone moves the last
    float bits of a convolution (as it does between machines), not what this test is about."""
    import torch

    from stlib import realtissue as rt
    from stlib.evaluate import nucleus_features

    net, images = setup["net"], setup["images"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        two = []
        for a in images:
            f_np = nucleus_features(net, a.image[None], [a.inst], device="cpu", branch="np")[0]
            f_nt = nucleus_features(net, a.image[None], [a.inst], device="cpu", branch="nt")[0]
            two.append((f_np[0], np.concatenate([f_np[1], f_nt[1]], axis=1)))
        ser = rt._features(net, [a.image for a in images], [a.inst for a in images], "cpu", workers=1)
    finally:
        torch.set_num_threads(threads)
    par = rt._features(net, [a.image for a in images], [a.inst for a in images], "cpu", workers=2)
    assert rt._FEATURE_MODEL is None  # no network left behind in this process
    assert len(two) == len(ser) == len(par) == len(images)
    for (i0, f0), (i1, f1), (i2, f2) in zip(two, ser, par):
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_array_equal(i0, i2)
        assert f0.shape[0] == i0.size and f0.shape[1] > 0
        np.testing.assert_array_equal(f0, f1)
        np.testing.assert_array_equal(f0, f2)
