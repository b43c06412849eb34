"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _realdata_dir() -> Path:
    env = os.environ.get("STLIB_REALDATA")
    if env:
        return Path(env)
    return REPO.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    """``../shared/realdata`` (or $STLIB_REALDATA); the test is skipped when absent."""
    path = _realdata_dir()
    if not path.is_dir():
        pytest.skip(f"real reference data not found at {path}")
    return path


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("STLIB_NO_PROGRESS", "1")
