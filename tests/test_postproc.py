"""Tests of stlib.model.postproc: HoVer-Net post-processing on perfect maps, seams."""

from __future__ import annotations

import numpy as np
import pytest

from stlib.metrics import centroids, pq
from stlib.model import postproc as P


def hv_from_inst(inst):
    """HoVer-Net's training target, written independently: per nucleus, the column (row)
    offset from its centroid, negative side scaled by its min, positive side by its max."""
    hv = np.zeros((2,) + inst.shape)
    for i in np.unique(inst)[1:]:
        r, c = np.nonzero(inst == i)
        for ch, coord in ((0, c - c.mean()), (1, r - r.mean())):
            val = coord.astype(float)
            neg, pos = val < 0, val > 0
            if neg.any():
                val[neg] /= -val[neg].min()
            if pos.any():
                val[pos] /= val[pos].max()
            hv[ch, r, c] = val
    return hv


def disks(shape, centres, radii):
    """Instance map of disks; a pixel claimed by several goes to the nearest centre (touching
    nuclei share a straight border)."""
    best = np.full(shape, np.inf)
    inst = np.zeros(shape, np.int32)
    for i, ((r0, c0), rad) in enumerate(zip(centres, radii), start=1):
        ra, rb = max(int(r0 - rad) - 1, 0), min(int(r0 + rad) + 2, shape[0])
        ca, cb = max(int(c0 - rad) - 1, 0), min(int(c0 + rad) + 2, shape[1])
        rr, cc = np.mgrid[ra:rb, ca:cb]
        d = np.hypot(rr - r0, cc - c0)
        win_best, win_inst = best[ra:rb, ca:cb], inst[ra:rb, ca:cb]
        take = (d <= rad) & (d < win_best)
        win_inst[take] = i
        win_best[take] = d[take]
    return inst


def random_disks(rng, shape, n, rmin=5, rmax=9, min_gap=2.0):
    """Up to n non-overlapping disks: a jittered grid (spacing leaves >= min_gap between
    disks), a random subset of its cells, random radii."""
    jitter = 2.0
    step = 2 * rmax + min_gap + 2 * jitter
    rows = np.arange(rmax + jitter, shape[0] - rmax - jitter, step)
    cols = np.arange(rmax + jitter, shape[1] - rmax - jitter, step)
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)
    grid = grid[rng.permutation(len(grid))[:n]] + rng.uniform(-jitter, jitter, (min(n, len(grid)), 2))
    return disks(shape, grid, rng.uniform(rmin, rmax, len(grid)))


def test_sobel_kernels():
    s, d = P.sobel_kernels(3)
    assert s.tolist() == [1, 2, 1] and d.tolist() == [-1, 0, 1]
    s, d = P.sobel_kernels(5)
    assert s.tolist() == [1, 4, 6, 4, 1] and d.tolist() == [-1, -2, 0, 2, 1]
    s, d = P.sobel_kernels(21)
    assert len(s) == len(d) == 21 and np.allclose(d, -d[::-1]) and d[-1] > 0
    with pytest.raises(ValueError, match="sobel_ksize"):
        P.sobel_kernels(4)


def test_perfect_maps_recover_instances():
    rng = np.random.default_rng(0)
    truth = random_disks(rng, (160, 160), 30)
    # add two touching pairs (centres 13-14 px apart, radii 8: they overlap)
    pair = disks((160, 160), [(20, 20), (20, 34), (140, 130), (127, 136)], [8, 8, 8, 8])
    free = (truth == 0) & (pair > 0)
    truth[free] = pair[free] + truth.max()
    np_prob = (truth > 0).astype(float)
    inst, typ, nuclei = P.hovernet_postprocess(np_prob, hv_from_inst(truth))
    assert inst.dtype == np.int32 and typ.dtype == np.uint8
    assert set(np.unique(inst)[1:]) == set(nuclei) == set(range(1, inst.max() + 1))
    r = pq(truth, inst)
    assert r.pq > 0.9, r
    # nucleus table agrees with the map
    ids, xy = centroids(inst)
    np.testing.assert_allclose([nuclei[i]["centroid"] for i in ids], xy)
    (r0, c0), (r1, c1) = nuclei[1]["bbox"]
    assert np.array_equal(np.argwhere(inst == 1).min(0), [r0, c0])
    assert np.array_equal(np.argwhere(inst == 1).max(0) + 1, [r1, c1])


def test_touching_nuclei_are_split():
    truth = disks((48, 64), [(24, 24), (24, 38)], [9, 9])  # overlapping disks, one blob
    import scipy.ndimage as ndi

    assert ndi.label(truth > 0)[1] == 1  # the NP map alone would merge them
    inst, _, nuclei = P.hovernet_postprocess((truth > 0).astype(float), hv_from_inst(truth))
    assert len(nuclei) == 2
    r = pq(truth, inst)
    assert r.tp == 2 and r.sq > 0.85


def test_type_vote_and_probability():
    truth = disks((40, 80), [(20, 20), (20, 60)], [8, 8])
    a, b = truth == 1, truth == 2
    tp = np.zeros((6, 40, 80))
    tp[0] = 1.0  # background everywhere first
    rr, cc = np.indices(truth.shape)
    # nucleus 1: left 60% of columns class 2, the rest class 3
    left = a & (cc < 20 + 2)
    tp[:, left] = np.array([0, 0, 0.8, 0.2, 0, 0])[:, None]
    tp[:, a & ~left] = np.array([0, 0, 0.3, 0.7, 0, 0])[:, None]
    # nucleus 2: background wins the vote (upper 70 %), class 4 second
    low = b & (rr >= 20 + 4)
    tp[:, b & ~low] = np.array([0.6, 0, 0, 0, 0.4, 0])[:, None]
    tp[:, low] = np.array([0.1, 0, 0, 0, 0.9, 0])[:, None]
    assert left.sum() > (a & ~left).sum() and (b & ~low).sum() > low.sum()
    inst, typ, nuclei = P.hovernet_postprocess((truth > 0).astype(float), hv_from_inst(truth), tp)
    ia, ib = np.bincount(inst[a]).argmax(), np.bincount(inst[b]).argmax()
    assert nuclei[ia]["type"] == 2 and nuclei[ib]["type"] == 4
    assert np.all(typ[inst == ia] == 2) and np.all(typ[inst == ib] == 4) and np.all(typ[inst == 0] == 0)
    assert nuclei[ia]["type_prob"] == pytest.approx(tp[2][inst == ia].mean())
    assert nuclei[ib]["type_prob"] == pytest.approx(tp[4][inst == ib].mean())


def test_empty_and_bad_input():
    inst, typ, nuclei = P.hovernet_postprocess(np.zeros((32, 32)), np.zeros((2, 32, 32)))
    assert inst.max() == 0 and typ.max() == 0 and nuclei == {}
    with pytest.raises(ValueError, match="hv"):
        P.hovernet_postprocess(np.zeros((32, 32)), np.zeros((2, 16, 32)))
    with pytest.raises(ValueError, match="tp_prob"):
        P.hovernet_postprocess(np.zeros((32, 32)), np.zeros((2, 32, 32)), np.zeros((6, 32, 31)))


def test_seam_duplicates_removed_no_losses():
    rng = np.random.default_rng(1)
    shape, tile, overlap = (420, 530), 128, 40  # overlap/2 = 20
    truth = random_disks(rng, shape, 250, rmin=4, rmax=9)  # diameter <= 18 < overlap / 2
    origins = P.tile_origins(shape, tile, overlap)
    tables, tiles = [], []
    for r, c in origins:
        crop = truth[r:r + tile, c:c + tile]
        # each tile "detects" what it sees, cut nuclei included, with its own ids 1..n
        ids = np.unique(crop)[1:]
        lut = np.zeros(truth.max() + 1, np.int32)
        lut[ids] = np.arange(1, ids.size + 1)
        local = lut[crop]
        tiles.append(local)
        tables.append(P.nuclei_table(local))
    raw = sum(len(t) for t in tables)
    kept = P.remove_seam_duplicates(tables, tile_origins=origins, tile_size=tile)
    t_ids, t_xy = centroids(truth)
    assert raw > len(t_ids) + 50  # the overlaps really do produce duplicates
    assert len(kept) == len(t_ids)  # no duplicates, no losses
    k_xy = np.array([kept[g]["centroid"] for g in sorted(kept)])
    # every kept nucleus is a complete one: its centroid equals a true centroid exactly
    d = np.hypot(*(k_xy[:, None, :] - t_xy[None]).transpose(2, 0, 1))
    assert np.allclose(d.min(axis=1), 0) and len(set(d.argmin(axis=1))) == len(t_ids)
    inst, _ = P.stitch_tiles(tiles, None, kept, tile_origins=origins, image_shape=shape)
    r = pq(truth, inst)
    assert (r.tp, r.fp, r.fn) == (len(t_ids), 0, 0) and r.sq == 1.0


def test_tiled_postprocess_matches_truth():
    rng = np.random.default_rng(2)
    truth = random_disks(rng, (300, 300), 120)
    inst, typ, nuclei = P.hovernet_postprocess_tiled((truth > 0).astype(float), hv_from_inst(truth),
                                                     tile_size=128, overlap=48)
    assert pq(truth, inst).pq > 0.9 and len(nuclei) == inst.max() == len(np.unique(inst)) - 1


def test_blob_without_marker_is_kept_as_one_nucleus_unless_reference_mode():
    from stlib.model.postproc import hovernet_postprocess

    np_prob = np.zeros((64, 64))
    np_prob[20:40, 20:40] = 0.9  # a clear nucleus...
    hv = np.zeros((2, 64, 64))  # ...but flat HV maps: Sm is 1 everywhere, so no marker survives
    inst, _, nuclei = hovernet_postprocess(np_prob, hv)
    assert len(nuclei) == 1 and (inst > 0).sum() == 400
    inst_ref, _, nuclei_ref = hovernet_postprocess(np_prob, hv, keep_unmarked=False)
    assert len(nuclei_ref) == 0 and inst_ref.max() == 0


# ----------------------------------------------------------------------------- imperfect maps
# A second, independent implementation of the HoVer-Net procedure (Graham et al. 2019, section
# "post-processing"), written here from the paper's description with other building blocks:
# OpenCV's Sobel kernel built by repeated convolution with [1, 1], a 2-D correlation of the
# padded image (OpenCV's default border, reflect-101 = numpy "reflect"), scikit-image
# morphology and labelling. The module's version (scipy separable filters) must agree with it.

def _sobel_1d(ksize):
    smooth = np.array([1.0])
    for _ in range(ksize - 1):
        smooth = np.convolve(smooth, [1.0, 1.0])
    deriv = np.array([1.0])
    for _ in range(ksize - 3):
        deriv = np.convolve(deriv, [1.0, 1.0])
    deriv = np.convolve(deriv, [1.0, 0.0, -1.0])[::-1]  # d/dx kernel read left to right: -1 ... +1
    return smooth, deriv


def _norm(x):
    return (x - x.min()) / (x.max() - x.min()) if x.max() > x.min() else np.zeros_like(x)


def reference_hovernet(np_prob, hv, *, ksize=21, np_thresh=0.5, min_size=10, marker_thresh=0.4):
    from scipy import ndimage as ndi
    from scipy.signal import correlate2d
    from skimage.measure import label
    from skimage.segmentation import watershed

    def remove_small(lab):
        size = np.bincount(lab.ravel())
        return np.where(size[lab] < min_size, 0, lab)

    def filt(img, kernel):
        return correlate2d(np.pad(img, kernel.shape[0] // 2, mode="reflect"), kernel, mode="valid")

    blob = remove_small(label(np_prob >= np_thresh, connectivity=1)) > 0
    smooth, deriv = _sobel_1d(ksize)

    dh = filt(_norm(hv[0]), np.outer(smooth, deriv))  # d/dx: difference along columns
    dv = filt(_norm(hv[1]), np.outer(deriv, smooth))  # d/dy: difference along rows
    sm = np.maximum(1 - _norm(dh), 1 - _norm(dv)) * blob
    energy = -filt((1 - sm) * blob, np.outer([1, 2, 1], [1, 2, 1]) / 16.0)
    marker = blob & (sm < marker_thresh)
    marker = ndi.binary_fill_holes(marker)
    ellipse = np.array([[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], bool)
    marker = ndi.binary_dilation(ndi.binary_erosion(marker, ellipse, border_value=1), ellipse)
    markers = remove_small(label(marker, connectivity=1))
    return watershed(energy, markers=markers, mask=blob)


def _crowded_truth(seed, shape=(192, 192)):
    """Nuclei on a jittered 38-px grid: in each cell a single disk or a touching pair (centres
    13-15 px apart, radii 7-9: they overlap and share a straight border), the case the HV maps
    exist for; cells far enough apart that only the pairs touch."""
    rng = np.random.default_rng(seed)
    centres = []
    for r0 in np.arange(19, shape[0] - 18, 38.0):
        for c0 in np.arange(19, shape[1] - 18, 38.0):
            r0j, c0j = r0 + rng.uniform(-1.5, 1.5), c0 + rng.uniform(-1.5, 1.5)
            if rng.random() < 0.4:
                half = rng.uniform(6.5, 7.5)
                ang = rng.uniform(0, np.pi)
                dr, dc = half * np.sin(ang), half * np.cos(ang)
                centres += [(r0j - dr, c0j - dc), (r0j + dr, c0j + dc)]
            else:
                centres.append((r0j, c0j))
    radii = rng.uniform(7, 9, len(centres))
    return disks(shape, centres, radii)


def _degraded(truth, seed, *, blur, noise):
    """NP and HV maps as a half-trained network gives them: blurred, noisy, not saturated."""
    import scipy.ndimage as ndi

    rng = np.random.default_rng(seed + 100)
    fg = (truth > 0).astype(float)
    np_prob = np.clip(0.1 + 0.8 * ndi.gaussian_filter(fg, blur) + rng.normal(0, noise, truth.shape), 0, 1)
    hv = np.stack([ndi.gaussian_filter(h, blur) for h in hv_from_inst(truth)])
    hv = np.clip(hv + rng.normal(0, noise, hv.shape), -1, 1)
    return np_prob, hv


def test_perfect_maps_recovered_at_pq_098():
    for seed in range(3):
        truth = _crowded_truth(seed)
        inst, _, _ = P.hovernet_postprocess((truth > 0).astype(float), hv_from_inst(truth))
        r = pq(truth, inst)
        assert r.pq >= 0.98 and r.fp == 0 and r.fn == 0, (seed, r)


@pytest.mark.parametrize("blur,noise", [(1.0, 0.05), (1.5, 0.1), (2.0, 0.15)])
def test_noisy_blurred_maps_agree_with_the_hovernet_procedure(blur, noise):
    for seed in range(2):
        truth = _crowded_truth(seed)
        np_prob, hv = _degraded(truth, seed, blur=blur, noise=noise)
        ours, _, _ = P.hovernet_postprocess(np_prob, hv, keep_unmarked=False)
        ref = reference_hovernet(np_prob, hv)
        agree = pq(ref, ours)
        assert agree.pq >= 0.99, (blur, noise, seed, agree)
        r_ours, r_ref = pq(truth, ours), pq(truth, ref)
        assert abs(r_ours.pq - r_ref.pq) <= 0.02, (r_ours, r_ref)
        # the maps still separate the nuclei: most of them found, touching pairs included
        assert r_ours.dq >= 0.95 and r_ours.pq >= 0.75, (blur, noise, seed, r_ours)
        # the default (keep blobs without a marker) never scores below the reference mode
        default, _, _ = P.hovernet_postprocess(np_prob, hv)
        assert pq(truth, default).pq >= r_ours.pq - 1e-9


# --------------------------------------------------------------------------- marker modes
@pytest.mark.parametrize("mode", ["distance", "blend"])
def test_distance_modes_split_touching_nuclei_without_hv(mode):
    """Two overlapping disks form one NP blob; with flat (useless) HV maps the HoVer-Net mode
    keeps one nucleus, the distance-transform modes find the neck and split it."""
    import scipy.ndimage as ndi

    truth = disks((48, 64), [(24, 24), (24, 38)], [9, 9])
    assert ndi.label(truth > 0)[1] == 1
    flat = np.zeros((2, *truth.shape))
    inst_hv, _, _ = P.hovernet_postprocess((truth > 0).astype(float), flat, min_size=10)
    assert inst_hv.max() == 1
    inst, _, nuclei = P.hovernet_postprocess((truth > 0).astype(float), flat, mode=mode, marker_h=1.0, min_size=10)
    assert len(nuclei) == 2
    r = pq(truth, inst)
    assert r.tp == 2 and r.sq > 0.85


def test_distance_mode_marker_height_merges_shallow_necks():
    """A neck shallower than marker_h is not a split: h-maxima of the distance transform."""
    truth = disks((48, 70), [(24, 24), (24, 44)], [10, 10])  # deep neck
    blob = (truth > 0).astype(float)
    flat = np.zeros((2, *truth.shape))
    low = P.hovernet_postprocess(blob, flat, mode="distance", marker_h=1.0, min_size=10)[0]
    high = P.hovernet_postprocess(blob, flat, mode="distance", marker_h=20.0, min_size=10)[0]
    assert low.max() == 2 and high.max() == 1  # a 20 px dip cannot exist in a 10 px radius disk


def test_blend_mode_follows_hv_edges():
    """The blend mode splits along the HV edge where the distance transform has no neck: a
    rectangle of two square nuclei side by side (no neck) is split only with the HV term."""
    truth = np.zeros((40, 72), np.int32)
    truth[8:32, 8:36], truth[8:32, 36:64] = 1, 2
    blob = (truth > 0).astype(float)
    hv = hv_from_inst(truth)
    dist_only = P.hovernet_postprocess(blob, hv, mode="distance", marker_h=1.0, min_size=10)[0]
    blended = P.hovernet_postprocess(blob, hv, mode="blend", marker_h=1.0, hv_weight=1.0, min_size=10)[0]
    assert dist_only.max() == 1
    assert blended.max() == 2 and pq(truth, blended).tp == 2


def test_mode_arguments_checked():
    z, hv = np.zeros((16, 16)), np.zeros((2, 16, 16))
    with pytest.raises(ValueError, match="mode"):
        P.hovernet_postprocess(z, hv, mode="otsu")
    with pytest.raises(ValueError, match="marker_h"):
        P.hovernet_postprocess(z, hv, mode="distance", marker_h=0)
    with pytest.raises(ValueError, match="hv_weight"):
        P.hovernet_postprocess(z, hv, mode="blend", hv_weight=1.5)
    assert P.hovernet_postprocess(z, hv, mode="distance")[0].max() == 0


def test_h_maxima_by_object_equals_the_whole_image_h_maxima():
    from skimage.morphology import h_maxima
    import scipy.ndimage as ndi

    rng = np.random.default_rng(3)
    truth = random_disks(rng, (120, 140), 25, rmin=4, rmax=10, min_gap=0.0)
    blob = truth > 0
    blob[60:63, 10:130] = True  # a bar joining several disks into one object
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(blob), 1.0) * blob
    dist += rng.uniform(0, 0.3, dist.shape) * blob  # plateaus broken, many shallow maxima
    for h in (0.2, 1.0, 2.5):
        np.testing.assert_array_equal(P._h_maxima_by_object(dist, h), (h_maxima(dist, h) > 0) & blob)
