"""The compiled grey reconstruction of the distance markers (stlib.model.postproc) against
scikit-image: the same arrays to the bit on random maps (continuous, plateau-heavy, several
objects) and on maps made from real manual nuclei, and the same instance maps end to end."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage.morphology import h_maxima, reconstruction

from stlib.model import postproc as P


def _maps(seed: int) -> list[np.ndarray]:
    """Random 2-D float64 maps of the kinds the markers meet: smooth bumps, integer plateaus
    (ties everywhere), noise, objects on a 0 background, single rows / columns, constant."""
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 40, 2)
    smooth = ndi.gaussian_filter(rng.uniform(0, 10, (h, w)), rng.uniform(0.5, 3))
    plateaus = rng.integers(0, 4, (h, w)).astype(np.float64)
    noise = rng.normal(0, 1, (h, w))
    blobs = ndi.gaussian_filter(ndi.distance_transform_edt(rng.uniform(size=(h, w)) > 0.4), 1.0)
    blobs *= rng.uniform(size=(h, w)) > 0.2
    return [smooth, plateaus, noise, blobs, np.full((h, w), 2.0), smooth[:1], smooth[:, :1]]


@pytest.mark.parametrize("seed", range(40))
def test_reconstruction_and_h_maxima_equal_the_library(seed):
    rng = np.random.default_rng(1000 + seed)
    for img in _maps(seed):
        for h in (0.1, 0.5, 1.0, float(rng.uniform(0.01, 3.0))):
            marker = img - h - 2 * np.finfo(np.float64).resolution * np.abs(img)
            np.testing.assert_array_equal(P._reconstruct_dilation(marker, img),
                                          reconstruction(marker, img, method="dilation"))
            np.testing.assert_array_equal(P.h_maxima_mask(img, h), h_maxima(img, h) > 0)
            # an arbitrary seed below the mask, not only the h-shifted image
            seed_img = np.minimum(img, img.min() + rng.uniform(-1, 1, img.shape) * np.ptp(img))
            np.testing.assert_array_equal(P._reconstruct_dilation(seed_img, img),
                                          reconstruction(seed_img, img, method="dilation"))


def test_h_maxima_by_object_fast_equals_reference():
    rng = np.random.default_rng(7)
    for k in range(20):
        blob = ndi.binary_opening(rng.uniform(size=(90, 110)) > 0.45, iterations=1)
        dist = ndi.gaussian_filter(ndi.distance_transform_edt(blob), 1.0) * blob
        dist += rng.uniform(0, 0.3, dist.shape) * blob * (k % 2)
        for h in (0.25, 1.0, 2.0):
            np.testing.assert_array_equal(P._h_maxima_by_object(dist, h),
                                          P._h_maxima_by_object(dist, h, reference=True))


def _distance_maps_of(inst: np.ndarray) -> np.ndarray:
    """The distance mode's marker input made from a nucleus mask (see _distance_instances)."""
    blob = inst > 0
    return ndi.gaussian_filter(ndi.distance_transform_edt(blob), 1.0) * blob


def test_real_nuclei_markers_and_instances_identical(realdata, monkeypatch):
    """Real MoNuSeg and CoNSeP manual masks: the markers of their distance maps, and the whole
    distance-mode post-processing of a probability map made from the real H&E, are the same with
    the compiled reconstruction and with scikit-image's."""
    from stlib.io.annotations import read_monuseg_folder

    anns = read_monuseg_folder(realdata / "nuclei-monuseg")[:3]
    assert anns
    for a in anns:
        dist = _distance_maps_of(a.inst)
        for h in (0.25, 1.0):
            np.testing.assert_array_equal(P._h_maxima_by_object(dist, h),
                                          P._h_maxima_by_object(dist, h, reference=True))
        grey = a.image.astype(np.float64).mean(axis=2) / 255.0
        prob = ndi.gaussian_filter(1.0 - grey, 2.0)
        prob = (prob - prob.min()) / max(np.ptp(prob), 1e-9)
        hv = np.zeros((2, *prob.shape), np.float32)
        kw = dict(np_thresh=0.5, min_size=30, mode="distance", marker_h=0.25)
        fast = P.hovernet_postprocess(prob, hv, **kw)[0]
        with monkeypatch.context() as m:
            m.setattr(P, "_h_maxima_by_object", functools.partial(P._h_maxima_by_object, reference=True))
            ref = P.hovernet_postprocess(prob, hv, **kw)[0]
        assert fast.max() > 10
        np.testing.assert_array_equal(fast, ref)
