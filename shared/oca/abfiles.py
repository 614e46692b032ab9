"""Write Association Blocks in the DFOS AB format and esorex SOF files.

AB format (DFOS, ``QUALIFIER value`` per line, ``#`` comments)::

    TOOL_VERSION     preimg-oca 1
    INSTRUMENT       HAWKI
    RECIPE           hawki_science_process
    COMPLETENESS     COMPLETE
    RAWFILE          /abs/path/HAWKI.2024-01-01T01:00:00.000.fits OBJECT
    MCALIB           /abs/path/master_dark.fits MASTER_DARK
    ...

``RECIPE_PARAM`` lines carry recipe options, ``MISSING`` lines the tags an
INCOMPLETE AB could not fill with the reason. :func:`read_ab` reads one back.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared.oca.associate import AssociationBlock

_log = logging.getLogger(__name__)

TOOL_VERSION = "preimg-oca 1"
#: Column where values start (DFOS ABs align them).
VALUE_COLUMN = 17


def _night(date_obs: Any) -> str:
    """The DFOS night of an observation: DATE-OBS shifted back 12 h (21:00 UT → same night)."""
    if not isinstance(date_obs, str) or len(date_obs) < 10:
        return ""
    try:
        when = _dt.datetime.fromisoformat(date_obs[:19])
    except ValueError:
        return date_obs[:10]
    return (when - _dt.timedelta(hours=12)).date().isoformat()


def _line(qualifier: str, value: Any) -> str:
    return f"{qualifier:<{VALUE_COLUMN - 1}} {'' if value is None else value}".rstrip()


def format_ab(ab: AssociationBlock, config_version: str = "",
              process_status: str = "CREATED") -> str:
    """The AB as DFOS text."""
    ref = ab.reference
    name = ab.name
    lines = [
        f"# Association Block {name}, created by preimg from the OCA rules",
        _line("TOOL_VERSION", TOOL_VERSION),
        _line("CONFIG_VERSION", config_version),
        _line("INSTRUMENT", ref.get("INSTRUME", "")),
        _line("DATE", _night(ref.get("DATE-OBS"))),
        _line("DPR_CATG", ref.get("DPR.CATG", "")),
        _line("RAW_TYPE", ab.raw_category),
        _line("RECIPE", ab.recipe),
        _line("DRS_TYPE", "CPL"),
        _line("ACTION", ab.action),
        _line("AB_NAME", f"{name}.ab"),
        _line("AB_EVENT", ab.event),
        _line("COMPLETENESS", ab.completeness),
        _line("PROCESS_STATUS", process_status),
        _line("OBS_PROG_ID", ref.get("OBS.PROG.ID", "")),
        _line("OBS_ID", ref.get("OBS.ID", "")),
        _line("MJD-OBS", ref.get("MJD-OBS", "")),
        _line("PROD_ROOT_NAME", name),
        _line("LOG_NAME", f"{name}.log"),
        _line("OCA_RULE", ab.rule),
    ]
    for key, value in ab.match_keys.items():
        lines.append(_line("RAW_MATCH_KEY", f"{key}={value}"))
    for opt in ab.recipe_options:
        lines.append(_line("RECIPE_PARAM", opt))
    for path, tag in ab.raw:
        lines.append(_line("RAWFILE", f"{Path(path).absolute()} {tag}"))
    for tag, paths in ab.calibs.items():
        for path in paths:
            lines.append(_line("MCALIB", f"{Path(path).absolute()} {tag}"))
    for tag, reason in ab.missing.items():
        lines.append(_line("MISSING", f"{tag} {reason}"))
    return "\n".join(lines) + "\n"


def write_ab(ab: AssociationBlock, directory: str | Path, config_version: str = "") -> Path:
    """Write ``<directory>/<ab.name>.ab`` and return its path."""
    path = Path(directory) / f"{ab.name}.ab"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_ab(ab, config_version))
    return path


def format_sof(entries: Iterable[tuple[str | os.PathLike[str], str]]) -> str:
    """An esorex set-of-frames file: ``<absolute path> <TAG>`` per line.

    The one SOF writer: the processor, ``preimg explain`` and the tests all use it.
    """
    return "".join(f"{Path(p).absolute()} {tag}\n" for p, tag in entries)


def write_sof(ab: AssociationBlock, path: str | Path) -> Path:
    """Write the esorex SOF of an AB (raw files first, then calibrations)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_sof(ab.sof_entries()))
    return path


def read_ab(path: str | Path) -> dict[str, Any]:
    """Read an AB file: single qualifiers → str; RAWFILE/MCALIB → lists of (path, tag);
    RAW_MATCH_KEY, RECIPE_PARAM, MISSING → lists."""
    out: dict[str, Any] = {"RAWFILE": [], "MCALIB": [], "RAW_MATCH_KEY": [],
                           "RECIPE_PARAM": [], "MISSING": []}
    for raw_line in Path(path).read_text().splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        qualifier, _, value = line.partition(" ")
        value = value.strip()
        if qualifier in ("RAWFILE", "MCALIB"):
            file_path, _, tag = value.rpartition(" ")
            out[qualifier].append((file_path, tag))
        elif qualifier in ("RAW_MATCH_KEY", "RECIPE_PARAM", "MISSING"):
            out[qualifier].append(value)
        else:
            out[qualifier] = value
    return out
