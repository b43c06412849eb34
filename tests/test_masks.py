"""Tests of stlib.labels.masks: exact small cases, agreement with skimage, HV maps, tiling."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from skimage.draw import polygon as sk_polygon

from stlib.constants import IGNORE
from stlib.labels import masks as M


def _random_star(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 14) -> shapely.Polygon:
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.6, 1.0, n)
    return shapely.Polygon(np.c_[cx + rad * np.cos(t), cy + rad * np.sin(t)])


# ---- exact small cases ---------------------------------------------------------------------

def test_square_pixel_count_two_scales():
    sq = shapely.box(2, 2, 6, 6)  # 4 x 4 level-0 px
    inst, typ = M.rasterize_instances([sq], shape=(10, 10), classes=[3], min_area_px=0)
    assert (inst == 1).sum() == 16
    assert np.array_equal(np.argwhere(inst == 1).min(0), [2, 2])
    assert set(np.unique(typ)) == {0, 3}
    inst2, _ = M.rasterize_instances([sq], shape=(20, 20), scale=2.0, min_area_px=0)
    assert (inst2 == 1).sum() == 64
    inst_half, _ = M.rasterize_instances([sq], shape=(5, 5), scale=0.5, min_area_px=0)
    assert (inst_half == 1).sum() == 4  # centres at level-0 3 and 5 lie in [2, 6)


def test_origin_shifts_the_tile():
    sq = shapely.box(12, 7, 16, 11)
    inst, _ = M.rasterize_instances([sq], shape=(10, 10), origin=(10, 5), min_area_px=0)
    rows, cols = np.nonzero(inst)
    assert rows.min() == 2 and rows.max() == 5 and cols.min() == 2 and cols.max() == 5


def test_overlap_rules():
    big = shapely.box(0, 0, 10, 10)
    small = shapely.box(5, 5, 8, 8)
    inst, _ = M.rasterize_instances([small, big], shape=(12, 12), min_area_px=0)
    assert inst[6, 6] == 1 and inst[1, 1] == 2  # smaller wins although drawn... first in input
    inst, _ = M.rasterize_instances([big, small], shape=(12, 12), min_area_px=0)
    assert inst[6, 6] == 2
    inst, _ = M.rasterize_instances([big, small], shape=(12, 12), overlap="first", min_area_px=0)
    assert inst[6, 6] == 1
    inst, _ = M.rasterize_instances([small, big], shape=(12, 12), overlap="last", min_area_px=0)
    assert inst[6, 6] == 2
    # equal areas: the earlier polygon wins, deterministic
    a, b = shapely.box(0, 0, 4, 4), shapely.box(2, 2, 6, 6)
    inst, _ = M.rasterize_instances([a, b], shape=(8, 8), min_area_px=0)
    assert inst[3, 3] == 1
    with pytest.raises(ValueError, match="overlap"):
        M.rasterize_instances([a], shape=(8, 8), overlap="biggest")


def test_bowtie_repaired_to_largest_part():
    # self-intersecting: two triangles, the right one larger
    bow = shapely.Polygon([(0, 0), (12, 8), (12, 0), (0, 4)])
    assert not bow.is_valid
    ps = M.prepare_polygons([bow])
    assert ps.report["n_repaired"] == 1 and len(ps) == 1
    inst, _ = M.rasterize_instances(ps, shape=(10, 14), min_area_px=0)
    cols = np.nonzero(inst)[1]
    assert cols.min() >= 3  # only the right (larger) triangle is drawn
    assert inst[2, 11] == 1 and inst[2, 0] == 0


def test_polygon_with_hole():
    ring = shapely.box(0, 0, 10, 10).difference(shapely.box(3, 3, 7, 7))
    inst, _ = M.rasterize_instances([ring], shape=(10, 10), min_area_px=0)
    assert (inst > 0).sum() == 100 - 16 and inst[5, 5] == 0


def test_tile_border_keeps_id_and_flags_clipped():
    polys = [shapely.box(28, 10, 38, 20), shapely.box(5, 5, 10, 10)]
    left = M.label_maps(polys, shape=(32, 32), origin=(0, 0), ids=[101, 7], min_area_px=0)
    right = M.label_maps(polys, shape=(32, 32), origin=(32, 0), ids=[101, 7], min_area_px=0)
    assert (left.inst == 101).sum() == 4 * 10 and (right.inst == 101).sum() == 6 * 10
    assert list(left.clipped_ids) == [101] and list(right.clipped_ids) == [101]
    assert list(left.ids) == [7, 101] and list(right.ids) == [101]
    # stitched tiles equal one big map
    both = M.label_maps(polys, shape=(32, 64), ids=[101, 7], min_area_px=0)
    assert np.array_equal(np.hstack([left.inst, right.inst]), both.inst)
    assert both.clipped_ids.size == 0


def test_tiny_polygon_goes_to_ignore():
    tiny = shapely.box(10.2, 10.2, 11.4, 11.4)  # 1.44 px^2 < 4
    big = shapely.box(0, 0, 5, 5)
    lm = M.label_maps([tiny, big], shape=(16, 16), classes=[2, 2])
    assert 1 not in lm.ids and (lm.inst == 1).sum() == 0
    assert lm.n_tiny == 1
    assert lm.ignore[10, 10] == 1 and lm.ignore.sum() == 1  # its centroid pixel
    assert lm.ignore[:5, :5].sum() == 0
    inst, _ = M.rasterize_instances([tiny, big], shape=(16, 16))
    assert set(np.unique(inst)) == {0, 2}
    inst, _ = M.rasterize_instances([tiny, big], shape=(16, 16), min_area_px=1.0)
    assert (inst == 1).sum() == 1


def test_outside_region_dropped_and_counted():
    polys = [shapely.box(5, 5, 9, 9), shapely.box(200, 200, 210, 210), shapely.box(48, 10, 56, 14), None]
    ps = M.prepare_polygons(polys, region=(0, 0, 50, 50))
    assert ps.report == {"n_input": 4, "n_empty": 1, "n_repaired": 0, "n_degenerate": 0,
                         "n_outside": 1, "n_kept": 2, }
    assert list(ps.ids) == [1, 3]
    lm = M.label_maps(ps, shape=(20, 64), min_area_px=0, region=(0, 0, 50, 50))
    assert (lm.inst == 3).sum() == 2 * 4  # clipped at x = 50
    assert lm.ignore[:, 50:].all() and not lm.ignore[:, :50].any()


def test_classes_confidence_and_ignore_polygons():
    polys = [shapely.box(0, 0, 6, 6), shapely.box(10, 10, 16, 16)]
    lm = M.label_maps(polys, shape=(20, 20), classes=[1, IGNORE], confidence=[0.5, 0.9],
                      ignore_polygons=[shapely.box(0, 15, 5, 20)], min_area_px=0)
    assert lm.type[2, 2] == 1 and lm.conf[2, 2] == 128
    assert lm.type[12, 12] == IGNORE and lm.conf[12, 12] == 0
    assert lm.conf[8, 8] == 0 and lm.type[8, 8] == 0
    assert lm.ignore[17, 2] == 1 and lm.ignore.sum() == 25
    tissue = np.zeros((20, 20), bool)
    tissue[:, :10] = True
    lm2 = M.label_maps(polys, shape=(20, 20), tissue_mask=tissue, min_area_px=0)
    assert lm2.ignore[:, 10:].all() and not lm2.ignore[:, :10].any()
    lm3 = M.label_maps(polys, shape=(20, 20), tissue_mask=shapely.box(0, 0, 10, 20), min_area_px=0)
    assert np.array_equal(lm2.ignore, lm3.ignore)


def test_input_errors():
    with pytest.raises(ValueError, match="ids"):
        M.prepare_polygons([shapely.box(0, 0, 1, 1)] * 2, ids=[1, 1])
    with pytest.raises(ValueError, match="ids"):
        M.prepare_polygons([shapely.box(0, 0, 1, 1)], ids=[0])
    with pytest.raises(ValueError, match="scale"):
        M.label_maps([shapely.box(0, 0, 1, 1)], shape=(4, 4), scale=0)
    with pytest.raises(ValueError, match="shape"):
        M.label_maps([shapely.box(0, 0, 1, 1)], shape=(0, 4))


# ---- agreement with skimage ----------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 0.8])
def test_agrees_with_skimage_polygon(scale):
    rng = np.random.default_rng(1)
    origin = (3.7, -2.2)
    shape = (80, 90)
    total_diff = 0
    total_px = 0
    for _ in range(40):
        p = _random_star(rng, rng.uniform(0, 110), rng.uniform(0, 100), rng.uniform(4, 20))
        if not p.is_valid:
            continue
        inst, _ = M.rasterize_instances([p], shape=shape, origin=origin, scale=scale, min_area_px=0)
        xy = shapely.get_coordinates(p)
        # convention: pixel (r, c) centre = origin + (c + 0.5, r + 0.5) / scale
        rr, cc = sk_polygon((xy[:, 1] - origin[1]) * scale - 0.5, (xy[:, 0] - origin[0]) * scale - 0.5, shape)
        ref = np.zeros(shape, bool)
        ref[rr, cc] = True
        total_diff += int(((inst > 0) != ref).sum())
        total_px += int(ref.sum())
    assert total_px > 5000
    assert total_diff / total_px < 0.002  # pixel-exact but for centres on an edge


def test_area_matches_polygon_area():
    rng = np.random.default_rng(2)
    polys = [_random_star(rng, 200, 200, 150, n=40) for _ in range(3)]
    polys = [p for p in polys if p.is_valid]
    for p in polys:
        inst, _ = M.rasterize_instances([p], shape=(400, 400), min_area_px=0)
        assert abs((inst > 0).sum() - p.area) / p.area < 0.01


# ---- HV maps --------------------------------------------------------------------------------

def test_hv_properties():
    rng = np.random.default_rng(3)
    polys = [_random_star(rng, x, y, 9) for x, y in rng.uniform(10, 90, (25, 2))]
    polys = [p for p in polys if p.is_valid]
    lm = M.label_maps(polys, shape=(100, 100), min_area_px=0)
    hv = lm.hv
    assert hv.dtype == np.float32 and hv.shape == (2, 100, 100)
    assert hv.min() >= -1.0 and hv.max() <= 1.0
    assert not hv[:, lm.inst == 0].any()
    for i in lm.ids:
        m = lm.inst == i
        rr, cc = np.nonzero(m)
        cx, cy = cc.mean(), rr.mean()
        h, v = hv[0][m], hv[1][m]
        assert np.all(np.sign(h) == np.sign(np.round(cc - cx, 9)))
        assert np.all(np.sign(v) == np.sign(np.round(rr - cy, 9)))
        if cc.max() > cc.min():
            assert h.min() == -1.0 or h.max() == 1.0
    # the tile path (bbox kernel) equals the generic dense function
    assert np.array_equal(M.hv_maps(lm.inst), hv)


def test_hv_maps_noncontiguous_ids_and_large_ids():
    inst = np.zeros((6, 7), np.int64)
    inst[1:4, 1:6] = 10**12
    inst[4:6, 0:2] = 5
    hv = M.hv_maps(inst)
    assert np.allclose(hv[0, 2, 1:6], [-1, -0.5, 0, 0.5, 1])
    assert np.allclose(hv[1, 1:4, 3], [-1, 0, 1])
    assert np.allclose(hv[0, 4:6, 0], -1) and np.allclose(hv[0, 4:6, 1], 1)
    with pytest.raises(ValueError):
        M.hv_maps(np.zeros((3, 3), float))


# ---- whole slides -------------------------------------------------------------------------

def test_tile_grid():
    g = M.tile_grid(100, 50, tile_px=32)
    assert g.shape == (4 * 2, 2) and g[0].tolist() == [0, 0] and g[-1].tolist() == [96, 32]
    g = M.tile_grid(100, 50, tile_px=32, overlap=8)
    assert sorted(set(g[:, 0])) == [0, 24, 48, 72]
    with pytest.raises(ValueError):
        M.tile_grid(10, 10, tile_px=8, overlap=8)


@pytest.mark.parametrize("overlap", [0, 6])
def test_iter_tiles_equal_one_big_map(overlap):
    rng = np.random.default_rng(4)
    polys = [_random_star(rng, x, y, rng.uniform(3, 12)) for x, y in rng.uniform(-10, 130, (150, 2))]
    scale = 0.9
    width, height = 120.0, 100.0
    cls = rng.integers(1, 6, len(polys))
    ref = M.label_maps(polys, shape=(120, 120), scale=scale, classes=cls,
                       region=(0, 0, width, height), min_area_px=2)
    seen = 0
    for tile, lm in M.iter_label_tiles(polys, width=width, height=height, scale=scale, tile_px=32,
                                       overlap=overlap, classes=cls, min_area_px=2):
        sl = np.s_[tile.y:tile.y + 32, tile.x:tile.x + 32]
        h, w = ref.inst[sl].shape
        assert np.array_equal(lm.inst[:h, :w], ref.inst[sl])
        assert np.array_equal(lm.type[:h, :w], ref.type[sl])
        assert np.array_equal(lm.ignore[:h, :w], ref.ignore[sl])
        assert lm.ignore[h:, :].all() and lm.ignore[:, w:].all()  # beyond the slide
        seen += 1
    assert seen == len(M.tile_grid(108, 90, tile_px=32, overlap=overlap))


def test_iter_tiles_threads_same_result():
    rng = np.random.default_rng(5)
    polys = [_random_star(rng, x, y, 6) for x, y in rng.uniform(0, 200, (300, 2))]
    kw = dict(width=200, height=200, scale=1.0, tile_px=64, min_area_px=0)
    one = list(M.iter_label_tiles(polys, **kw))
    two = list(M.iter_label_tiles(polys, n_workers=2, **kw))
    assert [t for t, _ in one] == [t for t, _ in two]
    for (_, a), (_, b) in zip(one, two):
        assert np.array_equal(a.inst, b.inst) and np.array_equal(a.hv, b.hv)


def test_render_without_hv_gives_the_same_maps():
    """``TileRenderer.render(hv=False)`` (the tile stage, which stores no HV maps) skips only the HV
    maps: instances, classes, ignore and confidence are those of the full render."""
    rng = np.random.default_rng(11)
    polys = [_random_star(rng, x, y, 7) for x, y in rng.uniform(0, 150, (120, 2))]
    r = M.TileRenderer(polys, width=150, height=150, scale=1.3, tile_px=64, classes=rng.integers(1, 6, 120),
                       confidence=rng.uniform(0, 1, 120), ignore_polygons=[shapely.box(20, 20, 40, 35)])
    for i in range(len(r)):
        a, b = r.render(i), r.render(i, hv=False)
        assert b.hv is None and a.hv.shape == (2, 64, 64)
        for k in ("inst", "type", "ignore", "conf", "ids", "clipped_ids"):
            assert np.array_equal(getattr(a, k), getattr(b, k)), k
        assert a.n_tiny == b.n_tiny


def test_unknown_background_fast_path_equals_the_fill_on_every_tile():
    """Tiles wholly inside the known region skip the polygon fill (``unknown_background`` -> None);
    on every tile of a grid crossed by a wavy, holed region the answer equals the full fill."""
    import shapely

    from stlib.labels.masks import TileRenderer, _fill_mask

    t = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    r = 700 + 60 * np.sin(7 * t)
    outer = shapely.Polygon(np.column_stack([900 + r * np.cos(t), 850 + r * np.sin(t)]))
    region = outer.difference(shapely.Point(900, 850).buffer(150))
    nuc = shapely.Point(400, 400).buffer(8)
    for scale in (1.0, 0.8):
        rend = TileRenderer([nuc], width=1900.0, height=1800.0, scale=scale, tile_px=64,
                            known_background=np.array([region], dtype=object))
        assert 0 < rend._known_inside.sum() < len(rend)
        s, st, en = rend._known
        for i in range(len(rend)):
            x, y = rend.grid[i]
            full = ~_fill_mask(s, en[st[i]:st[i + 1]], float(x), float(y), rend.scale, rend.shape).astype(bool)
            fast = rend.unknown_background(i)
            assert np.array_equal(np.zeros(rend.shape, bool) if fast is None else fast, full), (scale, i)
