"""Fixtures of the integration tests: esorex and the cached synthetic calibration sets."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.processor import synth
from shared.profiles import load_profile
from tests.conftest import IN_CI


@pytest.fixture(scope="session")
def cal_root(cache_dir: Path) -> Path:
    root = cache_dir / "synth" / "cal"
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def hawki_cal(cal_root: Path, esorex_installed: None) -> Path:
    synth.make_calibrations("HAWKI", cal_root)
    return cal_root


@pytest.fixture(scope="session")
def vimos_cal(cal_root: Path, esorex_installed: None) -> Path:
    synth.make_calibrations("VIMOS", cal_root)
    return cal_root


@pytest.fixture(scope="session")
def esorex_installed() -> None:
    if shutil.which("esorex") is None or load_profile("HAWKI").resolve_recipe_dir() is None:
        if IN_CI:
            pytest.fail("esorex and the pipeline plugins must be installed in CI")
        pytest.skip("esorex is not installed")
