"""Book sources: chapters are linked with {doc}/{numref}, never by a typed number.

The book numbers its chapters itself (the methods page is chapter 1, the data notebook 2, ...),
so a number typed in prose goes wrong as soon as a chapter is added or moved; `make book`
builds with -W -n, so a broken {doc} link fails the build (tests/test_notebooks.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
TYPED = re.compile(r"\b(?:[Cc]hapters?|§)\s*\d")


def _sources():
    for md in sorted((REPO / "book").glob("*.md")):
        yield md.relative_to(REPO), md.read_text()
    for nb_path in sorted((REPO / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(str(nb_path), as_version=4)
        text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        yield nb_path.relative_to(REPO), text


@pytest.mark.parametrize("path,text", list(_sources()), ids=lambda v: str(v) if isinstance(v, Path) else "")
def test_no_typed_chapter_numbers(path, text):
    hits = [m.group(0) for m in TYPED.finditer(text)]
    assert hits == [], f"{path}: link the chapter with {{doc}} instead of {hits}"


def test_the_check_catches_a_typed_number():
    assert TYPED.search("as shown in chapter 3 (labels)") and TYPED.search("Chapters 2-3")
    assert not TYPED.search("the {doc}`labels chapter <executed/02_labels>` in 2 steps")
