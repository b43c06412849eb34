"""The fast paths of slide-scale label derivation give the results of their references.

On a small demo cohort (two samples): the batched alignment equals the node-by-node one (to
float rounding: same shifts, same exclusions), and the tile stores cut in parallel by
``build_tile_stores`` equal, array for array, a straightforward per-tile loop built from the
reference implementations (``read_tile_image``, ``refine_label_maps(reference=True)``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SAMPLES = ("DEMO_BOWEL_1", "DEMO_LUNG_1")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from stlib.demo import make_cohort

    root = tmp_path_factory.mktemp("fastdemo") / "data"
    make_cohort(root, seed=3, image_px=512, raw_bundles=0, pannuke_per_fold=0)
    return root


@pytest.fixture(scope="module")
def run(demo, tmp_path_factory) -> Path:
    """Alignment (fast path) and a labels stand-in (aligned nuclei, classes by cell) per sample."""
    import geopandas as gpd

    from stlib.align import align_and_save, transform_nuclei
    from stlib.io.hest import HestSample

    run = tmp_path_factory.mktemp("fastrun")
    for sid in SAMPLES:
        res, _ = align_and_save(demo / "hest", sid, run / "alignment")
        nuc = transform_nuclei(HestSample(demo / "hest", sid).nuclei(), res)
        n = len(nuc)
        lab = gpd.GeoDataFrame({"cell_id": nuc.index.astype(str), "class": (np.arange(n) % 5 + 1).astype(np.uint8),
                                "confidence": np.linspace(0.3, 1.0, n).astype(np.float32)},
                               geometry=nuc.geometry.values)
        (run / "labels" / sid).mkdir(parents=True)
        lab.to_parquet(run / "labels" / sid / "nuclei.parquet")
    return run


@pytest.mark.parametrize("sid", SAMPLES)
def test_batched_alignment_equals_node_by_node(demo, sid):
    from stlib.align import align_sample

    a = align_sample(demo / "hest", sid).to_dict()
    b = align_sample(demo / "hest", sid, reference=True).to_dict()
    assert np.abs(np.array(a["xenium_um_to_he_px"]) - np.array(b["xenium_um_to_he_px"])).max() < 1e-6
    ga, gb = a["local_displacement"], b["local_displacement"]
    for k in ("dx_px", "dy_px"):
        assert np.abs(np.array(ga[k]) - np.array(gb[k])).max() < 1e-6
    assert a["excluded_regions"] == b["excluded_regions"]
    for ta, tb in zip(a["scores"]["tiles"], b["scores"]["tiles"]):
        for key in ("residual_before_um", "residual_after_um", "corr_before", "corr_after", "reliability"):
            x, y = ta[key], tb[key]
            assert (x is None) == (y is None)
            if x is not None:
                assert x == pytest.approx(y, rel=1e-6, abs=1e-9)
        assert ta["excluded"] == tb["excluded"] and ta["n_nuclei"] == tb["n_nuclei"]


def test_parallel_tile_stores_equal_the_per_tile_reference(demo, run):
    import geopandas as gpd

    from stlib.align import load_alignment
    from stlib.io.cohort import cohort_table
    from stlib.io.hest import HestSample
    from stlib.io.tiles import TileStore
    from stlib.tiles.stage import _box, build_tile_stores
    from stlib.labels.masks import iter_label_tiles
    from stlib.labels.refine import RefineStats, refine_label_maps
    from stlib.tiles.slide import read_tile_image
    from stlib.metrics import pannuke_bpq

    table = cohort_table(demo, samples=list(SAMPLES))
    timings: dict[str, float] = {}
    paths = build_tile_stores(demo / "hest", table, run, truth_dir=demo / "truth", workers=2, timings=timings,
                              force=True)
    assert {"masks", "tile_images", "mask_refinement", "store_writing"} <= set(timings)
    st, tr = TileStore(paths["st"]), TileStore(paths["truth"])
    refinement = st.info["refinement"]["per_sample"]
    k = 0
    for row in table.itertuples():
        s = HestSample(demo / "hest", row.sample)
        nuc = gpd.read_parquet(run / "labels" / row.sample / "nuclei.parquet")
        res = load_alignment(run / "alignment" / row.sample / "alignment.json")
        excluded = [_box(r) for r in res.excluded_regions] or None
        truth = gpd.read_parquet(demo / "truth" / row.sample / "nuclei.parquet")
        truth = truth[truth["visible"].to_numpy(bool)]
        scale = s.pixel_size_um / 0.25
        stats, pq0, pq1 = RefineStats(), [], []
        with s.wsi() as wsi:
            H, W = wsi.shape
            it_st = iter_label_tiles(nuc.geometry.values, width=W, height=H, scale=scale, tile_px=256,
                                     classes=nuc["class"].to_numpy(), confidence=nuc["confidence"].to_numpy(float),
                                     ignore_polygons=excluded)
            it_tr = iter_label_tiles(truth.geometry.values, width=W, height=H, scale=scale, tile_px=256,
                                     classes=truth["class"].to_numpy().astype(np.uint8))
            for (tile, m), (_, mt) in zip(it_st, it_tr):
                img = read_tile_image(wsi, *tile.origin, 256 / scale, 256)
                *maps, st_stats = refine_label_maps(img, m.inst, m.type, m.ignore, m.conf, um_per_px=0.25,
                                                    reference=True)
                stats = stats + st_stats
                if mt.inst.any():
                    pq0.append(pannuke_bpq(mt.inst, m.inst))
                    pq1.append(pannuke_bpq(mt.inst, maps[0]))
                got = st[k]
                assert np.array_equal(got["image"], img) and np.array_equal(tr[k]["image"], img)
                for key, ref in zip(("inst", "type", "ignore", "conf"), maps):
                    assert np.array_equal(got[key], ref), (row.sample, k, key)
                for key, ref in zip(("inst", "type", "ignore", "conf"), (mt.inst, mt.type, mt.ignore, mt.conf)):
                    assert np.array_equal(tr[k][key], ref), (row.sample, k, key)
                assert st.meta["n_nuclei"].iloc[k] == np.unique(maps[0][maps[0] > 0]).size
                k += 1
        rec = refinement[row.sample]
        assert {key: rec[key] for key in stats.to_dict()} == stats.to_dict()
        assert rec["mask_pq_vs_truth_before"] == pytest.approx(float(np.nanmean(pq0)), abs=1e-12)
        assert rec["mask_pq_vs_truth_after"] == pytest.approx(float(np.nanmean(pq1)), abs=1e-12)
    assert k == len(st) == len(tr)


@pytest.mark.parametrize("seed,m,n,max_shift,sigma,pad", [(0, 40, 64, 6, 2.0, 20), (63, 30, 63, 5, 1.5, 15),
                                                          (64, 30, 64, 5, 1.5, 15)])
def test_batched_phase_correlation_is_scikit_images(seed, m, n, max_shift, sigma, pad):
    """The batched phase correlation (real-input FFTs, the Hermitian mirror of the half spectrum
    for odd and even window sizes) finds scikit-image's shifts."""
    from scipy import ndimage
    from skimage.registration import phase_cross_correlation
    from threadpoolctl import threadpool_limits

    from stlib import _align_kernels as K

    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.random((m, n + 2 * pad, n + 2 * pad)).astype(np.float32), (0, sigma, sigma))
    shifts = rng.uniform(-max_shift, max_shift, (m, 2))
    ref = base[:, pad:pad + n, pad:pad + n]
    mov = np.stack([ndimage.shift(base[k], shifts[k], order=1)[pad:pad + n, pad:pad + n] for k in range(m)])
    if seed == 0:  # with a little noise
        mov = (mov + 0.01 * rng.standard_normal(mov.shape)).astype(np.float32)
    hann = np.outer(np.hanning(n), np.hanning(n)).astype(np.float32)
    ref = ((ref - ref.mean((1, 2), keepdims=True)) * hann).astype(np.float32)
    mov = ((mov - mov.mean((1, 2), keepdims=True)) * hann).astype(np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        fast = K.batched_phase_shift(ref, mov, 20)
        sk = np.array([phase_cross_correlation(ref[k], mov[k], upsample_factor=20, normalization=None)[0]
                       for k in range(m)])
    # real-input FFTs (rfft2 / irfft2) round differently from scikit-image's complex fft2 in the
    # last bits: on a near-tie the upsampled peak may move by one step, so the shifts must agree
    # to the upsampling precision 1 / upsample_factor px (not bit for bit), and nearly all exactly
    err = np.abs(fast - sk)
    assert err.max() <= 1 / 20 + 1e-6, err.max()
    assert (err.max(axis=1) < 1e-6).mean() >= 0.9


def test_full_image_twins_equal_numpy_and_scipy():
    from scipy import ndimage

    import stlib.align as A
    from stlib import _align_kernels as K

    rng = np.random.default_rng(0)
    for t in range(12):
        H, W = (int(v) for v in rng.integers(20, 100, 2))
        img = rng.random((H, W)).astype(np.float32)
        for s in (0.41, 1.0, 2.0):
            assert np.array_equal(K.gaussian_filter32(img, s, workers=2), ndimage.gaussian_filter(img, s))
        jy, jx = np.sort(rng.uniform(-3, H + 2, 37)), np.sort(rng.uniform(-3, W + 2, 41))
        JY, JX = np.meshgrid(jy, jx, indexing="ij")
        assert np.array_equal(K.map_linear_nearest(img, jy, jx),
                              ndimage.map_coordinates(img, [JY, JX], order=1, mode="nearest"))
        n = 30
        th = np.linspace(0, 2 * np.pi, 13)
        cx, cy = rng.uniform(-10, W + 10, n), rng.uniform(-10, H + 10, n)
        xs = cx[:, None] + rng.uniform(3, 12, n)[:, None] * np.cos(th) * rng.choice([-1, 1], n)[:, None]
        ys = cy[:, None] + rng.uniform(3, 12, n)[:, None] * np.sin(th)
        xy = np.stack([xs.ravel(), ys.ravel()], 1)
        if t % 3 == 0:
            xy = np.round(xy)  # vertices on pixel centres
        ring = np.repeat(np.arange(n), 13)
        assert np.array_equal(K.fill_rings(xy, ring, H, W), A._rasterize_rings(xy, ring, (H, W)))
        pts, cen = rng.uniform(-5, max(H, W) + 5, (300, 2)), rng.uniform(-20, max(H, W) + 20, (40, 2))
        u0, v0 = (np.round(cen[:, k] - 8).astype(np.int64) for k in (0, 1))
        got = K.count_in_windows(np.round(pts[:, 0]).astype(np.int64), np.round(pts[:, 1]).astype(np.int64),
                                 H, W, u0, v0, 16)
        assert np.array_equal(got, A._count_window(pts, (H, W), cen, 16))
    T = A.Transform(np.array([[3.6, 0.05, 100.0], [-0.04, 3.7, -50.0], [0, 0, 1]]), np.linspace(-10, 500, 11),
                    np.linspace(0, 400, 9), rng.normal(0, 3, (9, 11)), rng.normal(0, 3, (9, 11)))
    g = A.WorkGrid(x0=-0.5, y0=3.2, f=3.65, shape=(100, 100))
    xy = rng.uniform(-50, 600, (5000, 2))
    for TT in (T, A.Transform(T.affine)):
        assert np.array_equal(A._map_points(TT, g, xy), g.xy_to_work(TT.apply_xy(xy)))


def test_overlay_crop_feeds_the_alignment_figure(demo, run):
    """The data of the alignment figure are read by the align stage; the figure takes arrays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stlib import plot
    from stlib.align import load_alignment, overlay_crop

    sid = SAMPLES[0]
    res = load_alignment(run / "alignment" / sid / "alignment.json")
    crop = overlay_crop(demo / "hest", res, truth_dir=demo / "truth", crop_um=40.0)
    n = crop["image"].shape[0]
    assert crop["image"].shape == (n, n, 3) and n > 0
    assert len(crop["before"]) == len(crop["after"]) > 0 and len(crop["truth"]) > 0
    fig = plot.alignment_overlay(crop["image"], crop["before"], crop["after"], origin=crop["origin"],
                                 source="SYNTHETIC test", sample=sid, truth=crop["truth"])
    assert len(fig.axes) == 2
    plt.close(fig)


def test_roles_outside_cohort_json_come_from_the_manifest_only(demo, tmp_path):
    """A sample cohort.json does not list takes its role from data_manifest.yaml (by organ);
    without a readable manifest that is an error naming the samples, never a typed default."""
    from stlib.io.cohort import cohort_table
    from stlib.io.manifest import load_manifest
    from stlib.utils import InputError

    data = tmp_path / "mirror"
    data.mkdir()
    (data / "hest").symlink_to(demo / "hest", target_is_directory=True)  # no cohort.json
    table = cohort_table(data, samples=list(SAMPLES)).set_index("sample")
    held = set(load_manifest().organs("held-out"))
    for sid in SAMPLES:
        assert table.loc[sid, "role"] == ("held-out" if table.loc[sid, "organ"] in held else "train")
        assert table.loc[sid, "role_source"] == "data_manifest.yaml (organ)"
    with pytest.raises(InputError, match="data_manifest.yaml"):
        cohort_table(data, samples=list(SAMPLES), manifest=tmp_path / "absent.yaml")
    # the demo cohort itself needs no manifest (cohort.json has the roles)
    assert len(cohort_table(demo, samples=list(SAMPLES), manifest=tmp_path / "absent.yaml")) == len(SAMPLES)


def test_refine_glue_kernels_equal_numpy():
    """The compiled start of the refinement (ignore mask, local ids) gives numpy's arrays."""
    from stlib.labels import _refine_kernels as K
    from stlib.labels.refine import _local_ids

    rng = np.random.default_rng(0)
    cases = [rng.integers(0, 5, (17, 23)).astype(np.int32), rng.integers(1, 5, (9, 9)).astype(np.int64),
             np.full((5, 5), 7, np.int32), np.zeros((4, 4), np.int32), rng.integers(0, 3, (1, 30)).astype(np.uint16)]
    runs = np.repeat(rng.integers(0, 40, 600), rng.integers(1, 30, 600))[:64 * 64].reshape(64, 64).astype(np.int32)
    cases.append(runs)
    for a in cases:
        ids, local, n = K.local_ids(a)
        ref_ids, ref_local, ref_n = _local_ids(a.astype(np.float64))  # float: the numpy form
        assert np.array_equal(ids, ref_ids) and np.array_equal(local, ref_local) and n == ref_n
        assert local.dtype == ref_local.dtype == np.int32
        ignore = (rng.random(a.shape) < 0.3).astype(np.uint8)
        ign, work = K.unignored(a, ignore)
        assert np.array_equal(ign, ignore.astype(bool)) and np.array_equal(work, np.where(ignore.astype(bool), 0, a))
        assert work.dtype == a.dtype


def test_neighbour_outliers_kernel_equals_the_loop():
    import stlib.align as A

    rng = np.random.default_rng(1)
    for t in range(20):
        ny, nx = (int(v) for v in rng.integers(1, 30, 2))
        dx, dy = rng.normal(0, 2, (ny, nx)), rng.normal(0, 2, (ny, nx))
        if t % 2:  # ties and repeated values
            dx, dy = np.round(dx), np.round(dy)
        ok = rng.random((ny, nx)) < 0.8
        dx[~ok & (rng.random((ny, nx)) < 0.5)] = np.nan
        for thr in (0.5, 1.0, 3.0):
            assert np.array_equal(A._neighbour_outliers(dx, dy, ok, thr),
                                  A._neighbour_outliers(dx, dy, ok, thr, reference=True))


def test_haematoxylin_image_threaded_normalisation_equals_reference():
    """A working image over 1 Mpx is normalised in row bands in threads: the same pixels."""
    from stlib.align import WorkGrid, haematoxylin_image

    class Slide:
        level_downsamples = [1.0, 4.0]
        shape = (2400, 2400)

        def read_region(self, x, y, w, h, level=0):
            return np.random.default_rng(abs(7 * x + y)).integers(0, 255, (h, w, 3)).astype(np.uint8)

    g = WorkGrid(x0=0.0, y0=0.0, f=2.0, shape=(1100, 1100))
    assert np.array_equal(haematoxylin_image(Slide(), g), haematoxylin_image(Slide(), g, reference=True))


def test_compiled_warp_equals_apply_xy():
    """``Transform.warp_geometries`` (compiled, threaded) moves every vertex as ``apply_xy``."""
    import shapely

    import stlib.align as A

    rng = np.random.default_rng(2)
    T = A.Transform(np.array([[3.6, 0.05, 100.0], [-0.04, 3.7, -50.0], [0, 0, 1]]), np.linspace(-10, 500, 11),
                    np.linspace(0, 400, 9), rng.normal(0, 3, (9, 11)), rng.normal(0, 3, (9, 11)))
    pre = A.Transform(np.linalg.inv(T.affine))
    geoms = shapely.buffer(shapely.points(rng.uniform(-50, 600, (3000, 2))), rng.uniform(1, 5, 3000))
    for TT in (T, A.Transform(T.affine), A.Transform(T.affine, [5.0], [7.0], [[1.5]], [[-2.0]])):
        got = TT.warp_geometries(geoms)
        ref = shapely.transform(geoms, TT.apply_xy)
        assert np.array_equal(shapely.get_coordinates(got), shapely.get_coordinates(ref))
        got2 = TT.warp_geometries(geoms, before=pre)
        ref2 = shapely.transform(shapely.transform(geoms, pre.apply_xy), TT.apply_xy)
        assert np.array_equal(shapely.get_coordinates(got2), shapely.get_coordinates(ref2))
    assert TT.warp_geometries(geoms[:0]).size == 0


# --- the fused per-window kernels of the alignment (issue 14, session 5) ---------------------

def _windows_case(seed: int = 0):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    h = ndimage.gaussian_filter(rng.random((180, 150)), 2).astype(np.float32)
    mask = ndimage.gaussian_filter(rng.random((180, 150)), 3) > 0.5
    hmask = h > np.median(h)
    n = 40
    # interior windows, windows over every edge and corner, and one wholly outside
    u0 = np.concatenate([rng.integers(0, 110, 30), [-10, 130, -39, 140, 20, 60, -60]]).astype(np.int64)
    v0 = np.concatenate([rng.integers(0, 140, 30), [-10, 160, 170, -20, -39, 175, 300]]).astype(np.int64)
    return rng, h, mask, hmask, n, u0, v0


def test_window_kernels_equal_their_numpy_forms():
    """One-pass window scores, the compiled window preparation and the shifted-peak read
    straight from the images give the library / numpy forms (to float rounding)."""
    import stlib.align as A
    from stlib import _align_kernels as K

    rng, h, mask, hmask, n, u0, v0 = _windows_case()
    blurred = mask.astype(np.float32)
    counts = np.ones(u0.size, np.int64)
    counts[3] = 0
    corr, dice = K.window_stats(h, mask, hmask, u0, v0, n, counts)
    hann = np.outer(np.hanning(n), np.hanning(n)).astype(np.float32)
    ref, mov, ok = K.prep_windows(h, blurred, u0, v0, n, hann)
    h_w, b_w = K.gather_windows(h, u0, v0, n), K.gather_windows(blurred, u0, v0, n)
    for k in range(u0.size):
        ht, mt, hmt = (A._window(a, u0[k] + n / 2, v0[k] + n / 2, n)[0] for a in (h, mask, hmask))
        if counts[k] == 0:
            assert np.isnan(corr[k]) and np.isnan(dice[k])
        else:
            assert corr[k] == pytest.approx(A._pearson(ht, mt), rel=1e-9, abs=1e-12, nan_ok=True)
            assert dice[k] == pytest.approx(A._dice(hmt, mt), rel=1e-12, nan_ok=True)
        r = ((h_w[k] - h_w[k].mean(dtype=np.float64)) * hann).astype(np.float32)
        m = ((b_w[k] - b_w[k].mean(dtype=np.float64)) * hann).astype(np.float32)
        assert np.allclose(ref[k], r, atol=1e-6) and np.allclose(mov[k], m, atol=1e-6)
        assert ok[k] == (bool(r.any()) and bool(m.any()))
    assert not ok[-1]  # the window outside the image is all zero
    dv, du = rng.uniform(-4, 4, u0.size), rng.uniform(-4, 4, u0.size)
    dv[0], du[0] = 0.0, 2.0  # whole-pixel shifts
    dv[1], du[1] = 16.5, 0.0  # interior under 8 px: no peak
    # the reference path's form (_measure_nodes_reference): ndimage.shift, then _pearson on the interior
    from scipy import ndimage

    p_ref, v_ref = np.full(u0.size, np.nan), np.zeros(u0.size, bool)
    for k in range(u0.size):
        e = int(np.ceil(max(abs(du[k]), abs(dv[k])))) + 1
        if n - 2 * e >= 8:
            moved = ndimage.shift(b_w[k].astype(np.float64), (dv[k], du[k]), order=1, mode="constant")
            p_ref[k], v_ref[k] = A._pearson(h_w[k][e:-e, e:-e], moved[e:-e, e:-e]), True
    p_new, v_new = K.shifted_peak_at(h, blurred, u0, v0, n, dv, du)
    assert np.array_equal(v_ref, v_new) and not v_new[1]
    assert np.allclose(p_new, p_ref, rtol=1e-9, atol=1e-12, equal_nan=True)
    # the global scores from one pass of sums
    tot = K.global_sums(h, mask, hmask, 0, h.shape[0])
    assert K.pearson_from_sums(tot, float(h.size)) == pytest.approx(A._pearson(h, mask), rel=1e-9)
    assert 2 * tot[5] / (tot[2] + tot[4]) == A._dice(hmask, mask)


def test_threaded_percentile_and_otsu_are_numpy_and_scikit_images():
    from skimage.filters import threshold_otsu

    from stlib import _align_kernels as K

    rng = np.random.default_rng(5)
    for t in range(24):
        n = int(rng.integers(2, 50_000))
        a = rng.random(n).astype(np.float32)
        if t % 4 == 1:
            a = np.round(a * 20).astype(np.float32) / 20  # ties
        elif t % 4 == 2:
            a[: n // 2] = 0  # a heavy bin (haematoxylin background)
        elif t % 4 == 3:
            a = (rng.standard_normal(n) ** 3).astype(np.float32)
        for q in ([1.0, 99.5], [50.0], [0.0, 100.0]):
            want = np.percentile(a, q)
            got = K.percentile_threaded(a.reshape(1, -1) if t % 2 else a, q, workers=2, nbins=int(rng.choice([4, 65536])))
            assert np.array_equal(got, want) and got.dtype == want.dtype
        if np.ptp(a) > 0:
            assert K.otsu_threaded(a, workers=2) == float(threshold_otsu(a))
    a = rng.random(1000).astype(np.float32)
    a[7] = np.nan  # falls back to numpy
    assert np.array_equal(K.percentile_threaded(a, [1.0, 99.5], workers=2), np.percentile(a, [1.0, 99.5]), equal_nan=True)


def test_hest_route_rings_are_the_warped_polygons_rings(demo):
    """align_sample's HEST route hands align_nuclei the ring vertices mapped as one array: the
    same numbers as the rings of the warped polygons, and the same alignment."""
    import stlib.align as A

    sid = SAMPLES[0]
    _, M0, geoms, _ = A._hest_inputs(demo / "hest", sid)
    slide, M1, rings, _ = A._hest_inputs(demo / "hest", sid, rings=True)
    xy, rid = A._ring_coords(np.asarray(geoms, dtype=object))
    assert np.array_equal(M0, M1) and np.array_equal(rings.xy, xy) and np.array_equal(rings.ring, rid)
    with slide:
        a = A.align_nuclei(slide, geoms, M0, sample=sid).to_dict()
        b = A.align_nuclei(slide, rings, M0, sample=sid).to_dict()
    assert a == b


# --- alignment stage speed (issue 14, session 6): the same numbers, fewer passes ---------------

def test_phase_correlation_pieces_equal_their_numpy_forms():
    """The Hermitian mirror in one compiled pass equals numpy's strided copies, and the cached
    upsampled-DFT kernels equal the batch expression, bit for bit (odd and even sizes)."""
    from scipy.fft import fftfreq, rfft2

    from stlib import _align_kernels as K

    rng = np.random.default_rng(11)
    for n0, n1 in ((100, 100), (63, 63), (64, 50), (7, 8)):
        half = rfft2(rng.random((5, n0, n1)).astype(np.float32))
        nh = half.shape[2]
        want = np.empty((5, n0, n1), half.dtype)
        want[:, :, :nh] = half.conj()
        want[:, 0, nh:] = half[:, 0, n1 - nh:0:-1]
        want[:, 1:, nh:] = half[:, :0:-1, n1 - nh:0:-1]
        assert np.array_equal(K.hermitian_full(half, n1).view(np.float32), want.view(np.float32))
        uf = np.array(20, dtype=np.float32)
        ar = np.arange(np.ceil(uf * 1.5))
        for _ in range(3):  # offsets as batched_phase_shift makes them, some seen before
            shift = np.round(rng.integers(-n1 // 2, n1 // 2 + 1, 40).astype(np.float32) * uf) / uf
            vals = np.unique(np.trunc(np.ceil(uf * 1.5) / 2.0) - shift * uf)
            k = (ar[None, :] - vals[:, None])[:, :, None] * fftfreq(n1, uf)[None, None, :]
            ref = np.exp(-(1j * 2 * np.pi) * k).astype(np.complex64, copy=False)
            got = K._dft_kernels(vals, ar, n1, uf, np.complex64)
            assert np.array_equal(got.view(np.float32), ref.view(np.float32))


def test_threaded_ring_filling_equals_one_pass():
    """The row pass split over threads gives the mask of the single pass (bool and float32),
    for overlapping rings, several thread counts and unequal rings."""
    from stlib import _align_kernels as K

    rng = np.random.default_rng(4)
    for t in range(20):
        H, W = (int(v) for v in rng.integers(20, 160, 2))
        n = int(rng.integers(1, 60))
        sizes = rng.integers(4, 30, n)
        xs, ys = [], []
        for s in sizes:
            th = np.linspace(0, 2 * np.pi, s)
            cx, cy, r = rng.uniform(-10, W + 10), rng.uniform(-10, H + 10), rng.uniform(3, 40)
            xs.append(cx + r * np.cos(th) * rng.choice([-1, 1]))
            ys.append(cy + r * np.sin(th))
        xy = np.ascontiguousarray(np.stack([np.concatenate(xs), np.concatenate(ys)], 1))
        ring = np.repeat(np.arange(n), sizes).astype(np.int64)
        want = K.fill_rings(xy, ring, H, W)
        for workers in (1, 2, 3, 5):
            got, gotf = K.fill_rings_threaded(xy, ring, H, W, workers=workers)
            assert np.array_equal(got, want) and np.array_equal(gotf, want.astype(np.float32))


def test_ring_coords_shortcut_equals_exterior_rings():
    """Polygons without holes give their coordinates directly; with (multi)polygons, holes and
    empties the exterior rings are taken as before: the same vertices and ring indices."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    import stlib.align as A

    def rings(geoms):
        parts = shapely.get_parts(np.asarray(geoms, dtype=object))
        parts = parts[~shapely.is_empty(parts)]
        return shapely.get_coordinates(shapely.get_exterior_ring(parts), return_index=True)

    sq = Polygon([(0, 0), (1, 0), (1, 1), (0, 1)])
    holed = Polygon([(0, 0), (4, 0), (4, 4), (0, 4)], [[(1, 1), (2, 1), (2, 2), (1, 2)]])
    multi = MultiPolygon([sq, Polygon([(5, 5), (6, 5), (6, 6)])])
    for geoms in ([sq, sq], [sq, Polygon(), sq], [sq, holed], [multi, sq, Polygon()], [Polygon()], [multi]):
        xy, idx = A._ring_coords(geoms)
        wxy, widx = rings(geoms)
        assert np.array_equal(xy, wxy) and np.array_equal(idx, widx) and idx.dtype == widx.dtype


def test_polygon_reading_shortcuts_keep_ids_and_repairs(tmp_path):
    """Cell ids stored as a string index and the validity checked in blocks over threads give
    the same table as before: ids as str, invalid polygons repaired, missing ones dropped."""
    import geopandas as gpd
    import pandas as pd
    import shapely

    from stlib.io.hest import read_polygons_parquet
    from stlib.io.xenium import normalise_cell_ids

    assert normalise_cell_ids(np.array(["a", "UNASSIGNED", "b"], dtype=object)).tolist() == ["a", "UNASSIGNED", "b"]
    assert normalise_cell_ids(np.array(["a", None], dtype=object)).tolist() == ["a", "UNASSIGNED"]
    n = 120_000  # more than one validity block
    geoms = shapely.buffer(shapely.points(np.arange(n) % 300 * 10.0, np.arange(n) // 300 * 10.0), 3.0, quad_segs=2)
    bowtie = shapely.Polygon([(0, 0), (2, 2), (2, 0), (0, 2)])
    geoms[7], geoms[n - 3] = bowtie, None
    gdf = gpd.GeoDataFrame(geometry=geoms, index=pd.Index([f"c{i}" for i in range(n)], name="cell_id"))
    gdf.to_parquet(tmp_path / "seg.parquet")
    got = read_polygons_parquet(tmp_path / "seg.parquet")
    assert len(got) == n - 1 and got.index[0] == "c0" and "c" + str(n - 3) not in got.index
    assert shapely.is_valid(got.geometry.values).all() and got.geometry.values[7].geom_type == "MultiPolygon"
    assert shapely.equals(got.geometry.values[8:100], geoms[8:100]).all()


def test_threaded_tile_decoding_reads_the_same_pixels(demo):
    """``open_wsi(decode_workers=2)`` (the alignment's slide: JPEG tiles decoded in threads)
    reads the same pixels as the default reader, on every level and across the border."""
    from stlib.io.wsi import open_wsi

    p = demo / "hest" / "wsis" / f"{SAMPLES[0]}.tif"
    with open_wsi(p) as a, open_wsi(p, decode_workers=2) as b:
        assert a.level_count > 1
        for lv in range(a.level_count):
            H, W = a.level_shapes[lv]
            assert np.array_equal(a.read_region(-7, 5, W + 11, H - 3, level=lv),
                                  b.read_region(-7, 5, W + 11, H - 3, level=lv))
