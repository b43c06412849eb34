"""Structure of the library: the stage order of DEVELOPING.md and the length of functions.

Both are read from the source with :mod:`ast` (nothing is imported), so a new module or a new
import is checked as soon as it is written.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "stlib"

#: The layers of DEVELOPING.md ("module contracts"), lowest first. A name ending in ``.*`` covers
#: a package's modules. Inside a layer, ``then`` in DEVELOPING.md orders modules too: those
#: carry a fraction (5.5; 7 to 7.8 for the steps of ``stlib.train`` and ``stlib.infer``, the package
#: itself at the layer of its last step, since it re-exports them). A module may import its own
#: layer and the layers above it.
LAYERS: dict[str, float] = {
    "stlib": 1, "stlib.constants": 1, "stlib.utils": 1, "stlib.config": 1, "stlib.layout": 1, "stlib.data": 1, "stlib.data.*": 1,
    "stlib.io": 2, "stlib.io.*": 2, "stlib.metrics": 2,
    "stlib.demo": 3, "stlib.demo.*": 3,
    "stlib.align": 4, "stlib._align_kernels": 4,
    "stlib.labels": 5, "stlib.labels.masks": 5, "stlib.labels.refine": 5, "stlib.labels._refine_kernels": 5,
    "stlib.labels.celltypes": 5, "stlib.labels.classes": 5,
    "stlib.labels.derive": 5.5,
    "stlib.tiles": 5.7, "stlib.tiles.*": 5.7,
    "stlib.model": 6, "stlib.model.net": 6, "stlib.model.losses": 6, "stlib.model.postproc": 6,
    "stlib.model.baseline": 6, "stlib.model.stain": 6,
    "stlib.train.config": 7, "stlib.train.data": 7, "stlib.train.augment": 7, "stlib.train.checkpoint": 7.1,
    "stlib.train.loop": 7.2, "stlib.train.study": 7.3, "stlib.train.cli": 7.4, "stlib.train.__main__": 7.4,
    "stlib.train": 7.4,
    "stlib.infer.engine": 7.5, "stlib.infer.slide": 7.6, "stlib.infer.writers": 7.7, "stlib.infer.cli": 7.8,
    "stlib.infer": 7.8, "stlib.evaluate": 7.8, "stlib.robustness": 7.8, "stlib.realtissue": 7.8,
    "stlib.plot": 8, "stlib.run": 8, "stlib.lab": 8, "stlib.bench": 8, "stlib.bench_slide": 8,
    "stlib.gpu_check": 8, "stlib.cli": 8,
}

#: The longest a function of ``stlib`` may be (lines from ``def`` to its last line).
MAX_FUNCTION_LINES = 120


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _layer(name: str) -> float | None:
    if name in LAYERS:
        return LAYERS[name]
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        star = ".".join(parts[:k]) + ".*"
        if star in LAYERS:
            return LAYERS[star]
    return None


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) of every ``stlib`` module imported anywhere in the file (lazy imports too)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "stlib"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "stlib":
                continue
            # `from stlib.labels import derive` imports the module stlib.labels.derive
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
            out += [(node.lineno, s) for s in subs] or [(node.lineno, mod)]
    return out


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if _layer(m) is None]
    assert not missing, f"modules without a layer (add them to DEVELOPING.md and LAYERS here): {missing}"


def test_layers_are_the_ones_developing_md_lists():
    text = (REPO / "DEVELOPING.md").read_text(encoding="utf-8")
    contract = text.split("## On-disk layouts")[0]
    named = set(re.findall(r"`(stlib(?:\.[A-Za-z_]\w*)*(?:\.\*)?)`", contract))
    for name in LAYERS:
        if name in ("stlib", "stlib.data", "stlib.data.*", "stlib.io", "stlib.labels", "stlib.model"):
            continue  # packages (and the data files' package) are not stages
        assert name in named or name.removesuffix(".*") in named, \
            f"{name} is a layer here but DEVELOPING.md's contract does not name it"


def test_no_module_imports_a_later_stage():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        mine = _layer(name)
        for line, imported in _imports(path, modules):
            theirs = _layer(imported)
            assert theirs is not None, f"{path}:{line} imports {imported}, which has no layer"
            if theirs > mine:
                bad.append(f"{path.relative_to(REPO)}:{line} ({name}, layer {mine}) imports {imported} (layer {theirs})")
    assert not bad, "imports from a later stage:\n" + "\n".join(bad)


def test_checker_sees_lazy_and_relative_imports(tmp_path):
    """The import scan finds imports inside functions and resolves relative ones."""
    pkg = tmp_path / "stlib" / "labels"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def f():\n    from stlib import evaluate\n    from ..train import train\n    from . import derive\n")
    global REPO
    old = REPO
    REPO = tmp_path
    try:
        found = [m for _, m in _imports(f, {"stlib.evaluate": f, "stlib.labels.derive": f})]
    finally:
        REPO = old
    assert found == ["stlib.evaluate", "stlib.train", "stlib.labels.derive"]


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


#: Functions still over the limit, each with the reason it is not split yet. Keep this empty;
#: the test fails when a listed function has been brought under the limit (remove it then).
PENDING: dict[str, str] = {
}


def test_no_function_is_longer_than_the_limit():
    long = {}
    for name, path in _modules().items():
        for fn in _functions(ast.parse(path.read_text(encoding="utf-8"))):
            n = fn.end_lineno - fn.lineno + 1
            if n > MAX_FUNCTION_LINES:
                long[f"{name}.{fn.name}"] = n
    over = {k: v for k, v in long.items() if k not in PENDING}
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {over}"
    fixed = sorted(set(PENDING) - set(long))
    assert not fixed, f"no longer over the limit, remove from PENDING: {fixed}"


@pytest.mark.parametrize("source, n", [("def f():\n" + "    x = 1\n" * 130, 131), ("def g():\n    pass\n", 2)])
def test_length_counts_def_to_last_line(source, n):
    (fn,) = _functions(ast.parse(source))
    assert fn.end_lineno - fn.lineno + 1 == n


def test_plots_read_no_data():
    """stlib.plot draws what it is given: it imports no reader and opens no file."""
    tree = ast.parse((PKG / "plot.py").read_text(encoding="utf-8"))
    imported = [m for _, m in _imports(PKG / "plot.py", _modules())]
    assert set(imported) <= {"stlib.constants"}, imported
    calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
             for n in ast.walk(tree) if isinstance(n, ast.Call)}
    readers = {c for c in calls if c.startswith("read_") or c in ("open", "open_wsi", "imread", "load")}
    assert not readers, readers
