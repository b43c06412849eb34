"""stlib.robustness and the Xenium-region mask: scores, sweeps and the outside-region check."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import shapely

from stlib.labels.masks import coverage_region, known_background_region
from stlib.robustness import (
    DEV_SEEDS, EVAL_SEEDS, KNOB_GRID, SEEN_SEEDS, acceptance_table, edge_gap_grid, outside_region_background,
    robustness_sweep, score_cells,
)


def test_score_cells_by_hand():
    c = pd.DataFrame({"true_class": [1, 1, 2, 3, 5, 4, 1],
                      "pred_class": [1, 5, 2, 255, 5, 3, 1],
                      "disease_state": ["Cancer"] * 5 + ["Healthy"] * 2})
    sc = score_cells(c)
    assert sc["n"] == 7 and sc["n_labelled"] == 6
    assert sc["accuracy"] == pytest.approx(4 / 6)        # the Dead cell labelled Connective is wrong
    assert sc["accuracy_all"] == pytest.approx(4 / 7)    # ignore counted wrong
    assert sc["ignored_fraction"] == pytest.approx(1 / 7)
    assert sc["f1_Neoplastic"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    assert sc["f1_Epithelial"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 0))
    assert np.isnan(sc["f1_Connective"])                 # no labelled Connective cell in the truth
    assert sc["min_f1"] == pytest.approx(min(sc["f1_Neoplastic"], sc["f1_Inflammatory"], sc["f1_Epithelial"]))
    assert sc["neoplastic_in_healthy"] == 1
    assert "ignored_qc" not in sc  # no reason column, no breakdown
    c["ignore_reason"] = ["", "", "", "low_confidence", "", "", ""]
    sc = score_cells(c)
    assert sc["ignored_low_confidence"] == pytest.approx(1 / 7) and sc["ignored_no_type"] == 0.0


def test_seeds_and_grid():
    assert not set(DEV_SEEDS) & set(EVAL_SEEDS)
    # the seeds read after the first freeze are neither development nor evaluation seeds
    assert not set(SEEN_SEEDS) & set(EVAL_SEEDS) and not set(SEEN_SEEDS) & set(DEV_SEEDS)
    from stlib.demo.config import config_for_scale

    cfg = config_for_scale("demo")
    for knob, values in KNOB_GRID.items():
        assert getattr(cfg, knob) in values, knob  # every curve passes through the default


def test_sweep_runs_and_moves_with_a_knob():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = robustness_sweep([DEV_SEEDS[0]], knobs={"offvocab_fraction": (0.0, 0.3)},
                              samples=["DEMO_SKIN_1"], progress=False)
    assert list(df["value"]) == [0.0, 0.3] and (df["knob"] == "offvocab_fraction").all()
    assert (df["n"] > 100).all() and df["accuracy"].between(0, 1).all()


def test_acceptance_in_parallel_processes_equals_serial():
    kw = {"samples": ["DEMO_SKIN_1"], "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        serial = acceptance_table(DEV_SEEDS[:2], **kw)
        parallel = acceptance_table(DEV_SEEDS[:2], n_jobs=2, **kw)
    assert list(parallel["seed"]) == list(DEV_SEEDS[:2])
    pd.testing.assert_frame_equal(serial, parallel)


def test_coverage_region_ignores_what_xenium_did_not_image():
    rng = np.random.default_rng(0)
    # molecules in x 0-200, y 0-100 µm, with a 10 µm gap (a lumen) in the middle
    x, y = rng.uniform(0, 200, 40000), rng.uniform(0, 100, 40000)
    keep = ~((x > 95) & (x < 105) & (y > 40) & (y < 50))
    g = coverage_region(x[keep], y[keep], bin_um=4.0, margin_um=10.0)
    x0, y0, x1, y1 = g.bounds
    # shrunk by the margin + up to two bins everywhere, never beyond the molecules
    assert 10.0 <= x0 <= 22.0 and 10.0 <= y0 <= 22.0 and 178.0 <= x1 <= 190.0 and 78.0 <= y1 <= 90.0
    assert g.contains(shapely.Point(100, 45))  # the small gap is closed
    # where Xenium imaged beyond the H&E image (molecules past its border) the region is not shrunk there
    xw, yw = rng.uniform(-10, 210, 60000), rng.uniform(-10, 110, 60000)
    img = shapely.box(0, 0, 200, 100)
    g2 = coverage_region(xw, yw, bin_um=4.0, margin_um=10.0, extent=img)
    assert g2.contains(shapely.Point(1, 50)) and g2.area > 0.95 * img.area
    # a region smaller than the image: shrunk on the inner side only
    inner = xw < 150
    g3 = coverage_region(xw[inner], yw[inner], bin_um=4.0, margin_um=10.0, extent=img)
    assert g3.contains(shapely.Point(1, 50)) and not g3.contains(shapely.Point(140, 50))
    assert g3.bounds[2] <= 150 - 10.0
    assert coverage_region([], []).is_empty


@pytest.mark.parametrize("tilt_deg", [0.0, 2.0])
def test_a_region_ending_just_inside_the_image_edge_is_shrunk(tilt_deg):
    """A Xenium region whose edge runs 0-2 µm inside the H&E image edge leaves no empty bin there;
    main counted the area beyond the image as covered and did not shrink the region, so a nucleus
    centred in that strip (outside the region) reached ~5 µm into it and was taught as background."""
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-10, 210, 80000), rng.uniform(-10, 110, 80000)
    img = shapely.box(0, 0, 200, 100)
    slope = np.tan(np.deg2rad(tilt_deg))
    keep = x >= 1.0 + slope * y  # the region's left edge: 1 µm inside the image at y = 0, tilted by tilt_deg
    g = coverage_region(x[keep], y[keep], bin_um=4.0, margin_um=10.0, extent=img)
    outside = shapely.Polygon([(0, 0), (1.0, 0), (1.0 + slope * 100, 100), (0, 100)])  # in the image, not imaged
    # every nucleus (radius <= 9 µm) centred in the image outside the region stays off the kept region
    for cy in np.arange(0, 101, 2.0):
        cx = 0.5 * (1.0 + slope * cy)
        assert not g.intersects(shapely.Point(cx, cy).buffer(9.0)), (cx, cy)
    assert g.distance(outside) >= 9.0
    # the covered part of the image is kept up to the other borders, where Xenium imaged beyond the image
    assert g.contains(shapely.Point(100, 1)) and g.contains(shapely.Point(199, 50))
    assert g.area > 0.85 * img.area


def test_edge_parameters_are_chosen_on_development_seeds_only(tmp_path):
    from stlib.utils import InputError

    with pytest.raises(InputError, match="not development seeds"):
        edge_gap_grid([DEV_SEEDS[0], EVAL_SEEDS[0]], tmp_path)
    # the edge step off reproduces the region before the fix: not shrunk at a strip thinner than a bin
    rng = np.random.default_rng(2)
    x, y = rng.uniform(-10, 210, 40000), rng.uniform(-10, 110, 40000)
    keep = x >= 1.0
    img = shapely.box(0, 0, 200, 100)
    assert coverage_region(x[keep], y[keep], extent=img, edge_slope=None).bounds[0] < 5.0
    assert coverage_region(x[keep], y[keep], extent=img).bounds[0] >= 1.0 + 10.0


@pytest.fixture(scope="module")
def region_run(tmp_path_factory):
    from stlib.demo import make_cohort
    from stlib.io import cohort
    from stlib.labels import derive
    from stlib.tiles.stage import build_tile_stores

    root = tmp_path_factory.mktemp("region")
    data = make_cohort(root / "data", seed=7, image_px=512, pannuke_per_fold=0, raw_bundles=0,
                       xenium_region_fraction=0.6)
    hest = cohort.hest_dir(data)
    table = cohort.cohort_table(data)
    table = table[table["sample"].isin(["DEMO_BREAST_1", "DEMO_BOWEL_1"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sid in table["sample"]:
            derive.derive_sample(hest, sid, root / "run", truth_dir=data / "truth", neighbors_method="gauss",
                                 align=True)
        build_tile_stores(hest, table, root / "run", truth_dir=data / "truth", refine_masks=False)
    return root, data, hest, table


def test_no_training_tile_marks_a_nucleus_outside_the_xenium_region_as_background(region_run):
    root, data, hest, table = region_run
    res = outside_region_background(root / "run", data / "truth")
    assert res["n_outside_nuclei"] > 20  # the check has something to check
    assert res["n_background_nuclei"] == 0 and res["n_background_pixels"] == 0, res
    rep = __import__("json").loads((root / "run" / "labels" / "DEMO_BREAST_1" / "label_report.json").read_text())
    assert 0.2 < rep["coverage"]["fraction_of_slide"] < 0.8


def test_without_the_region_mask_the_check_fails(region_run, tmp_path):
    """The same tiles built without coverage.parquet (as before issue 12) teach those nuclei as background."""
    import shutil

    from stlib.tiles.stage import build_tile_stores

    root, data, hest, table = region_run
    run2 = tmp_path / "run"
    shutil.copytree(root / "run" / "labels", run2 / "labels")
    shutil.copytree(root / "run" / "alignment", run2 / "alignment")
    for p in (run2 / "labels").glob("*/coverage.parquet"):
        p.unlink()
    build_tile_stores(hest, table, run2, truth_dir=data / "truth", refine_masks=False)
    res = outside_region_background(run2, data / "truth")
    assert res["n_background_nuclei"] > 10, res


def test_panel_coverage_table_on_every_real_panel(realdata):
    from stlib.io.panels import read_panel_dir
    from stlib.labels.celltypes import panel_coverage_table
    from stlib.labels.classes import cnv_support

    panels = read_panel_dir(realdata / "xenium-panels")
    assert {"hMulti", "hBreast", "hColon", "hLung", "hSkin", "hPrime5K"} <= set(panels)
    tab = panel_coverage_table(panels).set_index("type")
    assert tab.loc["t_cell", "hMulti"] == "13" and tab.loc["cardiomyocyte", "hMulti"].endswith("(off)")
    assert not tab.loc["hepatocyte", "hPrime5K"].endswith("(off)")
    assert [p for p in panels if cnv_support(panels[p])[0]] == ["hPrime5K"]


def test_robustness_curves_figure():
    import matplotlib

    matplotlib.use("Agg")
    from stlib import plot

    df = pd.DataFrame({"knob": ["cnv_fold"] * 4, "value": [1.0, 1.0, 1.3, 1.3], "default": 1.3, "seed": [1, 2, 1, 2],
                       "accuracy": [0.8, 0.82, 0.85, 0.86], "f1_Neoplastic": [0.7, 0.72, 0.9, 0.88]})
    fig = plot.robustness_curves(df, source="SYNTHETIC test", metrics=("accuracy", "f1_Neoplastic"))
    assert len(fig.axes) >= 1 and any("SYNTHETIC" in t.get_text() for t in fig.texts)


def test_an_unlabelled_nucleus_reaching_into_the_region_is_ignore_not_background():
    """Issue 12's last tile check. A nucleus centred just beyond the H&E image edge (and outside the Xenium
    region, so without an ST outline) where the region runs up to the image edge, and one centred just
    outside the region's inner edge, reach into the region; main taught their visible part as background.
    With the default ``region_border_um`` those pixels are ignore, while ST nuclei in the same strip keep
    their labels and background away from the region's edge stays background."""
    from stlib.config import TilesConfig
    from stlib.labels.masks import TileRenderer, known_background_region
    from stlib.tiles.slide import _tile_work

    um, W, H = 0.25, 400, 400  # level-0 px = tile px
    border_px = TilesConfig().region_border_um / um
    assert border_px >= 24  # the default covers a nucleus of 6 µm semi-axis
    region = [shapely.box(0, 0, 300, 400)]  # imaged: up to the image's left, top and bottom edges
    st = [shapely.Point(100, 200).buffer(20), shapely.Point(12, 100).buffer(16)]  # ST nuclei, one near the edge
    out = [shapely.Point(-4, 300).buffer(24), shapely.Point(310, 100).buffer(24)]  # no ST outline

    def tiles(known):
        r = TileRenderer(st, width=W, height=H, scale=1.0, tile_px=200, tissue=region, known_background=known,
                         classes=[1, 2])
        return [(r.tile(i), _tile_work(i, np.zeros((200, 200, 3), np.uint8), {"st": r}, 200.0, 200, um, None))
                for i in range(len(r))]

    def count(result, geom):
        n_bg = n_lab = 0
        for t, res in result:
            inst, _, ign, _ = res.maps["st"]
            yy, xx = np.mgrid[0:200, 0:200]
            m = shapely.contains_xy(geom, xx + 0.5 + t.origin[0], yy + 0.5 + t.origin[1])
            n_bg += int((m & (inst == 0) & (ign == 0)).sum())
            n_lab += int((m & (inst > 0)).sum())
        return n_bg, n_lab

    before = tiles(None)  # main: no strip
    after = tiles(known_background_region(region, W, H, border_px))
    for g in out:
        assert count(before, g)[0] > 50  # taught as background before
        assert count(after, g)[0] == 0
    for g in st:  # ST nuclei keep every labelled pixel
        assert count(after, g)[1] == count(before, g)[1] > 0
    far = shapely.box(150, 150, 250, 190)  # background away from the region's edge stays background
    assert count(after, far)[0] == count(before, far)[0] == 100 * 40
    assert known_background_region(region, W, H, 0.0) is None and known_background_region(None, W, H, 8) is None


def test_region_border_is_chosen_on_development_seeds_only(tmp_path):
    from stlib.robustness import region_border_grid
    from stlib.utils import InputError

    with pytest.raises(InputError, match="not development seeds"):
        region_border_grid([EVAL_SEEDS[0]], tmp_path)
    # the known-background region is the imaged region within the image, shrunk by the border
    region = [shapely.box(-50, 20, 300, 400)]
    known = known_background_region(region, 400, 400, 10.0)
    k = shapely.union_all(known)
    assert k.symmetric_difference(shapely.box(10, 30, 290, 390)).area < 1e-6
    none = known_background_region([shapely.box(0, 0, 15, 15)], 400, 400, 10.0)  # nothing left: all unknown
    assert len(none) == 1 and none[0].bounds[2] < 0
