"""The release pair of the real-tissue chapter (stlib.realtissue: pack_release, load_release,
install_release, loo_budget_table, release_decision), on tiny fake model files; and the shipped
release folder itself where present."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stlib import realtissue as rt
from stlib.constants import CLASS_NAMES
from stlib.utils import InputError

REPO = Path(__file__).resolve().parents[1]
RECIPE = rt.RecipeConfig(steps=40, seed=0, device="cpu")
NAMES = ["TCGA-A1-0001", "TCGA-A1-0002"]


def _model_file(path: Path, recipe: rt.RecipeConfig, seed: int) -> Path:
    """A model file as stlib.train writes it: a tiny untrained network with the recipe's config."""
    from stlib.model.net import build_model

    torch.manual_seed(seed)
    model = build_model({"encoder": recipe.encoder})
    cfg = {"encoder": recipe.encoder, "n_types": 6, "steps": recipe.steps, "batch_size": recipe.batch_size,
           "crop_px": recipe.crop_px, "lr": recipe.lr, "aug_hed": recipe.aug_hed, "aug_scale": recipe.aug_scale,
           "warmup_steps": recipe.warmup_steps, "stain_norm": recipe.stain_norm,
           "channels_last_cpu": recipe.channels_last_cpu, "seed": recipe.seed}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg, "state_dict": model.state_dict(), "class_names": dict(CLASS_NAMES), "um_per_px": 0.25,
                "tile_px": 256, "stlib_version": "test", "postproc": rt.postproc_of(recipe)}, path)
    return path


@pytest.fixture
def trained_pair(tmp_path):
    models = tmp_path / "run" / "models" / "book"
    for k, net in enumerate(rt.RELEASE_NETS):
        _model_file(models / net / "model.pt", RECIPE, seed=k)
    src = tmp_path / "source"
    for n in [*NAMES, "TCGA-B9-0003"]:
        (src / "images").mkdir(parents=True, exist_ok=True)
        (src / "images" / f"{n}.tif").write_bytes(n.encode())
        (src / "annotations").mkdir(exist_ok=True)
        (src / "annotations" / f"{n}.xml.gz").write_bytes(n[::-1].encode())
    return models, src


def _pack(models: Path, src: Path, out: Path, **kw) -> Path:
    kw = {"recipe": RECIPE, "command": "make realtissue-models", "commit": "abc123", "source": src,
          "train_images": NAMES, "train_organs": ["Breast", "Breast"], "training": {"cpu_s": 12.5, "wall_s": 7.0, "loadavg": "1.0"}, **kw}
    return rt.pack_release(models, out, **kw)


def test_pack_load_install_round_trip(trained_pair, tmp_path):
    models, src = trained_pair
    out = _pack(models, src, tmp_path / "release", dtype="float16")
    doc = json.loads((out / "release.json").read_text())
    assert doc["command"] == "make realtissue-models" and doc["commit"] == "abc123"
    assert doc["recipe"]["steps"] == 40 and doc["recipe"]["seed"] == 0 and doc["dtype"] == "float16"
    assert doc["train_images"]["organs"] == ["Breast"]
    assert doc["training"]["cpu_s"] == 12.5 and doc["training"]["machine"]["cpu_count"] >= 1
    # the training images' files (image and annotation) and only those carry a checksum
    assert sorted(doc["train_images"]["files"]) == sorted(
        [f"images/{n}.tif" for n in NAMES] + [f"annotations/{n}.xml.gz" for n in NAMES])
    assert "NC" in (out / "README.md").read_text() and "MoNuSeg" in (out / "README.md").read_text()
    stored = torch.load(out / "st.pt", weights_only=True)
    assert {v.dtype for v in stored["state_dict"].values() if v.is_floating_point()} == {torch.float16}

    rel = rt.load_release(out, replace(RECIPE, steps=150, device="auto"), steps=40)
    assert rel.ok and rel.reason == "" and rel.steps == 40 and set(rel.models) == {"st", "manual"}
    inst = rt.install_release(rel, tmp_path / "run" / "models")
    for net in rt.RELEASE_NETS:
        a = torch.load(inst[net], weights_only=True)
        b = torch.load(models / net / "model.pt", weights_only=True)
        assert {v.dtype for v in a["state_dict"].values() if v.is_floating_point()} == {torch.float32}
        assert a["postproc"] == b["postproc"] and a["um_per_px"] == 0.25
        for k, v in b["state_dict"].items():  # fp16 storage: the weights within fp16 rounding
            if v.is_floating_point():
                assert torch.allclose(a["state_dict"][k], v, rtol=1e-3, atol=1e-4), k
        assert json.loads((inst[net].parent / "release.json").read_text())["commit"] == "abc123"
    mtime = inst["st"].stat().st_mtime_ns
    assert rt.install_release(rel, tmp_path / "run" / "models")["st"].stat().st_mtime_ns == mtime  # idempotent


def test_float32_release_is_bit_identical(trained_pair, tmp_path):
    models, src = trained_pair
    out = _pack(models, src, tmp_path / "release")
    inst = rt.install_release(rt.load_release(out, RECIPE), tmp_path / "installed")
    a = torch.load(inst["manual"], weights_only=True)["state_dict"]
    b = torch.load(models / "manual" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_installed_fp16_release_runs_with_stlib_infer(trained_pair, tmp_path, capsys):
    from PIL import Image

    from stlib.cli import main

    models, src = trained_pair
    out = _pack(models, src, tmp_path / "release", dtype="float16")
    inst = rt.install_release(rt.load_release(out, RECIPE), tmp_path / "installed")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(tmp_path / "he.png")
    rc = main(["infer", "--model", str(inst["st"]), "--input", str(tmp_path / "he.png"), "--um-per-px", "0.25",
               "--out", str(tmp_path / "pred"), "--device", "cpu", "--workers", "0"])
    assert rc == 0 and (tmp_path / "pred" / "he.npz").is_file()
    summary = json.loads((tmp_path / "pred" / "he_summary.json").read_text())
    assert summary["model_um_per_px"] == 0.25


def test_install_replaces_another_runs_artefacts(trained_pair, tmp_path):
    models, src = trained_pair
    out = _pack(models, src, tmp_path / "release")
    old = tmp_path / "run2" / "models" / "st"
    old.mkdir(parents=True)
    for f in ("checkpoint.pt", "metrics.csv", "model_300.pt", "model.pt"):
        (old / f).write_bytes(b"old")
    rt.install_release(rt.load_release(out, RECIPE), tmp_path / "run2" / "models")
    assert sorted(p.name for p in old.iterdir()) == ["model.pt", "release.json"]


def test_corrupted_file_is_a_clear_error_naming_it(trained_pair, tmp_path):
    models, src = trained_pair
    out = _pack(models, src, tmp_path / "release")
    data = bytearray((out / "manual.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "manual.pt").write_bytes(bytes(data))
    with pytest.raises(InputError, match="manual.pt") as e:
        rt.load_release(out, RECIPE)
    assert "corrupted" in str(e.value) and "make realtissue-models" in str(e.value)
    (out / "manual.pt").unlink()
    with pytest.raises(InputError, match="manual.pt"):
        rt.load_release(out, RECIPE)


def test_recipe_mismatch_or_missing_folder_is_skipped_with_a_reason(trained_pair, tmp_path):
    models, src = trained_pair
    out = _pack(models, src, tmp_path / "release")
    rel = rt.load_release(out, replace(RECIPE, lr=0.004))
    assert not rel.ok and "lr" in rel.reason and "0.004" in rel.reason
    rel = rt.load_release(out, replace(RECIPE, seed=1))
    assert not rel.ok and "seed" in rel.reason
    rel = rt.load_release(out, RECIPE, steps=1500)
    assert not rel.ok and "40 steps" in rel.reason
    rel = rt.load_release(tmp_path / "nowhere", RECIPE)
    assert not rel.ok and "no release pair" in rel.reason
    assert not rt.load_release("", RECIPE).ok
    with pytest.raises(InputError, match="not a usable release"):
        rt.install_release(rel, tmp_path / "x")


def test_pack_refuses_a_pair_of_another_recipe(trained_pair, tmp_path):
    models, src = trained_pair
    with pytest.raises(InputError, match="another recipe"):
        _pack(models, src, tmp_path / "release", recipe=replace(RECIPE, steps=1500))
    with pytest.raises(InputError, match="another recipe"):
        _pack(models, src, tmp_path / "release", recipe=replace(RECIPE, min_size=100))
    with pytest.raises(InputError, match="TCGA-ZZ"):
        _pack(models, src, tmp_path / "release", train_images=[*NAMES, "TCGA-ZZ-9999"])
    assert not (tmp_path / "release").exists()


def test_recipe_of_params_is_the_chapters_recipe():
    from stlib.config import RealTissueParams, load_params

    p = RealTissueParams()
    r = rt.recipe_of(p)
    assert r == rt.RecipeConfig(seed=p.seed, device=p.device)
    d = load_params("demo", "07_real_tissue", overrides={"steps": 1500})
    assert rt.recipe_differences(rt.recipe_dict(rt.recipe_of(d)), r) == {}
    assert rt.recipe_of(d).steps == 1500


def _loo_rows(name, net, steps, bpqs, **kw):
    return pd.DataFrame({"image": [f"img{i}" for i in range(len(bpqs))], "bpq": bpqs, "name": name, "net": net,
                         "steps": steps, "seed": 0, **kw})


def test_loo_budget_table_and_the_decision_rule(tmp_path):
    a = pd.concat([_loo_rows("classical", "classical", 0, [0.3, 0.3, 0.3]),
                   _loo_rows("macenko", "st", 150, [0.2, 0.4, 0.5]),
                   _loo_rows("base", "st", 150, [0.9, 0.9, 0.9])])
    b = pd.concat([_loo_rows("long", net, n, v, run_steps=1000) for net in ("st", "manual")
                   for n, v in ((300, [0.1, 0.2, 0.3]), (1000, [0.4, 0.35, 0.2]))])
    a.to_csv(tmp_path / "a.csv", index=False)
    b.to_csv(tmp_path / "b.csv", index=False)
    t = rt.loo_budget_table(tmp_path / "a.csv", tmp_path / "b.csv")
    assert t[["steps", "net"]].values.tolist() == [[150, "st"], [300, "manual"], [300, "st"], [1000, "manual"],
                                                   [1000, "st"]]
    r = t.set_index(["steps", "net"])
    assert r.loc[(150, "st"), "bpq"] == pytest.approx(1.1 / 3) and r.loc[(150, "st"), "above_otsu"] == "2 / 3"
    assert r.loc[(300, "st"), "snapshot"] and not r.loc[(1000, "st"), "snapshot"]
    assert r.loc[(1000, "st"), "above_otsu"] == "2 / 3" and r.loc[(1000, "st"), "otsu"] == pytest.approx(0.3)
    d = rt.release_decision(t, long_steps=1000)
    assert not d["adopt"] and d["long"] == pytest.approx(0.95 / 3) and d["base"] == pytest.approx(1.1 / 3)
    assert rt.release_decision(t.assign(bpq=0.5), long_steps=1000)["adopt"]  # equal means: not below, adopt
    part = t.assign(n_images=np.where(t.steps == 1000, 2, t.n_images))  # an unfinished long run decides nothing
    d = rt.release_decision(part.assign(bpq=0.9), long_steps=1000)
    assert d["adopt"] is None and not d["complete"] and d["n_long"] == 2


def test_shipped_release_verifies_against_the_chapter_recipe():
    """The release folder shipped in the repository: checksums hold and its recipe is the chapter's."""
    from stlib.config import RealTissueParams

    p = RealTissueParams()
    path = REPO / p.release_dir
    if not (path / "release.json").is_file():
        pytest.skip("no release pair shipped in this checkout")
    rel = rt.load_release(path, rt.recipe_of(p), steps=p.release_steps)
    assert rel.ok, rel.reason
    doc = rel.doc
    assert doc["command"] and len(doc["commit"]) == 40 and doc["train_images"]["files"]
    for rel_path, sha in doc["train_images"]["files"].items():  # the shipped training images are the ones recorded
        f = REPO / doc["train_images"]["source"] / rel_path
        assert f.is_file() and rt._sha256(f) == sha, rel_path
    organs = set(doc["train_images"]["organs"])
    assert organs and not organs & set(p.heldout_organs)
    for net in rt.RELEASE_NETS:  # the files carry the post-processing the release records
        assert torch.load(rel.models[net], weights_only=True).get("postproc") == rel.postproc
    c = rel.postproc_choice
    if c:  # chosen for the release budget: the committed grid is the one recorded and the rule gives the same
        grid = REPO / c["grid_csv"]
        assert grid.is_file() and rt._sha256(grid) == c["grid_sha256"]
        again = rt.choose_release_postproc(grid, rt.postproc_of(rt.recipe_of(p)), steps=rel.steps)
        assert again["postproc"] == rel.postproc == c["postproc"]
        for net in rt.RELEASE_NETS:
            assert rt._weights_sha256(torch.load(rel.models[net], weights_only=True)) == doc["weights_sha256"][f"{net}.pt"]


def test_heldout_comparison_verdicts_follow_the_cis():
    rng = np.random.default_rng(0)
    rows = []
    for k in range(8):
        s = "CoNSeP colon" if k < 5 else "Kidney (MoNuSeg)"
        base = rng.uniform(0.3, 0.5)
        for model, v in (("ST-trained", base + 0.10), ("manual-trained", base + 0.11),
                         ("classical (Otsu + watershed)", base)):
            rows.append({"model": model, "image": f"i{k}", "set": s, "organ": s, "bpq": v, "dice": v, "aji": v})
    per = pd.DataFrame(rows)
    r = rt.heldout_comparison(per, n_boot=200)
    assert r["verdict_classical"] == "above"
    assert r["verdict_ratio"] == "at least" and 0.9 < r["ratio"][0] < 1.0
    assert r["text"]["n"] == 8 and r["text"]["diff_classical"].startswith("+0.100")
    worse = per.assign(bpq=np.where(per.model == "ST-trained", per.bpq - 0.3, per.bpq))
    r = rt.heldout_comparison(worse, n_boot=200)
    assert r["verdict_classical"] == "below" and r["verdict_ratio"] == "below"


def test_release_command_packs_with_provenance(trained_pair, tmp_path, capsys):
    """`python -m stlib.realtissue release`: recipe from the profile, training time from a /usr/bin/time log,
    the shipped training images' checksums (the chapter's training organs of realtissue/)."""
    models, _ = trained_pair
    log = tmp_path / "time.log"
    log.write_text("\tUser time (seconds): 100.50\n\tSystem time (seconds): 9.50\n"
                   "\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03\n")
    rc = rt.release_main(["--models", str(models), "--out", str(tmp_path / "rel"), "-p", "steps=40",
                          "--command", "make realtissue-models", "--commit", "f" * 40, "--time-log", str(log),
                          "--loadavg", "2.0"])
    assert rc == 0
    doc = json.loads((tmp_path / "rel" / "release.json").read_text())
    assert doc["training"]["run_cpu_s"] == 110.0 and doc["training"]["run_wall_s"] == 3723.0
    assert doc["training"]["loadavg"] == "2.0" and doc["commit"] == "f" * 40
    assert set(doc["train_images"]["organs"]) == {"Breast", "Lung", "Prostate"}
    assert len(doc["train_images"]["names"]) == 9 and len(doc["train_images"]["files"]) == 18
    assert rt.load_release(tmp_path / "rel", rt.RecipeConfig(), steps=40).ok
    with pytest.raises(InputError, match="another recipe"):  # the profile's recipe is checked against the files
        rt.release_main(["--models", str(models), "--out", str(tmp_path / "rel2"), "-p", "steps=40", "-p", "lr=0.02",
                         "--command", "x", "--commit", "abc"])


def _grid(rows: dict[str, dict[str, list[float]]], steps: int = 1500) -> pd.DataFrame:
    """A post-processing grid table: setting -> net -> bPQ per image."""
    out = []
    for setting, nets in rows.items():
        for net, vals in nets.items():
            for k, v in enumerate(vals):
                out.append({"name": "long1500", "seed": 0, "steps": steps, "fold": "Breast", "net": net,
                            "image": f"img{k}", "setting": setting, "mode": json.loads(setting)["mode"], "bpq": v})
    return pd.DataFrame(out)


CUR = rt.postproc_of(rt.RecipeConfig())  # the chapter's own setting
CUR_KEY = rt._pp_key(CUR)
SMALL_KEY = rt._pp_key({**CUR, "min_size": 100})


def test_release_postproc_rule_picks_the_best_mean_over_both_nets(tmp_path):
    f = tmp_path / "grid.csv"
    # best on ST alone would be SMALL by a lot, but manual prefers CUR: the mean over both decides
    _grid({CUR_KEY: {"st": [0.40, 0.40], "manual": [0.50, 0.50]},
           SMALL_KEY: {"st": [0.46, 0.46], "manual": [0.46, 0.46]}}).to_csv(f, index=False)
    c = rt.choose_release_postproc(f, CUR, steps=1500)
    assert c["postproc"] == json.loads(SMALL_KEY) and c["best"] == c["postproc"]
    assert c["chosen_bpq"] == pytest.approx(0.46) and c["current_bpq"] == pytest.approx(0.45)
    assert c["n_pairs"] == 4 and c["grid_sha256"] == rt._sha256(f)
    assert list(c["table"]["setting"]) == [SMALL_KEY, CUR_KEY]
    # within the tolerance the recipe's own setting is kept
    c = rt.choose_release_postproc(f, CUR, steps=1500, tol=0.02)
    assert c["postproc"] == json.loads(CUR_KEY) and c["best"] == json.loads(SMALL_KEY)


def test_release_postproc_rule_refuses_an_unfinished_grid(tmp_path):
    f = tmp_path / "grid.csv"
    _grid({CUR_KEY: {"st": [0.4, 0.4], "manual": [0.5, 0.5]}, SMALL_KEY: {"st": [0.9, 0.9], "manual": [0.9]}}
          ).to_csv(f, index=False)
    with pytest.raises(InputError, match="different"):
        rt.choose_release_postproc(f, CUR, steps=1500)
    _grid({CUR_KEY: {"st": [0.4, 0.4]}}).to_csv(f, index=False)
    with pytest.raises(InputError, match="manual"):
        rt.choose_release_postproc(f, CUR, steps=1500)
    with pytest.raises(InputError, match="no rows"):
        rt.choose_release_postproc(f, CUR, steps=150, nets=("st",))
    with pytest.raises(InputError, match="not found"):
        rt.choose_release_postproc(tmp_path / "none.csv", CUR, steps=1500)


def test_set_release_postproc_keeps_the_weights_and_records_the_choice(trained_pair, tmp_path):
    from stlib.infer import load_inference_model

    models, src = trained_pair
    out = _pack(models, src, tmp_path / "release")
    before = json.loads((out / "release.json").read_text())
    f = tmp_path / "grid.csv"
    _grid({CUR_KEY: {"st": [0.40], "manual": [0.40]}, SMALL_KEY: {"st": [0.50], "manual": [0.48]}},
          steps=RECIPE.steps).to_csv(f, index=False)
    choice = rt.choose_release_postproc(f, rt.postproc_of(RECIPE), steps=RECIPE.steps)
    rt.set_release_postproc(out, choice)
    doc = json.loads((out / "release.json").read_text())
    assert doc["postproc"] == json.loads(SMALL_KEY) and doc["recipe"] == before["recipe"]
    assert doc["postproc_choice"]["grid_sha256"] == rt._sha256(f) and "table" not in doc["postproc_choice"]
    assert doc["files"] != before["files"]  # the files changed (their post-processing) ...
    rel = rt.load_release(out, RECIPE)  # ... and verify against the new checksums
    assert rel.ok and rel.postproc == json.loads(SMALL_KEY) and rel.postproc_choice["chosen_bpq"] == pytest.approx(0.49)
    for net in rt.RELEASE_NETS:  # ... but the weights are the trained ones, bit for bit
        orig = torch.load(models / net / "model.pt", weights_only=True)
        new = torch.load(out / f"{net}.pt", weights_only=True)
        assert rt._weights_sha256(orig) == rt._weights_sha256(new) == doc["weights_sha256"][f"{net}.pt"]
        assert all(torch.equal(orig["state_dict"][k], new["state_dict"][k]) for k in orig["state_dict"])
    inst = rt.install_release(rel, tmp_path / "installed")
    assert load_inference_model(inst["st"]).postproc == json.loads(SMALL_KEY)  # what stlib infer applies
    assert "chosen for this budget" in (out / "README.md").read_text()
    mtime = (out / "st.pt").stat().st_mtime_ns
    rt.set_release_postproc(out, choice)  # idempotent
    assert (out / "st.pt").stat().st_mtime_ns == mtime


def test_heldout_verdict_needs_the_sign_flip_test_too():
    """A single-image set carries a set's weight but no bootstrap spread: a pooled CI above 0 driven by it
    is not enough for "above" when the sign-flip test over images disagrees."""
    rows = []
    for k in range(6):  # a set of 6 images where ST and Otsu are level ...
        for model, v in (("ST-trained", 0.40 + (0.01 if k % 2 else -0.01)), ("manual-trained", 0.41),
                         ("classical (Otsu + watershed)", 0.40)):
            rows.append({"model": model, "image": f"a{k}", "set": "A", "organ": "A", "bpq": v, "dice": v, "aji": v})
    for model, v in (("ST-trained", 0.50), ("manual-trained", 0.50), ("classical (Otsu + watershed)", 0.40)):
        rows.append({"model": model, "image": "b0", "set": "B", "organ": "B", "bpq": v, "dice": v, "aji": v})
    r = rt.heldout_comparison(pd.DataFrame(rows), n_boot=300)  # ... and one image of set B far ahead
    d = r["diffs"]
    c = d[(d.metric == "bpq") & (d.set == "pooled") & (d.comparison.str.endswith("watershed)"))].iloc[0]
    assert c.diff_ci_low > 0 and c.p_value >= 0.05
    assert r["verdict_classical"].startswith("ahead of, but not significantly above")
