"""The USERREPORT configuration (``fitsreport_preimg.cfg``), read by three services.

DFOS's ``fitsreport`` tabulated header keywords of a set of FITS files with the
columns named in a configuration file; processPreImg ran it with
``fitsreport_preimg.cfg`` for the USERREPORT. The reporter builds its tables
from it (``services.reporter.fitsreport``); ingest and the processor read the
keywords it names (:func:`report_keywords`) with the rest of each header, once,
so the reporter never opens a FITS file. Syntax: the header of the shipped file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The shipped configuration.
USERREPORT_CONFIG = Path(__file__).resolve().parent / "fitsreport_preimg.cfg"

AGGREGATES = ("first", "count", "sum", "min", "max", "list")
SOURCES = ("raw", "products")


class FitsreportConfigError(ValueError):
    """The configuration file is invalid; the message names the file and line."""


@dataclass(frozen=True)
class ColumnSpec:
    keyword: str
    width: int
    fmt: str
    aggregate: str
    title: str

    @property
    def numeric(self) -> bool:
        return bool(re.search(r"%[-+ 0#]*\d*(\.\d+)?[dfeEgGi]$", self.fmt))


@dataclass(frozen=True)
class ReportSpec:
    report_id: str
    title: str
    source: str = "raw"
    rows: str = "file"
    group: str = ""
    sort: str = ""
    columns: tuple[ColumnSpec, ...] = ()


def normalise_keyword(keyword: str) -> str:
    """The dotted form of a header keyword: ``HIERARCH ESO OBS ID`` -> ``OBS.ID``."""
    key = keyword.strip().upper()
    key = key.removeprefix("HIERARCH ")
    key = key.removeprefix("ESO ")
    return ".".join(key.split())


def parse_config(path: Path) -> tuple[ReportSpec, ...]:
    """Read a fitsreport configuration file.

    Parameters
    ----------
    path
        The configuration file, e.g. :data:`USERREPORT_CONFIG`.

    Returns
    -------
    tuple of ReportSpec
        The report sections in file order.

    Raises
    ------
    FitsreportConfigError
        With the file and line number of the first problem.
    """
    reports: list[dict[str, Any]] = []
    for number, raw_line in enumerate(path.read_text().splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{number}"
        statement, _, rest = line.partition(" ")
        statement = statement.upper()
        rest = rest.strip()
        if statement == "REPORT":
            report_id, _, title = rest.partition(" ")
            if not report_id:
                raise FitsreportConfigError(f"{where}: REPORT needs an id and a title")
            reports.append({"report_id": report_id, "title": title.strip() or report_id,
                            "columns": []})
            continue
        if not reports:
            raise FitsreportConfigError(f"{where}: {statement} before the first REPORT")
        current = reports[-1]
        if statement == "SOURCE":
            if rest not in SOURCES:
                raise FitsreportConfigError(f"{where}: SOURCE must be one of {SOURCES}, not {rest!r}")
            current["source"] = rest
        elif statement == "ROWS":
            if rest not in ("file", "group"):
                raise FitsreportConfigError(f"{where}: ROWS must be file or group, not {rest!r}")
            current["rows"] = rest
        elif statement in ("GROUP", "SORT"):
            if not rest or " " in rest:
                raise FitsreportConfigError(f"{where}: {statement} takes one keyword")
            current[statement.lower()] = rest
        elif statement == "COLUMN":
            current["columns"].append(_parse_column(rest, where))
        else:
            raise FitsreportConfigError(f"{where}: unknown statement {statement!r}")
    specs = []
    for data in reports:
        data["columns"] = tuple(data["columns"])
        spec = ReportSpec(**data)
        if not spec.columns:
            raise FitsreportConfigError(f"{path}: report {spec.report_id!r} has no COLUMN")
        if spec.rows == "group" and not spec.group:
            raise FitsreportConfigError(f"{path}: report {spec.report_id!r}: ROWS group needs GROUP")
        specs.append(spec)
    if not specs:
        raise FitsreportConfigError(f"{path}: no REPORT section")
    return tuple(specs)


def _parse_column(text: str, where: str) -> ColumnSpec:
    parts = text.split(None, 4)
    if len(parts) < 5:
        raise FitsreportConfigError(
            f"{where}: COLUMN needs <keyword> <width> <format> <aggregate> <title>"
        )
    keyword, width, fmt, aggregate, title = parts
    if not width.isdigit() or int(width) < 1:
        raise FitsreportConfigError(f"{where}: width must be a positive integer, not {width!r}")
    if not fmt.startswith("%"):
        raise FitsreportConfigError(f"{where}: format must be printf style (%s, %.3f), not {fmt!r}")
    if aggregate not in AGGREGATES + ("-",):
        raise FitsreportConfigError(f"{where}: aggregate must be one of {AGGREGATES} or '-'")
    return ColumnSpec(keyword, int(width), fmt, "first" if aggregate == "-" else aggregate, title)


def report_keywords(source: str, config_path: Path = USERREPORT_CONFIG) -> tuple[str, ...]:
    """Header keywords (dotted) the USERREPORT tabulates for ``source`` (``raw`` or ``products``).

    Ingest and the processor read these with the rest of a header, once, and
    pass them on in the messages: the reporter itself opens no FITS file.
    Keywords added to the configuration reach the messages after those
    services restart.
    """
    keywords: set[str] = set()
    for spec in parse_config(config_path):
        if spec.source == source:
            keywords |= {c.keyword for c in spec.columns} | {spec.group, spec.sort}
    return tuple(sorted(k for k in keywords if k and not k.startswith("@")))
