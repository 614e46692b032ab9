"""Write Association Blocks in the DFOS AB format and esorex SOF files.

AB format (DFOS AB_structure.html: ``QUALIFIER value`` per line, text behind ``#`` a
comment), fields in DFOS's order::

    TOOL_VERSION     preimg-oca 2
    CONFIG_VERSION   hawki.oca+hawki_overlay.oca sha1:0123456789ab

    INSTRUMENT       HAWKI
    DATE             2024-01-01
    ...
    # pipeline product path
    PROD_PATH        /data/run/sci
    # raw match key
    RAW_MATCH_KEY    INS_FILT1_NAME=J
    # raw files
    RAWFILE          /abs/path/HAWKI.2024-01-01T01:00:00.000.fits OBJECT
    # master calibrations
    MCALIB           /abs/path/master_dark.fits MASTER_DARK
    MCALIB           VIRTUAL /abs/VCAL/r.HAWKI..._0000.fits MASTER_FLAT
    # preimg (no DFOS equivalent)
    ACTION           SCIENCE_FRAMES
    ...

:func:`read_ab` reads this layout and the one preimg wrote before (dotted
RAW_MATCH_KEY, ACTION/OCA_RULE among the DFOS fields).
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

TOOL_VERSION = "preimg-oca 2"
#: Column where values start (DFOS ABs align them).
VALUE_COLUMN = 17
#: Lines preimg adds that DFOS ABs have no qualifier for (docs/oca.md "Files").
PREIMG_QUALIFIERS = ("ACTION", "OCA_RULE", "TIME_MATCH", "RECIPE_PARAM", "MISSING", "NOTE")
_LIST_QUALIFIERS = ("RAW_MATCH_KEY", "RECIPE_PARAM", "MISSING", "NOTE")


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


def match_key_name(dotted: str) -> str:
    """A keyword as DFOS writes it in RAW_MATCH_KEY: ``INS.GRAT.NAME`` → ``INS_GRAT_NAME``."""
    return dotted.replace(".", "_")


def obs_mode(ab: AssociationBlock) -> str:
    """OBS_MODE: NONE for calibrations (DFOS); SCIENCE frames are SM or VM, and preimg
    (chosen) writes SM: pre-imaging is taken by Paranal and delivered through AOG, the
    service-mode route (processPreImg steps 1-6). A header ``OBS.MODE`` wins."""
    ref = ab.reference
    given = ref.get("OBS.MODE")
    if isinstance(given, str) and given:
        return given
    return "SM" if ref.get("DPR.CATG") == "SCIENCE" else "NONE"


def _mjd_mod(ref: dict[str, Any]) -> Any:
    mjd, exptime = ref.get("MJD-OBS"), ref.get("EXPTIME")
    if isinstance(mjd, (int, float)) and not isinstance(mjd, bool):
        if isinstance(exptime, (int, float)) and not isinstance(exptime, bool):
            return f"{mjd + exptime / 2.0 / 86400.0:.8f}"
        return mjd
    return ""


def format_ab(ab: AssociationBlock, config_version: str = "",
              process_status: str = "CREATED", prod_path: str | os.PathLike[str] = "",
              batch_id: str = "") -> str:
    """The AB as DFOS text.

    ``config_version``, ``batch_id`` default to the AB's own (the rule set's version,
    the run); ``prod_path`` is where the products go (PROD_PATH).
    """
    ref = ab.reference
    name = ab.name
    lines = [
        f"# Association Block {name}, created by preimg from the OCA rules",
        _line("TOOL_VERSION", TOOL_VERSION),
        _line("CONFIG_VERSION", config_version or ab.config_version),
        "",
        _line("INSTRUMENT", ref.get("INSTRUME", "")),
        _line("DATE", _night(ref.get("DATE-OBS"))),
        "",
        _line("DPR_CATG", ref.get("DPR.CATG", "")),
        _line("RAW_TYPE", ab.raw_category),
        _line("RECIPE", ab.recipe),
        _line("DRS_TYPE", "CPL"),
        _line("BATCH_ID", batch_id or ab.batch_id),
        "",
        _line("AB_NAME", f"{name}.ab"),
        _line("AB_EVENT", ab.event),
        _line("COMPLETENESS", ab.completeness),
        _line("PROCESS_STATUS", process_status),
        "",
        _line("OBS_PROG_ID", ref.get("OBS.PROG.ID", "")),
        _line("OBS_MODE", obs_mode(ab)),
        _line("OBS_ID", ref.get("OBS.ID", "")),
        "",
        _line("MJD-OBS", ref.get("MJD-OBS", "")),
        _line("MJD-OBS_MOD", _mjd_mod(ref)),
        "",
        _line("PROD_ROOT_NAME", name),
        _line("LOG_NAME", f"{name}.log"),
        "# pipeline product path",
        _line("PROD_PATH", os.fspath(prod_path) if prod_path else ""),
        "# raw match key",
    ]
    for key, value in ab.match_keys.items():
        lines.append(_line("RAW_MATCH_KEY", f"{match_key_name(key)}={value}"))
    lines.append("# raw files")
    for path, tag in ab.raw:
        lines.append(_line("RAWFILE", f"{Path(path).absolute()} {tag}"))
    lines.append("# master calibrations")
    for tag, paths in ab.calibs.items():
        for path in paths:
            lines.append(_line("MCALIB", f"{Path(path).absolute()} {tag}"))
    for tag, entries in ab.virtual.items():
        for path, producer in entries:
            lines.append(_line("MCALIB", f"VIRTUAL {Path(path).absolute()} {tag}")
                         + f"  # product of {producer}.ab")
    lines += [
        "# preimg (no DFOS equivalent)",
        _line("ACTION", ab.action),
        _line("OCA_RULE", ab.rule),
        _line("TIME_MATCH", ab.time_match),
    ]
    for opt in ab.recipe_options:
        lines.append(_line("RECIPE_PARAM", opt))
    for tag, reason in ab.missing.items():
        lines.append(_line("MISSING", f"{tag} {reason}"))
    for note in ab.notes:
        lines.append(_line("NOTE", note))
    return "\n".join(lines) + "\n"


def write_ab(ab: AssociationBlock, directory: str | Path, config_version: str = "",
             prod_path: str | os.PathLike[str] = "", batch_id: str = "") -> Path:
    """Write ``<directory>/<ab.name>.ab`` and return its path."""
    path = Path(directory) / f"{ab.name}.ab"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_ab(ab, config_version, prod_path=prod_path, batch_id=batch_id))
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
    """Read an AB file (DFOS layout, or preimg's earlier one).

    Single qualifiers → str (empty when the line has no value); RAWFILE/MCALIB →
    lists of (path, tag); virtual calibrations (``MCALIB VIRTUAL path tag``) →
    ``MCALIB_VIRTUAL``, a list of (path, tag); RAW_MATCH_KEY, RECIPE_PARAM, MISSING,
    NOTE → lists of the text written; ``match_keys`` → {name: value} of the
    RAW_MATCH_KEY lines, names as written (``INS_FILT1_NAME``, or dotted in old ABs).
    Text behind ``#`` is a comment (a ``#`` inside a path or value after the first
    column is kept only when no blank precedes it).
    """
    out: dict[str, Any] = {"RAWFILE": [], "MCALIB": [], "MCALIB_VIRTUAL": [],
                           **{q: [] for q in _LIST_QUALIFIERS}, "match_keys": {}}
    for raw_line in Path(path).read_text().splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        for marker in (" #", "\t#"):
            cut = line.find(marker)
            if cut >= 0:
                line = line[:cut].rstrip()
        qualifier, _, value = line.partition(" ")
        value = value.strip()
        if qualifier in ("RAWFILE", "MCALIB"):
            key = qualifier
            if qualifier == "MCALIB" and value.startswith("VIRTUAL "):
                key, value = "MCALIB_VIRTUAL", value[len("VIRTUAL "):].strip()
            file_path, _, tag = value.rpartition(" ")
            out[key].append((file_path, tag))
        elif qualifier in _LIST_QUALIFIERS:
            out[qualifier].append(value)
            if qualifier == "RAW_MATCH_KEY":
                name, _, v = value.partition("=")
                out["match_keys"][name] = v
        else:
            out[qualifier] = value
    return out
