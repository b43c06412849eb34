import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stlib import evaluate as ev
from stlib.constants import IGNORE
from stlib.utils import InputError

REPO = Path(__file__).resolve().parents[1]


def test_bootstrap_ci_brackets_mean_and_is_deterministic():
    rng = np.random.default_rng(1)
    v = rng.normal(0.6, 0.1, size=200)
    a = ev.bootstrap_ci(v, n_boot=500, seed=3)
    b = ev.bootstrap_ci(v, n_boot=500, seed=3)
    assert a == b
    assert a.low < a.estimate < a.high
    assert a.estimate == pytest.approx(v.mean())
    # 95% CI of the mean of 200 values with sd 0.1 has half-width about 1.96*0.1/sqrt(200)
    assert (a.high - a.low) / 2 == pytest.approx(1.96 * v.std() / np.sqrt(200), rel=0.25)


def test_bootstrap_ci_nan_and_tiny_inputs():
    assert ev.bootstrap_ci([np.nan, 0.5]).n == 1
    r = ev.bootstrap_ci([0.5])
    assert r.low == r.high == r.estimate == 0.5
    assert np.isnan(ev.bootstrap_ci([]).estimate)
    with pytest.raises(ValueError, match="ci"):
        ev.bootstrap_ci([1, 2], ci=1.5)


def _slides(rng, n_slides=10, n_tiles=40, slide_sd=0.1, tile_sd=0.02, mean=0.6):
    """Per-tile scores with a strong slide effect (tiles of a slide are correlated)."""
    effect = rng.normal(0, slide_sd, n_slides)
    v = mean + np.repeat(effect, n_tiles) + rng.normal(0, tile_sd, n_slides * n_tiles)
    return v, np.repeat(np.arange(n_slides), n_tiles)


def test_hierarchical_bootstrap_is_wider_than_the_tile_bootstrap_on_correlated_tiles():
    v, slide = _slides(np.random.default_rng(0))
    tile = ev.bootstrap_ci(v, n_boot=1000, seed=1)
    hier = ev.hierarchical_bootstrap(v, slide, n_boot=1000, seed=1)
    assert hier.estimate == pytest.approx(v.mean()) == pytest.approx(tile.estimate)
    assert (hier.high - hier.low) > 3 * (tile.high - tile.low)
    # it is about as wide as a bootstrap over the 10 slide means (the independent units)
    means = np.array([v[slide == s].mean() for s in range(10)])
    by_slide = ev.bootstrap_ci(means, n_boot=1000, seed=1)
    assert (hier.high - hier.low) == pytest.approx(by_slide.high - by_slide.low, rel=0.35)
    # without clusters it is the ordinary bootstrap again
    flat = ev.hierarchical_bootstrap(v, None, n_boot=1000, seed=1)
    assert (flat.high - flat.low) == pytest.approx(tile.high - tile.low, rel=0.2)


def test_hierarchical_bootstrap_covers_the_true_mean_and_the_tile_bootstrap_does_not():
    rng = np.random.default_rng(5)
    cover_h = cover_t = 0
    n = 120
    for _ in range(n):
        v, slide = _slides(rng, n_slides=12, n_tiles=20)
        h = ev.hierarchical_bootstrap(v, slide, n_boot=300, ci=0.9, seed=int(rng.integers(1 << 30)))
        t = ev.bootstrap_ci(v, n_boot=300, ci=0.9, seed=1)
        cover_h += h.low <= 0.6 <= h.high
        cover_t += t.low <= 0.6 <= t.high
    assert cover_h / n > 0.75 and cover_t / n < 0.4


def test_pooled_mean_is_pannukes_rule_and_the_bootstrap_is_stratified():
    v = np.r_[np.full(10, 0.5), np.full(2, 0.9), np.nan]
    organ = np.array(["A"] * 10 + ["B"] * 3)
    assert ev.pooled_mean(v, organ) == pytest.approx(0.7)  # not the tile mean 0.567
    r = ev.hierarchical_bootstrap(v, np.arange(13), strata=organ, n_boot=200)
    assert r.estimate == pytest.approx(0.7) and r.low == pytest.approx(0.7) and r.n == 12
    with pytest.raises(ValueError, match="one entry per value"):
        ev.hierarchical_bootstrap(v, np.arange(3))


def test_sign_flip_test_is_exact_and_respects_clusters():
    # three clusters with sums 1, 2, 3: |sum| >= 6 only for all-plus and all-minus -> 2 / 8
    assert ev.sign_flip_test([1.0, 2.0, 3.0], [0, 1, 2]) == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    big = 0.05 + rng.normal(0, 0.01, 200)
    assert ev.sign_flip_test(big, np.arange(200) // 10) < 0.001  # 20 clusters, all positive
    # the same tiles in two slides can never reach p < 0.5, however many tiles there are
    assert ev.sign_flip_test(big, np.arange(200) // 100) >= 0.5
    null = rng.normal(0, 0.01, 200)
    assert ev.sign_flip_test(null, np.arange(200) // 10) > 0.05
    assert ev.sign_flip_test(np.zeros(5), np.arange(5)) == 1.0
    # many clusters: Monte Carlo, reproducible by seed
    p1 = ev.sign_flip_test(null, np.arange(200), n_perm=2000, seed=3)
    assert p1 == ev.sign_flip_test(null, np.arange(200), n_perm=2000, seed=3) and 0 < p1 <= 1


def test_holm_adjustment():
    adj = ev.holm([0.01, 0.04, 0.03, 0.005, np.nan])
    np.testing.assert_allclose(adj[:4], [0.03, 0.06, 0.06, 0.02])
    assert np.isnan(adj[4])
    assert ev.holm([0.6, 0.7]).max() == 1.0


def test_paired_comparison_detects_a_real_difference_only():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.8, size=40)
    better = base + 0.05 + rng.normal(0, 0.01, size=40)
    r = ev.paired_comparison(better, base, seed=0)
    assert r.diff.low > 0 and r.p_value < 1e-3 and r.n_clusters == 40
    same = ev.paired_comparison(base + rng.normal(0, 0.01, 40), base, seed=0)
    assert same.diff.low < 0 < same.diff.high and same.p_value > 0.05
    # 40 tiles from 2 slides: the test cannot reject, and says so
    two = ev.paired_comparison(better, base, clusters=np.arange(40) // 20, seed=0)
    assert two.p_value >= 0.5 and two.n_clusters == 2
    with pytest.raises(ValueError, match="paired"):
        ev.paired_comparison([1, 2], [1])


def _per_image():
    rows = []
    for model, shift in (("st", 0.1), ("pannuke", 0.0)):
        for organ, n in (("Bowel", 10), ("Skin", 4)):
            for i in range(n):
                rows.append({"model": model, "organ": organ, "image": f"{organ}-{i}", "slide": f"{organ}-s{i % 2}",
                             "pq": 0.5 + shift + 0.01 * i})
    return pd.DataFrame(rows)


def test_summarize_and_compare_tables():
    df = _per_image()
    s = ev.summarize(df, ["pq"], n_boot=200)
    pooled = s[(s.organ == "pooled") & (s.model == "st")].iloc[0]
    # PanNuke's rule: (mean Bowel + mean Skin) / 2, not the mean over 14 images
    assert pooled["n_images"] == 14 and pooled["n_clusters"] == 4
    assert pooled["mean"] == pytest.approx((0.6 + 0.045 + 0.6 + 0.015) / 2)
    c = ev.compare_models(df, ["pq"], model_a="st", model_b="pannuke", n_boot=200)
    assert set(c.organ) == {"Bowel", "Skin", "pooled"}
    assert np.allclose(c["diff"], 0.1)
    assert list(c.columns[:5]) == ["organ", "metric", "diff", "diff_ci_low", "diff_ci_high"]  # effect first
    assert (c["p_holm"] >= c["p_value"]).all() and (c["n_clusters"] <= 4).all()
    with pytest.raises(ValueError, match="same images"):
        ev.compare_models(df[~((df.model == "st") & (df.image == "Skin-3"))], ["pq"],
                          model_a="st", model_b="pannuke")
    with pytest.raises(ValueError, match="slide"):
        ev.summarize(df.drop(columns="slide"), ["pq"], cluster="slide")
    # a table of whole images without slide ids: every image is its own unit
    alone = ev.summarize(df.drop(columns="slide"), ["pq"], n_boot=50)
    assert (alone.loc[alone.organ == "pooled", "n_clusters"] == 14).all()


def test_seed_average_and_spread():
    df = _per_image()
    per_seed = pd.concat([df.assign(seed=s, reference="r", pq=df["pq"] + 0.01 * s) for s in range(3)])
    avg = ev.seed_average(per_seed, ["pq"])
    assert len(avg) == len(df) and (avg["n_seeds"] == 3).all()
    np.testing.assert_allclose(avg["pq"].to_numpy(), df["pq"].to_numpy() + 0.01)
    sp = ev.seed_spread(per_seed, "pq").set_index("model")
    assert sp.loc["st", "n_seeds"] == 3 and sp.loc["st", "range"] == pytest.approx(0.02)
    assert sp.loc["st", "sd"] == pytest.approx(0.01)


def test_class_scores_hand_computed():
    t = [1, 1, 2, 3, 5, 5]
    p = [1, 2, 2, 3, 5, IGNORE]
    s = ev.class_scores(t, p)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["f1_Neoplastic"] == pytest.approx(2 * 1 / (2 + 0 + 1))
    assert s["f1_Inflammatory"] == pytest.approx(2 / 3)
    assert s["f1_Epithelial"] == pytest.approx(2 / 3)
    assert np.isnan(s["f1_Dead"])
    assert s["ignored_fraction"] == pytest.approx(1 / 6)


def test_label_accuracy_vs_truth_joins_on_cell_id():
    truth = pd.DataFrame({"cell_id": ["a", "b", "c", "nopoly-1"], "class": [1, 2, 3, 5],
                          "x_he": [0.0, 10, 20, 30], "y_he": [0.0, 0, 0, 0],
                          "visible": [True, True, False, True]})
    cells = pd.DataFrame({"cell_id": ["a", "b", "c", "zzz"], "class": [1, 3, 3, 2],
                          "x_he": [1.0, 10, 20, 0], "y_he": [0.0, 2, 0, 0]})
    r = ev.label_accuracy_vs_truth(cells, truth)
    assert r["n_matched"] == 3 and r["n_truth"] == 4
    assert r["class_scores"]["accuracy"] == pytest.approx(2 / 3)
    assert r["median_centroid_error_px"] == pytest.approx(1.0)
    rv = ev.label_accuracy_vs_truth(cells, truth, visible_only=True)
    assert rv["n_matched"] == 2


def test_cell_correct_pairs_label_sets_by_cell():
    truth = pd.DataFrame({"cell_id": ["a", "b", "c"], "class": [1, 2, 3]})
    hier = pd.DataFrame({"cell_id": ["a", "b", "c", "x"], "class": [1, 2, IGNORE, 5]})
    m = ev.cell_correct(hier, truth)
    assert m["cell_id"].tolist() == ["a", "b", "c"] and m["correct"].tolist() == [1.0, 1.0, 0.0]


def test_load_instance_folder(tmp_path):
    from PIL import Image

    from stlib.utils import InputError

    inst = np.zeros((16, 20), np.int32)
    inst[2:6, 2:6] = 7
    np.savez(tmp_path / "a.npz", inst=inst, image=np.full((16, 20, 3), 200, np.uint8))
    np.savez(tmp_path / "b.npz", inst=inst, type=(inst > 0).astype(np.uint8) * 2)
    Image.fromarray(np.full((16, 20, 3), 100, np.uint8)).save(tmp_path / "b.png")
    pd.DataFrame({"name": ["a"], "tissue": ["Colon"]}).to_csv(tmp_path / "tissue.csv", index=False)
    batch, meta = ev.load_instance_folder(tmp_path)
    assert meta["organ"].tolist() == ["Colon", "unknown"]
    assert batch["image"][1].shape == (16, 20, 3) and batch["image"][1][0, 0, 0] == 100
    assert batch["type"][1].max() == 2 and batch["type"][0].max() == 0
    (tmp_path / "b.png").unlink()
    with pytest.raises(InputError, match="no image"):
        ev.load_instance_folder(tmp_path)


def _tiny_store(path, organs, samples, split="test", n_px=32):
    from stlib.io.tiles import TileStoreWriter

    rng = np.random.default_rng(0)
    with TileStoreWriter(path, tile_px=n_px, um_per_px=0.25, source="test") as w:
        for i, (organ, sample) in enumerate(zip(organs, samples)):
            inst = np.zeros((n_px, n_px), np.int32)
            inst[4:10, 4:10], inst[15:22, 15:22] = 3, 8
            typ = np.where(inst > 0, 1 + i % 5, 0).astype(np.uint8)
            w.add(image=rng.integers(0, 255, (n_px, n_px, 3), dtype=np.uint8), inst=inst, type=typ,
                  sample=sample, organ=organ, x0=float(i), y0=0.0, split=split, tile_id=f"t{i}")
    return path


def test_references_from_stores_carry_their_unit_and_organ(tmp_path):
    st = _tiny_store(tmp_path / "st", ["Bowel", "Bowel", "Skin"], ["S1", "S1", "S2"])
    r = ev.reference_from_store(st, [0, 1, 2], name="demo truth", kind="manual", domain="post-Xenium H&E",
                                images_key="hest_test")
    assert r.meta["slide"].tolist() == ["hest_test/S1", "hest_test/S1", "hest_test/S2"]
    assert r.meta["image"].is_unique and len(r.batch["inst"]) == 3
    pn = _tiny_store(tmp_path / "pn", ["Colon", "Breast", "Skin", "Colon"], ["pannuke_fold3"] * 4, split="fold3")
    ref = ev.pannuke_reference(pn, split="fold3", tissues=["Colon", "Skin"], organ_of={"Colon": "Bowel", "Skin": "Skin"})
    # PanNuke images are their own unit (no slide ids); tissues renamed into HEST organs
    assert (ref.meta["slide"] == ref.meta["image"]).all() and len(ref.meta) == 3
    assert ref.meta["organ"].tolist() == ["Bowel", "Skin", "Bowel"] and ref.meta["tissue"].tolist()[0] == "Colon"
    assert ref.kind == "manual" and ref.domain == "routine H&E"
    assert len(ev.restrict_reference(ref, ["Skin"]).meta) == 1
    with pytest.raises(ValueError, match="kind"):
        ev.reference_from_store(st, [0], name="x", kind="guess", domain="d", images_key="k")


def test_manual_truth_folder_resamples_and_maps_unknown_classes(tmp_path, monkeypatch):
    inst = np.zeros((40, 40), np.int32)
    inst[5:15, 5:15] = 2
    typ = np.where(inst > 0, 254, 0).astype(np.uint8)  # e.g. "epithelial, malignancy unknown"
    np.savez(tmp_path / "img1.npz", inst=inst, type=typ, image=np.full((40, 40, 3), 120, np.uint8),
             um_per_px=0.25)  # the readers never guess a pixel size
    pd.DataFrame({"name": ["img1"], "tissue": ["Colon"]}).to_csv(tmp_path / "tissue.csv", index=False)
    ref = ev.manual_truth_folder(tmp_path, organ_of={"Colon": "Bowel"})
    assert ref.meta["organ"].tolist() == ["Bowel"] and ref.meta["slide"].tolist() == ref.meta["image"].tolist()
    assert set(np.unique(ref.batch["type"][0])) == {0, IGNORE}
    # a reader that knows the pixel size: images at 0.5 µm/px are brought to 0.25 µm/px
    recs = [{"name": "a", "image": np.zeros((20, 30, 3), np.uint8), "inst": np.ones((20, 30), np.int32),
             "type": None, "um_per_px": 0.5, "organ": "Kidney"}]
    monkeypatch.setattr(ev, "_read_annotated", lambda path: recs)
    r2 = ev.manual_truth_folder(tmp_path)
    assert r2.batch["inst"][0].shape == (40, 60) and r2.batch["image"][0].shape == (40, 60, 3)
    from stlib.utils import InputError

    with pytest.raises(InputError, match="not found"):
        ev.manual_truth_folder(tmp_path / "none")


def test_segment_and_score_each_image_set_once_per_network(tmp_path, monkeypatch):
    import stlib.infer as infer

    st = _tiny_store(tmp_path / "st", ["Bowel", "Skin"], ["S1", "S2"])
    refs = [ev.reference_from_store(st, [0, 1], name=n, kind=k, domain="post-Xenium H&E", images_key="hest")
            for n, k in (("truth", "manual"), ("st labels", "st-derived"))]
    calls = []

    def fake_segment(model, images, **kw):
        calls.append((model, len(images)))
        return [(np.asarray(inst), np.ones_like(inst, dtype=np.uint8)) for inst in refs[0].batch["inst"][:len(images)]]

    monkeypatch.setattr(infer, "segment_tiles", fake_segment)
    per_seed, preds = ev.segment_and_score({"A": {0: object(), 1: object()}, "B": {0: object()}}, refs)
    assert len(calls) == 3  # 3 networks x 1 image set, although 2 references use it
    assert len(per_seed) == 3 * 2 * 2 and set(per_seed["reference"]) == {"truth", "st labels"}
    assert (per_seed["bpq"] == 1.0).all() and set(preds) == {"A", "B"} and len(preds["A"]["hest"]) == 2
    avg = ev.seed_average(per_seed, ["bpq", "mpq"])
    assert len(avg) == 2 * 2 * 2 and set(avg["n_seeds"]) == {1, 2}


def test_segment_and_score_reuses_cached_scores_of_the_same_network_and_reference(tmp_path, monkeypatch):
    import os

    import stlib.infer as infer

    st = _tiny_store(tmp_path / "st", ["Bowel", "Skin"], ["S1", "S2"])
    truth = ev.reference_from_store(st, [0, 1], name="truth", kind="manual", domain="d", images_key="hest")
    labels = ev.reference_from_store(st, [0, 1], name="st labels", kind="st-derived", domain="d", images_key="hest")
    calls = []
    monkeypatch.setattr(infer, "load_inference_model", lambda path, device="cpu": type("M", (), {"model": path})())
    monkeypatch.setattr(infer, "segment_tiles", lambda model, images, **kw: calls.append(model) or
                        [(np.asarray(i), np.ones_like(i, dtype=np.uint8)) for i in truth.batch["inst"][:len(images)]])
    m = tmp_path / "model.pt"
    m.write_bytes(b"weights")
    cache = tmp_path / "cache"
    first, _ = ev.segment_and_score({"A": {0: m}}, [truth, labels], cache_dir=cache, keep_predictions=False)
    assert len(calls) == 1 and len(list(cache.glob("*.parquet"))) == 2
    again, _ = ev.segment_and_score({"hier": {0: m}}, [truth], cache_dir=cache, keep_predictions=False)
    assert len(calls) == 1 and set(again["model"]) == {"hier"} and len(again) == 2  # reused, renamed
    pd.testing.assert_frame_equal(again.drop(columns="model").reset_index(drop=True),
                                  first[first.reference == "truth"].drop(columns="model").reset_index(drop=True))
    ev.segment_and_score({"A": {0: m}}, [truth], cache_dir=cache)  # predictions wanted: the network runs
    assert len(calls) == 2
    os.utime(m, ns=(1, 1))  # a retrained model file: scored again
    ev.segment_and_score({"A": {0: m}}, [truth], cache_dir=cache, keep_predictions=False)
    assert len(calls) == 3
    monkeypatch.setattr(ev, "_scoring_key", lambda: "another metric definition")  # changed scoring code
    ev.segment_and_score({"A": {0: m}}, [truth], cache_dir=cache, keep_predictions=False)
    assert len(calls) == 4


def test_heldout_references_order_names_and_the_test_fold_guard(tmp_path):
    run = tmp_path / "run"
    _tiny_store(run / "tiles" / "st", ["Bowel", "Skin"], ["S1", "S2"])
    _tiny_store(run / "tiles" / "st_truth", ["Bowel", "Skin"], ["S1", "S2"])
    _tiny_store(run / "tiles" / "pannuke", ["Colon", "Breast", "Skin"], ["pannuke_fold3"] * 3, split="fold3")
    kw = dict(heldout_organs=["Bowel", "Skin"], heldout_tissues=["Colon", "Skin"],
              organ_of_tissue={"Colon": "Bowel", "Skin": "Skin", "Breast": "Breast"})
    refs = ev.heldout_references(run, pannuke_trained_on=["fold1", "fold2"], **kw)
    assert [r.kind for r in refs] == ["manual", "manual", "st-derived"]
    assert [len(r.meta) for r in refs] == [2, 2, 2] and refs[0].images_key == refs[2].images_key
    assert set(refs[1].meta["organ"]) == {"Bowel", "Skin"}  # no Breast tile: not a held-out organ
    with pytest.raises(ValueError, match="trained on"):
        ev.heldout_references(run, pannuke_trained_on=["fold3"], **kw)


def _fake_networks(monkeypatch, truth_store):
    """``load_inference_model`` / ``segment_tiles`` stand-ins: a model file named ``good*`` segments
    exactly the truth of ``truth_store``, any other finds nothing."""
    import stlib.infer as infer
    from stlib.io.tiles import TileStore

    truth = TileStore(truth_store)
    calls = []
    monkeypatch.setattr(infer, "load_inference_model", lambda path, device="cpu": type("M", (), {"model": path})())

    def segment(model, images, **kw):
        calls.append(Path(model).name)
        out = []
        for im in images:  # the truth of the tile with these pixels
            i = next(k for k in range(len(truth)) if np.array_equal(truth[k]["image"], im))
            inst = truth[i]["inst"] if Path(model).name.startswith("good") else np.zeros_like(truth[i]["inst"])
            out.append((inst, np.where(inst > 0, truth[i]["type"], 0).astype(np.uint8)))
        return out

    monkeypatch.setattr(infer, "segment_tiles", segment)
    return calls


def _model_file(path: Path, splits=("fold1", "fold2")) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    (path.parent / "config.json").write_text(json.dumps({"train_splits": list(splits)}))
    return str(path)


def test_stlib_eval_scores_given_models_under_the_run_layout(tmp_path, monkeypatch, capsys):
    from stlib.cli import main
    from stlib.layout import RunLayout

    run = RunLayout(tmp_path / "run")
    _tiny_store(run.tiles_dir("st"), ["Bowel", "Bowel", "Skin"], ["S1", "S1", "S2"])
    _tiny_store(run.tiles_dir("st_truth"), ["Bowel", "Bowel", "Skin"], ["S1", "S1", "S2"])
    calls = _fake_networks(monkeypatch, run.tiles_dir("st_truth"))
    good = _model_file(tmp_path / "m" / "good" / "good.pt")
    bad = _model_file(tmp_path / "m" / "pannuke_noheldout" / "empty.pt")
    argv = ["eval", "--run-dir", str(run.root), "--model", f"st={good}", "--model", f"pannuke_noheldout={bad}",
            "--n-bootstrap", "20", "--n-permutations", "100", "--manifest", str(REPO / "data_manifest.yaml")]
    assert main(argv) == 0
    out = run.eval_results("segmentation")
    assert "bpq st - pannuke_noheldout = +1.000" in capsys.readouterr().out
    info = json.loads((out / "eval.json").read_text())
    assert info["heldout_organs"] == ["Bowel", "Skin"] and info["config"]["n_bootstrap"] == 20
    assert [r["kind"] for r in info["references"]] == ["manual", "st-derived"]
    per_seed = pd.read_parquet(out / "per_seed.parquet")
    assert len(per_seed) == 2 * 2 * 3  # models x references x images
    assert (per_seed.loc[per_seed.model == "st", "bpq"] == 1).all()
    assert (per_seed.loc[per_seed.model == "pannuke_noheldout", "bpq"] == 0).all()
    assert {"mpq", "type_acc"} <= set(per_seed)  # classification scored too
    summary = pd.read_csv(out / "summary.csv")
    pooled = summary[(summary.organ == "pooled") & (summary.metric == "bpq")]
    assert set(pooled.model) == {"st", "pannuke_noheldout"} and set(pooled.reference) == set(per_seed.reference)
    comp = pd.read_csv(out / "comparison.csv").set_index("organ")
    assert comp.loc["pooled", "diff"] == 1.0 and comp.loc["pooled", "n_clusters"] == 2  # unit: the slide
    assert sorted(p.name for p in out.iterdir()) == ["comparison.csv", "eval.json", "per_image.parquet",
                                                      "per_seed.parquet", "summary.csv"]
    n = len(calls)
    assert main([*argv, "--name", "again"]) == 0  # a second evaluation reuses the cached scores
    assert len(calls) == n and not list(run.eval_dir.glob(".*tmp"))
    pd.testing.assert_frame_equal(pd.read_parquet(run.eval_results("again") / "per_seed.parquet"), per_seed)
    # a PanNuke network is never scored on a fold it trained on
    _tiny_store(run.tiles_dir("pannuke"), ["Colon", "Skin"], ["pannuke_fold3"] * 2, split="fold3")
    trained = _model_file(tmp_path / "m" / "pannuke" / "good.pt", splits=("fold3",))
    with pytest.raises(ValueError, match="trained on"):
        main(["eval", "--run-dir", str(run.root), "--model", f"pannuke={trained}",
              "--manifest", str(REPO / "data_manifest.yaml")])


def test_stlib_eval_options_are_generated_from_the_eval_config():
    from dataclasses import fields

    from stlib.config import EvalConfig, config_from_args

    p = ev.cli_parser()
    opts = {o for a in p._actions for o in a.option_strings}
    assert {f"--{f.name.replace('_', '-')}" for f in fields(EvalConfig)} <= opts
    assert {"--run-dir", "--model", "--primary-metric", "--manual-truth"} <= opts
    args = p.parse_args(["--run-dir", "r", "--ci", "0.9", "--pannuke-test-split", "fold2"])
    assert config_from_args(EvalConfig, args) == EvalConfig(ci=0.9, pannuke_test_split="fold2")
    assert config_from_args(EvalConfig, p.parse_args(["--run-dir", "r"])) == EvalConfig()
    with pytest.raises(InputError, match="NAME=PATH"):
        ev._models_of(["just-a-path.pt"])
