"""stlib.demo: layout, determinism, truth, registration and measured realism of the synthetic cohort."""

from __future__ import annotations

import hashlib
import json

import geopandas as gpd
import h5py
import numpy as np
import pandas as pd
import pytest
import shapely
from windows import demo_statistics

from stlib.constants import XENIUM_PIXEL_SIZE_UM
from stlib.demo import DemoConfig, FINE_TYPE_TO_CLASS, cli_main, make_cohort, true_he_xy
from stlib.demo.biology import DEAD_TYPE, type_class
from stlib.demo.registration import apply_affine, true_um_from_he
from stlib.io.panels import load_panel
from stlib.io.wsi import open_wsi
from stlib.utils import InputError

SMALL = {"image_px": 384, "pannuke_per_fold": 2, "pannuke_px": 128}
TINY = {"image_px": 160, "pannuke_per_fold": 1, "pannuke_px": 64, "raw_bundles": 1}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    make_cohort(root, seed=3, **SMALL)
    return root


@pytest.fixture(scope="module")
def meta(cohort):
    return json.loads((cohort / "cohort.json").read_text())


@pytest.fixture(scope="module")
def outside_windows(cohort):
    """Statistics of the cohort outside their windows (derived from the knobs and the sample sizes, tests/windows.py)."""
    return demo_statistics(cohort)


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _gene_matrix(cohort, sid):
    genes = load_panel("hMulti")
    gi = {g: i for i, g in enumerate(genes)}
    tx = pd.read_parquet(cohort / "hest" / "transcripts" / f"{sid}_transcripts.parquet")
    truth = gpd.read_parquet(cohort / "truth" / sid / "nuclei.parquet")
    truth = truth[truth.has_polygon].reset_index(drop=True)
    tx = tx[(tx.qv >= 20) & tx.feature_name.isin(gi)]
    cid = tx.cell_id.astype(str)
    idx = pd.Index(truth.cell_id)
    row = idx.get_indexer(cid)
    ok = row >= 0
    X = np.zeros((len(truth), len(genes)))
    np.add.at(X, (row[ok], tx.feature_name.map(gi).to_numpy()[ok]), 1)
    return X, truth


# ---------------------------------------------------------------------------------------
def test_layout_and_cohort_table(cohort, meta):
    samples = meta["samples"]
    assert len({s["organ"] for s in samples}) >= 6
    train = {s["organ"] for s in samples if s["role"] == "train"}
    held = {s["organ"] for s in samples if s["role"] == "held-out"}
    assert held and not (train & held)
    assert any(s["disease_state"] == "Healthy" for s in samples)
    assert {s["cell_id_style"] for s in samples} == {"xoa", "int"}
    csv = pd.read_csv(cohort / "hest" / "HEST_v1_1_0.csv", encoding="utf-8-sig")
    real_cols = ["dataset_title", "id", "organ", "disease_state", "oncotree_code", "st_technology",
                 "pixel_size_um_estimated", "fullres_px_width", "fullres_px_height", "tissue", "preservation_method"]
    assert set(real_cols) <= set(csv.columns)
    assert sorted(csv.id) == sorted(s["sample_id"] for s in samples)
    for s in samples:
        sid = s["sample_id"]
        md = json.loads((cohort / "hest" / "metadata" / f"{sid}.json").read_text())
        for k in ("pixel_size_um_estimated", "organ", "disease_state", "oncotree_code", "st_technology", "species",
                  "nb_genes", "tissue", "preservation_method", "magnification", "fullres_px_width",
                  "fullres_px_height"):
            assert k in md
        assert md["st_technology"] == "Xenium"
        with open_wsi(cohort / "hest" / "wsis" / f"{sid}.tif") as w:
            assert w.shape == (384, 384)
            assert w.um_per_px == pytest.approx(md["pixel_size_um_estimated"], rel=1e-4)
            img = w.read_region(0, 0, 384, 384)
            assert 60 < img.mean() < 245 and img.std() > 15  # not blank, not saturated


def test_truth_columns_dtypes_and_transform_keys(cohort, meta):
    for s in meta["samples"]:
        sid = s["sample_id"]
        t = gpd.read_parquet(cohort / "truth" / sid / "nuclei.parquet")
        assert list(t.columns) == ["cell_id", "class", "fine_type", "has_polygon", "visible", "in_xenium_region",
                                   "x_he", "y_he", "geometry"]
        assert t["class"].dtype == np.uint8 and t["has_polygon"].dtype == bool and t["visible"].dtype == bool
        assert t["cell_id"].map(type).eq(str).all() and t["cell_id"].is_unique
        assert set(t["class"]) <= {1, 2, 3, 4, 5}
        # truth classes come from what the generator made each cell (its own catalogue)
        assert (t["class"].to_numpy() == np.array([type_class(f) for f in t["fine_type"]])).all()
        # outside the Xenium region there is no Xenium cell
        assert not (t.has_polygon & ~t.in_xenium_region).any()
        assert t.loc[~t.has_polygon, "cell_id"].str.startswith("nopoly-").all()
        assert (t.has_polygon | t.visible).all()
        if s["disease_state"] == "Healthy":
            assert not (t["class"] == 1).any()
        # centroid inside / near its polygon
        c = shapely.centroid(t.geometry.values)
        assert np.median(np.hypot(shapely.get_x(c) - t.x_he, shapely.get_y(c) - t.y_he)) < 1.5
        tf = json.loads((cohort / "truth" / sid / "transform.json").read_text())
        assert {"xenium_um_to_he_px", "hest_registration_um_to_he_px", "local_displacement"} <= set(tf)
        assert np.asarray(tf["xenium_um_to_he_px"]).shape == (3, 3)
        assert set(tf["local_displacement"]) == {"x_um", "y_um", "dx_px", "dy_px"}


def test_true_he_xy_and_imperfect_registration(cohort, meta):
    for s in meta["samples"]:
        sid = s["sample_id"]
        tf = json.loads((cohort / "truth" / sid / "transform.json").read_text())
        tx = pd.read_parquet(cohort / "hest" / "transcripts" / f"{sid}_transcripts.parquet")
        x, y = tx.x_location.to_numpy(float), tx.y_location.to_numpy(float)
        # he_x/he_y are exactly HEST's registration
        hx, hy = apply_affine(tf["hest_registration_um_to_he_px"], x, y)
        np.testing.assert_allclose(tx.he_x, hx, atol=1e-3)
        np.testing.assert_allclose(tx.he_y, hy, atol=1e-3)
        tx_, ty_ = true_he_xy(tf, x, y)
        err_um = np.hypot(tx_ - hx, ty_ - hy) * s["um_per_px"]
        assert np.median(err_um) >= 4.0
        # the true map round-trips and includes a warp beyond the affine
        ax, ay = apply_affine(tf["xenium_um_to_he_px"], x[:500], y[:500])
        assert np.hypot(tx_[:500] - ax, ty_[:500] - ay).max() > 0.5
        bx, by = true_um_from_he(tf, tx_[:500], ty_[:500])
        np.testing.assert_allclose(bx, x[:500], atol=1e-3)
        np.testing.assert_allclose(by, y[:500], atol=1e-3)


def test_dapi_polygons_missing_extra(cohort, meta, outside_windows):
    miss, extra = 0, 0
    for s in meta["samples"]:
        sid = s["sample_id"]
        truth = gpd.read_parquet(cohort / "truth" / sid / "nuclei.parquet").set_index("cell_id")
        seg = gpd.read_parquet(cohort / "hest" / "xenium_seg" / f"{sid}_xenium_nucleus_seg.parquet")
        assert seg.index.name == "cell_id" and len(seg) == truth.has_polygon.sum()
        assert set(map(str, seg.index)) == set(truth.index[truth.has_polygon])
        inside = truth.visible & truth.in_xenium_region  # missed by DAPI = inside the region, no polygon
        miss += int((inside & ~truth.has_polygon).sum())
        extra += int((~truth.visible).sum())
    assert miss > 0 and extra > 0
    # DAPI-vs-H&E IoU (median over the cohort; outlines mapped back through the true map) and the
    # missing / extra shares: windows from the knobs and the sample sizes (tests/windows.py)
    assert not [b for b in outside_windows if "nuclei" in b or "DAPI IoU" in b]


def test_expression_statistics(cohort, meta, outside_windows):
    for s in meta["samples"]:
        sid = s["sample_id"]
        tx = pd.read_parquet(cohort / "hest" / "transcripts" / f"{sid}_transcripts.parquet")
        assert {"cell_id", "transcript_id", "feature_name", "qv", "x_location", "y_location", "z_location",
                "overlaps_nucleus", "he_x", "he_y"} <= set(tx.columns)
        if s["cell_id_style"] == "int":
            assert tx.cell_id.dtype == np.int64 and (tx.cell_id == -1).any()
        else:
            assert (tx.cell_id == "UNASSIGNED").any() and tx.cell_id[tx.cell_id != "UNASSIGNED"].str.endswith("-1").all()
        assert tx.transcript_id.is_unique
        assert (tx.qv < 20).any() and (tx.qv >= 20).any()
        ctrl = tx.feature_name.str.startswith(("NegControlProbe_", "BLANK_"))
        assert ctrl.any()  # how many: a window from control_fraction and the sample's transcripts (below)
        assert tx.overlaps_nucleus.isin([0, 1]).all()
        assert set(tx.feature_name[~ctrl]) <= set(load_panel("hMulti"))
        X, truth = _gene_matrix(cohort, sid)
        live = truth.fine_type.ne(DEAD_TYPE).to_numpy()
        # dying cells lose some RNA at the default dead_signal (0.3: library x 0.775)
        assert np.median(X[~live].sum(1)) < np.median(X[live].sum(1)) if (~live).sum() > 3 else True
        ex = pd.read_parquet(cohort / "truth" / sid / "expression.parquet")
        spill = ex.n_spill.sum() / (ex.n_own + ex.n_spill + ex.n_ambient).sum()
        assert spill >= 0.1
    # low-qv and in-nucleus shares, control probes per sample, median transcripts per live cell:
    # windows from the knobs and the sample sizes (tests/windows.py)
    assert not [b for b in outside_windows if "qv" in b or "in the nucleus" in b or "control-probe" in b
                or "transcripts per live cell" in b]


def test_class_recoverable_from_expression(cohort, meta):
    """An oracle labeller (nearest centroid of the generator's own types, on held-out cells) recovers
    the four live classes from expression: the cohort is hard, not impossible. Dead cells are not
    required to be recoverable: at the default dead_signal their expression is their origin's.
    """
    rng = np.random.default_rng(0)
    Fs, fts, clss, trs = [], [], [], []
    for s in meta["samples"]:
        X, truth = _gene_matrix(cohort, s["sample_id"])
        tot = X.sum(1)
        Fs.append(np.hstack([np.log1p(X / np.maximum(tot[:, None], 1) * 1e3), 2 * np.log1p(tot)[:, None]]))
        # tumour programmes are per sample; the other types share the cohort's programmes
        fts.append(np.where(truth.fine_type == "tumour_cell", "tumour_cell@" + s["sample_id"], truth.fine_type))
        clss.append(truth["class"].to_numpy())
        trs.append(rng.random(len(truth)) < 0.5)
    F, ft, cls, tr = np.vstack(Fs), np.concatenate(fts), np.concatenate(clss), np.concatenate(trs)
    types = [t for t in np.unique(ft) if t != DEAD_TYPE and (tr & (ft == t)).any()]
    C = np.stack([F[tr & (ft == t)].mean(0) for t in types])
    d = ((F[~tr, None, :] - C[None]) ** 2).sum(-1)
    preds = [np.array([type_class(types[i].split("@")[0]) for i in d.argmin(1)])]
    trues = [cls[~tr]]
    p, t = np.concatenate(preds), np.concatenate(trues)
    live = t != 4
    assert (p[live] == t[live]).mean() >= 0.8
    for c in (1, 2, 3, 5):
        f1 = 2 * ((p == c) & (t == c)).sum() / max((p == c).sum() + (t == c).sum(), 1)
        assert f1 >= 0.6, (c, f1)


def test_raw_bundle(cohort, meta):
    s = next(s for s in meta["samples"] if s["raw_bundle"])
    d = cohort / "xenium" / s["sample_id"]
    exp = json.loads((d / "experiment.xenium").read_text())
    assert exp["pixel_size"] == XENIUM_PIXEL_SIZE_UM
    cells = pd.read_parquet(d / "cells.parquet")
    nb = pd.read_parquet(d / "nucleus_boundaries.parquet")
    assert list(nb.columns) == ["cell_id", "vertex_x", "vertex_y", "label_id"]
    assert set(nb.cell_id) == set(cells.cell_id)
    with h5py.File(d / "cell_feature_matrix.h5") as h:
        for k in ("barcodes", "data", "indices", "indptr", "shape", "features/id", "features/name",
                  "features/feature_type", "features/genome"):
            assert f"matrix/{k}" in h
        shape = h["matrix/shape"][:]
        assert shape[1] == len(cells) and h["matrix/indptr"].shape[0] == len(cells) + 1
        total = int(h["matrix/data"][:].sum())
    assert total == int(cells.total_counts.sum())
    # alignment CSV: H&E px = inv(A) @ [x_um / 0.2125, y_um / 0.2125, 1] equals HEST's he_x/he_y
    A = np.loadtxt(d / f"{s['sample_id']}_he_imagealignment.csv", delimiter=",")
    tx = pd.read_parquet(cohort / "hest" / "transcripts" / f"{s['sample_id']}_transcripts.parquet").head(200)
    m = np.c_[tx.x_location / XENIUM_PIXEL_SIZE_UM, tx.y_location / XENIUM_PIXEL_SIZE_UM, np.ones(len(tx))]
    he = (np.linalg.inv(A) @ m.T).T
    np.testing.assert_allclose(he[:, 0], tx.he_x, atol=1e-2)
    np.testing.assert_allclose(he[:, 1], tx.he_y, atol=1e-2)
    with open_wsi(d / "he_image.ome.tif") as w:
        assert w.shape == tuple(s["shape"])


def test_pannuke_and_cellvit(cohort, meta):
    tissues = set()
    for k in (1, 2, 3):
        base = cohort / "pannuke" / f"Fold {k}"
        im = np.load(base / "images" / f"fold{k}" / "images.npy")
        mk = np.load(base / "masks" / f"fold{k}" / "masks.npy")
        ty = np.load(base / "images" / f"fold{k}" / "types.npy")
        assert im.shape == (2, 128, 128, 3) and im.dtype == np.float64 and 0 <= im.min() and im.max() <= 255
        assert mk.shape == (2, 128, 128, 6) and mk.dtype == np.float64
        fg = (mk[..., :5] > 0).sum(-1)
        assert fg.max() <= 1  # one class per pixel
        np.testing.assert_array_equal(mk[..., 5], (fg == 0).astype(float))
        assert (fg > 0).mean() > 0.03
        tissues |= set(ty.tolist())
    assert tissues
    s = meta["samples"][0]
    cv = gpd.read_parquet(cohort / "hest" / "cellvit_seg" / f"{s['sample_id']}_cellvit_seg.parquet")
    assert set(cv.class_name) <= {"Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial"}


def test_determinism_and_idempotence(tmp_path):
    a = make_cohort(tmp_path / "a", seed=5, **TINY)
    c = make_cohort(tmp_path / "c", seed=6, **TINY)
    sid = json.loads((a / "cohort.json").read_text())["samples"][0]["sample_id"]
    rels = (f"hest/transcripts/{sid}_transcripts.parquet", f"truth/{sid}/nuclei.parquet",
            f"hest/xenium_seg/{sid}_xenium_nucleus_seg.parquet", f"xenium/{sid}/cells.parquet")
    before = {rel: _sha(a / rel) for rel in rels}
    for rel in rels:
        assert before[rel] != _sha(c / rel), rel
    # idempotent: a complete identical cohort is skipped, --force rebuilds
    stamp = (a / "cohort.json").stat().st_mtime_ns
    make_cohort(a, seed=5, **TINY)
    assert (a / "cohort.json").stat().st_mtime_ns == stamp
    assert cli_main(["--out", str(a), "--seed", "5", "--image-px", "160", "--pannuke-per-fold", "1",
                     "--pannuke-px", "64", "--force"]) == 0
    assert (a / "cohort.json").stat().st_mtime_ns != stamp
    for rel in rels:  # the same seed gives identical bytes
        assert _sha(a / rel) == before[rel], rel
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_cli_help_lists_every_knob(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(DemoConfig):
        assert f"--{f.name.replace('_', '-')}" in out, f.name


def test_bad_knobs_raise(tmp_path):
    with pytest.raises(InputError, match="missing_fraction"):
        make_cohort(tmp_path / "x", missing_fraction=1.5)
    with pytest.raises(InputError, match="unknown demo knob"):
        make_cohort(tmp_path / "x", no_such_knob=1)
    with pytest.raises(InputError, match="scale"):
        make_cohort(tmp_path / "x", scale="huge")


def test_restricted_pannuke_baseline_has_no_tile_of_the_held_out_organs(cohort, meta):
    """The demo's PanNuke-layout set holds the held-out organs' tissues, and the restricted store none."""
    from stlib.demo.config import ORGANS
    from stlib.io.manifest import load_manifest
    from stlib.io.pannuke import pannuke_to_store
    from stlib.io.tiles import TileStore

    man = load_manifest()
    held = meta["held_out_organs"]
    assert held == man.demo_organs("held-out") == ["Bowel", "Skin"]
    tissues = man.pannuke_tissues(held)
    # the generator names the demo organs' PanNuke tissues as the manifest does
    assert tissues == sorted(o.pannuke for o in ORGANS.values() if o.name in held) == ["Colon", "Skin"]
    full = TileStore(pannuke_to_store(cohort / "pannuke", cohort.parent / "pn_all"))
    restricted = TileStore(pannuke_to_store(cohort / "pannuke", cohort.parent / "pn_nohe", exclude_tissues=tissues))
    assert set(tissues) <= set(full.meta["organ"])  # the restriction removes something real
    assert not set(tissues) & set(restricted.meta["organ"])
    assert len(restricted) == len(full) - int(full.meta["organ"].isin(tissues).sum())


def test_post_xenium_stain_knob():
    from stlib.demo.config import ORGANS
    from stlib.demo.render import post_xenium_stain, render_he, sample_stain
    from stlib.demo.tissue import simulate_tissue

    base = sample_stain(ORGANS["bowel"], np.random.default_rng(0), 0.0)
    assert post_xenium_stain(base, 0.0) == base
    shifted = post_xenium_stain(base, 1.0)
    assert shifted.h_strength < base.h_strength and shifted.e_strength > base.e_strength
    assert shifted.h_vec != base.h_vec and np.isclose(np.linalg.norm(shifted.h_vec), 1)
    tis = simulate_tissue(ORGANS["bowel"], (128, 128), 0.25, np.random.default_rng(1), cancer=True)
    a, inst = render_he(tis, base, np.random.default_rng(2), noise_sd=0)
    b, _ = render_he(tis, shifted, np.random.default_rng(2), noise_sd=0)
    nuc = inst > 0
    assert b[nuc].mean() > a[nuc].mean() + 5  # paler nuclei after a Xenium run
    with pytest.raises(InputError, match="post_xenium_stain"):
        make_cohort("unused", post_xenium_stain=1.5)
    with pytest.raises(ValueError, match="strength"):
        post_xenium_stain(base, -0.1)
