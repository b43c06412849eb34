"""Shared pytest fixtures, and the strict mode of CI.

``STLIB_STRICT=1`` (set by ``.ci/run``) turns every skip into a failure: in CI a missing
prerequisite (``../shared/realdata``, Chromium for the rendered-book check, a dependency)
must fail the run loudly instead of quietly testing less. Without it (a user's clone) tests
that need such a prerequisite skip and say why.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: true when skips must fail (CI): ``STLIB_STRICT`` set to anything but "", "0", "false", "no"
STRICT = os.environ.get("STLIB_STRICT", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip the calling test with ``reason``; under ``STLIB_STRICT=1`` fail it instead."""
    if STRICT:
        pytest.fail(f"{reason} [STLIB_STRICT=1: a missing prerequisite fails the run]", pytrace=False)
    pytest.skip(reason)


def _realdata_dir() -> Path:
    env = os.environ.get("STLIB_REALDATA")
    if env:
        return Path(env)
    return REPO.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    """``../shared/realdata`` (or $STLIB_REALDATA); skipped when absent (failed under STLIB_STRICT)."""
    path = _realdata_dir()
    if not path.is_dir():
        skip_or_fail(f"real reference data not found at {path}")
    return path


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("STLIB_NO_PROGRESS", "1")


# ----------------------------------------------------------------------------- strict mode
# Any other skip (a skip mark, an importorskip of a dependency, a skip inside a test) is a
# failure under STLIB_STRICT too: "no test is skipped in CI" holds by construction.

def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if STRICT and rep.skipped and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        rep.longrepr = f"{item.nodeid}: skipped under STLIB_STRICT=1 ({_skip_reason(rep.longrepr)})"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if STRICT and rep.skipped:
        rep.outcome = "failed"
        rep.longrepr = f"{collector.nodeid}: module skipped under STLIB_STRICT=1 ({_skip_reason(rep.longrepr)})"


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory) -> Path:
    """Six 640-px demo samples (every organ, two held out), no PanNuke, no raw bundle.

    Shared by the property tests of label derivation and alignment (tests/test_derive.py,
    tests/test_align_demo.py); large enough for the labeler's clustering (~200-300 cells a
    sample), small enough to generate in a few seconds.
    """
    from stlib.demo import make_cohort

    root = tmp_path_factory.mktemp("small_cohort") / "data"
    make_cohort(root, seed=3, image_px=640, pannuke_per_fold=0, raw_bundles=0)
    return root
