"""The run folder: RunLayout owns its paths; DEVELOPING.md's "Run folder" block is checked against it."""

from __future__ import annotations

import re
from pathlib import Path

from stlib.layout import RUN_LAYOUT, RunLayout, render_layout

REPO = Path(__file__).resolve().parents[1]


def _developing_block() -> str:
    text = (REPO / "DEVELOPING.md").read_text(encoding="utf-8")
    section = text.split("### Run folder (`run_dir`)", 1)[1]
    return section.split("```", 2)[1].strip("\n")


def test_developing_md_run_folder_block_is_the_layout():
    assert _developing_block() == render_layout(), (
        "DEVELOPING.md's run-folder block differs from stlib.layout.RUN_LAYOUT: paste "
        "`python -c 'from stlib.layout import render_layout; print(render_layout())'` into it")


def test_every_documented_path_is_what_its_method_returns(tmp_path):
    lay = RunLayout(tmp_path)
    args = {"{id}": "S1", "{store}": "st", "{run}": "st", "{name}": "S1"}
    for pattern, method, _ in RUN_LAYOUT:
        concrete = pattern
        for k, v in args.items():
            concrete = concrete.replace(k, v)
        seed = re.search(r"__seed\{k\}", concrete)
        concrete = concrete.replace("{k}", "2")
        attr = getattr(lay, method)
        if callable(attr):
            params = [a for k, a in args.items() if k in pattern]
            got = attr(*params[:1], 2) if seed else attr(*params[:1])
        else:
            got = attr
        assert got == tmp_path / concrete.rstrip("/"), (pattern, got)
        assert "{" not in str(got)


def test_every_public_path_method_is_documented():
    documented = {m for _, m, _ in RUN_LAYOUT}
    public = {n for n in dir(RunLayout) if not n.startswith("_") and n != "root"}
    # alignment_root / labels_dir / model_pt are the folders and files the documented paths are made of
    assert public - documented <= {"alignment_root", "alignment_dir", "labels_dir", "model_pt"}, public - documented


def test_no_stage_joins_run_folder_names_by_hand():
    """Only stlib/layout.py spells the run folder's sub-folders (``/ "labels" /`` and the like)."""
    pat = re.compile(r'/ "(alignment|labels|tiles|models|eval|infer)"')
    bad = []
    for path in sorted((REPO / "stlib").rglob("*.py")):
        if path.name == "layout.py" or "demo" in path.parts:
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pat.search(line):
                bad.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not bad, "use stlib.layout.RunLayout:\n" + "\n".join(bad)


def test_notebooks_take_run_paths_from_the_layout():
    """No notebook joins a run folder's sub-folders by hand (``Path(run_dir) / "labels"``,
    ``run / "tiles" / ...``, ``f"{run_dir}/models/..."``): they use :class:`RunLayout`."""
    import json

    pat = re.compile(r'/ "(alignment|labels|tiles|models|eval|infer)"|Path\((rt_)?run_dir\)'
                     r'|f"[^"]*\b(alignment|labels|tiles|models|eval|infer)/')
    bad = []
    notebooks = sorted((REPO / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 7
    for nb in notebooks:
        for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] == "code":
                bad += [f"{nb.name}: {line.strip()}" for line in "".join(cell["source"]).splitlines() if pat.search(line)]
    assert not bad, "use stlib.layout.RunLayout:\n" + "\n".join(bad)
    assert pat.search('x = Path(run_dir) / "labels" / sid') and pat.search('run / "tiles" / "st"')
