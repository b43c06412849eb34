import numpy as np
import pandas as pd
import pytest

from stlib import evaluate as ev
from stlib.constants import IGNORE


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


def test_paired_comparison_detects_a_real_difference_only():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.8, size=40)
    better = base + 0.05 + rng.normal(0, 0.01, size=40)
    r = ev.paired_comparison(better, base, seed=0)
    assert r.diff.low > 0 and r.p_value < 1e-3
    same = ev.paired_comparison(base + rng.normal(0, 0.01, 40), base, seed=0)
    assert same.diff.low < 0 < same.diff.high
    with pytest.raises(ValueError, match="paired"):
        ev.paired_comparison([1, 2], [1])


def test_summarize_and_compare_tables():
    rows = []
    for model, shift in (("st", 0.1), ("pannuke", 0.0)):
        for organ in ("Bowel", "Skin"):
            for i in range(10):
                rows.append({"model": model, "organ": organ, "image": f"{organ}-{i}",
                             "pq": 0.5 + shift + 0.01 * i})
    df = pd.DataFrame(rows)
    s = ev.summarize(df, ["pq"], n_boot=200)
    pooled = s[(s.organ == "pooled") & (s.model == "st")].iloc[0]
    assert pooled["n_images"] == 20 and pooled["mean"] == pytest.approx(0.645)
    c = ev.compare_models(df, ["pq"], model_a="st", model_b="pannuke", n_boot=200)
    assert set(c.organ) == {"Bowel", "Skin", "pooled"}
    assert np.allclose(c["diff"], 0.1)
    with pytest.raises(ValueError, match="same images"):
        ev.compare_models(df[~((df.model == "st") & (df.image == "Skin-3"))], ["pq"],
                          model_a="st", model_b="pannuke")


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
