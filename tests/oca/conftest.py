"""Fixtures of the OCA tests: Debian's rule files and synthetic FITS headers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from shared.oca import load_rules

REPO = Path(__file__).resolve().parents[2]
PIPELINES = ("hawki", "vimos", "amber", "giraf", "muse", "naco", "uves", "visir")
PROFILES = REPO / "shared" / "profiles"


@pytest.fixture(scope="session")
def oca_rules_dir() -> Path:
    """``.cache/oca-rules`` with the eight shipped rule files; fetched when missing."""
    dest = REPO / ".cache" / "oca-rules"
    if not all((dest / f"{p}.oca").is_file() for p in PIPELINES):
        done = subprocess.run(
            [str(REPO / "scripts" / "fetch-oca-rules.sh"), str(dest)],
            capture_output=True, text=True, timeout=300, check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"fetch-oca-rules.sh failed: {done.stderr[-2000:]}")
    return dest


@pytest.fixture(scope="session")
def hawki_shipped(oca_rules_dir: Path):
    return load_rules(oca_rules_dir / "hawki.oca")


@pytest.fixture(scope="session")
def hawki_rules(oca_rules_dir: Path):
    return load_rules(oca_rules_dir / "hawki.oca", PROFILES / "hawki_overlay.oca")


@pytest.fixture(scope="session")
def vimos_shipped(oca_rules_dir: Path):
    return load_rules(oca_rules_dir / "vimos.oca")


@pytest.fixture(scope="session")
def vimos_rules(oca_rules_dir: Path):
    return load_rules(oca_rules_dir / "vimos.oca", PROFILES / "vimos_overlay.oca")


def write_fits(path: Path, cards: dict) -> Path:
    """A data-less primary HDU with the given cards (dotted names become HIERARCH ESO)."""
    from astropy.io import fits

    header = fits.Header()
    for key, value in cards.items():
        name = f"HIERARCH ESO {key.replace('.', ' ')}" if "." in key else key
        header[name] = value
    fits.PrimaryHDU(header=header).writeto(path, overwrite=True)
    return path


#: Reflex workflow rules from the pipelines' source packages (tests/oca/fetch-reflex-rules.sh).
REFLEX_RULES = ("hawki_hawki.oca", "muse_muse_wkf.oca", "muse_muse_wkf_zap.oca",
                "uves_uves_fibre.oca", "uves_uves_wkf.oca", "uves_uves_wkf_onlydflats.oca")


@pytest.fixture(scope="session")
def reflex_rules_dir() -> Path:
    """``.cache/oca-reflex`` with ESO's Reflex rule files; fetched when missing."""
    dest = REPO / ".cache" / "oca-reflex"
    if not all((dest / name).is_file() for name in REFLEX_RULES):
        done = subprocess.run(
            [str(REPO / "tests" / "oca" / "fetch-reflex-rules.sh"), str(dest)],
            capture_output=True, text=True, timeout=600, check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"fetch-reflex-rules.sh failed: {done.stderr[-2000:]}")
    return dest
