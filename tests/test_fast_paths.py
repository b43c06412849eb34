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
    from stlib.labels.derive import _box, build_tile_stores
    from stlib.labels.masks import iter_label_tiles
    from stlib.labels.refine import RefineStats, refine_label_maps
    from stlib.labels.slide_tiles import read_tile_image
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
