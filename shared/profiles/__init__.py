"""Instrument profiles: the ``.dfosrc_<instr>`` + ``config.processPreImg`` equivalents.

One TOML file per instrument lives beside this module (``hawki.toml``,
``vimos.toml``, ``fors2.toml``). ``load_profile`` validates it; a profile that
does not validate stops a service at start-up with the file and field named.

The shipped profiles are the operational ones: the recipes run with the
pipeline's default parameters. Settings that only test data need (e.g. the
smaller background cells of small synthetic HAWK-I windows) live in a
**profile overlay** beside that data, a TOML file naming its instrument and
the fields it changes::

    instrument = "HAWKI"
    [recipe_options]
    hawki_science_process = ["--psm_nbsize=32", "--stk_cat_nbsize=32"]

Overlays are applied only when asked for: ``load_profile(..., overlays=[...])``
or the environment variable ``PREIMG_PROFILE_OVERLAY`` (paths separated by
``:``), read at each call. A validated profile is kept per process and read
again when its file or an overlay changes (inode, size or mtime). An overlay for another instrument is skipped, so
one list can serve several instruments. Tables (``recipe_options``) are merged
key by key, other fields replaced. ``Profile.overlays`` names the files applied.

What makes a recipe run SUCCESSFUL beyond rc 0 and no ``[ ERROR ]`` line is
configuration too: ``[recipe_checks.<recipe>]`` lists the PRO.CATG values the
run must have written and, optionally, one product per exposure::

    [recipe_checks.vimos_ima_science]
    expected_products = ["BASIC_CALIBRATED_SCI", "JITTERED_IMAGE_SCI"]
    per_exposure = {raw_tag = "OBJECT", files = 4, product = "BASIC_CALIBRATED_SCI"}

A recipe the profile has no check for has no expected products; ``preimg
check`` warns about every SCIENCE recipe of the rules without one. (The
calibration recipes only ``preimg synth`` runs keep their checks in ``synth``.)
"""

from __future__ import annotations

import glob
import logging
import os
import tomllib
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from shared.files import Stamp, reuse_while_unchanged
from shared.layout import INSTRUMENT_PATTERN
from shared.messages import describe_validation_error

_log = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).parent
#: Environment variable naming profile overlays (``os.pathsep``-separated TOML files).
OVERLAY_ENV = "PREIMG_PROFILE_OVERLAY"
_announced: set[tuple[str, str]] = set()


class ProfileError(ValueError):
    """A profile is missing or invalid; the message names the file and the field."""


#: A PRO.CATG value (``BASIC_CALIBRATED_SCI``) or a SOF tag (``OBJECT``).
Category = Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9_]*$")]
#: A recipe name (``hawki_science_process``).
RecipeName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")]


class PerExposure(BaseModel):
    """One ``product`` per exposure: ``files`` raw files tagged ``raw_tag`` in the SOF make one exposure.

    VIMOS writes one file per quadrant, so 4 OBJECT files are one exposure.
    Without LST the VIMOS recipe silently processes only the first exposure
    (ESOREX.md §4.6); this check turns that into a failure.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    raw_tag: Category
    files: int = Field(1, ge=1)
    product: Category


class RecipeCheck(BaseModel):
    """What a recipe must have written for a run with rc 0 and no errors to count as SUCCESSFUL.

    ``expected_products`` are the PRO.CATG values the reports and the PI need;
    optional products (e.g. MEAN_SKY, written only when a sky is made) are not
    listed. A recipe without a check has no expected products: rc 0 and no
    ``[ ERROR ]`` line are then enough (``preimg check`` warns about it).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    expected_products: frozenset[Category] = frozenset()
    per_exposure: PerExposure | None = None


class QcRange(BaseModel):
    """A key QC value of the run page and the monitor's trends, and the range it should lie in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str
    #: The product whose header carries it (every chip's value is averaged); empty: any product.
    pro_catg: str = ""
    min: float | None = None
    max: float | None = None


class Profile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    instrument: str = Field(pattern=INSTRUMENT_PATTERN)
    pipe_support: bool = True
    email_note: bool = False
    email_to: tuple[str, ...] = ()
    qc_prefix: str = Field("", description="Key prefix of the instrument on the QC server")
    readme_name: str = "PRE_README.txt"
    required_tools: tuple[str, ...] = ("esorex",)
    #: Glob of the OCA rule file; the first match is used. A ``.h`` entry file (DFOS's
    #: preprocessed rule sets) is run through a C preprocessor; a ``.RLS`` is parsed as it is.
    oca_rules: str = ""
    #: Overlay on the shipped rules, relative to this directory.
    oca_overlay: str = ""
    #: Include path of a preprocessed rule set (relative to this directory, or absolute).
    oca_include_dirs: tuple[str, ...] = ()
    #: Macros defined for a preprocessed rule set (``-D NAME=VALUE``).
    oca_defines: dict[str, str | int] = Field(default_factory=dict)
    #: Time the association matches on: DFOS's MJD-OBS_MOD (MJD-OBS + EXPTIME/2) or plain MJD-OBS.
    oca_time_match: str = Field("MJD-OBS_MOD", pattern="^(MJD-OBS_MOD|MJD-OBS)$")
    #: esorex plugin directory of this instrument's pipeline (glob; avoids the libcasu clash).
    recipe_dir: str = ""
    recipe_options: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    #: Per recipe, the products a successful run must have written (``[recipe_checks.<recipe>]``).
    recipe_checks: dict[RecipeName, RecipeCheck] = Field(default_factory=dict)
    recipe_timeout_s: float = Field(900.0, gt=0)
    max_parallel_abs: int = Field(2, ge=1)
    #: The processing is for SCIENCE ABs only, as in processPreImg.
    science_actions: tuple[str, ...] = ()
    #: PRO.CATG values the calibration directories must hold although the rules
    #: do not name them (e.g. the local catalogues the CASU recipes need, ESOREX.md §4.8).
    required_calibrations: tuple[str, ...] = ()
    #: PRO.CATG of the products that get a quick-look PNG (``RAW``: the raw frames, PIPE_SUPPORT=NO).
    quicklook_catgs: tuple[str, ...] = ()
    quicklook_stretch: str = Field("asinh", pattern="^(asinh|linear)$")
    #: Key QC values by keyword (``QC MAGZPT``), with the range each should lie in.
    qc_ranges: dict[str, QcRange] = Field(default_factory=dict)
    #: Overlay files merged over the shipped profile, in order (empty for operational runs).
    overlays: tuple[str, ...] = ()

    def resolve_rules(self) -> Path | None:
        """The rule file the profile names, or None when no package provides it."""
        if not self.oca_rules:
            return None
        hits = sorted(glob.glob(self.oca_rules))
        return Path(hits[-1]) if hits else None

    def resolve_include_dirs(self) -> tuple[Path, ...]:
        return tuple(Path(d) if Path(d).is_absolute() else PROFILE_DIR / d for d in self.oca_include_dirs)

    def resolve_overlay(self) -> Path | None:
        return (PROFILE_DIR / self.oca_overlay) if self.oca_overlay else None

    def resolve_recipe_dir(self) -> Path | None:
        if not self.recipe_dir:
            return None
        hits = sorted(glob.glob(self.recipe_dir))
        return Path(hits[-1]) if hits else None


def available_instruments() -> list[str]:
    return sorted(p.stem.upper() for p in PROFILE_DIR.glob("*.toml"))


def overlay_paths(overlays: Iterable[str | Path] | None = None) -> list[Path]:
    """The overlay files asked for: ``overlays``, else those of ``$PREIMG_PROFILE_OVERLAY``."""
    if overlays is None:
        overlays = [p for p in os.environ.get(OVERLAY_ENV, "").split(os.pathsep) if p.strip()]
    return [Path(p) for p in overlays]


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as e:
        raise ProfileError(f"{what} {path} cannot be read: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from e


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_profile(instrument: str, directory: Path | None = None,
                 overlays: Iterable[str | Path] | None = None) -> Profile:
    """The validated profile of ``instrument``, with the overlays that name it merged in.

    Parameters
    ----------
    instrument : str
        HAWKI, VIMOS, FORS2 (case-insensitive).
    directory : Path, optional
        Where the profiles are (default: beside this module).
    overlays : iterable of path, optional
        Overlay files; default ``$PREIMG_PROFILE_OVERLAY`` (none when unset).

    Raises
    ------
    ProfileError
        Unknown instrument, unreadable or invalid profile or overlay (the file is named).
    """
    directory = directory or PROFILE_DIR
    path = directory / f"{instrument.lower()}.toml"
    overlay_files = overlay_paths(overlays)
    return reuse_while_unchanged(_loaded, (str(path), tuple(str(p) for p in overlay_files)), (path, *overlay_files),
                                 lambda: _load(path, instrument, overlay_files))


#: Profiles already validated, by (profile file, overlay files): (their stamps, the profile).
#: An edited or replaced file has another stamp (``shared.files.file_stamp``): read again on the next call.
_loaded: dict[Hashable, tuple[tuple[Stamp | None, ...], Profile]] = {}


def _load(path: Path, instrument: str, overlay_files: list[Path]) -> Profile:
    """Read, merge and validate the profile and its overlays (``load_profile`` without the cache)."""
    if not path.is_file():
        known = ", ".join(available_instruments()) or "none"
        raise ProfileError(f"unknown instrument {instrument!r}: no profile {path} (known: {known})")
    data = _read_toml(path, "profile")
    applied: list[str] = []
    for overlay in overlay_files:
        extra = _read_toml(overlay, f"profile overlay (${OVERLAY_ENV})")
        target = extra.pop("instrument", None)
        if not isinstance(target, str):
            raise ProfileError(f"{overlay}: a profile overlay names its instrument (instrument = \"HAWKI\")")
        if target.upper() != str(data.get("instrument", instrument)).upper():
            continue
        if "overlays" in extra:
            raise ProfileError(f"{overlay}: 'overlays' is not a setting an overlay can change")
        data = _merge(data, extra)
        applied.append(str(overlay))
        if (str(overlay), target.upper()) not in _announced:
            _announced.add((str(overlay), target.upper()))
            _log.info("profile %s: overlay %s applied (%s)", target.upper(), overlay, ", ".join(sorted(extra)) or "nothing")
    data["overlays"] = tuple(applied)
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        where = " + ".join([str(path), *applied])
        raise ProfileError(f"{where}: {describe_validation_error(e)}") from e
