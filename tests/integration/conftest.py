"""Fixtures of the integration tests: esorex and the cached synthetic calibration sets.

Each set is built once by the real calibration recipes and cached under
``.cache/synth/`` (one set per calibration root and instrument, so the
full-size HAWK-I set has its own root). When the data of a set need recipe
options beyond the shipped profile, synth writes them into the set's profile
overlay; the fixtures export it (``PREIMG_PROFILE_OVERLAY``) for the session,
so the ``preimg run`` processes and the service clusters (``tests/backbone/cluster.py``)
the tests start pick it up as ``make demo`` does. The default 128² HAWK-I set
has one (smaller background cells); the full-size set needs none.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

import synth
from shared.profiles import OVERLAY_ENV, load_profile
from tests.conftest import IN_CI

T = TypeVar("T")

#: Where the full-size HAWK-I set (4 x 2048² masters, about 200 MB) is cached.
FULLSIZE_CAL = Path("synth") / "cal-hawki-2048"


@pytest.fixture(scope="session")
def cal_root(cache_dir: Path) -> Path:
    root = cache_dir / "synth" / "cal"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _exported(cal: synth.CalibrationSet, value: T) -> Iterator[T]:
    """Yield ``value`` with the set's profile overlay (if it has one) exported meanwhile."""
    if cal.profile_overlay is None:
        yield value
        return
    with pytest.MonkeyPatch.context() as mp:
        present = [p for p in os.environ.get(OVERLAY_ENV, "").split(os.pathsep) if p]
        mp.setenv(OVERLAY_ENV, os.pathsep.join([*present, str(cal.profile_overlay)]))
        yield value


@pytest.fixture(scope="session")
def hawki_cal(cal_root: Path, esorex_installed: None) -> Iterator[Path]:
    """The calibration root holding the default (128² per chip) HAWK-I set."""
    yield from _exported(synth.make_calibrations("HAWKI", cal_root), cal_root)


@pytest.fixture(scope="session")
def vimos_cal(cal_root: Path, esorex_installed: None) -> Iterator[Path]:
    yield from _exported(synth.make_calibrations("VIMOS", cal_root), cal_root)


@pytest.fixture(scope="session")
def hawki_fullsize_cal(cache_dir: Path, esorex_installed: None) -> Iterator[synth.CalibrationSet]:
    """The full-size HAWK-I set (4 x 2048² per master), about 25 s to build, then reused."""
    cal = synth.make_calibrations("HAWKI", cache_dir / FULLSIZE_CAL, size=synth.HAWKI_CHIP)
    yield from _exported(cal, cal)


@pytest.fixture(scope="session")
def esorex_installed() -> None:
    if shutil.which("esorex") is None or load_profile("HAWKI").resolve_recipe_dir() is None:
        if IN_CI:
            pytest.fail("esorex and the pipeline plugins must be installed in CI")
        pytest.skip("esorex is not installed")
