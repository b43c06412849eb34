"""Tests of stlib.labels.classes: class table, sample gate, neoplastic step, Dead proxy, label_cells."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from sklearn.metrics import f1_score
from test_celltypes import MIX_HEALTHY, MIX_TUMOR, make_sample

from stlib.constants import DEAD, EPITHELIAL, IGNORE, INFLAMMATORY, NEOPLASTIC
from stlib.labels import celltypes as ct
from stlib.labels import classes as cl

FAST = {"neighbors_method": "gauss"}  # avoid ~30 s of numba compilation in the test process
#: weak tumour signature: tumour vs normal epithelium is hard for markers alone
STRENGTH = 0.3


def _label(ad: AnnData, method: str, ds: str = "Cancer", **kw) -> AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # melanocyte coverage warning on hMulti
        return cl.label_cells(ad.copy(), method=method, organ="Breast", disease_state=ds,
                              oncotree_code="IDC" if ds == "Cancer" else None, seed=0, **FAST, **kw)


@pytest.fixture(scope="module")
def tumor_sample() -> AnnData:
    return make_sample(MIX_TUMOR, seed=1, tumor_strength=STRENGTH)


@pytest.fixture(scope="module")
def hier(tumor_sample) -> AnnData:
    return _label(tumor_sample, "hierarchical")


@pytest.fixture(scope="module")
def flat(tumor_sample) -> AnnData:
    return _label(tumor_sample, "flat")


def _truth_class(ad: AnnData) -> np.ndarray:
    return ad.obs["truth"].map(cl.FINE_TO_CLASS).to_numpy().astype(int)


def _neo_epi_accuracy(ad: AnnData) -> float:
    """Among true tumour + epithelial cells: fraction given the right class (255 counts as wrong)."""
    t = _truth_class(ad)
    m = np.isin(t, [NEOPLASTIC, EPITHELIAL])
    return float((ad.obs["class"].to_numpy()[m] == t[m]).mean())


def test_class_table_covers_vocabulary():
    assert set(cl.FINE_TO_CLASS) == set(ct.FINE_TYPES)
    assert cl.FINE_TO_CLASS["tumor"] == NEOPLASTIC and cl.FINE_TO_CLASS["melanocyte"] == EPITHELIAL
    assert cl.FINE_TO_CLASS["dead"] == DEAD and cl.FINE_TO_CLASS["mast"] == INFLAMMATORY


@pytest.mark.parametrize("state,code,expected", [
    ("Cancer", "IDC", True), ("Healthy", None, False), ("Diseased", None, False),
    (None, "COAD", True), (None, None, False), (float("nan"), "LUAD", True),
])
def test_sample_gate(state, code, expected):
    assert cl.is_tumor_sample(state, code) is expected


def test_sample_gate_rejects_unknown_state():
    with pytest.raises(ValueError, match="disease_state"):
        cl.is_tumor_sample("weird", None)


def test_gene_positions_cover_panels():
    ad = AnnData(np.zeros((1, 3)), var=pd.DataFrame(index=["EPCAM", "ERBB2", "NOT_A_GENE"]))
    assert cl.load_gene_positions(ad) == 2
    assert ad.var.loc["ERBB2", "chromosome"] == "chr17"
    assert pd.isna(ad.var.loc["NOT_A_GENE", "chromosome"])


def test_hierarchical_beats_flat_on_neoplastic(hier, flat):
    a_h, a_f = _neo_epi_accuracy(hier), _neo_epi_accuracy(flat)
    assert a_h >= a_f, (a_h, a_f)
    assert a_h > 0.5  # coverage-limited: the grey zone leaves uncertain cells at 255 on purpose
    t, c = _truth_class(hier), hier.obs["class"].to_numpy()
    m = np.isin(t, [NEOPLASTIC, EPITHELIAL]) & (c != IGNORE)
    assert (c[m] == t[m]).mean() > 0.9  # precision among the cells that keep a class
    # the three signals were all computed and the CNV one separates tumour from normal epithelium
    m = hier.obs["neoplastic_call"].astype(str) != ""
    assert np.isfinite(hier.obs["cnv_score"][m]).all()
    is_tum = (hier.obs["truth"][m] == "tumor").to_numpy()
    cnv = hier.obs["cnv_score"][m].to_numpy()
    assert np.median(cnv[is_tum]) > np.quantile(cnv[~is_tum], 0.75)


def test_class_accuracy_and_f1(hier):
    t, c = _truth_class(hier), hier.obs["class"].to_numpy().astype(int)
    kept = c != IGNORE
    assert kept.mean() > 0.6
    acc = (c[kept] == t[kept]).mean()
    f1 = f1_score(t[kept], c[kept], labels=[1, 2, 3, 5], average=None)
    assert acc > 0.9 and f1.min() > 0.8, (acc, f1)
    conf = hier.obs["confidence"].to_numpy()
    assert ((conf >= 0) & (conf <= 1)).all()
    # every cell that keeps a class clears the bar it was labelled with (default 0.3)
    assert (conf[kept] >= hier.uns["stlib_labels"]["min_confidence"]).all()


def test_healthy_gate_gives_no_neoplastic():
    # the healthy sample even contains tumour-like cells: the gate must still call none
    ad = make_sample({**MIX_HEALTHY, "tumor": 100}, seed=2, tumor_strength=1.0)
    out = _label(ad, "hierarchical", ds="Healthy")
    assert (out.obs["class"] != NEOPLASTIC).all()
    assert "neoplastic" not in set(out.obs["neoplastic_call"].astype(str))
    assert out.obs["neoplastic_score"].isna().all()
    assert out.uns["stlib_labels"]["neoplastic_step"]["tumor_sample"] is False


def test_neoplastic_step_skips_cnv_on_tiny_panel(caplog):
    ad = make_sample({"tumor": 60, "epithelial": 60, "t_cell": 60}, seed=4, tumor_strength=1.0)
    ct.normalize(ad)
    ad.obs["fine_type"] = pd.Categorical(ad.obs["truth"].replace({"tumor": "epithelial"}))
    with caplog.at_level(logging.INFO, logger="stlib.labels.classes"):
        cl.neoplastic_step(ad, disease_state="Cancer", organ="Breast", min_positioned_genes=10_000)
    assert ad.obs["cnv_score"].isna().all()
    assert "copy-number signal skipped" in caplog.text
    calls = ad.obs["neoplastic_call"].astype(str)
    assert set(calls[ad.obs["truth"] == "t_cell"]) == {""}
    tum = (ad.obs["truth"] == "tumor").to_numpy()
    ns = ad.obs["neoplastic_score"].to_numpy()
    assert np.nanmean(ns[tum]) > np.nanmean(ns[~tum & (ad.obs["truth"] == "epithelial").to_numpy()])


def test_dead_rule_is_low_count_plus_apoptosis():
    genes = ["FAS", "BCL2L11", "CD3E", "EPCAM"]
    x = np.array([
        [2, 0, 1, 0],     # low count + apoptosis -> dead
        [0, 0, 2, 1],     # low count, no apoptosis -> unknown
        [1, 0, 40, 0],    # many counts: untouched even with FAS
        [0, 0, 30, 0],    # untouched
    ], dtype=np.float32)
    ad = AnnData(x, var=pd.DataFrame(index=genes))
    ad.obs["fine_type"] = pd.Categorical(["t_cell", "t_cell", "t_cell", "t_cell"])
    ad.obs["type_confidence"] = 0.9
    cl.dead_rule(ad, max_counts=5)
    assert ad.obs["fine_type"].astype(str).tolist() == ["dead", "unknown", "t_cell", "t_cell"]
    assert ad.obs["apoptosis_counts"].tolist() == [2, 0, 1, 0]
    cl.to_image_classes(ad, min_confidence=0.5)
    assert ad.obs["class"].tolist() == [DEAD, IGNORE, INFLAMMATORY, INFLAMMATORY]
    assert ad.uns["stlib_labels"]["dead_rule"]["proxy"] is True
    # a panel without apoptosis genes never calls dead
    ad2 = AnnData(x[:, 2:], var=pd.DataFrame(index=genes[2:]))
    ad2.obs["fine_type"] = pd.Categorical(["t_cell"] * 4)
    cl.dead_rule(ad2, max_counts=5)
    assert "dead" not in set(ad2.obs["fine_type"].astype(str))


def test_dead_on_synthetic(hier):
    called = hier.obs["class"].to_numpy() == DEAD
    truth_dead = (hier.obs["truth"] == "dead").to_numpy()
    assert called.sum() > 0
    assert truth_dead[called].mean() > 0.8  # precision of the proxy on data made to fit it


def test_to_image_classes_thresholds():
    ad = AnnData(np.zeros((4, 1)), var=pd.DataFrame(index=["A"]))
    ad.obs["fine_type"] = pd.Categorical(["epithelial", "tumor", "fibroblast", "unknown"])
    ad.obs["type_confidence"] = [0.9, 0.9, 0.3, 0.9]
    ad.obs["neoplastic_score"] = [0.5, 1.0, np.nan, np.nan]
    ad.obs["neoplastic_call"] = pd.Categorical(["ambiguous", "neoplastic", "", ""])
    cl.to_image_classes(ad, min_confidence=0.5)
    assert ad.obs["class"].tolist() == [IGNORE, NEOPLASTIC, IGNORE, IGNORE]
    assert ad.obs["confidence"].iloc[1] == pytest.approx(0.9)
    assert ad.obs["class"].dtype == np.uint8


def test_all_methods_run_and_seed_is_deterministic(tumor_sample, hier):
    again = _label(tumor_sample, "hierarchical")
    np.testing.assert_array_equal(again.obs["class"].to_numpy(), hier.obs["class"].to_numpy())
    np.testing.assert_allclose(again.obs["confidence"].to_numpy(), hier.obs["confidence"].to_numpy())
    for m in ("marker", "cluster"):
        out = _label(tumor_sample, m)
        assert out.uns["stlib_labels"]["method"] == m
        assert set(np.unique(out.obs["class"])) <= {1, 2, 3, 4, 5, IGNORE}
    with pytest.raises(ValueError, match="method"):
        cl.label_cells(tumor_sample.copy(), method="nope")


# ------------------------------------------------------------------------------------------------
# end to end on a small generated demo cohort (expression + HEST metadata only, as on real data)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    from stlib.demo import make_cohort

    return make_cohort(tmp_path_factory.mktemp("demo") / "data", seed=3, image_px=512, raw_bundles=0,
                       pannuke_per_fold=0)


def _demo_classes(root, method: str) -> tuple[np.ndarray, np.ndarray]:
    import geopandas as gpd

    from stlib.io.hest import HestSample

    truth_all, pred_all = [], []
    for sid in sorted(p.name for p in (root / "truth").iterdir()):
        s = HestSample(root / "hest", sid)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ad = cl.label_cells(s.cells(), method=method, organ=s.organ, disease_state=s.disease_state,
                                oncotree_code=s.oncotree_code, seed=0, **FAST)
        truth = gpd.read_parquet(root / "truth" / sid / "nuclei.parquet").set_index("cell_id")
        t = truth["class"].reindex(ad.obs_names.astype(str))
        ok = t.notna().to_numpy()
        truth_all.append(t.to_numpy()[ok].astype(int))
        pred_all.append(ad.obs["class"].to_numpy()[ok].astype(int))
    return np.concatenate(truth_all), np.concatenate(pred_all)


def test_label_cells_on_demo_cohort(small_demo):
    from stlib.evaluate import class_scores

    t, p = _demo_classes(small_demo, "hierarchical")
    assert t.size > 500
    cs = class_scores(t, p)  # 255 counts as wrong
    # ~1,100 cells of six small samples: looser than the >= 0.85 of full-size cohorts
    assert cs["accuracy"] >= 0.8, cs
    assert cs["ignored_fraction"] <= 0.15, cs
    for c in ("Neoplastic", "Inflammatory", "Connective", "Epithelial"):
        assert cs[f"f1_{c}"] >= 0.6, (c, cs)
    # the hierarchy beats the flat labeler on neoplastic vs normal epithelium
    tf, pf = _demo_classes(small_demo, "flat")
    m, mf = np.isin(t, [NEOPLASTIC, EPITHELIAL]), np.isin(tf, [NEOPLASTIC, EPITHELIAL])
    assert (p[m] == t[m]).mean() > (pf[mf] == tf[mf]).mean()


def test_tumor_lineage():
    assert cl.tumor_lineage("SKCM") == ("melanocyte",)
    assert cl.tumor_lineage("IDC") == ("epithelial",)
    assert set(cl.tumor_lineage(None)) == {"epithelial", "melanocyte"}
