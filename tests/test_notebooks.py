"""End to end: every notebook on a small demo cohort with papermill, the book built from them,
the rendered pages checked in headless Chromium, the HF token searched for everywhere, and the
paper profile run through notebooks 00-02 on a local HEST mirror (network off).

One session-scoped run serves all tests here (a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from conftest import skip_or_fail

from stlib.config import NOTEBOOK_PARAMS
from stlib.run import build_book, run_profile

REPO = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_stlibFAKEtoken0123456789abcdefXYZ"
pytestmark = pytest.mark.slow

SMOKE = {
    "00_data": {"demo_image_px": 512},
    "03_training": {"steps": 4, "batch_size": 2, "val_every": 4, "val_max_tiles": 2, "crop_px": 64},
    "04_segmentation_eval": {"n_bootstrap": 50, "n_permutations": 500},
    "05_classification_eval": {"n_bootstrap": 50, "n_permutations": 500},
    # two MoNuSeg training organs, one held-out MoNuSeg image, three CoNSeP images (one trains the
    # classification heads): every cell of the real-tissue chapter runs, in a fraction of its time. Batch and
    # crop stay the chapter's, so that the shipped release pair (models/realtissue, same recipe but steps)
    # is verified, installed and scored here too
    "07_real_tissue": {"steps": 4, "n_bootstrap": 50, "n_class_train": 1,
                       "images": ["TCGA-A7-A13E-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1",
                                  "train_1", "train_3", "train_6"]},
}


def _copy_study(dst: Path) -> Path:
    """The book sources and notebooks in a scratch folder (the repository stays untouched)."""
    dst.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml", "data_manifest.yaml"):
        shutil.copy(REPO / name, dst / name)
    for folder in ("book", "notebooks", "params", "benchmarks"):
        shutil.copytree(REPO / folder, dst / folder, ignore=shutil.ignore_patterns("executed", "tmp"))
    return dst


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    root = _copy_study(tmp_path_factory.mktemp("study") / "repo")
    demo = yaml.safe_load((REPO / "params" / "demo.yaml").read_text())
    demo["common"].update({"data_dir": str(root / "data" / "demo"), "run_dir": str(root / "runs" / "demo")})
    for nb, vals in SMOKE.items():
        demo.setdefault(nb, {}).update(vals)
    (root / "params" / "demo.yaml").write_text(yaml.safe_dump(demo))
    logs: list[str] = []
    old = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = FAKE_TOKEN  # a user's token in the environment must never surface
    try:
        report = run_profile("demo", root=root, params_dir=root / "params", build=False, log=logs.append)
        book_error = None
        try:
            build_book(root)
        except Exception as e:  # noqa: BLE001 - reported by the test that needs the book
            book_error = str(e)
    finally:
        if old is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = old
    (root / "run.log").write_text("\n".join(logs))
    return {"root": root, "report": report, "book_error": book_error}


def _outputs(nb_path: Path):
    nb = nbformat.read(str(nb_path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            yield from cell.get("outputs", [])


def test_every_notebook_ran_with_figures_and_no_error(smoke):
    exe = smoke["root"] / "book" / "executed"
    assert smoke["report"].executed == list(NOTEBOOK_PARAMS)
    for name in NOTEBOOK_PARAMS:
        outs = list(_outputs(exe / f"{name}.ipynb"))
        assert not [o for o in outs if o.get("output_type") == "error"], name
        images = [o for o in outs if "image/png" in o.get("data", {})]
        assert images, f"{name} has no figure"
        text = json.dumps([o.get("text", "") for o in outs if o.get("output_type") == "stream"])
        assert "Traceback" not in text, name


def test_outputs_of_the_study_exist(smoke):
    run = smoke["root"] / "runs" / "demo"
    assert (run / "tiles" / "st" / "store.json").is_file()
    assert (run / "models" / "st" / "model.pt").is_file() and (run / "models" / "pannuke" / "model.pt").is_file()
    labels = sorted(p.name for p in (run / "labels").iterdir() if "__" not in p.name)
    assert len(labels) >= 6
    for sid in labels:
        assert (run / "alignment" / sid / "alignment.json").is_file()
        assert (run / "labels" / sid / "cells.parquet").is_file()
    assert list((run / "infer").glob("*/*.geojson"))
    rt = smoke["root"] / "runs" / "realtissue"  # the real-tissue chapter's live pair, and the release pair for `stlib infer`
    assert (rt / "models" / "book" / "st" / "model.pt").is_file() and (rt / "models" / "book" / "manual" / "model.pt").is_file()
    glued = _glued(smoke["root"] / "book" / "executed" / "07_real_tissue.ipynb")
    if (REPO / "models" / "realtissue" / "release.json").is_file():  # shipped: verified, installed and scored
        assert (rt / "models" / "st" / "model.pt").is_file() and (rt / "models" / "manual" / "model.pt").is_file()
        assert "verified, installed" in glued["rt_rel_status"], glued["rt_rel_status"]
        assert float(glued["rt_rel_st"].strip("'")) > 0 and "[" in glued["rt_rel_ratio"]
        rel = json.loads((REPO / "models" / "realtissue" / "release.json").read_text())
        if rel.get("postproc_choice"):  # the release's own post-processing, chosen on the dev grid, is shown
            shown = glued["rt_pp_chosen"].strip("'")
            assert all(f"{k} {v}" in shown for k, v in rel["postproc"].items()), shown
    else:
        assert "not evaluated" in glued["rt_rel_status"]
    if (REPO / "benchmarks" / "realtissue_diagnosis.csv").is_file():
        assert "n/a" not in glued["rt_dg_first_st"] and float(glued["rt_dg_small_st"].strip("'")) > 0
    unseen = REPO / "benchmarks" / "realtissue_unseen_consep.csv"
    if unseen.is_file():  # the committed scores of the unseen CoNSeP images, summarised by the chapter
        n = len(pd.read_csv(unseen)["image"].unique())
        assert glued["rt_un_n"].strip("'") == str(n) and "[" in glued["rt_un_ratio"]
        assert glued["rt_un_verdict_classical"].strip("'") != "n/a"


def _glued(nb_path: Path) -> dict:
    """``{key: text/plain}`` of every value a notebook glued (myst_nb stores them as outputs)."""
    out = {}
    for o in _outputs(nb_path):
        sb = o.get("metadata", {}).get("scrapbook", {})
        if sb.get("name"):
            out[sb["name"]] = o.get("data", {}).get(sb.get("mime_prefix", "") + "text/plain")
    return out


def test_primary_endpoint_is_glued_at_the_right_unit(smoke):
    import ast

    g = {k: ast.literal_eval(v) for k, v in _glued(smoke["root"] / "book" / "executed" / "04_segmentation_eval.ipynb").items()
         if k in ("primary_endpoint", "primary_diff", "primary_ci_low", "primary_ci_high", "ci_unit", "n_train_seeds",
                  "baselines")}
    assert set(g) == {"primary_endpoint", "primary_diff", "primary_ci_low", "primary_ci_high", "ci_unit",
                      "n_train_seeds", "baselines"}
    assert isinstance(g["primary_endpoint"], str) and "manual truth" in g["primary_endpoint"]
    assert all(isinstance(g[k], float) for k in ("primary_diff", "primary_ci_low", "primary_ci_high"))
    assert g["primary_ci_low"] <= g["primary_diff"] <= g["primary_ci_high"]
    assert "tile" not in g["ci_unit"] and ("slide" in g["ci_unit"] or "image" in g["ci_unit"])
    assert isinstance(g["n_train_seeds"], int) and g["n_train_seeds"] >= 3
    assert "all tissues" in g["baselines"] and "w/o held-out tissues" in g["baselines"]
    run = smoke["root"] / "runs" / "demo"
    for name in ("st", "pannuke", "pannuke_noheldout"):
        assert (run / "models" / f"{name}__seed2" / "model.pt").is_file(), name
    # the demo's ablation retrains the first `ablation_seeds` (2) of the 3 seeds, as the book says
    n_abl = yaml.safe_load((REPO / "params" / "demo.yaml").read_text())["05_classification_eval"]["ablation_seeds"]
    assert (run / "models" / f"st__flat__seed{n_abl - 1}" / "model.pt").is_file()
    assert not (run / "models" / f"st__flat__seed{n_abl}").exists()
    # the front page shows them (cross-document glue resolved in the built book)
    index = (smoke["root"] / "_build" / "html" / "book" / "intro.html").read_text()
    assert "Results at a glance" in index and g["baselines"].split(";")[0] in index



def test_stlib_eval_reproduces_the_glued_primary_endpoint(smoke, capsys):
    """``stlib eval`` on the smoke run (same profile, seed and statistics) gives notebook 04's primary
    endpoint to the last digit: one evaluation, whether from the chapter or the command line."""
    import ast

    import pandas as pd

    from stlib.cli import main
    from stlib.layout import RunLayout

    g = {k: ast.literal_eval(v) for k, v in _glued(smoke["root"] / "book" / "executed" / "04_segmentation_eval.ipynb").items()}
    run = RunLayout(smoke["root"] / "runs" / "demo")
    assert main(["eval", "--run-dir", str(run.root), "--profile", str(smoke["root"] / "params" / "demo.yaml"),
                 "--manifest", str(smoke["root"] / "data_manifest.yaml")]) == 0
    pooled = pd.read_csv(run.eval_results("segmentation") / "comparison.csv", float_precision="round_trip")\
        .set_index("organ").loc["pooled"]
    assert [pooled["diff"], pooled["diff_ci_low"], pooled["diff_ci_high"], pooled["p_value"], pooled["n_clusters"]] == \
        [g["primary_diff"], g["primary_ci_low"], g["primary_ci_high"], g["primary_p"], g["primary_n_units"]]

def test_tile_store_records_mask_refinement_and_rebuilds_on_change(smoke):
    from stlib.io import cohort
    from stlib.tiles import stage

    root = smoke["root"]
    run, data = root / "runs" / "demo", root / "data" / "demo"
    ref = stage.refinement_table(run / "tiles" / "st")
    assert len(ref) >= 6 and (ref["refined"] > 0).all()
    # on the synthetic cohort the snapped masks are closer to the true nuclei than DAPI outlines
    assert ref["mask_pq_vs_truth_after"].mean() > ref["mask_pq_vs_truth_before"].mean()
    # the same store name with other parameters is rebuilt, not silently reused
    table = cohort.cohort_table(data)
    kw = dict(truth_dir=data / "truth", name="st_keycheck")
    p = stage.build_tile_stores(cohort.hest_dir(data), table, run, refine_masks=False, **kw)["st"]
    info = json.loads((p / "store.json").read_text())
    assert info["refinement"] is None
    mtime = (p / "store.json").stat().st_mtime_ns
    stage.build_tile_stores(cohort.hest_dir(data), table, run, refine_masks=False, **kw)
    assert (p / "store.json").stat().st_mtime_ns == mtime  # unchanged parameters: reused
    stage.build_tile_stores(cohort.hest_dir(data), table, run, refine_masks=True, **kw)
    assert json.loads((p / "store.json").read_text())["refinement"]["per_sample"]


def test_rerun_skips_finished_notebooks(smoke):
    root = smoke["root"]
    rep = run_profile("demo", root=root, params_dir=root / "params", build=False, log=lambda *_: None)
    assert rep.executed == [] and rep.skipped == list(NOTEBOOK_PARAMS)


def test_book_builds_with_every_chapter(smoke):
    assert smoke["book_error"] is None, smoke["book_error"]
    html = smoke["root"] / "_build" / "html"
    assert (html / "index.html").is_file()
    for name in NOTEBOOK_PARAMS:
        page = html / "book" / "executed" / f"{name}.html"
        assert page.is_file(), page
        text = page.read_text()
        if name == "07_real_tissue":  # real images and nuclei, simulated Xenium layer: it says both
            assert "REAL H&amp;E" in text or "REAL H&E" in text
            assert "SIMULATED" in text
        else:
            assert "SYNTHETIC" in text  # every chapter says which data it shows
        # papermill's injected-parameters cell (and the notebook's defaults cell) are not shown
        assert "tag_injected-parameters" not in text and "tag_parameters" not in text, name
        assert "# Parameters</span>" not in text, name
        # every code input of a results chapter sits behind a "Show code cell source" toggle
        n_inputs = text.count('class="cell_input')
        n_toggled = text.count('<details class="admonition hide above-input">')
        n_shown = text.count("tag_show-input")  # a cell its author chose to show
        assert n_toggled >= 1 and n_inputs == n_toggled + n_shown, (name, n_inputs, n_toggled, n_shown)
        assert "Show code cell source" in text, name


def _chromium() -> str | None:
    for exe in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(exe):
            return shutil.which(exe)
    return None


def test_rendered_chapters_in_headless_chromium(smoke):
    exe = _chromium()
    if exe is None:
        skip_or_fail("chromium not installed (.ci/run installs Debian's chromium)")
    assert smoke["book_error"] is None, smoke["book_error"]
    html = smoke["root"] / "_build" / "html"
    for name in NOTEBOOK_PARAMS:
        page = html / "book" / "executed" / f"{name}.html"
        proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={smoke['root'] / '.chromium'}", "--dump-dom", page.as_uri()],
                              capture_output=True, text=True, timeout=120)
        dom = proc.stdout
        assert proc.returncode == 0 and "<html" in dom, (name, proc.stderr[-500:])
        n_img = len(re.findall(r"<img[^>]+src=\"[^\"]*_images/[^\"]+\.png\"", dom))
        assert n_img >= 1, f"{name}: no figure rendered"
        assert "output error" not in dom and "ansi-red-fg" not in dom, f"{name}: an error output is shown"
        assert "tag_injected-parameters" not in dom, f"{name}: papermill's parameters cell is shown"
        assert "Show code cell source" in dom, f"{name}: no code toggle"
        for img in re.findall(r"src=\"([^\"]*_images/[^\"]+\.png)\"", dom):
            assert (page.parent / img).resolve().is_file(), f"{name}: broken image {img}"


def test_hf_token_never_appears(smoke):
    root = smoke["root"]
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and p.suffix in {".ipynb", ".html", ".log", ".json", ".txt", ".js", ".csv", ".yaml"}:
            if FAKE_TOKEN in p.read_text(errors="ignore"):
                hits.append(str(p))
    assert hits == []


def test_paper_profile_runs_on_a_local_hest_mirror(smoke, tmp_path, monkeypatch):
    """The real-data path is not dead code: notebooks 00-02 on a local mirror, network off."""
    root = smoke["root"]
    mirror = root / "data" / "demo" / "hest"
    ids = sorted(p.stem for p in (mirror / "wsis").glob("*.tif"))[:3]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    exe = tmp_path / "executed"
    rep = run_profile("paper", root=root, params_dir=REPO / "params", build=False, executed_dir=exe,
                      only=["00_data", "01_alignment", "02_labels"], log=lambda *_: None,
                      overrides={"data_dir": str(tmp_path / "hest1k"), "run_dir": str(tmp_path / "runs"),
                                 "samples": ids, "mirror": str(mirror), "offline": True, "device": "cpu"})
    assert rep.executed == ["00_data", "01_alignment", "02_labels"]
    for sid in ids:
        assert (tmp_path / "hest1k" / "hest" / "wsis" / f"{sid}.tif").is_file()
        assert (tmp_path / "runs" / "labels" / sid / "cells.parquet").is_file()
        rep_json = json.loads((tmp_path / "runs" / "labels" / sid / "label_report.json").read_text())
        assert "truth" not in rep_json  # real-data layout: no truth, CellViT as second opinion
        assert "cellvit" in rep_json
    text = " ".join(p.read_text() for p in exe.glob("*.ipynb"))
    assert "HEST-1k" in text and FAKE_TOKEN not in text


def test_paper_profile_fetches_the_annotated_sets(smoke, realdata, tmp_path, monkeypatch):
    """Notebook 00 on the paper profile puts the manifest's annotated sets (MoNuSeg, CoNSeP) under
    {data_dir}/annotations/, where chapters 4-5 read manual truth: here from the local mirror."""
    root = smoke["root"]
    mirror = root / "data" / "demo" / "hest"
    ids = sorted(p.stem for p in (mirror / "wsis").glob("*.tif"))[:1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exe = tmp_path / "executed"
    data = tmp_path / "hest1k"
    rep = run_profile("paper", root=root, params_dir=REPO / "params", build=False, executed_dir=exe,
                      only=["00_data"], log=lambda *_: None,
                      overrides={"data_dir": str(data), "run_dir": str(tmp_path / "runs"), "samples": ids,
                                 "mirror": str(mirror), "offline": True, "annotations_mirror": str(realdata)})
    assert rep.executed == ["00_data"]
    assert sorted(p.name for p in (data / "annotations").iterdir()) == ["consep", "monuseg"]
    assert len(list((data / "annotations" / "monuseg" / "images").glob("*.tif"))) == 13
    assert list((data / "annotations" / "consep" / "inst").iterdir())
