"""Fixtures every test area can use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """A directory that survives between test runs (synthetic data, downloaded rule files)."""
    path = REPO / ".cache"
    path.mkdir(exist_ok=True)
    return path
