"""H&E-guided refinement of ST nucleus masks (stlib.labels.refine)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from independent import MACENKO_E, MACENKO_H
from scipy import ndimage as ndi

from stlib.labels.refine import RefineConfig, RefineStats, haematoxylin, refine_instances, refine_label_maps

UM = 0.25
# haematoxylin-like and eosin-like absorbances (unit RGB optical density vectors): Macenko's
# reference pair, not the Ruifrok-Johnston vectors the refinement deconvolves
H_VEC = MACENKO_H
E_VEC = MACENKO_E


def _render(true_inst: np.ndarray, *, h_level=None, seed: int = 0) -> np.ndarray:
    """Beer-Lambert H&E-like image: eosin background, haematoxylin inside the true nuclei."""
    rng = np.random.default_rng(seed)
    n = int(true_inst.max())
    levels = np.zeros(n + 1)
    levels[1:] = rng.uniform(0.5, 0.9, n) if h_level is None else h_level
    h = levels[true_inst]
    h = ndi.gaussian_filter(h, 0.8)
    e = 0.25 + 0.03 * rng.standard_normal(true_inst.shape)
    od = h[..., None] * H_VEC + e[..., None] * E_VEC
    rgb = 255 * 10 ** (-od) + rng.normal(0, 2, od.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _ellipses(shape, centres, axes, angles=None) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    inst = np.zeros(shape, np.int32)
    for i, ((cx, cy), (a, b)) in enumerate(zip(centres, axes), 1):
        t = 0.0 if angles is None else angles[i - 1]
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        inst[(u / a) ** 2 + (v / b) ** 2 <= 1] = i
    return inst


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture
def field():
    """A 192 px field of 9 nuclei, two of them touching, and DAPI-like outlines: 15 % larger,
    shifted by ~0.5 µm and jittered, as rasterised ST masks are."""
    rng = np.random.default_rng(3)
    centres = [(30, 30), (90, 32), (150, 35), (35, 95), (95, 100), (112, 100), (160, 100), (40, 160), (120, 155)]
    axes = [(14, 10), (12, 12), (16, 9), (11, 9), (10, 8), (9, 8), (15, 11), (13, 10), (12, 9)]
    angles = rng.uniform(0, np.pi, len(centres))
    true = _ellipses((192, 192), centres, axes, angles)
    dapi_c = [(x + rng.normal(0, 2), y + rng.normal(0, 2)) for x, y in centres]
    dapi = _ellipses((192, 192), dapi_c, [(a * 1.15, b * 1.15) for a, b in axes], angles + rng.normal(0, 0.2, len(axes)))
    return true, dapi * 1000 + 7 * (dapi > 0), _render(true)  # large, non-contiguous global ids


def _per_nucleus_iou(true, inst):
    ids = [i for i in np.unique(inst) if i]
    out = []
    for j in ids:
        m = inst == j
        t = np.bincount(true[m]).argmax() if (true[m] > 0).any() else 0
        out.append(_iou(m, true == t) if t else 0.0)
    return np.array(out)


def test_snapped_outlines_match_the_haematoxylin_nuclei(field):
    true, dapi, img = field
    refined, not_vis, stats = refine_instances(img, dapi, um_per_px=UM)
    before = _per_nucleus_iou(true, dapi)
    after = _per_nucleus_iou(true, refined)
    assert before.mean() < 0.75  # the DAPI-like outlines are clearly off
    assert after.mean() > 0.88 and after.min() > 0.75
    # identities are kept: same ids, none created, none lost
    assert set(np.unique(refined)) == set(np.unique(dapi))
    assert not not_vis.any()
    assert stats.n == 9 and stats.refined == 9 and stats.kept_st == 0 and stats.not_visible == 0
    assert stats.to_dict()["area_ratio"] < 0.9  # outlines that were 15 % too large shrank


def test_touching_nuclei_stay_apart(field):
    true, dapi, img = field
    refined, _, _ = refine_instances(img, dapi, um_per_px=UM)
    a, b = dapi[95, 95], dapi[100, 112]
    assert a != b and a and b
    # each of the two touching nuclei is one connected component and they do not swap
    for j, (x, y) in ((a, (95, 100)), (b, (112, 100))):
        lab, n = ndi.label(refined == j)
        assert n == 1
        assert refined[y, x] == j


def test_nucleus_without_haematoxylin_becomes_not_visible(field):
    true, dapi, img = field
    ghost = _ellipses(true.shape, [(170, 165)], [(10, 8)])  # a DAPI nucleus over plain stroma
    assert not (true[ghost > 0]).any()
    inst = np.where(ghost > 0, 99_999, dapi)
    refined, not_vis, stats = refine_instances(img, inst, um_per_px=UM)
    assert stats.not_visible == 1
    assert not (refined == 99_999).any()
    assert np.array_equal(not_vis, inst == 99_999)


def test_guard_keeps_the_st_outline_where_the_image_disagrees():
    # the image shows a nucleus of twice the ST radius: snapping would more than triple the
    # ST area, beyond max_grow, so the ST outline is kept
    true = _ellipses((96, 96), [(48, 48)], [(14, 14)])
    img = _render(true, h_level=0.8)
    st = _ellipses((96, 96), [(48, 48)], [(7, 7)])
    refined, not_vis, stats = refine_instances(img, st * 5, um_per_px=UM)
    assert stats.kept_st == 1 and stats.refined == 0
    assert np.array_equal(refined, st * 5)
    assert not not_vis.any()


def test_flat_region_is_not_visible_even_alone():
    # one ST nucleus over a uniformly dark area: no contrast between core and ring, so there is
    # no haematoxylin boundary to snap to; the relative test cannot judge a lone nucleus, the
    # absolute floor does
    dark = np.ones((64, 64), np.int32)
    img = _render(dark, h_level=0.8)
    st = _ellipses((64, 64), [(32, 32)], [(8, 7)])
    refined, not_vis, stats = refine_instances(img, st, um_per_px=UM)
    assert stats.not_visible == 1 and not refined.any() and np.array_equal(not_vis, st > 0)


def test_label_maps_follow_the_instances_and_keep_ignore(field):
    true, dapi, img = field
    ids = [i for i in np.unique(dapi) if i]
    cls = {j: (k % 5) + 1 for k, j in enumerate(ids)}
    cls[ids[0]] = 255  # a nucleus of unknown class
    typ = np.zeros(dapi.shape, np.uint8)
    conf = np.zeros(dapi.shape, np.uint8)
    for j in ids:
        typ[dapi == j] = cls[j]
        conf[dapi == j] = 0 if cls[j] == 255 else 100 + j % 100
    ignore = np.zeros(dapi.shape, np.uint8)
    ignore[:, 176:] = 1  # an excluded strip
    inst2, typ2, ign2, conf2, stats = refine_label_maps(img, dapi, typ, ignore, conf, um_per_px=UM)
    # excluded pixels are untouched
    strip = ignore.astype(bool)
    assert np.array_equal(inst2[strip], dapi[strip]) and ign2[strip].all()
    # class and confidence are those of the (refined) instance, background is 0
    for j in ids:
        m = inst2 == j
        assert (typ2[m] == cls[j]).all()
        assert (conf2[m] == conf[dapi == j][0]).all()
    assert (typ2[inst2 == 0] == 0).all() and (conf2[inst2 == 0] == 0).all()
    assert inst2.dtype == dapi.dtype and typ2.dtype == np.uint8 and ign2.dtype == np.uint8


def test_empty_tile_and_tile_without_background():
    img = np.full((32, 32, 3), 230, np.uint8)
    inst = np.zeros((32, 32), np.int32)
    out, nv, st = refine_instances(img, inst, um_per_px=UM)
    assert not out.any() and not nv.any() and st == RefineStats()
    full = np.ones((32, 32), np.int32) * 4  # one nucleus covering the tile
    out, nv, st = refine_instances(_render(full), full, um_per_px=UM)
    assert out.shape == full.shape and st.n == 1


def test_bad_input_and_config():
    with pytest.raises(ValueError, match="RGB"):
        haematoxylin(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="share"):
        refine_instances(np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8), np.int32), um_per_px=UM)
    with pytest.raises(ValueError, match="um_per_px"):
        refine_instances(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int32), um_per_px=0)
    with pytest.raises(ValueError, match="edge_fraction"):
        RefineConfig(edge_fraction=1.0)
    with pytest.raises(ValueError, match="grow_um"):
        RefineConfig(grow_um=0)


def test_stats_add_up():
    a = RefineStats(n=3, refined=2, kept_st=1, area_st=10, area_refined=8)
    b = RefineStats(n=1, not_visible=1)
    s = a + b
    assert (s.n, s.refined, s.kept_st, s.not_visible) == (4, 2, 1, 1)
    assert s.to_dict()["area_ratio"] == pytest.approx(0.8)


# --------------------------------------------------------------------------------------
# the compiled path equals the scikit-image / scipy reference
# --------------------------------------------------------------------------------------

def _labels(rng, shape, density, grow):
    lab = ndi.label(rng.random(shape) < density)[0]
    lab = ndi.grey_dilation(lab, size=grow).astype(np.int32)
    lab[0, 0] = max(lab[0, 0], 1)
    return lab


def test_kernels_equal_their_library_twins():
    from skimage.color import rgb2hed
    from skimage.filters import sobel
    from skimage.segmentation import watershed

    from stlib.labels import _refine_kernels as K
    from stlib.labels.refine import _clean, _label_median

    rng = np.random.default_rng(1)
    lut, hcol = K.hed_lut()
    for trial in range(24):
        H, W = (int(v) for v in rng.integers(20, 70, 2))
        img = rng.integers(0, 256, (H, W, 3), np.uint8)
        if trial % 3 == 0:
            img = (img // 64 * 64).astype(np.uint8)  # few colours: exact ties everywhere
        sig = [0.0, 2.0, 1.3][trial % 3]
        h_ref = rgb2hed(img)[..., 0].astype(np.float32)
        h_ref = ndi.gaussian_filter(h_ref, sig) if sig else h_ref
        h = K.haematoxylin_smoothed(img, lut, hcol, K.gaussian_weights(sig) if sig else np.ones(1))
        assert np.array_equal(h, h_ref)
        lab = _labels(rng, (H, W), [0.02, 0.1, 0.4][trial % 3], [1, 3, 5][trial % 3])
        d_ref, (iy, ix) = ndi.distance_transform_edt(lab == 0, return_indices=True)
        d, owner = K.edt_owner(lab)
        assert np.array_equal(d, d_ref) and np.array_equal(owner, lab[iy, ix])  # scipy's tie rule
        m = rng.random((H, W)) < 0.8
        assert np.array_equal(K.edt_distance(m), ndi.distance_transform_edt(m))
        for rad in (1.0, 2.74, 3.0):
            assert np.array_equal(K.beyond(m, rad), ndi.distance_transform_edt(m) > rad)
        n = int(lab.max())
        vals = h if trial % 2 else (np.round(h * 4) / 4).astype(np.float32)
        assert np.array_equal(K.label_median(vals, lab, n), _label_median(vals, lab, n), equal_nan=True)
        s = K.sobel_magnitude(h)
        assert np.array_equal(s, sobel(h))
        q = s if trial % 2 else (np.round(s * 20) / 20).astype(np.float32)
        mk = np.where(ndi.binary_erosion(lab > 0), lab, 0).astype(np.int32)
        mk[ndi.distance_transform_edt(lab == 0) > 3] = n + 1
        assert np.array_equal(K.watershed(q, mk), watershed(q, mk))
        lab2 = np.where(rng.random((H, W)) < 0.85, lab, 0).astype(np.int32)
        assert np.array_equal(K.clean_labels(lab2, mk, n), _clean(lab2, mk))


@pytest.mark.parametrize("n_pairs", [0, 1, 2, 3])
def test_watershed_ties_between_labels_resolve_as_scikit_image(n_pairs):
    """Seeds of different labels with equal values: the heap's tie order matters, and the
    compiled watershed must reproduce it (pairs tried both ways, else the exact heap)."""
    from skimage.segmentation import watershed

    from stlib.labels import _refine_kernels as K

    rng = np.random.default_rng(7 + n_pairs)
    bad = 0
    for _ in range(60):
        H, W = (int(v) for v in rng.integers(8, 30, 2))
        img = (np.round(rng.random((H, W)) * 5) / 5).astype(np.float32)  # plateaus
        mk = np.zeros((H, W), np.int32)
        idx = rng.choice(H * W, 6, replace=False)
        mk.flat[idx] = np.arange(1, 7)
        img.flat[idx] = rng.random(6).astype(np.float32) + 10 * np.arange(6)  # distinct marker values...
        for p in range(n_pairs):  # ...except n_pairs tied pairs of different labels
            img.flat[idx[2 * p + 1]] = img.flat[idx[2 * p]]
        bad += not np.array_equal(K.watershed(img, mk), watershed(img, mk))
    assert bad == 0


def test_watershed_on_the_needed_gradient_equals_scikit_image_on_the_full_one():
    """The refinement computes the Sobel gradient only where the flooding reads it (pixels near a
    nucleus and their 4-neighbours) and hands the full one to the exact heap when ties force it:
    the labels are scikit-image's on the full gradient, with plateaus making ties frequent."""
    from skimage.filters import sobel
    from skimage.segmentation import watershed

    from stlib.labels import _refine_kernels as K

    rng = np.random.default_rng(5)
    cross = ndi.generate_binary_structure(2, 1)
    exact = 0
    for trial in range(40):
        H, W = (int(v) for v in rng.integers(12, 48, 2))
        h = (np.round(rng.random((H, W)) * [2, 4, 20][trial % 3]) / 4).astype(np.float32)
        lab = _labels(rng, (H, W), 0.03, 3)
        n = int(lab.max())
        mk = np.where(ndi.binary_erosion(lab > 0), lab, 0).astype(np.int32)
        mk[ndi.distance_transform_edt(lab == 0) > 2] = n + 1
        need = ndi.binary_dilation(mk != n + 1, cross)
        g = K.sobel_where(h, need)
        assert np.array_equal(g[need], sobel(h)[need]) and not g[~need].any()
        out = np.zeros((H + 2, W + 2), np.int32)
        out[1:-1, 1:-1] = mk
        inside = np.zeros_like(out, bool)
        inside[1:-1, 1:-1] = True
        seed = (out != 0) & ndi.binary_dilation(inside & (out == 0), cross)
        padded = np.zeros(out.shape, np.float64)
        padded[1:-1, 1:-1] = g
        exact += K._sorted_seeds(padded.ravel(), out.ravel(), seed.ravel())[1].size > 2
        assert np.array_equal(K._watershed(g, mk, h), watershed(sobel(h), mk))
    assert exact > 0  # the heap path was exercised


def test_compiled_refinement_equals_reference_on_rendered_fields():
    rng = np.random.default_rng(11)
    for trial in range(6):
        size = 160
        k = 14
        centres = [tuple(v) for v in rng.uniform(15, size - 15, (k, 2))]
        axes = [(a, a * rng.uniform(0.6, 1.0)) for a in rng.uniform(6, 14, k)]
        angles = rng.uniform(0, np.pi, k)
        true = _ellipses((size, size), centres, axes, angles)
        dapi_c = [(x + rng.normal(0, 2), y + rng.normal(0, 2)) for x, y in centres]
        dapi = _ellipses((size, size), dapi_c, [(a * 1.15, b * 1.15) for a, b in axes], angles)
        img = _render(true, seed=trial)
        typ = np.where(dapi > 0, dapi % 5 + 1, 0).astype(np.uint8)
        ign = np.zeros_like(typ)
        ign[:, : 10 * trial] = 1
        conf = np.where(dapi > 0, 200, 0).astype(np.uint8)
        a = refine_label_maps(img, dapi * 37, typ, ign, conf, um_per_px=UM)
        b = refine_label_maps(img, dapi * 37, typ, ign, conf, um_per_px=UM, reference=True)
        for x, y in zip(a[:4], b[:4]):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        assert a[4] == b[4]


def test_compiled_decisions_equal_the_numpy_glue():
    """The per-nucleus decisions of refine_instances, compiled (thresholds, guards), against the
    numpy lines of refine_instances_reference, with labels lacking a ring and an empty outside."""
    from stlib.labels import _refine_kernels as K
    from stlib.labels.refine import _guards, _thresholds_numpy

    cfg = RefineConfig()
    rng = np.random.default_rng(4)
    for trial in range(40):
        H, W = (int(v) for v in rng.integers(10, 40, 2))
        n = int(rng.integers(1, 8))
        h = rng.random((H, W)).astype(np.float32)
        if trial % 4 == 0:
            h = (np.round(h * 3) / 3).astype(np.float32)  # ties in the medians
        core = np.where(rng.random((H, W)) < 0.3, rng.integers(1, n + 1, (H, W)), 0).astype(np.int32)
        ring = np.where(rng.random((H, W)) < [0.3, 0.02, 0.0][trial % 3], rng.integers(1, n + 1, (H, W)), 0)
        ring = ring.astype(np.int32)
        outside = rng.random((H, W)) < (0.0 if trial % 5 == 0 else 0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # all-NaN slices
            thr, not_vis = _thresholds_numpy(h, core, ring, outside, n, cfg)  # refine_instances_reference's
        thr_k, nv_k = K.thresholds(h, core, ring, outside, n, cfg.edge_fraction, cfg.min_rel_contrast,
                                   cfg.min_contrast_od)
        assert np.array_equal(thr_k, thr, equal_nan=True) and np.array_equal(nv_k, not_vis)
        local = np.where(rng.random((H, W)) < 0.6, rng.integers(0, n + 1, (H, W)), 0).astype(np.int32)
        out = np.where(rng.random((H, W)) < 0.5, local, rng.integers(0, n + 1, (H, W))).astype(np.int32)
        nv = rng.random(n + 1) < 0.2
        nv[0] = False
        a0 = np.bincount(local.ravel(), minlength=n + 1).astype(float)
        a1 = np.bincount(out.ravel(), minlength=n + 1).astype(float)
        keep_st, drop, stats = _guards(a0, a1, nv, cfg)
        k_keep, k_drop, st = K.guards(local, out, nv, n, cfg.min_keep, cfg.max_grow)
        assert np.array_equal(k_keep, keep_st) and np.array_equal(k_drop, drop)
        assert RefineStats(*(int(v) for v in st)) == stats
    for x in ([np.nan], [1.0, np.nan, 3.0], [2.0, 1.0, np.nan, 5.0, 4.0], [0.1, 0.2]):
        a = np.array(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert np.array_equal(K._nanmedian(a), np.nanmedian(a), equal_nan=True)


def test_bounded_zones_equal_the_full_feature_transform():
    """The near / ring / outside zones computed only up to the ring's distance (the leftmost of the
    columns' nearest pixels at the smallest distance) equal those of the full feature transform,
    whose nearest pixels are scipy's, on sparse, dense and tie-heavy label maps."""
    from stlib.labels import _refine_kernels as K

    rng = np.random.default_rng(8)
    for trial in range(300):
        H, W = (int(v) for v in rng.integers(3, 70, 2))
        p = [0.002, 0.02, 0.1, 0.4, 0.9][trial % 5]
        lab = np.where(rng.random((H, W)) < p, rng.integers(1, 6, (H, W)), 0).astype(np.int32)
        if not lab.any():
            continue
        r, rr = [6.0, 2.5, 1.0, 3.3, 0.5][trial % 5], [4.0, 1.0, 2.2, 7.0][trial % 4]
        t_near, t_ring = K._sqrt_le(r), K._sqrt_le(r + rr)
        shift = int(np.ceil(np.log2(W))) if W > 1 else 0
        full = K._near_ring_full(lab, t_near, t_ring)
        got = K._near_ring(lab, t_near, t_ring, shift)
        assert all(np.array_equal(a, b) for a, b in zip(full, got))
        if trial % 10 == 0:  # and the owner is scipy's nearest labelled pixel
            d, (iy, ix) = ndi.distance_transform_edt(lab == 0, return_indices=True)
            own = lab[iy, ix]
            assert np.array_equal(got[0], np.where(d <= r, own, 0))
            assert np.array_equal(got[1], np.where((d > r) & (d <= r + rr), own, 0))


# --------------------------------------------------------------------------------------
# H&E nuclei without an ST nucleus become ignore (unmatched_ignore)
# --------------------------------------------------------------------------------------

def _unmatched_tile():
    """Three true nuclei: two with an ST nucleus (one of them small: the ST layer covers it), one
    the DAPI layer missed (a dark blob with no ST nucleus), plus a small dark speck."""
    true = _ellipses((128, 128), [(30, 30), (95, 35), (60, 95)], [(11, 9), (10, 8), (12, 10)])
    speck = _ellipses((128, 128), [(110, 110)], [(4, 4)])  # ~3 µm²: below the blob area range
    true_all = np.where(speck > 0, 4, true)
    img = _render(true_all, h_level=0.7, seed=5)
    st = np.where(np.isin(true, [1, 2]), true * 10, 0).astype(np.int32)  # nucleus 3 missed by the ST layer
    return true, img, st


def test_unmatched_nucleus_becomes_ignore_and_st_nuclei_are_unchanged():
    true, img, st = _unmatched_tile()
    typ = np.where(st > 0, 2, 0).astype(np.uint8)
    conf = np.where(st > 0, 150, 0).astype(np.uint8)
    ign = np.zeros(st.shape, np.uint8)
    off = refine_label_maps(img, st, typ, ign, conf, um_per_px=UM, config=RefineConfig(unmatched_ignore=False))
    on = refine_label_maps(img, st, typ, ign, conf, um_per_px=UM, config=RefineConfig(unmatched_ignore=True))
    missed = true == 3
    assert not off[2][missed].any()  # off: the missed nucleus is taught as background
    assert on[2][missed].mean() > 0.9 and (on[0][missed] == 0).all()  # on: ignored, not a nucleus
    # nuclei the ST layer covers keep their instance, class and confidence; their pixels are not ignored
    for k in range(4):
        assert np.array_equal(on[k][~missed & (on[2] == 0)], off[k][~missed & (on[2] == 0)])
    assert np.array_equal(on[0], off[0]) and np.array_equal(on[1], off[1]) and np.array_equal(on[3], off[3])
    assert not on[2][on[0] > 0].any()
    # true background stays background: only pixels at the missed nucleus's blurred edge are newly ignored
    newly = (on[2] > 0) & (off[2] == 0)
    assert (ndi.binary_dilation(missed, iterations=3) | ~newly).all()
    assert not newly[true_bg_far(true)].any()
    assert on[4].unmatched == 1 and on[4].unmatched_px == int(newly.sum()) and off[4].unmatched == 0
    # the compiled path equals the reference with the step on
    ref = refine_label_maps(img, st, typ, ign, conf, um_per_px=UM, config=RefineConfig(unmatched_ignore=True),
                            reference=True)
    for x, y in zip(on[:4], ref[:4]):
        assert np.array_equal(x, y)
    assert on[4] == ref[4]


def true_bg_far(true: np.ndarray) -> np.ndarray:
    """True background farther than 3 px from any nucleus."""
    return ~ndi.binary_dilation(true > 0, iterations=3)


def test_unmatched_nuclei_rules():
    from stlib.labels.refine import tile_haematoxylin, unmatched_nuclei

    true, img, st = _unmatched_tile()
    h = tile_haematoxylin(img, um_per_px=UM)
    assert np.array_equal(h, tile_haematoxylin(img, um_per_px=UM, reference=True))
    ign = np.zeros(st.shape, bool)
    mask, n = unmatched_nuclei(h, st, ign, um_per_px=UM)
    assert n == 1 and mask[true == 3].mean() > 0.9 and not mask[st > 0].any()
    # a blob that overlaps an ST nucleus is that nucleus, not an unmatched one
    st_over = st.copy()
    st_over[(true == 3) & (np.arange(128)[None, :] < 60)] = 77  # an ST nucleus on half of it
    mask, n = unmatched_nuclei(h, st_over, ign, um_per_px=UM)
    assert n == 1 and not mask[st_over > 0].any()  # only its uncovered half (still nucleus-sized) is ignored
    st_cover = np.where(true == 3, 77, st)
    assert unmatched_nuclei(h, st_cover, ign, um_per_px=UM)[1] == 0
    # already-ignored pixels are not candidates; the area range bounds the blobs
    assert unmatched_nuclei(h, st, true == 3, um_per_px=UM)[1] == 0
    few = RefineConfig(unmatched_min_um2=1.0, unmatched_max_um2=5.0)  # the missed nucleus is ~24 µm²
    assert not unmatched_nuclei(h, st, ign, um_per_px=UM, config=few)[0][true == 3].any()
    small = RefineConfig(unmatched_min_um2=0.1)
    assert unmatched_nuclei(h, st, ign, um_per_px=UM, config=small)[1] == 2  # now the speck too
    # no ST nucleus in the tile: no nucleus level to compare with, nothing is ignored
    assert unmatched_nuclei(h, np.zeros_like(st), ign, um_per_px=UM)[1] == 0
    # an empty tile (flat stain) has no blob
    flat = tile_haematoxylin(np.full((128, 128, 3), 200, np.uint8), um_per_px=UM)
    assert unmatched_nuclei(flat, st, ign, um_per_px=UM)[1] == 0
    with pytest.raises(ValueError, match="same"):
        unmatched_nuclei(h[:10], st, ign, um_per_px=UM)
    with pytest.raises(ValueError, match="unmatched_edge_fraction"):
        RefineConfig(unmatched_edge_fraction=0.0)
    with pytest.raises(ValueError, match="unmatched_min_um2"):
        RefineConfig(unmatched_min_um2=10.0, unmatched_max_um2=5.0)
