"""One config per stage: its defaults are what the CLI, the notebooks and the cache keys see.

The central test changes defaults in a copy of ``stlib/config.py`` and checks, in a fresh
interpreter, that the generated ``--help`` and parsed options, the notebooks' papermill
parameters (``load_params``), ``stlib run --show-config`` and the stages' cache keys follow.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from stlib import align, config
from stlib.cli import main
from stlib.config import (NOTEBOOK_PARAMS, AlignConfig, LabelsConfig, NeoplasticConfig, TilesConfig, TrainRecipe,
                          config_from_args, stage_config, with_options)
from stlib.labels import derive
from stlib.tiles import stage
from stlib.utils import InputError

REPO = Path(__file__).resolve().parents[1]

#: (the default's source text in stlib/config.py, its replacement): three stages, one nested config
CHANGES = [("    tile_um: float = _opt(100.0,", "    tile_um: float = _opt(80.0,"),
           ("    low: float = _opt(0.4,", "    low: float = _opt(0.35,"),
           ("    grow_um: float = _opt(1.5,", "    grow_um: float = _opt(1.25,"),
           ("    lr: float = _opt(1e-3,", "    lr: float = _opt(2e-3,"),
           ("    n_bootstrap: int = _opt(1000,", "    n_bootstrap: int = _opt(900,")]

PROBE = r"""
import argparse, contextlib, io, json, sys
import yaml
from stlib import align, config
from stlib.cli import main
from stlib.labels import derive
from stlib.tiles import stage

def help_of(*cmd):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main([*cmd, "--help"])
    return " ".join(buf.getvalue().split())

req = ["--hest-dir", "h", "--sample", "S1", "--run-dir", "r"]
a = config.config_from_args(config.AlignConfig, align.cli_parser().parse_args(req))
largs = derive.cli_parser().parse_args(req)
lab = config.config_from_args(config.LabelsConfig, largs)
til = config.config_from_args(config.TilesConfig, stage.cli_parser().parse_args(["build", *req]))
shown = yaml.safe_load(io.StringIO(config.show_config("demo")))
print(json.dumps({
    "align_help": "--tile-um X edge of a scoring / phase-correlation tile (µm) (default: 80.0)" in help_of("align"),
    "labels_help": "(default: 0.35)" in help_of("labels"),
    "tiles_help": "(default: 1.25)" in help_of("tiles", "build"),
    "eval_help": "(slides/images, then tiles) (default: 900)" in help_of("eval"),
    "eval_cli": config.config_from_args(config.EvalConfig, __import__("stlib.evaluate").evaluate.cli_parser()
                                        .parse_args(["--run-dir", "r"])).n_bootstrap,
    "eval_notebooks": [config.notebook_defaults(nb)["n_bootstrap"] for nb in ("04_segmentation_eval", "05_classification_eval")],
    "cli": [a.tile_um, lab.neoplastic.low, til.refinement.grow_um],
    "notebooks": [config.load_params("demo", "01_alignment")["tile_um"],
                  config.load_params("demo", "02_labels")["neoplastic"]["low"],
                  config.load_params("demo", "02_labels")["refinement"]["grow_um"],
                  config.load_params("demo", "03_training")["lr"]],
    "show_config": [shown["align"]["tile_um"], shown["labels"]["neoplastic"]["low"],
                    shown["tiles"]["refinement"]["grow_um"], shown["train"]["lr"]],
    "keys": [align.alignment_key(sys.argv[1], "S1", config.AlignConfig()),
             derive.labels_key(config.LabelsConfig()),
             stage.tiles_key(config.TilesConfig())],
}))
"""


def _probe(tmp: Path, changes: list[tuple[str, str]]) -> dict:
    src = tmp / "src"
    shutil.copytree(REPO / "stlib", src / "stlib", ignore=shutil.ignore_patterns("__pycache__"))
    cfg = src / "stlib" / "config.py"
    text = cfg.read_text(encoding="utf-8")
    for old, new in changes:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    cfg.write_text(text, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(src)}  # -P below: the copy, not the checkout in cwd
    out = subprocess.run([sys.executable, "-P", "-c", PROBE, str(tmp / "no_hest")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_changed_default_reaches_cli_notebooks_show_config_and_cache_keys(tmp_path):
    before = _probe(tmp_path / "before", [])
    after = _probe(tmp_path / "after", CHANGES)
    assert before["cli"] == [100.0, 0.4, 1.5] and after["cli"] == [80.0, 0.35, 1.25]
    assert after["align_help"] and after["labels_help"] and after["tiles_help"]
    assert not before["align_help"] and not before["labels_help"] and not before["tiles_help"]
    assert after["eval_help"] and not before["eval_help"]  # stlib eval: options from EvalConfig
    assert before["eval_cli"] == 1000 and after["eval_cli"] == 900
    # the parameters of both evaluation notebooks (a profile's block overrides them)
    assert before["eval_notebooks"] == [1000, 1000] and after["eval_notebooks"] == [900, 900]
    assert before["notebooks"] == [100.0, 0.4, 1.5, 1e-3] and after["notebooks"] == [80.0, 0.35, 1.25, 2e-3]
    assert before["show_config"] == before["notebooks"] and after["show_config"] == after["notebooks"]
    # every stage's cache key moves with its config's default
    assert all(b != a for b, a in zip(before["keys"], after["keys"])), (before["keys"], after["keys"])


def test_cache_keys_see_every_field():
    base_a, base_l, base_t = (align.alignment_key(REPO / "none", "S1", AlignConfig()),
                              derive.labels_key(LabelsConfig()), stage.tiles_key(TilesConfig()))
    assert align.alignment_key(REPO / "none", "S1", AlignConfig(min_nuclei=9)) != base_a
    assert derive.labels_key(LabelsConfig(neoplastic=NeoplasticConfig(smooth_neighbors=9))) != base_l
    assert stage.tiles_key(TilesConfig(val_fraction=0.3)) != base_t
    assert stage.tiles_key(TilesConfig(refinement=config.RefineConfig(grow_um=2.0))) != base_t
    assert derive.labels_key(LabelsConfig()) == base_l  # and is stable


def test_notebook_parameter_cells_hold_the_config_defaults():
    """A notebook opened by hand runs with the defaults of stlib/config.py (papermill overrides them all)."""
    for nb in NOTEBOOK_PARAMS:
        doc = json.loads((REPO / "notebooks" / f"{nb}.ipynb").read_text(encoding="utf-8"))
        cell = next(c for c in doc["cells"] if "parameters" in c["metadata"].get("tags", []))
        values = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse("".join(cell["source"])).body}
        assert values == config.notebook_defaults(nb), (
            f"{nb}: the parameters cell differs from stlib.config; its lines are "
            f"config.parameters_cell_source({nb!r})")


def _stdout(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        rc = main(argv)
        assert rc == 0
    return buf.getvalue()


def _recipes(node, found):
    if isinstance(node, dict):
        if {"steps", "batch_size", "lr"} <= set(node):
            found.append(node)
        for v in node.values():
            _recipes(v, found)
    return found


def test_show_config_paper_prints_every_stage_and_one_training_recipe():
    shown = yaml.safe_load(_stdout(["run", "--profile", "paper", "--show-config"]))
    assert list(shown) == ["align", "labels", "tiles", "train", "eval", "infer"]
    recipes = _recipes(shown, [])
    assert len(recipes) == 1, recipes
    block = yaml.safe_load((REPO / "params" / "paper.yaml").read_text())["03_training"]
    assert {k: recipes[0][k] for k in block} == block  # the profile's block, resolved over the defaults
    assert set(recipes[0]) == {f.name for f in fields(TrainRecipe)}


def _tiles_build_parser():
    """The ``build`` sub-command's parser of ``stlib tiles``."""
    import argparse

    sub = next(a for a in stage.cli_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["build"]


def test_generated_options_cover_every_field():
    def opts(parser):
        return {o for a in parser._actions for o in a.option_strings}

    a = opts(align.cli_parser())
    assert {f"--{f.name.replace('_', '-')}" for f in fields(AlignConfig)} <= a
    assert {"--refine", "--no-refine", "--run-dir"} <= a
    lab = opts(derive.cli_parser())
    want = {f"--{f.name.replace('_', '-')}" for f in fields(LabelsConfig) if f.name != "neoplastic"}
    want |= {f"--neoplastic-{f.name.replace('_', '-')}" for f in fields(NeoplasticConfig)}
    want |= {"--run-dir", "--align"}
    assert want <= lab, want - lab
    # the tile stores are the next stage (stlib tiles build), not an option of stlib labels
    assert not {"--tiles", "--tile-px", "--refine-masks"} & lab
    til = opts(_tiles_build_parser())
    want = {f"--{f.name.replace('_', '-')}" for f in fields(TilesConfig) if f.name != "refinement"}
    want |= {f"--refinement-{f.name.replace('_', '-')}" for f in fields(config.RefineConfig)}
    want |= {"--refine-masks", "--no-refine-masks", "--run-dir", "--profile", "--truth-dir", "--workers"}
    assert want <= til, want - til


def test_options_and_profile_reach_the_config():
    req = ["--hest-dir", "h", "--sample", "S1", "--run-dir", "r"]
    args = align.cli_parser().parse_args([*req, "--no-refine", "--tile-um", "60", "--grid-um", "20"])
    assert config_from_args(AlignConfig, args) == AlignConfig(refine=False, tile_um=60.0, grid_um=20.0)
    args = derive.cli_parser().parse_args([*req, "--labeler", "flat", "--neoplastic-weights", "1", "0", "0",
                                           "--no-neoplastic-use-cnv"])
    lab = config_from_args(LabelsConfig, args)
    assert lab.labeler == "flat" and lab.neoplastic.weights == (1.0, 0.0, 0.0) and lab.neoplastic.use_cnv is False
    args = stage.cli_parser().parse_args(["build", *req, "--tile-px", "128", "--no-refine-masks", "--seed", "3",
                                          "--refinement-grow-um", "2"])
    til = config_from_args(TilesConfig, args)
    assert til.tile_px == 128 and til.refine_masks is False and til.seed == 3 and til.refinement.grow_um == 2.0
    assert config_from_args(TilesConfig, stage.cli_parser().parse_args(["build", *req])) == TilesConfig()
    paper_tiles = stage_config("paper", "tiles")
    assert config_from_args(TilesConfig, stage.cli_parser().parse_args(["build", *req]), base=paper_tiles) == paper_tiles
    # a profile is the base, options override it
    paper = stage_config("paper", "align")
    assert config_from_args(AlignConfig, align.cli_parser().parse_args(req), base=paper) == paper
    with pytest.raises(SystemExit):
        derive.cli_parser().parse_args([*req, "--labeler", "nonsense"])


def test_yaml_block_is_the_config(tmp_path):
    doc = yaml.safe_load((REPO / "params" / "demo.yaml").read_text())
    doc["02_labels"].update({"neoplastic": {"low": 0.3, "weights": [1, 0, 1]}, "refinement": {"grow_um": 2}})
    doc["01_alignment"]["grid_um"] = 40
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    lab = stage_config(str(path), "labels")
    assert lab.neoplastic.low == 0.3 and lab.neoplastic.weights == (1.0, 0.0, 1.0) and lab.neoplastic.high == 0.6
    assert stage_config(str(path), "tiles").refinement.grow_um == 2.0
    assert stage_config(str(path), "align").grid_um == 40.0
    for bad, match in [({"neoplastic": {"lowww": 0.3}}, "lowww"), ({"neoplastic": {"low": "x"}}, "low"),
                       ({"neoplastic": {"low": 0.9}}, "low <= high"), ({"neoplastic": 3}, "mapping")]:
        doc2 = yaml.safe_load(yaml.safe_dump(doc))
        doc2["02_labels"].update(bad)
        path.write_text(yaml.safe_dump(doc2))
        with pytest.raises(InputError, match=match):
            stage_config(str(path), "labels")


def test_keyword_options_are_thin_overrides():
    cfg = AlignConfig(tile_um=60.0)
    assert with_options(AlignConfig, cfg, {"refine": False}) == AlignConfig(tile_um=60.0, refine=False)
    assert with_options(AlignConfig, None, {}) == AlignConfig()
    with pytest.raises(TypeError, match="tile_mu"):
        with_options(AlignConfig, cfg, {"tile_mu": 1.0})
    with pytest.raises(TypeError):
        with_options(AlignConfig, LabelsConfig(), {})


def test_labels_never_realign_silently(small_cohort, tmp_path):
    """A run without the sample's alignment: a clear error naming the path and the command, nothing written."""
    from stlib.io.cohort import hest_dir
    from stlib.layout import RunLayout

    sid = "DEMO_BREAST_1"
    with pytest.raises(InputError, match="stlib align") as e:
        derive.derive_sample(hest_dir(small_cohort), sid, tmp_path / "run")
    assert str(RunLayout(tmp_path / "run").alignment_json(sid)) in str(e.value)
    assert not (tmp_path / "run").exists()
    rc = main(["labels", "--hest-dir", str(hest_dir(small_cohort)), "--sample", sid, "--run-dir", str(tmp_path / "r")])
    assert rc == 1 and not (tmp_path / "r").exists()


def test_train_options_are_the_recipe_and_reach_the_run_config(tmp_path):
    from stlib.train.cli import cli_parser, config_from_cli
    from stlib.train.config import TrainConfig

    opts = {o for a in cli_parser()._actions for o in a.option_strings}
    assert {f"--{f.name.replace('_', '-')}" for f in fields(TrainRecipe) if f.name not in ("recipes", "n_seeds")} <= opts
    paper = stage_config("paper", "train")
    cfg = config_from_cli(cli_parser().parse_args(["--profile", "paper"]))
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.encoder) == (paper.steps, paper.batch_size, paper.lr, paper.encoder)
    cfg = config_from_cli(cli_parser().parse_args(["--profile", "paper", "--steps", "7", "--run-dir", str(tmp_path),
                                                   "--run", "pannuke", "--seed-index", "1", "--nt-confidence"]))
    assert cfg.steps == 7 and cfg.run_dir == str(tmp_path) and cfg.seed == paper.seed + 1000
    assert cfg.out_dir == "models/pannuke__seed1" and cfg.loss.nt_confidence is True
    path = tmp_path / "c.yaml"
    TrainConfig(steps=5).to_yaml(path)
    cfg = config_from_cli(cli_parser().parse_args(["--config", str(path), "--lr", "0.5", "--nt-confidence"]))
    assert cfg.steps == 5 and cfg.lr == 0.5 and cfg.loss.nt_confidence is True


def test_train_config_recipe_defaults_are_the_recipe():
    """TrainConfig (one run) takes the recipe part of its defaults from TrainRecipe, not from a copy."""
    from stlib.train.config import TrainConfig

    run, recipe = TrainConfig(), TrainRecipe()
    shared = [f.name for f in fields(TrainRecipe) if hasattr(run, f.name) and f.name not in ("recipes", "n_seeds")]
    assert len(shared) >= 10
    assert {k: getattr(run, k) for k in shared} == {k: getattr(recipe, k) for k in shared}


def test_infer_options_are_the_infer_config(tmp_path):
    from stlib.infer.cli import cli_parser

    p = cli_parser()
    opts = {o for a in p._actions for o in a.option_strings}
    assert {f"--{f.name.replace('_', '-')}" for f in fields(config.InferConfig)} <= opts
    assert {"--no-amp", "--no-tissue-detection", "--run-dir", "--out"} <= opts
    args = p.parse_args(["--model", "m.pt", "--input", "x.png", "--run-dir", str(tmp_path), "--no-amp",
                         "--batch-size", "2", "--workers", "0"])
    cfg = config_from_args(config.InferConfig, args)
    assert cfg == config.InferConfig(amp=False, batch_size=2, workers=0)


def test_align_labels_then_tiles_share_the_run_folder(small_cohort, tmp_path, capsys):
    """`stlib align --run-dir R` writes where `stlib labels --run-dir R` reads, and `stlib tiles build
    --run-dir R` reads both; the options reach the outputs."""
    from stlib.io.cohort import hest_dir
    from stlib.layout import RunLayout
    from stlib.utils import read_json

    sid, run = "DEMO_BOWEL_1", RunLayout(tmp_path / "run")
    common = ["--hest-dir", str(hest_dir(small_cohort)), "--sample", sid, "--run-dir", str(run.root)]
    assert main(["align", *common, "--profile", "demo", "--tile-um", "80"]) == 0
    assert read_json(run.alignment_json(sid))["params"]["tile_um"] == 80.0
    assert main(["labels", *common, "--neighbors-method", "gauss", "--min-confidence", "0.4"]) == 0
    report = read_json(run.label_report(sid))
    assert report["params"]["min_confidence"] == 0.4 and report["params"]["neighbors_method"] == "gauss"
    assert f"-> {run.labels_dir(sid)}" in capsys.readouterr().out
    assert not run.tiles_dir("st").exists()  # stlib labels builds no tile store
    assert main(["tiles", "build", *common, "--tile-px", "128", "--no-refine-masks", "--workers", "1"]) == 0
    store = read_json(run.tiles_dir("st") / "store.json")
    assert store["tile_px"] == 128 and store["refinement"] is None
    assert str(run.tiles_dir("st")) in capsys.readouterr().out
    # unchanged options: the labels are reused (same cache key), a changed one recomputes them
    mtime = run.cells_parquet(sid).stat().st_mtime_ns
    assert main(["labels", *common, "--neighbors-method", "gauss", "--min-confidence", "0.4"]) == 0
    assert run.cells_parquet(sid).stat().st_mtime_ns == mtime
    assert main(["labels", *common, "--neighbors-method", "gauss", "--min-confidence", "0.5"]) == 0
    assert read_json(run.label_report(sid))["params"]["min_confidence"] == 0.5
