"""stlib.labels.derive and stlib.tiles: properties of labels and tile stores that a wrong implementation breaks.

On a tiny generated cohort (six 640-px samples, every organ of the demo, two of them
held out) the labels are derived end to end (alignment, expression classes, masks) and cut
into tile stores; the tests check what the study rests on, against the generator's truth:

* splits: held-out organs only in ``test``; no true nucleus lies in both a ``train`` and a
  ``val`` tile (the guard band of the spatial split); both stores carry the same splits;
* labels: class accuracy and centroid error against the truth within bounds that follow from
  the cohort's knobs; the refined masks are closer to the true nuclei than the DAPI outlines;
* ``truth_scores`` and ``cellvit_agreement`` on inputs whose answer is known by construction.

Several tests also run the property checker on a deliberately broken variant (a split
without guard band, a split that ignores the held-out organs) and require it to object, so
a checker that cannot fail would itself fail.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

from stlib.demo import DemoConfig
from stlib.io.cohort import cohort_table
from stlib.io.hest import HestSample
from stlib.io.tiles import TileStore
from stlib.labels.derive import cellvit_agreement, derive_sample, truth_scores
from stlib.tiles.stage import assign_splits, build_tile_stores

TILE_PX = 128
UM_PER_PX = 0.25
KNOBS = {"image_px": 640, "pannuke_per_fold": 0, "raw_bundles": 0}


@pytest.fixture(scope="module")
def cohort(small_cohort) -> Path:
    """The session's small demo cohort (tests/conftest.py): its knobs are KNOBS."""
    import json

    knobs = json.loads((small_cohort / "cohort.json").read_text())["config"]
    assert {k: knobs[k] for k in KNOBS} == KNOBS
    return small_cohort


@pytest.fixture(scope="module")
def table(cohort) -> pd.DataFrame:
    return cohort_table(cohort)


@pytest.fixture(scope="module")
def run(cohort, table, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("derive_run")
    reports = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sid in table["sample"]:
            # gauss neighbours: the labeler without ~30 s of numba compilation in the test process
            reports[sid] = derive_sample(cohort / "hest", sid, run, truth_dir=cohort / "truth",
                                         neighbors_method="gauss", align=True)
    paths = build_tile_stores(cohort / "hest", table, run, truth_dir=cohort / "truth", tile_px=TILE_PX,
                              um_per_px=UM_PER_PX, workers=1)
    return {"dir": run, "reports": reports, "paths": paths}


# ----------------------------------------------------------------------------- split checkers

def _tile_boxes(meta: pd.DataFrame, he_um_per_px: dict[str, float]) -> np.ndarray:
    """Level-0 boxes of the tiles (a tile of TILE_PX target px covers TILE_PX * 0.25 µm)."""
    size = np.array([TILE_PX * UM_PER_PX / he_um_per_px[s] for s in meta["sample"]])
    x0, y0 = meta["x0"].to_numpy(float), meta["y0"].to_numpy(float)
    return shapely.box(x0, y0, x0 + size, y0 + size)


def split_leaks(meta: pd.DataFrame, split: pd.Series, truth: dict[str, gpd.GeoDataFrame],
                he_um_per_px: dict[str, float]) -> list[tuple[str, str]]:
    """(sample, cell_id) of every true nucleus that touches both a train and a val tile."""
    boxes = _tile_boxes(meta, he_um_per_px)
    sp = split.to_numpy()
    leaks = []
    for sid, t in truth.items():
        rows = np.flatnonzero(meta["sample"].to_numpy() == sid)
        tree = shapely.STRtree(boxes[rows])
        nuc_i, tile_i = tree.query(t.geometry.values, predicate="intersects")
        s = sp[rows][tile_i]
        in_train = np.zeros(len(t), bool)
        in_val = np.zeros(len(t), bool)
        in_train[nuc_i[s == "train"]] = True
        in_val[nuc_i[s == "val"]] = True
        leaks += [(sid, c) for c in t["cell_id"].to_numpy()[in_train & in_val]]
    return leaks


def heldout_violations(meta: pd.DataFrame, split: pd.Series, heldout: set[str]) -> int:
    """Tiles of a held-out organ outside ``test`` plus ``test`` tiles of a training organ."""
    ho = meta["organ"].isin(heldout).to_numpy()
    sp = split.to_numpy()
    return int((ho & (sp != "test")).sum() + (~ho & (sp == "test")).sum())


@pytest.fixture(scope="module")
def split_inputs(cohort, table, run):
    st = TileStore(run["paths"]["st"])
    he = {sid: HestSample(cohort / "hest", sid).pixel_size_um for sid in table["sample"]}
    truth = {sid: gpd.read_parquet(cohort / "truth" / sid / "nuclei.parquet") for sid in table["sample"]}
    heldout = set(table.loc[table["role"] == "held-out", "organ"])
    return st.meta, he, truth, heldout


# ----------------------------------------------------------------------------- splits

def test_heldout_organs_only_in_test(split_inputs):
    meta, _, _, heldout = split_inputs
    assert len(heldout) == 2 and heldout < set(meta["organ"])
    assert heldout_violations(meta, meta["split"], heldout) == 0
    assert set(meta.loc[~meta["organ"].isin(heldout), "split"]) == {"train", "val", ""}
    # the checker objects to a split that forgets the held-out organs
    leaky = assign_splits(meta, heldout_organs=[])
    assert heldout_violations(meta, leaky, heldout) > 0


def test_no_true_nucleus_in_a_train_and_a_val_tile(split_inputs):
    meta, he, truth, heldout = split_inputs
    # every training organ here has one sample: the spatial split with its guard band is used
    assert (meta.loc[~meta["organ"].isin(heldout)].groupby("organ")["sample"].nunique() == 1).all()
    for organ, sub in meta[~meta["organ"].isin(heldout)].groupby("organ"):
        assert {"train", "val"} <= set(sub["split"]), organ
    assert split_leaks(meta, meta["split"], truth, he) == []
    # without the guard band nuclei on the train/val border are in both: the checker sees them
    no_guard = assign_splits(meta, heldout_organs=sorted(heldout), guard_tiles=0)
    assert len(split_leaks(meta, no_guard, truth, he)) > 0
    # nor does a split drawn tile by tile keep them apart
    rng = np.random.default_rng(0)
    per_tile = pd.Series(np.where(rng.random(len(meta)) < 0.3, "val", "train"), index=meta.index)
    assert len(split_leaks(meta, per_tile, truth, he)) > 0


def test_both_stores_share_tiles_and_splits(run):
    st, tr = TileStore(run["paths"]["st"]), TileStore(run["paths"]["truth"])
    assert len(st) == len(tr) > 0
    cols = ["tile_id", "sample", "organ", "x0", "y0", "split"]
    pd.testing.assert_frame_equal(st.meta[cols].reset_index(drop=True), tr.meta[cols].reset_index(drop=True))
    assert np.array_equal(st.get_batch(np.arange(len(st)), ["image"])["image"],
                          tr.get_batch(np.arange(len(tr)), ["image"])["image"])


def test_tiles_cli_rebuilds_the_same_stores(run, cohort, table, capsys):
    """`stlib tiles build` (the tile stage's CLI) with the parameters of the fixture rebuilds
    (--force) stores equal array for array and row for row; `stlib tiles info` reads them."""
    from stlib.tiles.stage import cli_main

    before = {k: (TileStore(p).meta.copy(), {a: np.array(v) for a, v in TileStore(p).arrays.items()})
              for k, p in run["paths"].items()}
    argv = ["build", "--hest-dir", str(cohort / "hest"), "--run-dir", str(run["dir"]), "--truth-dir", str(cohort / "truth"),
            "--tile-px", str(TILE_PX), "--um-per-px", str(UM_PER_PX), "--workers", "2", "--force"]
    for sid in table["sample"]:
        argv += ["--sample", sid]
    assert cli_main(argv) == 0
    for k, p in run["paths"].items():
        st = TileStore(p)
        meta, arrays = before[k]
        pd.testing.assert_frame_equal(st.meta, meta)
        for a, v in arrays.items():
            assert np.array_equal(st.arrays[a], v), (k, a)
    assert cli_main(["info", str(run["paths"]["st"])]) == 0
    assert "TileStore(" in capsys.readouterr().out


def test_assign_splits_by_whole_samples_when_an_organ_has_several():
    rows = []
    for organ, n in (("lung", 5), ("skin", 2), ("breast", 1)):
        for k in range(n):
            for x in range(6):
                rows.append({"sample": f"{organ}{k}", "organ": organ, "x0": 100.0 * x, "y0": 0.0})
    meta = pd.DataFrame(rows)
    for seed in range(4):
        split = assign_splits(meta, heldout_organs=["skin"], val_fraction=0.2, seed=seed)
        per_sample = split.groupby(meta["sample"]).unique()
        for sid in meta.loc[meta["organ"] == "lung", "sample"].unique():
            assert len(per_sample[sid]) == 1  # a multi-sample organ never splits a sample
        lung = split[meta["organ"] == "lung"].groupby(meta["sample"]).first()
        assert (lung == "val").sum() == 1 and (lung == "train").sum() == 4
        assert (split[meta["organ"] == "skin"] == "test").all()
        b = split[meta["organ"] == "breast"].to_numpy()  # one sample: columns, then guard, then val
        assert list(b) == ["train"] * 4 + [""] + ["val"]


# ----------------------------------------------------------------------------- labels end to end

def _cfg() -> DemoConfig:
    return DemoConfig(**KNOBS)


def _confusion(report: dict) -> tuple[np.ndarray, list]:
    cm = np.array(report["truth"]["confusion"])
    return cm, list(report["truth"]["confusion_labels"])


def test_labels_against_the_truth(run):
    """Class of each cell against the truth: few wrong classes among the cells given one.

    A cell left unknown (255: an unplaceable cluster, Dead as ignore) is not a wrong label but
    no label; the labeler must place most cells and get most of those right. The bounds are
    well above chance (the largest class is about half of a sample's cells) and below what the
    labeler reaches here (placed 83-98 %, right 79-98 % of those, per sample)."""
    cfg = _cfg()
    placed_all = right_all = n_all = 0
    for sid, r in run["reports"].items():
        cm, labels = _confusion(r)
        unknown = labels.index(255)
        n = cm.sum()
        placed = n - cm[:, unknown].sum()
        right = sum(cm[i, i] for i in range(len(labels)) if i != unknown)
        assert placed >= 0.5 * n and right >= 0.6 * placed, (sid, cm)
        placed_all, right_all, n_all = placed_all + placed, right_all + right, n_all + n
        t = r["truth"]
        assert t["n_matched"] >= 0.9 * r["n_cells"]
        # the HEST registration is off by reg_shift_um (5 µm); after alignment the centroid
        # error is the DAPI outline offset (dapi_shift_um per axis) plus a residual
        assert t["median_centroid_error_um"] < min(0.5 * cfg.reg_shift_um, 4 * cfg.dapi_shift_um + 0.5), (sid, t)
    assert placed_all >= 0.70 * n_all and right_all >= 0.75 * placed_all, (placed_all, right_all, n_all)


def test_refined_masks_are_closer_to_the_truth(run):
    per = TileStore(run["paths"]["st"]).info["refinement"]["per_sample"]
    assert set(per) == set(run["reports"])
    for sid, rec in per.items():
        assert rec["refined"] > 0
        assert rec["mask_pq_vs_truth_after"] > rec["mask_pq_vs_truth_before"], (sid, rec)


def test_label_report_fields_hold_together(run):
    for sid, r in run["reports"].items():
        assert sum(r["class_mix"].values()) == r["n_cells"]
        assert abs(sum(r["class_fraction"].values()) - 1) < 1e-9
        cm, labels = _confusion(r)
        assert cm.sum() == r["truth"]["n_matched"]
        # accuracy counts 255 as wrong: the diagonal of the known classes over all cells
        right = sum(cm[i, i] for i in range(len(labels)) if labels[i] != 255)
        assert right / cm.sum() == pytest.approx(r["truth"]["class"]["accuracy"])
        assert 0 <= r["truth"]["mask"]["pq"] <= 1 and 0 <= r["cellvit"]["pq"] <= 1


# ----------------------------------------------------------------------------- truth_scores, cellvit_agreement

def _perfect(cohort: Path, sid: str):
    t = gpd.read_parquet(cohort / "truth" / sid / "nuclei.parquet")
    cells = pd.DataFrame(t.drop(columns="geometry"))[["cell_id", "class", "x_he", "y_he"]]
    nuclei = gpd.GeoDataFrame({"cell_id": t["cell_id"], "class": t["class"]},
                              geometry=t.geometry.values)[t["visible"].to_numpy(bool)]
    return cells, nuclei


def test_truth_scores_of_the_truth_and_of_known_errors(cohort):
    sid = "DEMO_LUNG_1"
    he = HestSample(cohort / "hest", sid).pixel_size_um
    cells, nuclei = _perfect(cohort, sid)
    r = truth_scores(cells, nuclei, cohort / "truth" / sid, he_um_per_px=he)
    assert r["class"]["accuracy"] == 1.0 and r["n_matched"] == len(cells)
    assert r["median_centroid_error_um"] == pytest.approx(0.0, abs=1e-9)
    assert r["mask"]["pq"] > 0.99 and r["mask"]["dice"] > 0.99
    # every centroid 3 µm off, a fifth of the classes wrong, nuclei shifted by 3 µm
    shift_px = 3.0 / he
    bad = cells.copy()
    bad["x_he"] += shift_px
    wrong = np.arange(len(bad)) % 5 == 0
    bad.loc[wrong, "class"] = bad.loc[wrong, "class"] % 5 + 1
    moved = nuclei.copy()
    moved["geometry"] = shapely.transform(nuclei.geometry.values, lambda xy: xy + [shift_px, 0])
    r2 = truth_scores(bad, moved, cohort / "truth" / sid, he_um_per_px=he)
    assert r2["median_centroid_error_um"] == pytest.approx(3.0, rel=1e-6)
    assert r2["class"]["accuracy"] == pytest.approx(1 - wrong.mean())
    assert r2["mask"]["pq"] < r["mask"]["pq"] - 0.2


def test_cellvit_agreement_known_answers(cohort):
    from stlib.constants import CLASS_NAMES

    sid = "DEMO_BREAST_1"
    he = HestSample(cohort / "hest", sid).pixel_size_um
    _, nuclei = _perfect(cohort, sid)
    nuclei = nuclei.reset_index(drop=True)
    names = np.array([CLASS_NAMES[int(c)] for c in nuclei["class"]])
    same = gpd.GeoDataFrame({"class_name": names}, geometry=nuclei.geometry.values)
    r = cellvit_agreement(nuclei, same, he_um_per_px=he)
    assert r["pq"] > 0.99 and r["class_agreement"] == 1.0 and r["n_paired"] == len(nuclei)
    # every class renamed to the next one: no agreement; half of CellViT's nuclei missing: DQ 2/3
    other = gpd.GeoDataFrame({"class_name": [CLASS_NAMES[int(c) % 5 + 1] for c in nuclei["class"]]},
                             geometry=nuclei.geometry.values)
    assert cellvit_agreement(nuclei, other, he_um_per_px=he)["class_agreement"] == 0.0
    half = same.iloc[::2]
    r3 = cellvit_agreement(nuclei, half, he_um_per_px=he)
    assert r3["n_cellvit"] == len(half)
    assert r3["dq"] == pytest.approx(len(half) / ((len(half) + len(nuclei)) / 2), abs=0.02)
    # unknown classes (255) are not compared
    unk = nuclei.copy()
    unk["class"] = 255
    assert cellvit_agreement(unk, same, he_um_per_px=he)["n_class_compared"] == 0

