"""Instrument profiles: the ``.dfosrc_<instr>`` + ``config.processPreImg`` equivalents.

One TOML file per instrument lives beside this module (``hawki.toml``,
``vimos.toml``, ``fors2.toml``). ``load_profile`` validates it; a profile that
does not validate stops a service at start-up with the file and field named.
"""

from __future__ import annotations

import glob
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.messages import describe_validation_error

PROFILE_DIR = Path(__file__).parent


class ProfileError(ValueError):
    """A profile is missing or invalid; the message names the file and the field."""


class Profile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    instrument: str = Field(pattern=r"^[A-Z][A-Z0-9_]{1,15}$")
    pipe_support: bool = True
    email_note: bool = False
    email_to: tuple[str, ...] = ()
    qc_prefix: str = Field("", description="Key prefix of the instrument on the QC server")
    readme_name: str = "PRE_README.txt"
    required_tools: tuple[str, ...] = ("esorex",)
    #: Glob of the shipped OCA rule file; the first match is used.
    oca_rules: str = ""
    #: Overlay on the shipped rules, relative to this directory.
    oca_overlay: str = ""
    #: esorex plugin directory of this instrument's pipeline (glob; avoids the libcasu clash).
    recipe_dir: str = ""
    recipe_options: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    recipe_timeout_s: float = Field(900.0, gt=0)
    max_parallel_abs: int = Field(2, ge=1)
    #: The processing is for SCIENCE ABs only, as in processPreImg.
    science_actions: tuple[str, ...] = ()
    #: PRO.CATG values the calibration directories must hold although the rules
    #: do not name them (e.g. the local catalogues the CASU recipes need, ESOREX.md §4.8).
    required_calibrations: tuple[str, ...] = ()

    def resolve_rules(self) -> Path | None:
        """The rule file the profile names, or None when no package provides it."""
        if not self.oca_rules:
            return None
        hits = sorted(glob.glob(self.oca_rules))
        return Path(hits[-1]) if hits else None

    def resolve_overlay(self) -> Path | None:
        return (PROFILE_DIR / self.oca_overlay) if self.oca_overlay else None

    def resolve_recipe_dir(self) -> Path | None:
        if not self.recipe_dir:
            return None
        hits = sorted(glob.glob(self.recipe_dir))
        return Path(hits[-1]) if hits else None


def available_instruments() -> list[str]:
    return sorted(p.stem.upper() for p in PROFILE_DIR.glob("*.toml"))


def load_profile(instrument: str, directory: Path | None = None) -> Profile:
    directory = directory or PROFILE_DIR
    path = directory / f"{instrument.lower()}.toml"
    if not path.is_file():
        known = ", ".join(available_instruments()) or "none"
        raise ProfileError(f"unknown instrument {instrument!r}: no profile {path} (known: {known})")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from e
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        raise ProfileError(f"{path}: {describe_validation_error(e)}") from e
