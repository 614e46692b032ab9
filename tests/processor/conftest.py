"""Fixtures of the processor tests: esorex, the cached synthetic calibration sets, raw frames.

The calibration sets are built once with the real calibration recipes and
cached under ``<repo>/.cache/synth/cal`` (gitignored); later sessions reuse
them through the manifest (``synth.make_calibrations``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import synth
from services.processor.esorex import find_esorex
from shared.profiles import load_profile

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def esorex_available() -> Path:
    """esorex and both pipelines; skipped locally when absent, a failure in CI."""
    exe = find_esorex()
    missing = []
    if exe is None:
        missing.append("esorex")
    for instrument in ("HAWKI", "VIMOS"):
        if load_profile(instrument).resolve_recipe_dir() is None:
            missing.append(f"{instrument} pipeline plugins")
    if missing:
        message = f"not installed: {', '.join(missing)} (apt-get install esorex cpl-plugin-hawki cpl-plugin-vimos)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    assert exe is not None
    return exe


@pytest.fixture(scope="session")
def synth_cal_root(cache_dir: Path) -> Path:
    path = cache_dir / "synth" / "cal"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def hawki_recipe_dir() -> Path:
    path = load_profile("HAWKI").resolve_recipe_dir()
    assert path is not None
    return path


@pytest.fixture(scope="session")
def vimos_recipe_dir() -> Path:
    path = load_profile("VIMOS").resolve_recipe_dir()
    assert path is not None
    return path


@pytest.fixture(scope="session")
def hawki_cal(esorex_available: Path, synth_cal_root: Path) -> synth.CalibrationSet:
    return synth.make_calibrations("HAWKI", synth_cal_root)


@pytest.fixture(scope="session")
def hawki_science_options(hawki_cal: synth.CalibrationSet) -> tuple[str, ...]:
    """hawki_science_process's options for the default set, as the processor gets them.

    The shipped profile with the set's overlay merged in (the cells the small
    synthetic windows need; see ``synth.synthetic_recipe_options``).
    """
    overlays = [hawki_cal.profile_overlay] if hawki_cal.profile_overlay is not None else []
    return load_profile("HAWKI", overlays=overlays).recipe_options.get("hawki_science_process", ())


@pytest.fixture(scope="session")
def vimos_cal(esorex_available: Path, synth_cal_root: Path) -> synth.CalibrationSet:
    return synth.make_calibrations("VIMOS", synth_cal_root)


@pytest.fixture
def hawki_raw(tmp_path: Path) -> list[Path]:
    """Three fresh HAWK-I pre-imaging frames (128² per chip, ~0.3 s to make)."""
    return synth.make_raw_frames("HAWKI", tmp_path / "raw", n_frames=3)


@pytest.fixture(scope="session")
def vimos_raw(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One VIMOS pre-imaging exposure: 4 full-size quadrant files (read-only, shared)."""
    return synth.make_raw_frames("VIMOS", tmp_path_factory.mktemp("vimos_raw"), n_frames=1)
