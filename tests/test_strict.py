"""The strict mode of CI (tests/conftest.py): under STLIB_STRICT=1 nothing skips quietly.

A small test file is run in a pytest subprocess with this repository's conftest, once as a
user's clone runs it (missing prerequisites skip) and once as CI runs it (they fail).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

CASES = '''
import pytest
from conftest import skip_or_fail

def test_needs_realdata(realdata):
    assert realdata.is_dir()

def test_needs_a_browser():
    skip_or_fail("chromium not installed")

def test_plain_skip():
    pytest.skip("some reason")

def test_missing_dependency():
    pytest.importorskip("a_module_that_does_not_exist_anywhere")

@pytest.mark.xfail(reason="expected", strict=True)
def test_xfail_is_not_a_skip():
    assert False

def test_passes():
    assert True
'''


def _run(tmp_path: Path, strict: str | None) -> tuple[int, str]:
    d = tmp_path / ("strict" if strict else "plain")
    d.mkdir()
    (d / "conftest.py").write_text((HERE / "conftest.py").read_text())
    (d / "test_cases.py").write_text(CASES)
    env = {k: v for k, v in os.environ.items() if k not in ("STLIB_STRICT", "PYTEST_ADDOPTS")}
    env["STLIB_REALDATA"] = str(tmp_path / "no-such-folder")
    if strict is not None:
        env["STLIB_STRICT"] = strict
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(d)],
                          cwd=d, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_without_strict_missing_prerequisites_skip(tmp_path):
    rc, out = _run(tmp_path, None)
    assert rc == 0, out
    assert "4 skipped" in out and "1 passed" in out and "1 xfailed" in out, out


@pytest.mark.parametrize("value", ["1", "true"])
def test_under_strict_every_skip_fails(tmp_path, value):
    rc, out = _run(tmp_path, value)
    assert rc == 1, out
    for name in ("test_needs_realdata", "test_needs_a_browser", "test_plain_skip", "test_missing_dependency"):
        assert f"FAILED test_cases.py::{name}" in out or f"ERROR test_cases.py::{name}" in out, (name, out)
    assert "real reference data not found" in out and "STLIB_STRICT=1" in out
    # the final counts line (its width does not depend on the terminal, unlike the summary lines,
    # whose failure messages themselves say "skipped under STLIB_STRICT=1")
    counts = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed)\b.* in [\d.]+s", line)][-1]
    assert "1 passed" in counts and "1 xfailed" in counts and "3 failed" in counts, counts
    assert "skipped" not in counts, counts


def test_ci_entry_point_is_strict_and_fails_without_chromium():
    text = (HERE.parent / ".ci" / "run").read_text()
    assert 'export STLIB_STRICT="${STLIB_STRICT:-1}"' in text
    # a failed chromium install under strict mode stops the run (exit 1) instead of a note
    block = text[text.index("if ! have_chromium; then"):]
    assert block.index("exit 1") < block.index("make test")
