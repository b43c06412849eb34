"""The real-tissue cohort (stlib.demo.realtissue), its experiments (stlib.realtissue) and the
MoNuSeg / CoNSeP downloads: small synthetic annotated images first, the real files after
(skipped when ../shared/realdata is absent)."""

from __future__ import annotations

import json
import shutil

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest

from stlib.constants import CONNECTIVE, EPITHELIAL_ANY, IGNORE, INFLAMMATORY
from stlib.io.annotations import AnnotatedImage
from stlib.utils import InputError


def _annotated(name: str, organ: str, seed: int, *, typed: bool, size: int = 256) -> AnnotatedImage:
    """A small H&E-like image with elliptic nuclei; classes visible as colour and size."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (235, 190, 215)
    inst = np.zeros((size, size), np.int32)
    typ = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    k = 0
    for cy in range(14, size - 10, 26):
        for cx in range(14, size - 10, 26):
            k += 1
            cls = [INFLAMMATORY, CONNECTIVE, EPITHELIAL_ANY, IGNORE][k % 4]
            a, b = (5, 5) if cls == INFLAMMATORY else (9, 4) if cls == CONNECTIVE else (8, 7)
            m = ((yy - cy - rng.uniform(-3, 3)) / a) ** 2 + ((xx - cx - rng.uniform(-3, 3)) / b) ** 2 <= 1
            inst[m] = 3 * k + 1  # non-consecutive ids
            typ[m] = cls
            img[m] = (60, 30, 120) if cls == INFLAMMATORY else (110, 60, 150) if cls == CONNECTIVE else (90, 50, 140)
    noise = rng.normal(0, 4, img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    return AnnotatedImage(name=name, image=img, inst=inst, type=typ if typed else None, um_per_px=0.25,
                          organ=organ, source="consep" if typed else "monuseg", path=name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from stlib.demo.realtissue import make_realtissue_cohort

    root = tmp_path_factory.mktemp("rt")
    imgs = [_annotated("TCGA-A7-A001-01Z", "Breast", 0, typed=False),
            _annotated("TCGA-21-A002-01Z", "Lung", 1, typed=False),
            _annotated("train_1", "Bowel", 2, typed=True),
            _annotated("train_2", "Bowel", 3, typed=True)]
    data = make_realtissue_cohort(root / "data", imgs, seed=0, pannuke=None)
    return {"root": root, "data": data, "images": imgs}


def test_cohort_has_the_demo_layout_and_says_what_is_real(tiny):
    from stlib.demo.realtissue import expected_files
    from stlib.io.cohort import cohort_table

    data = tiny["data"]
    meta = json.loads((data / "cohort.json").read_text())
    ids = [s["sample_id"] for s in meta["samples"]]
    assert ids == ["MONUSEG_A7-A001", "MONUSEG_21-A002", "CONSEP_train_1", "CONSEP_train_2"]
    for f in expected_files(ids, raw_bundle=ids[0], pannuke=False):
        assert (data / f).is_file(), f
    assert "REAL H&E" in meta["note"] and "SIMULATED" in meta["note"]
    assert meta["train_organs"] == ["Breast", "Lung"] and meta["held_out_organs"] == ["Bowel"]
    t = cohort_table(data)
    assert not t["synthetic"].any() and set(t["role_source"]) == {"cohort.json (real tissue)"}
    row = json.loads((data / "hest" / "metadata" / "CONSEP_train_1.json").read_text())
    assert "SIMULATED Xenium layer" in row["dataset_title"] and "CC BY-NC-SA" in row["license"]


def test_truth_is_the_annotation_and_expression_follows_the_real_class(tiny):
    from stlib.io.annotations import rasterize_polygons
    from stlib.metrics import pq

    data, a = tiny["data"], tiny["images"][2]
    t = gpd.read_parquet(data / "truth" / "CONSEP_train_1" / "nuclei.parquet")
    vis = t[t["visible"].to_numpy(bool)]
    ids, cls = a.nucleus_classes()
    assert sorted(vis["source_id"].tolist()) == ids.tolist()
    by_id = dict(zip(vis["source_id"], vis["class"]))
    assert [by_id[i] for i in ids] == cls.tolist()  # the real classes, 254 and 255 included
    # expression programmes follow the real class where it is known
    sel = vis["class"] == INFLAMMATORY
    assert set(vis.loc[sel, "fine_type"]) <= {"t_cell", "b_cell", "plasma", "macrophage"}
    assert (vis.loc[sel, "expression_class"] == INFLAMMATORY).all()
    sel = vis["class"] == EPITHELIAL_ANY
    assert set(vis.loc[sel, "fine_type"]) <= {"tumor", "epithelial"}
    # the truth outlines give back the annotation's instance map
    rings = [np.asarray(g.exterior.coords) for g in vis.geometry.values]
    inst, _, _ = rasterize_polygons(rings, a.shape)
    lut = np.zeros(inst.max() + 1, np.int64)
    lut[1:] = vis["source_id"].to_numpy()
    assert pq(a.inst, lut[inst]).pq > 0.95
    # extra Xenium cells are invisible and of unknown class; missed nuclei have no polygon
    ex = t[~t["visible"].to_numpy(bool)]
    assert (ex["class"] == IGNORE).all() and (~t["has_polygon"]).sum() >= 1


def test_cohort_is_deterministic_and_idempotent(tiny, tmp_path):
    from stlib.demo.realtissue import make_realtissue_cohort

    data = tiny["data"]
    mtime = (data / "cohort.json").stat().st_mtime_ns
    make_realtissue_cohort(data, tiny["images"], seed=0, pannuke=None)
    assert (data / "cohort.json").stat().st_mtime_ns == mtime  # same inputs: reused
    other = make_realtissue_cohort(tmp_path / "again", tiny["images"], seed=0, pannuke=None)
    a = pd.read_parquet(data / "hest" / "transcripts" / "CONSEP_train_2_transcripts.parquet")
    b = pd.read_parquet(other / "hest" / "transcripts" / "CONSEP_train_2_transcripts.parquet")
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(InputError, match="organ"):
        bad = _annotated("x", "Spleen", 0, typed=False)
        make_realtissue_cohort(tmp_path / "bad", [bad], pannuke=None)


@pytest.fixture(scope="module")
def trained(tiny):
    from stlib import realtissue as rt
    from stlib.io.cohort import cohort_table

    data, run = tiny["data"], tiny["root"] / "run"
    table = cohort_table(data)
    train_ids = table.loc[table.role == "train", "sample"].tolist()
    rt.st_labels(data, run, train_ids + ["CONSEP_train_1"], classes_for=[], seed=0)
    stores = rt.build_stores(data, run, table[table.role == "train"], um_per_px=0.5, tile_px=64)
    res = rt.train_pair(run, rt.RecipeConfig(steps=2, batch_size=2, crop_px=0, device="cpu"))
    return {"run": run, "stores": stores, "res": res, "table": table}


def test_two_stores_of_the_same_tiles_and_two_models(trained):
    from stlib.io.tiles import TileStore

    st, tr = TileStore(trained["stores"]["st"]), TileStore(trained["stores"]["truth"])
    assert list(st.meta["tile_id"]) == list(tr.meta["tile_id"]) and len(st) > 0
    assert set(st.meta["organ"]) == {"Breast", "Lung"}
    np.testing.assert_array_equal(st.get_batch([0])["image"], tr.get_batch([0])["image"])
    assert not np.array_equal(np.asarray(st.get_batch(range(len(st)))["inst"]) > 0,
                              np.asarray(tr.get_batch(range(len(tr)))["inst"]) > 0)  # labels differ
    run = trained["run"]
    assert (run / "models" / "st" / "model.pt").is_file() and (run / "models" / "manual" / "model.pt").is_file()
    cfg = json.loads((run / "models" / "manual" / "config.json").read_text())
    assert cfg["stores"] == ["tiles/rt_truth"] and cfg["recipe"] == "manual"


def test_label_quality_scores_the_training_masks_against_the_manual_ones(trained):
    from stlib import realtissue as rt
    from stlib.config import RefineConfig
    from stlib.io.tiles import TileStore
    from stlib.metrics import error_summary, segmentation_errors

    st, truth = trained["stores"]["st"], trained["stores"]["truth"]
    same = rt.label_quality(truth, truth, classical=False)
    assert (same["bpq"] == 1).all() and (same["fn"] == 0).all() and (same["fp"] == 0).all()
    q = rt.label_quality(st, truth)
    assert set(q["method"]) == {"ST-derived masks", "classical (Otsu + watershed)"}
    pooled = q[(q["sample"] == "all") & (q["method"] == "ST-derived masks")].iloc[0]
    # the pooled row is the per-tile counts summed, by hand
    a, b = TileStore(st), TileStore(truth)
    tot: dict[str, float] = {}
    for i in range(len(a)):
        keep = b[i]["ignore"] == 0
        e = segmentation_errors(np.where(keep, b[i]["inst"], 0), np.where(keep, a[i]["inst"], 0),
                                pred_ignore=(a[i]["ignore"] > 0) & keep)
        for k, v in e.items():
            tot[k] = tot.get(k, 0) + v
    assert pooled["bpq"] == pytest.approx(error_summary(tot)["bpq"]) and 0 < pooled["bpq"] < 1
    assert pooled["n_tiles"] == len(a)
    with pytest.raises(InputError, match="already refined"):  # refinements need the unrefined ST masks
        rt.label_quality(st, truth, refinements={"default": RefineConfig()})


def test_retraining_with_another_recipe_replaces_the_model(trained):
    from stlib import realtissue as rt

    res = rt.train_pair(trained["run"], rt.RecipeConfig(steps=3, batch_size=2, crop_px=0, device="cpu"))
    assert res["st"].steps == 3 and not res["st"].skipped
    again = rt.train_pair(trained["run"], rt.RecipeConfig(steps=3, batch_size=2, crop_px=0, device="cpu"))
    assert again["st"].skipped


def test_recipe_postproc_travels_with_both_model_files(trained, tiny):
    """The recipe's post-processing thresholds are written into both model files (and snapshots), so
    the chapter's scoring and a user's `stlib infer` apply them; the default recipe's are the chapter's."""
    import torch

    from stlib import realtissue as rt
    from stlib.config import RealTissueParams
    from stlib.infer import load_inference_model

    recipe = rt.RecipeConfig(steps=2, batch_size=2, crop_px=0, device="cpu", np_thresh=0.3, marker_thresh=0.6,
                             min_size=20, postproc_mode="hv")
    res = rt.train_pair(trained["run"], recipe, models_dir="models/pp", snapshots=(1,))
    want = {"np_thresh": 0.3, "marker_thresh": 0.6, "min_size": 20, "mode": "hv"}
    assert rt.postproc_of(recipe) == want
    # the other marker modes store their own constants only (and the description names them)
    dist = rt.RecipeConfig(postproc_mode="distance", marker_h=1.5, np_thresh=0.3, min_size=20)
    assert rt.postproc_of(dist) == {"np_thresh": 0.3, "min_size": 20, "mode": "distance", "marker_h": 1.5}
    assert "distance markers (h-maxima 1.5 px)" in rt.describe_recipe(dist)
    blend = rt.RecipeConfig(postproc_mode="blend", marker_h=2.0, hv_weight=0.7)
    assert rt.postproc_of(blend)["hv_weight"] == 0.7 and "HV weight 0.7" in rt.describe_recipe(blend)
    for r in res.values():
        assert torch.load(r.model_path, weights_only=True)["postproc"] == want
        assert torch.load(r.out_dir / "model_1.pt", weights_only=True)["postproc"] == want
        assert load_inference_model(r.model_path).postproc == want
    p = RealTissueParams()
    d = rt.RecipeConfig()
    assert (d.np_thresh, d.marker_thresh, d.min_size, d.warmup_steps, d.lr, d.postproc_mode, d.marker_h,
            d.hv_weight) == (p.np_thresh, p.marker_thresh, p.min_size, p.warmup_steps, p.lr, p.postproc_mode,
                             p.marker_h, p.hv_weight)
    tests = rt.load_test_images(tiny["data"], ["CONSEP_train_1"])
    per, _ = rt.score_images({"a": res["st"].model_path}, tests, device="cpu")
    from stlib.infer import infer_image
    from stlib.metrics import evaluate_pair

    own = infer_image(res["st"].model_path, tests[0].image, um_per_px=0.25, device="cpu", workers=0,
                      tissue_detection=False, postproc_kwargs=want)
    assert per["bpq"].iloc[0] == pytest.approx(evaluate_pair(tests[0].inst, own.inst, um_per_px=0.25)["bpq"])


def test_budget_curve_keeps_snapshots_equal_to_shorter_runs(trained, tiny):
    """The budget curve's snapshot after step 1 of a 2-step run holds the weights a 1-step run
    ends with (same seed, sampler and first LR), and every point is scored on the dev images only."""
    import torch

    from stlib import realtissue as rt

    data, run = tiny["data"], tiny["root"] / "budget"
    recipe = rt.RecipeConfig(batch_size=2, crop_px=0, device="cpu")
    with pytest.raises(InputError, match="also training"):
        rt.budget_curve(data, run, ["MONUSEG_TCGA-A7-A001-01Z"], ["MONUSEG_TCGA-A7-A001-01Z"])
    train_ids = trained["table"].loc[trained["table"].role == "train", "sample"].tolist()
    curve = rt.budget_curve(data, run, train_ids, ["CONSEP_train_1"], budgets=(2, 1), recipe=recipe,
                            um_per_px=0.5, tile_px=64)
    assert sorted(curve["steps"].unique()) == [0, 1, 2] and set(curve["image"]) == {"CONSEP_train_1"}
    assert curve.loc[curve.steps == 1, "snapshot"].all() and not curve.loc[curve.steps == 2, "snapshot"].any()
    snap = torch.load(run / "models" / "budget" / "st" / "model_1.pt", map_location="cpu", weights_only=True)
    # the same process layout as the curve's run (one single-thread process per network): bit-identical
    one = rt.train_pair(run, rt.RecipeConfig(steps=1, batch_size=2, crop_px=0, device="cpu"), models_dir="models/one")
    ref = torch.load(one["st"].model_path, map_location="cpu", weights_only=True)
    assert all(torch.equal(snap["state_dict"][k], ref["state_dict"][k]) for k in ref["state_dict"])
    final = torch.load(run / "models" / "budget" / "st" / "model.pt", map_location="cpu", weights_only=True)
    assert any(not torch.equal(snap["state_dict"][k], final["state_dict"][k]) for k in final["state_dict"])
    summ = rt.budget_summary(curve)
    assert set(summ["model"]) == {"ST-trained", "manual-trained"} and (summ["n_images"] == 1).all()


def test_scores_through_infer_and_the_cli_check_agree(trained, tiny, tmp_path, monkeypatch):
    """score_images reads each model file once (not once per image) and scores exactly as the
    CLI check, which loads the file for every image."""
    from stlib import infer
    from stlib import realtissue as rt

    run = trained["run"]
    tests = rt.load_test_images(tiny["data"], ["CONSEP_train_1", "CONSEP_train_2"])
    assert tests[0].type is not None and tests[0].n_nuclei == tiny["images"][2].n_nuclei
    methods = {"ST-trained": run / "models" / "st" / "model.pt", "classical": "classical"}
    loads = []
    real_load = infer.load_inference_model
    monkeypatch.setattr(infer, "load_inference_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    per_image, preds = rt.score_images(methods, tests, device="cpu", keep_predictions=True, workers=1)
    monkeypatch.undo()
    assert len(loads) == 1
    assert len(per_image) == 4 and {"bpq", "dice", "aji", "f_d"} <= set(per_image.columns)
    assert per_image.loc[per_image.model == "classical", "bpq"].min() > 0.3  # dark ellipses on pink
    check = rt.held_out_check({"ST-trained": run / "models" / "st" / "model.pt"}, tests, tmp_path / "check")
    m = per_image.merge(check, on=["model", "image"], suffixes=("", "_cli"))
    assert len(m) == 4
    np.testing.assert_allclose(m["bpq"], m["bpq_cli"], atol=1e-9)
    np.testing.assert_allclose(m["dice"], m["dice_cli"], atol=1e-9)
    s, d = rt.summary_tables(per_image, metrics=("bpq",), pairs=[("ST-trained", "classical")], n_boot=50)
    assert {"pooled", "Bowel"} <= set(s["organ"]) and len(d) == 2


def test_ratio_ci():
    from stlib.realtissue import ratio_ci

    r, lo, hi = ratio_ci([0.45, 0.5, 0.55, 0.4], [0.5, 0.5, 0.5, 0.5], n_boot=500)
    assert r == pytest.approx(0.95) and lo <= r <= hi
    assert all(np.isnan(ratio_ci([], [])))


def test_ratio_ci_pools_per_set_like_the_other_values():
    """One set of 1 image and one of 4: the pooled ratio weights the sets equally; the plain mean
    over images (the old statistic) would not. The bootstrap resamples images within each set."""
    from stlib.evaluate import pooled_mean
    from stlib.realtissue import ratio_ci

    a = np.array([0.2, 0.6, 0.6, 0.6, 0.6])
    b = np.array([0.4, 0.5, 0.5, 0.5, 0.5])
    sets = ["kidney", "consep", "consep", "consep", "consep"]
    r, lo, hi = ratio_ci(a, b, sets, n_boot=400)
    assert r == pytest.approx(pooled_mean(a, sets) / pooled_mean(b, sets)) == pytest.approx(0.4 / 0.45)
    assert abs(r - a.mean() / b.mean()) > 0.1  # the plain mean over images: 2.6 / 2.4
    assert lo == pytest.approx(r) and hi == pytest.approx(r)  # no spread within either set: nothing to resample
    rng = np.random.default_rng(1)
    a2 = a + rng.normal(0, 0.05, a.size)
    r2, lo2, hi2 = ratio_ci(a2, b, sets, n_boot=400)
    assert lo2 < r2 < hi2
    # resampling within the sets: the 1-image set never changes, so every replicate keeps its pair
    assert r2 == pytest.approx(pooled_mean(a2, sets) / pooled_mean(b, sets))
    with pytest.raises(ValueError):
        ratio_ci(a, b, sets[:3])


def test_classification_heads_compare_label_sets(trained, tiny):
    from stlib import realtissue as rt
    from stlib.infer import load_inference_model

    model = load_inference_model(trained["run"] / "models" / "st" / "model.pt").model
    tests = rt.load_test_images(tiny["data"], ["CONSEP_train_1", "CONSEP_train_2"])
    train, test = [rt.to_resolution(tests[0], 0.5)], [rt.to_resolution(tests[1], 0.5)]
    rng = np.random.default_rng(0)
    shuffled = train[0].type.copy()
    ids = np.unique(train[0].inst[train[0].inst > 0])
    perm = dict(zip(ids, rng.permutation(ids)))
    ids_t, cls_t = train[0].nucleus_classes()
    lut = dict(zip(ids_t, cls_t))
    for i in ids:
        shuffled[train[0].inst == i] = lut[perm[i]]
    per_image, conf = rt.classification_experiment(
        model, train, test, {"real": [train[0].type], "shuffled": [shuffled]}, device="cpu")
    acc = per_image.set_index("labels")["accuracy"]
    assert acc["real"] > 0.8 and acc["real"] > acc["shuffled"] + 0.2
    assert set(conf["labels"]) == {"real", "shuffled"}


def test_derived_classes_are_painted_on_the_manual_nuclei(tiny, tmp_path):
    from stlib.realtissue import derived_class_maps

    data = tiny["data"]
    t = gpd.read_parquet(data / "truth" / "CONSEP_train_1" / "nuclei.parquet")
    t = t[t["visible"].to_numpy(bool) & t["has_polygon"].to_numpy(bool)]
    cells = pd.DataFrame({"cell_id": t["cell_id"].to_numpy(), "class": np.full(len(t), INFLAMMATORY, np.uint8)})
    (tmp_path / "labels" / "CONSEP_train_1").mkdir(parents=True)
    cells.iloc[1:].to_parquet(tmp_path / "labels" / "CONSEP_train_1" / "cells.parquet")
    a = tiny["images"][2]
    out = derived_class_maps(tmp_path, data, "CONSEP_train_1", a)
    assert set(np.unique(out[a.inst > 0])) <= {INFLAMMATORY, IGNORE}
    first = int(t["source_id"].iloc[0])
    assert (out[a.inst == first] == IGNORE).all()  # its cell has no derived class
    assert (out[a.inst == 0] == 0).all()


def test_cli_writes_a_cohort_from_a_folder(tmp_path, monkeypatch):
    from stlib.cli import main
    from stlib.io.annotations import write_instance_folder

    a = _annotated("img1", "Breast", 0, typed=False)
    b = _annotated("img2", "Kidney", 1, typed=False)
    write_instance_folder([a, b], tmp_path / "src")
    assert main(["realtissue", "--out", str(tmp_path / "c"), "--source", str(tmp_path / "src"), "--pannuke", "none"]) == 0
    meta = json.loads((tmp_path / "c" / "cohort.json").read_text())
    assert {s["role"] for s in meta["samples"]} == {"train", "held-out"}


# ----------------------------------------------------------------------------- downloads
def test_download_monuseg_from_a_mirror_checks_every_file(realdata, tmp_path):
    from stlib.io.annotations import read_monuseg_folder
    from stlib.io.download import DownloadError, download_monuseg

    src = realdata / "nuclei-monuseg"
    names = ["TCGA-B0-5710-01Z-00-DX1", "TCGA-NH-A8F7-01A-01-TS1"]
    out = download_monuseg(tmp_path / "m", mirror=src, names=names)
    got = read_monuseg_folder(out)
    assert [a.organ for a in got] == ["Kidney", "Bowel"]
    bad = tmp_path / "badmirror"
    shutil.copytree(src, bad)
    xml = bad / "annotations" / "TCGA-B0-5698-01Z-00-DX1.xml"
    xml.chmod(0o644)
    xml.write_bytes(xml.read_bytes()[:-10])
    with pytest.raises(DownloadError) as e:
        download_monuseg(tmp_path / "m2", mirror=bad, names=["TCGA-B0-5698-01Z-00-DX1"])
    assert "TCGA-B0-5698-01Z-00-DX1.xml" in str(e.value)
    assert not (tmp_path / "m2" / "annotations" / "TCGA-B0-5698-01Z-00-DX1.xml").exists()
    with pytest.raises(InputError, match="not in the manifest"):
        download_monuseg(tmp_path / "m3", mirror=src, names=["TCGA-XX-0000"])


def test_download_consep_from_a_mirror(realdata, tmp_path):
    from stlib.io.annotations import read_consep_patches
    from stlib.io.download import download_consep

    out = download_consep(tmp_path / "c", mirror=realdata / "nuclei-consep")
    [a] = read_consep_patches(out, images=["train_5"])
    assert a.shape == (1000, 1000)
    part = tmp_path / "partial"
    for sub in ("images", "inst", "type_mat"):
        (part / sub).mkdir(parents=True)
    shutil.copy(realdata / "nuclei-consep" / "images" / "train_5_000.jpg", part / "images")
    with pytest.raises(InputError, match="incomplete"):
        download_consep(tmp_path / "c2", mirror=part)


def test_manifest_lists_the_annotated_sets(repo):
    from stlib.io.manifest import ANNOTATED_HE, load_manifest

    m = load_manifest(repo / "data_manifest.yaml")
    assert m.annotated_he == json.loads(json.dumps(ANNOTATED_HE))  # the YAML block is the code's table
    assert len(m.annotated_he["monuseg"]["files"]) == 13
    assert all(len(f["image_sha256"]) == 64 for f in m.annotated_he["monuseg"]["files"])
    assert m.annotated_he["consep"]["licence"].startswith("CC BY-NC-SA")


# ----------------------------------------------------------------------------- real files
def test_real_images_get_a_plausible_xenium_layer(realdata, tmp_path):
    from stlib.demo.realtissue import load_source_images, make_realtissue_cohort

    imgs = load_source_images([realdata / "nuclei-monuseg"], images={"nuclei-monuseg": ["TCGA-B0-5710-01Z-00-DX1"]})
    imgs += load_source_images([realdata / "nuclei-consep"], images={"nuclei-consep": ["train_5"]})
    out = make_realtissue_cohort(tmp_path / "c", imgs, seed=0, pannuke=None)
    meta = json.loads((out / "cohort.json").read_text())
    for s, a in zip(meta["samples"], imgs):
        st = s["stats"]
        assert st["n_visible_nuclei"] >= 0.97 * a.n_nuclei  # every real nucleus is in the truth
        assert 0.45 < st["dapi_iou_median"] < 0.9  # DAPI outlines differ from the H&E nucleus, as in the demo
        assert st["n_missing"] > 0 and st["n_extra"] > 0
    assert meta["samples"][0]["role"] == "held-out" and meta["samples"][0]["organ"] == "Kidney"


def _same_run_files(a, b) -> None:
    """Every file of run folder ``a`` is in ``b`` with the same content: arrays and tables equal,
    JSON equal once the keys that record times are dropped."""
    import json as _json

    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items()
                    if k != "build_key"  # fingerprints the inputs: name, size, mtime
                    and not any(t in k.lower() for t in ("seconds", "time", "wall", "date", "created"))}
        return [strip(v) for v in o] if isinstance(o, list) else o

    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and fa
    for r in fa:
        pa, pb = a / r, b / r
        if pa.read_bytes() == pb.read_bytes():
            continue
        if pa.suffix == ".npy":
            np.testing.assert_array_equal(np.load(pa), np.load(pb), err_msg=str(r))
        elif pa.suffix == ".parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(pa), pd.read_parquet(pb), obj=str(r))
        elif pa.suffix == ".json":
            assert strip(_json.loads(pa.read_text())) == strip(_json.loads(pb.read_text())), r
        else:
            raise AssertionError(f"{r} differs")


def test_st_labels_and_stores_same_in_worker_processes(tiny, tmp_path):
    """st_labels over 2 worker processes (1 thread each) writes what the serial path writes, and the
    tile stores built from either are the same arrays; the rows come back in sample order."""
    from stlib import realtissue as rt
    from stlib.io.cohort import cohort_table

    data = tiny["data"]
    table = cohort_table(data)
    ids = table.loc[table.role == "train", "sample"].tolist() + ["CONSEP_train_1"]
    runs = {}
    for workers in (1, 2):
        run = tmp_path / f"w{workers}"
        rows = rt.st_labels(data, run, ids, classes_for=[], seed=0, workers=workers)
        assert rows["sample"].tolist() == ids
        rt.build_stores(data, run, table[table.role == "train"], um_per_px=0.5, tile_px=64)
        runs[workers] = (run, rows.drop(columns="seconds"))
    pd.testing.assert_frame_equal(runs[1][1], runs[2][1])
    _same_run_files(runs[1][0], runs[2][0])
