"""Tests of stlib.align: transforms, rasterisation, QC score, refinement, alignment.json."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import shapely
from independent import render_od
from scipy import ndimage

from stlib import align
from stlib.align import (
    AlignmentResult,
    Transform,
    affine_from_points,
    align_nuclei,
    alignment_error_um,
    apply_affine,
    compose,
    fit_hest_registration,
    in_excluded_region,
    load_alignment,
    nuclei_mask_dice,
    rasterize_polygons,
    robust_affine_from_points,
    transform_nuclei,
    xenium_alignment_um_to_he_px,
)
from stlib.utils import InputError
from stlib.layout import RunLayout


# ---------------------------------------------------------------------------------------
# synthetic rendered fixture: nuclei in haematoxylin OD, a known map with a smooth warp
# ---------------------------------------------------------------------------------------

class ArraySlide:
    """In-memory slide with the read_region contract of stlib.io.wsi (white outside)."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        self.level_downsamples = [1.0]
        self.shape = rgb.shape[:2]

    def read_region(self, x, y, w, h, *, level=0):
        out = np.full((h, w, 3), 255, np.uint8)
        H, W = self.shape
        a0, a1, b0, b1 = max(0, y), min(H, y + h), max(0, x), min(W, x + w)
        if a1 > a0 and b1 > b0:
            out[a0 - y:a1 - y, b0 - x:b1 - x] = self.rgb[a0:a1, b0:b1]
        return out


def _rot(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def _trans(tx, ty):
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])


def _about(M, c):
    return _trans(*c) @ M @ _trans(-c[0], -c[1])


def make_scene(seed=0, size_um=240.0, um_per_px=0.4, warp_px=3.0, bad_box_um=None, bad_shift_um=(0.0, 0.0),
               reg_shift_um=(4.0, -3.0), reg_rot_deg=1.0):
    """Xenium nuclei (µm), the true map (affine + smooth warp), a rendered H&E and HEST's guess."""
    rng = np.random.default_rng(seed)
    sp = 9.0
    g = np.arange(sp / 2, size_um - sp / 2, sp)
    cx, cy = np.meshgrid(g, g)
    c = np.column_stack([cx.ravel(), cy.ravel()]) + rng.uniform(-2.5, 2.5, (cx.size, 2))
    c = c[rng.random(len(c)) < 0.8] + 1000.0  # Xenium origin is not the image origin
    th = np.linspace(0, 2 * np.pi, 13)[:-1]
    polys = []
    for x, y in c:
        a, b, phi = rng.uniform(2.2, 3.8), rng.uniform(1.8, 3.0), rng.uniform(0, np.pi)
        px, py = a * np.cos(th), b * np.sin(th)
        polys.append(shapely.Polygon(np.column_stack([x + px * np.cos(phi) - py * np.sin(phi),
                                                      y + px * np.sin(phi) + py * np.cos(phi)])))
    polys = np.array(polys, dtype=object)
    ppu = 1.0 / um_per_px
    margin = 40
    c_um = (1000.0 + size_um / 2, 1000.0 + size_um / 2)
    c_px = (margin + size_um / 2 * ppu,) * 2
    A_true = _trans(*c_px) @ _rot(2.0) @ np.diag([ppu, ppu, 1.0]) @ _trans(-c_um[0], -c_um[1])
    gx = np.linspace(1000.0, 1000.0 + size_um, 5)
    GX, GY = np.meshgrid(gx, gx)
    u, v = (GX - 1000.0) / size_um, (GY - 1000.0) / size_um
    dx = warp_px * np.sin(2 * np.pi * u) * np.cos(np.pi * v)
    dy = 0.8 * warp_px * np.cos(2 * np.pi * v) * np.sin(np.pi * u)
    T_true = Transform(A_true, gx, gx, dx, dy)
    true_px = T_true.warp_geometries(polys)
    if bad_box_um is not None:  # the H&E content of a box is displaced (a fold / tear)
        inb = ((c[:, 0] >= bad_box_um[0]) & (c[:, 0] < bad_box_um[2])
               & (c[:, 1] >= bad_box_um[1]) & (c[:, 1] < bad_box_um[3]))
        true_px[inb] = shapely.transform(true_px[inb], lambda xy: xy + np.asarray(bad_shift_um) * ppu)
    n = int(size_um * ppu) + 2 * margin
    m = rasterize_polygons(true_px, (n, n)).astype(np.float32)
    od_h = ndimage.gaussian_filter(m, 0.7) * 0.9 + 0.06 * rng.random((n, n)).astype(np.float32)
    od_e = 0.25 + 0.05 * rng.random((n, n)).astype(np.float32)
    # rendered with stain vectors other than the ones align deconvolves (tests/independent.py)
    rgb = render_od(od_h, od_e, stain="macenko", seed=seed)
    E = _about(_trans(reg_shift_um[0] * ppu, reg_shift_um[1] * ppu) @ _rot(reg_rot_deg), c_px)
    return dict(slide=ArraySlide(rgb), polys=polys, T_true=T_true, A_init=E @ A_true, centroids=c,
                true_px=true_px, ppu=ppu)


@pytest.fixture(scope="module")
def scene():
    return make_scene()


@pytest.fixture(scope="module")
def aligned(scene):
    return align_nuclei(scene["slide"], scene["polys"], scene["A_init"], sample="SYN", route="hest", tile_um=60)


# ---------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------

def test_affine_from_points_recovers_known_affine():
    rng = np.random.default_rng(1)
    M = np.array([[3.1, 0.2, 40.0], [-0.15, 2.9, -7.0], [0, 0, 1]])
    src = rng.uniform(0, 500, (50, 2))
    dst = apply_affine(M, src)
    np.testing.assert_allclose(affine_from_points(src, dst), M, atol=1e-9)
    # weights: a zero-weight outlier does not move the fit
    dst2 = dst.copy()
    dst2[0] += 100
    w = np.ones(50)
    w[0] = 0
    np.testing.assert_allclose(affine_from_points(src, dst2, weights=w), M, atol=1e-9)
    with pytest.raises(ValueError, match="collinear"):
        affine_from_points([[0, 0], [1, 1], [2, 2]], [[0, 0], [1, 1], [2, 2]])


def test_robust_affine_ignores_outliers():
    rng = np.random.default_rng(2)
    M = np.array([[2.0, -0.1, 5.0], [0.1, 2.0, 3.0], [0, 0, 1]])
    src = rng.uniform(0, 100, (200, 2))
    dst = apply_affine(M, src) + rng.normal(0, 0.05, (200, 2))
    dst[:20] += rng.uniform(20, 50, (20, 2))
    plain = affine_from_points(src, dst)
    robust, w = robust_affine_from_points(src, dst)
    assert np.abs(plain - M).max() > 0.05  # least squares is pulled away ...
    np.testing.assert_allclose(robust, M, atol=0.02)  # ... the robust fit is not
    assert np.all(w[:20] == 0) and np.all(w[20:] > 0)


def test_compose_order_and_apply():
    A = _trans(10, 0)
    B = np.diag([2.0, 2.0, 1.0])
    p = np.array([[1.0, 1.0]])
    np.testing.assert_allclose(apply_affine(compose(A, B), p), [[12.0, 2.0]])  # B first, then A
    np.testing.assert_allclose(apply_affine(compose(B, A), p), [[22.0, 2.0]])


def test_fit_hest_registration_from_transcripts():
    rng = np.random.default_rng(3)
    M = _trans(120, -40) @ _rot(1.3) @ np.diag([1 / 0.2737, 1 / 0.2737, 1])
    xy = rng.uniform(0, 2000, (5000, 2))
    he = apply_affine(M, xy) + rng.normal(0, 0.3, xy.shape)
    he[:100] += 80.0  # a few wildly wrong rows
    df = pd.DataFrame({"x_location": xy[:, 0], "y_location": xy[:, 1], "he_x": he[:, 0], "he_y": he[:, 1]})
    np.testing.assert_allclose(fit_hest_registration(df), M, atol=0.01 * np.abs(M).max() / 100 + 0.05)
    # predicted H&E px within 0.05 px over the field
    err = np.abs(apply_affine(fit_hest_registration(df), xy) - apply_affine(M, xy)).max()
    assert err < 0.1
    with pytest.raises(InputError, match="TENX1.*he_x"):
        fit_hest_registration(df.drop(columns=["he_x"]), sample="TENX1")


def test_xenium_csv_routes_matrix_and_keypoints(tmp_path):
    ps = 0.2125
    M_true = _trans(300, 150) @ _rot(-0.8) @ np.diag([1 / 0.2737, 1 / 0.2737, 1])  # µm -> H&E px
    # matrix form: A maps H&E px -> morphology px = (µm / ps)
    A = np.diag([1 / ps, 1 / ps, 1]) @ np.linalg.inv(M_true)
    mat = tmp_path / "S1_he_imagealignment.csv"
    np.savetxt(mat, A, delimiter=",")
    np.testing.assert_allclose(xenium_alignment_um_to_he_px(mat, pixel_size_um=ps), M_true, rtol=1e-9, atol=1e-6)
    # keypoints form: fixed = Xenium µm, alignment = H&E px
    um = np.array([[100.0, 100.0], [900.0, 120.0], [500.0, 800.0], [120.0, 700.0]])
    hepx = apply_affine(M_true, um)
    kp = tmp_path / "S1_keypoints.csv"
    pd.DataFrame({"fixedX": um[:, 0], "fixedY": um[:, 1], "alignmentX": hepx[:, 0],
                  "alignmentY": hepx[:, 1]}).to_csv(kp, index=False)
    np.testing.assert_allclose(xenium_alignment_um_to_he_px(kp, pixel_size_um=ps), M_true, rtol=1e-8, atol=1e-5)


def test_transform_bilinear_dict_roundtrip_and_polygons():
    A = _trans(5, 7) @ np.diag([4.0, 4.0, 1])
    gx = np.array([0.0, 10.0, 20.0])
    gy = np.array([0.0, 10.0])
    dx = np.array([[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]])
    dy = -dx
    T = Transform(A, gx, gy, dx, dy)
    x, y = T(np.array([10.0, 5.0, 100.0]), np.array([0.0, 5.0, -50.0]))
    # node value, the bilinear centre of a cell, and constant extrapolation beyond the grid
    np.testing.assert_allclose(x, [45.0 + 2.0, 25.0 + 1.5, 405.0 + 4.0])
    np.testing.assert_allclose(y, [7.0 - 2.0, 27.0 - 1.5, -193.0 - 4.0])
    T2 = Transform.from_dict(json.loads(json.dumps(T.to_dict())))
    np.testing.assert_allclose(T2(3.3, 4.4), T(3.3, 4.4))
    sq = shapely.box(0, 0, 10, 10)
    warped = T.warp_geometries([sq])[0]
    np.testing.assert_allclose(np.sort(shapely.get_coordinates(warped), axis=0),
                               np.sort(T.apply_xy(shapely.get_coordinates(sq)), axis=0))
    with pytest.raises(ValueError, match="shape"):
        Transform(A, gx, gy, dx[:, :2], dy)


def test_transform_matches_demo_truth_evaluator():
    from stlib.demo import registration as demo

    rng = np.random.default_rng(4)
    t = demo.make_transform(rng, (512, 512), 0.2737, true_rot_deg=3, warp_px=3, warp_grid=5,
                            reg_shift_um=5, reg_rot_deg=1, reg_scale_err=0.01)
    pts = rng.uniform(-100, 400, (300, 2)) + np.asarray(t["local_displacement"]["x_um"][0])
    ours = Transform.from_dict(t).apply_xy(pts)
    theirs = np.column_stack(demo.true_he_xy(t, pts[:, 0], pts[:, 1]))
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    assert np.all(alignment_error_um(Transform.from_dict(t), t, pts) < 1e-9)


def test_rasterize_matches_skimage_and_keeps_overlaps():
    from skimage.draw import polygon as sk_polygon

    rng = np.random.default_rng(5)
    shape = (60, 70)
    polys = []
    ref = np.zeros(shape, bool)
    for k in range(25):
        c = rng.uniform(5, 60, 2)
        th = np.sort(rng.uniform(0, 2 * np.pi, 9))
        r = rng.uniform(2, 6, 9)
        xy = np.column_stack([c[0] + r * np.cos(th), c[1] + r * np.sin(th)])
        if k % 2:
            xy = xy[::-1]  # both orientations
        polys.append(shapely.Polygon(xy))
        rr, cc = sk_polygon(xy[:, 1], xy[:, 0], shape)
        ref[rr, cc] = True
    got = rasterize_polygons(polys, shape)
    # identical except possibly on pixel centres lying exactly on an edge
    assert (got != ref).sum() <= 3 and ref.sum() > 300
    # two overlapping squares of opposite orientation stay filled where they overlap
    a = shapely.box(10, 10, 30, 30)
    b = shapely.Polygon(shapely.get_coordinates(shapely.box(20, 20, 40, 40))[::-1])
    m = rasterize_polygons([a, b], (50, 50))
    assert m[25, 25] and m[15, 15] and m[35, 35] and not m[15, 35]
    assert int(m.sum()) == 20 * 20 + 20 * 20 - 10 * 10  # half-open pixel-centre rule, union


# ---------------------------------------------------------------------------------------
# QC score and refinement on the rendered fixture
# ---------------------------------------------------------------------------------------

def test_refinement_recovers_shift_rotation_warp(scene, aligned):
    truth = scene["T_true"].to_dict()
    before = alignment_error_um(scene["A_init"], truth, scene["centroids"])
    after = alignment_error_um(aligned, truth, scene["centroids"])
    assert np.median(before) > 4.0
    assert np.median(after) < 1.0, np.median(after)
    # the smooth warp (up to 3 px = 1.2 µm) is corrected too, not only the affine part
    affine_only = alignment_error_um(aligned.transform.affine, truth, scene["centroids"])
    assert np.median(after) < 0.7 * np.median(affine_only)
    g = aligned.scores["global"]
    assert g["after"]["corr"] > g["before"]["corr"] + 0.3
    assert g["after"]["dice"] > g["before"]["dice"] + 0.2
    assert g["after"]["median_residual_um"] < 0.5 < 4.0 < g["before"]["median_residual_um"]
    assert aligned.excluded_regions == []
    # mask Dice against the true nuclei rises
    al = transform_nuclei(scene["polys"], aligned.transform)
    init = transform_nuclei(scene["polys"], Transform(scene["A_init"]))
    d0 = nuclei_mask_dice(scene["true_px"], init.geometry, he_um_per_px=1 / scene["ppu"])
    d1 = nuclei_mask_dice(scene["true_px"], al.geometry, he_um_per_px=1 / scene["ppu"])
    assert d1 > 0.9 and d0 < 0.5


def test_no_refine_scores_initial_map(scene):
    r = align_nuclei(scene["slide"], scene["polys"], scene["A_init"], refine=False, tile_um=80)
    np.testing.assert_allclose(r.transform.affine, scene["A_init"])
    assert not r.transform.has_grid
    field = r.residual_field
    ok = np.isfinite(np.asarray(field["dx_um"], float))
    # the measured residual field reflects the injected error (>= 4 µm shift)
    assert np.median(np.hypot(np.asarray(field["dx_um"])[ok], np.asarray(field["dy_um"])[ok])) > 3.5
    assert r.scores["global"]["before"] == r.scores["global"]["after"]


def test_region_with_wrong_local_shift_is_excluded():
    box = (1130.0, 1130.0, 1180.0, 1180.0)  # Xenium µm; the H&E content there moved by 6 µm
    sc = make_scene(seed=1, bad_box_um=box, bad_shift_um=(0.0, 6.0))
    r = align_nuclei(sc["slide"], sc["polys"], sc["A_init"], tile_um=60, max_residual_um=3.0)
    assert r.excluded_regions, "the displaced region should be excluded"
    c = sc["centroids"]
    # true error of every nucleus under the refined map (the displaced ones included)
    true_xy = shapely.get_coordinates(shapely.centroid(sc["true_px"]))
    mapped = shapely.get_coordinates(shapely.centroid(r.transform.warp_geometries(sc["polys"])))
    err_um = np.hypot(*(mapped - true_xy).T) / sc["ppu"]
    excl = in_excluded_region(r, true_xy[:, 0], true_xy[:, 1])
    bad = err_um > 3.0
    assert bad.sum() >= 5
    assert excl[bad].mean() >= 0.9  # nuclei the map still gets wrong lie in excluded regions
    assert excl.mean() < 0.15  # and little else (box: 4% of the field; exclusion ~ one tile around it)
    far_x, far_y = sc["T_true"](np.array([1020.0, 1220.0]), np.array([1220.0, 1020.0]))
    assert not in_excluded_region(r, far_x, far_y).any()
    # away from the box the refinement still reaches < 1 µm
    assert np.median(err_um[~excl]) < 1.0 and np.percentile(err_um[~excl], 99) < 3.0


def test_no_nuclei_raises_naming_sample(scene):
    with pytest.raises(InputError, match="TENX999"):
        align_nuclei(scene["slide"], [], scene["A_init"], sample="TENX999")


# ---------------------------------------------------------------------------------------
# HEST layout, CLI, alignment.json
# ---------------------------------------------------------------------------------------

def _write_hest(root, sid, sc):
    import geopandas as gpd

    from stlib.io.wsi import write_pyramidal_tiff

    hest = root / "hest"
    for d in ("wsis", "metadata", "transcripts", "xenium_seg"):
        (hest / d).mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(hest / "wsis" / f"{sid}.tif", sc["slide"].rgb, um_per_px=1 / sc["ppu"],
                         compression=None, min_size=256)
    (hest / "metadata" / f"{sid}.json").write_text(json.dumps({"pixel_size_um_estimated": 1 / sc["ppu"]}))
    rng = np.random.default_rng(0)
    c = sc["centroids"]
    xy = np.repeat(c, 4, axis=0) + rng.normal(0, 1.5, (4 * len(c), 2))
    he = apply_affine(sc["A_init"], xy)
    pd.DataFrame({"cell_id": np.repeat(np.arange(len(c)), 4).astype(str), "feature_name": "EPCAM",
                  "qv": 30.0, "x_location": xy[:, 0], "y_location": xy[:, 1], "z_location": 0.0,
                  "overlaps_nucleus": 1, "he_x": he[:, 0], "he_y": he[:, 1]}
                 ).to_parquet(hest / "transcripts" / f"{sid}_transcripts.parquet")
    geoms = Transform(sc["A_init"]).warp_geometries(sc["polys"])
    gpd.GeoDataFrame({"cell_id": pd.Series(np.arange(len(geoms)).astype(str), dtype="string")},
                     geometry=gpd.GeoSeries(list(geoms))
                     ).to_parquet(hest / "xenium_seg" / f"{sid}_xenium_nucleus_seg.parquet")
    return hest


def test_cli_writes_schema_and_is_idempotent(tmp_path, scene, capsys):
    hest = _write_hest(tmp_path, "SYN1", scene)
    run = tmp_path / "run"
    argv = ["--hest-dir", str(hest), "--sample", "SYN1", "--run-dir", str(run), "--tile-um", "60"]
    assert align.cli_main(argv) == 0
    path = RunLayout(run).alignment_json("SYN1")
    assert path == run / "alignment" / "SYN1" / "alignment.json"
    doc = json.loads(path.read_text())
    for key in ("xenium_um_to_he_px", "initial_um_to_he_px", "local_displacement", "scores",
                "residual_field", "excluded_regions", "route", "sample"):
        assert key in doc
    assert doc["route"] == "hest" and doc["sample"] == "SYN1"
    assert np.asarray(doc["xenium_um_to_he_px"]).shape == (3, 3)
    ld = doc["local_displacement"]
    assert np.asarray(ld["dx_px"]).shape == (len(ld["y_um"]), len(ld["x_um"]))
    assert {"before", "after"} <= set(doc["scores"]["global"]) and doc["scores"]["tiles"]
    assert set(doc["residual_field"]) >= {"x_um", "y_um", "dx_um", "dy_um", "reliability"}
    # the initial map is HEST's registration, recovered from the transcripts
    np.testing.assert_allclose(doc["initial_um_to_he_px"], scene["A_init"], atol=1e-6)
    # the refined map is right, through the real readers and a JPEG-free pyramidal TIFF
    res = load_alignment(path)
    err = alignment_error_um(res, scene["T_true"].to_dict(), scene["centroids"])
    assert np.median(err) < 1.0
    # HEST's xenium_seg (H&E px) -> aligned polygons equal the µm polygons under the refined map
    from stlib.io.hest import HestSample

    nuc = HestSample(hest, "SYN1").nuclei()
    moved = transform_nuclei(nuc, res)
    direct = res.transform.warp_geometries(scene["polys"])
    c1 = shapely.get_coordinates(shapely.centroid(moved.geometry.values))
    c2 = shapely.get_coordinates(shapely.centroid(direct))
    np.testing.assert_allclose(c1, c2, atol=1e-6)
    # idempotent: second run skips, file untouched; --force recomputes
    mtime = path.stat().st_mtime_ns
    capsys.readouterr()
    assert align.cli_main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == mtime
    assert align.cli_main([*argv, "--no-refine"]) == 0  # other parameters: recomputed
    assert load_alignment(path).params["refine"] is False


def test_cli_sample_without_nuclei(tmp_path, scene, monkeypatch):
    import geopandas as gpd

    from stlib.io import hest as hest_io

    hest = _write_hest(tmp_path, "EMPTY1", scene)
    monkeypatch.setattr(hest_io.HestSample, "nuclei", lambda self: gpd.GeoDataFrame(geometry=[]))
    with pytest.raises(InputError, match="EMPTY1.*no nucleus polygons"):
        align.cli_main(["--hest-dir", str(hest), "--sample", "EMPTY1", "--run-dir", str(tmp_path / "o")])
    assert not RunLayout(tmp_path / "o").alignment_json("EMPTY1").exists()


def test_result_dict_roundtrip(aligned):
    d = json.loads(json.dumps(aligned.to_dict()))
    r2 = AlignmentResult.from_dict(d)
    np.testing.assert_allclose(r2.transform(1100.0, 1200.0), aligned.transform(1100.0, 1200.0))
    assert r2.route == "hest" and r2.sample == "SYN"
