"""The demo generator's own biology (stlib.demo.biology) and its knobs.

Each knob is checked on what the generator actually produced (cycling shares, off-vocabulary
shares, copy-number folds, the Xenium region, the dying cells' signal), the easy preset is checked
to reproduce the generator of before issue 12 exactly, and the generator and the labeler are checked
never to read each other's biology.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
from windows import library_factor, median_window

import stlib
from stlib.demo import biology as bio
from stlib.demo.config import PRESETS, DemoConfig, cohort_samples, config_for_scale
from stlib.demo.expression import cell_count_matrix, simulate_cell_expression
from stlib.demo.sample import simulate_sample
from stlib.io.panels import chromosome_arms, load_panel
from stlib.utils import InputError

GENES = load_panel("hMulti")
ROOT = Path(stlib.__file__).parent


def _sample(cfg: DemoConfig, name: str, seed: int = 11):
    for i, spec in enumerate(cohort_samples(cfg)):
        if spec.sample_id == name:
            return simulate_sample(spec, cfg, seed=seed, index=i, genes=GENES, render=False)
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# independence of generator and labeler
# ---------------------------------------------------------------------------------------------

def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_labeler_never_imports_the_generator():
    for p in sorted((ROOT / "labels").glob("*.py")):
        assert not any(m.startswith("stlib.demo") for m in _imports(p)), p


def test_generator_biology_is_not_read_from_the_labeler():
    for p in sorted((ROOT / "demo").glob("*.py")):
        assert not any(m.startswith("stlib.labels") for m in _imports(p)), p
        # no call reads the labeler's marker files (e.g. resources.files("stlib.labels"), open(...yaml))
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call):
                for a in node.args:
                    if isinstance(a, ast.Constant) and isinstance(a.value, str):
                        assert "stlib.labels" not in a.value and not a.value.endswith(".yaml"), (p, a.value)


def test_off_vocabulary_types_are_outside_the_labeler_vocabulary():
    import yaml

    from stlib.labels.celltypes import FINE_TYPES

    labeler = set(FINE_TYPES) | set(yaml.safe_load((ROOT / "labels" / "markers" / "celltypes.yaml").read_text())["types"])
    assert set(bio.OFF_VOCABULARY) == {"myoepithelial", "neutrophil", "dendritic", "pericyte", "schwann"}
    assert not set(bio.OFF_VOCABULARY) & labeler
    # the generator's own names differ from the labeler's for most types (its catalogue is its own)
    assert len(set(bio.CATALOGUE) - labeler) >= len(bio.CATALOGUE) // 2


# ---------------------------------------------------------------------------------------------
# presets and knobs
# ---------------------------------------------------------------------------------------------

def test_easy_preset_reproduces_the_generator_before_issue_12():
    """Reference values computed with the generator of commit 41e3034 (main before issue 12)."""
    cfg = config_for_scale("demo", "easy", image_px=256, pannuke_per_fold=0, raw_bundles=0)
    assert cfg.biology == "legacy" and cfg.xenium_region_fraction == 1.0
    expected = [("DEMO_BREAST_1", 8808, 141, "39a24d226853505c"), ("DEMO_LUNG_1", 6179, 78, "91d1c76d8a5ca981"),
                ("DEMO_PANCREAS_1", 10738, 305, "74e05b61c10cf83f")]
    for (sid, n_tx, cls_sum, digest), (i, spec) in zip(expected, enumerate(cohort_samples(cfg))):
        sd = simulate_sample(spec, cfg, seed=5, index=i, genes=GENES)
        tx = sd.transcripts
        h = hashlib.sha256(("|".join(tx["feature_name"].astype(str)) + "|" +
                            "|".join(tx["cell_id"].astype(str))).encode()).hexdigest()[:16]
        assert (spec.sample_id, len(tx), int(sd.truth["class"].astype(int).sum()), h) == (sid, n_tx, cls_sum, digest)


def test_presets_and_knob_validation():
    real = config_for_scale("demo")
    assert real.biology == "realistic" and PRESETS["realistic"] == {}
    # literature-based defaults (the reasons are in stlib/demo/config.py)
    assert 1.2 <= real.cnv_fold <= 1.5 and real.noncycling_tumour_fraction >= 0.5
    assert real.cycling_normal_fraction <= 0.05 and real.marker_overlap < 1 and real.offvocab_fraction > 0
    assert real.xenium_region_fraction < 1
    easy = config_for_scale("demo", "easy")
    assert easy.marker_overlap == 1.0 and easy.offvocab_fraction == 0.0 and easy.noncycling_tumour_fraction == 0.0
    for bad in ({"marker_overlap": 1.2}, {"cnv_fold": 0.8}, {"dead_signal": -1.0}, {"xenium_region_fraction": 0.0},
                {"biology": "other"}, {"offvocab_fraction": 2.0}):
        with pytest.raises(InputError):
            dataclasses.replace(real, **bad).validate()
    with pytest.raises(InputError, match="preset"):
        config_for_scale("demo", "hard")


def test_cli_lists_the_biology_knobs(capsys):
    from stlib.demo import cli_main

    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    for knob in ("--marker-overlap", "--cnv-fold", "--cnv-subclonal-fraction", "--cycling-normal-fraction",
                 "--noncycling-tumour-fraction", "--offvocab-fraction", "--dead-signal",
                 "--xenium-region-fraction", "--preset"):
        assert knob in out, knob


@pytest.fixture(scope="module")
def breast():
    return _sample(config_for_scale("demo"), "DEMO_BREAST_1")


def test_cycling_is_a_state_not_a_tumour_property(breast):
    ex = breast.expression_truth
    tum = ex["fine_type"].eq(bio.TUMOUR_TYPE).to_numpy()
    normal = ~tum & ex["fine_type"].ne(bio.DEAD_TYPE).to_numpy()
    cyc = ex["cycling"].to_numpy(bool)
    # defaults: 30 % of tumour cells and 3 % of normal cells cycle
    assert 0.18 <= cyc[tum].mean() <= 0.42
    assert cyc[normal].mean() <= 0.08
    cfg = dataclasses.replace(config_for_scale("demo"), noncycling_tumour_fraction=0.0, cycling_normal_fraction=0.2)
    ex2 = _sample(cfg, "DEMO_BREAST_1").expression_truth
    tum2 = ex2["fine_type"].eq(bio.TUMOUR_TYPE).to_numpy()
    assert ex2["cycling"].to_numpy(bool)[tum2].mean() > 0.95
    assert 0.12 <= ex2["cycling"].to_numpy(bool)[~tum2].mean() <= 0.3


def test_offvocab_fraction_and_truth_classes(breast):
    t = breast.truth
    share = np.isin(t["fine_type"], bio.OFF_VOCABULARY).mean()
    assert 0.04 <= share <= 0.12  # default 0.08, capped by what each compartment holds
    assert set(t["fine_type"]) & set(bio.OFF_VOCABULARY)
    cfg0 = dataclasses.replace(config_for_scale("demo"), offvocab_fraction=0.0)
    assert not np.isin(_sample(cfg0, "DEMO_BREAST_1").truth["fine_type"], bio.OFF_VOCABULARY).any()
    # classes are those of what the cells are
    assert t.loc[t.fine_type == "pericyte", "class"].eq(3).all()
    assert t.loc[t.fine_type == "neutrophil", "class"].eq(2).all()
    assert t.loc[t.fine_type == "myoepithelial", "class"].eq(5).all()


def test_xenium_region_fraction(breast):
    t = breast.truth
    vis = t["visible"].to_numpy(bool)
    inside = t["in_xenium_region"].to_numpy(bool)
    assert 0.75 <= inside[vis].mean() <= 0.95  # default 0.85 of the field
    assert not (t["has_polygon"].to_numpy(bool) & ~inside).any()
    # no transcript outside the region
    box = breast.stats["xenium_region_um"]
    tx = breast.transcripts
    assert (tx.x_location >= box[0] - 1e-3).all() and (tx.x_location <= box[2] + 1e-3).all()
    assert (tx.y_location >= box[1] - 1e-3).all() and (tx.y_location <= box[3] + 1e-3).all()
    full = _sample(dataclasses.replace(config_for_scale("demo"), xenium_region_fraction=1.0), "DEMO_BREAST_1")
    assert full.truth["in_xenium_region"].all() and full.stats["xenium_region_um"] is None


def test_cnv_fold_is_realised_on_the_arms():
    cfg = dataclasses.replace(config_for_scale("demo"), cnv_fold=1.5, cnv_subclonal_fraction=0.0)
    b = bio.make_sample_biology(GENES, "bowel", cancer=True, cfg=cfg, cohort_rng=np.random.default_rng(1),
                                sample_rng=np.random.default_rng(2))
    arms = chromosome_arms(GENES)
    assert b.events and all(a.startswith("chr") for a, _, _ in b.events)
    for arm, sign, sub in b.events:
        m = arms == arm
        if m.any():
            np.testing.assert_allclose(b.cnv[1, m], 1.5 ** sign)
            assert not sub
    untouched = ~np.isin(arms, [a for a, _, _ in b.events])
    np.testing.assert_allclose(b.cnv[:, untouched], 1.0)
    # subclonal events are only in state 2
    cfg2 = dataclasses.replace(cfg, cnv_subclonal_fraction=1.0)
    b2 = bio.make_sample_biology(GENES, "bowel", cancer=True, cfg=cfg2, cohort_rng=np.random.default_rng(1),
                                 sample_rng=np.random.default_rng(2))
    np.testing.assert_allclose(b2.cnv[1], 1.0)
    assert (b2.cnv[2] != 1.0).any()


def test_marker_overlap_controls_marker_specificity():
    def specific_share(overlap: float) -> float:
        cfg = dataclasses.replace(config_for_scale("demo"), marker_overlap=overlap)
        b = bio.make_sample_biology(GENES, "breast", cancer=False, cfg=cfg, cohort_rng=np.random.default_rng(3),
                                    sample_rng=np.random.default_rng(4))
        mapping = {t: t for t in b.types if t != bio.TUMOUR_TYPE}
        return float(np.mean(list(bio.realised_marker_specificity(
            b, {t: bio.CATALOGUE[t].markers for t in mapping}, mapping).values())))

    lo, hi = specific_share(0.3), specific_share(1.0)
    assert hi > 0.9 and lo < hi - 0.3


def test_dead_signal_zero_means_no_signal():
    cfg = dataclasses.replace(config_for_scale("demo"), dead_signal=0.0, atypical_fraction=0.0,
                              cycling_normal_fraction=0.0)
    b = bio.make_sample_biology(GENES, "breast", cancer=False, cfg=cfg, cohort_rng=np.random.default_rng(5),
                                sample_rng=np.random.default_rng(6))
    ct = np.array(["fibroblast"] * 50 + [bio.DEAD_TYPE] * 50, dtype=object)
    pc = bio.per_cell_programmes(b, ct, np.array(["fibroblast"] * 100, dtype=object), cfg=cfg,
                                 rng=np.random.default_rng(7))
    np.testing.assert_allclose(pc["P"][50:], pc["P"][:50], rtol=1e-9)  # a dying cell is its origin
    assert np.allclose(pc["library"][50:], pc["library"][:50])
    cfg1 = dataclasses.replace(cfg, dead_signal=1.0)
    pc1 = bio.per_cell_programmes(b, ct, np.array(["fibroblast"] * 100, dtype=object), cfg=cfg1,
                                  rng=np.random.default_rng(7))
    assert (pc1["library"][50:] < 0.5 * pc1["library"][:50]).all()
    stress = np.isin(GENES, bio.STRESS_GENES)
    assert pc1["P"][50:, stress].sum(1).min() > 2 * pc1["P"][:50, stress].sum(1).max()


# ---------------------------------------------------------------------------------------------
# public API for other cohorts (real annotated H&E with a simulated Xenium layer)
# ---------------------------------------------------------------------------------------------

def test_simulate_cell_expression_from_classes():
    rng = np.random.default_rng(0)
    n = 300
    xy = rng.uniform(0, 200, (n, 2))
    classes = rng.choice([1, 2, 3, 5], size=n)
    cfg = config_for_scale("demo")
    types = bio.types_for_classes(classes, "bowel", cancer=True, rng=np.random.default_rng(1))
    assert (np.array([bio.type_class(t) for t in types]) == classes).all()
    ex = simulate_cell_expression(xy, types, organ_key="bowel", cancer=True, genes=GENES, cfg=cfg,
                                  cohort_seed=3, sample_key=(3, 0))
    X = cell_count_matrix(ex, n, len(GENES))
    assert X.shape == (n, len(GENES))
    # median transcripts per cell: within the window of the law the knobs and the types' library
    # factors state, at n = 300 cells (tests/windows.py; no qv filter here)
    lam = cfg.tx_per_cell_median * np.array([library_factor({}, "bowel", t) for t in types])
    r = np.random.default_rng(0)
    ref = r.poisson(lam[None, :] * np.exp(r.normal(0.0, cfg.library_log_sd, (200, n))))
    lo, hi = median_window(ref.ravel(), n)
    assert lo <= np.median(np.asarray(X.sum(1)).ravel()) <= hi, (lo, hi)
    again = simulate_cell_expression(xy, types, organ_key="bowel", cancer=True, genes=GENES, cfg=cfg,
                                     cohort_seed=3, sample_key=(3, 0))
    np.testing.assert_array_equal(ex["gene"], again["gene"])
    assert ex["events"] and ex["clone"][classes == 1].min() >= 1 and (ex["clone"][classes != 1] == 0).all()
    with pytest.raises(ValueError):
        simulate_cell_expression(xy[:5], types, organ_key="bowel", cancer=True, genes=GENES, cfg=cfg)
    # healthy samples have no tumour cells
    h = bio.types_for_classes([1, 5], "bowel", cancer=False, rng=np.random.default_rng(1))
    assert bio.TUMOUR_TYPE not in set(h)
