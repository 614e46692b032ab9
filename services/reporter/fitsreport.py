"""A fitsreport equivalent: tables of header values driven by a configuration file.

DFOS's ``fitsreport`` tabulated header keywords of a set of FITS files with the
columns named in a configuration file; processPreImg ran it twice (OB report,
frame report) with ``fitsreport_preimg.cfg`` and merged the output into the
USERREPORT. :func:`parse_config` reads that file (syntax in its header) and
:func:`build_tables` turns header dictionaries into :class:`Table` objects the
templates render as text or HTML.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

AGGREGATES = ("first", "count", "sum", "min", "max", "list")
SOURCES = ("raw", "products")
MISSING = "-"


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


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    numeric: bool


@dataclass(frozen=True)
class Group:
    """Lines sharing one GROUP value; ``label`` is empty when the report has no GROUP."""

    label: str
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Table:
    report_id: str
    title: str
    grouped_by: str
    columns: tuple[Column, ...]
    groups: tuple[Group, ...] = field(default_factory=tuple)


def normalise_keyword(keyword: str) -> str:
    """The dotted form of a header keyword: ``HIERARCH ESO OBS ID`` -> ``OBS.ID``."""
    key = keyword.strip().upper()
    key = key.removeprefix("HIERARCH ")
    key = key.removeprefix("ESO ")
    return ".".join(key.split())


def normalise_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Header values keyed by dotted keyword, whatever spelling the producer used."""
    return {normalise_keyword(k): v for k, v in headers.items()}


def parse_config(path: Path) -> tuple[ReportSpec, ...]:
    """Read a fitsreport configuration file.

    Parameters
    ----------
    path
        The configuration file, e.g. ``services/reporter/fitsreport_preimg.cfg``.

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


def format_value(value: Any, fmt: str) -> str:
    """Format one header value; text that does not fit a numeric format is shown as it is."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return "T" if value else "F"
    try:
        return fmt % value
    except (TypeError, ValueError):
        pass
    if isinstance(value, str):
        try:
            number: float = float(value)
            if re.search(r"[di]$", fmt) and number.is_integer():
                return fmt % int(number)
            return fmt % number
        except (TypeError, ValueError):
            pass
    return str(value)


def fit(text: str, width: int, right: bool = False) -> str:
    """Pad or cut ``text`` to exactly ``width`` characters; a cut value ends in '~'."""
    text = " ".join(str(text).split())  # no line breaks inside a table cell
    if len(text) > width:
        return text[: max(width - 1, 0)] + "~"
    return text.rjust(width) if right else text.ljust(width)


def _sort_key(value: Any) -> tuple[int, Any]:
    # Missing values last; numbers before text, so mixed columns still sort.
    if value is None or value == "":
        return (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def _aggregate(values: list[Any], how: str) -> Any:
    present = [v for v in values if v is not None and v != ""]
    if how == "count":
        return len(values)
    if not present:
        return None
    if how == "first":
        return present[0]
    if how == "list":
        return ",".join(dict.fromkeys(str(v) for v in present))
    numbers = []
    for v in present:
        try:
            numbers.append(float(v))
        except (TypeError, ValueError):
            continue
    if how == "sum":
        return sum(numbers) if numbers else None
    ordered = sorted(present, key=_sort_key)
    return ordered[0] if how == "min" else ordered[-1]


def build_table(spec: ReportSpec, files: Iterable[Mapping[str, Any]]) -> Table:
    """Tabulate ``files`` (dotted-keyword header dictionaries) as ``spec`` says.

    Groups appear in the order of their first file after sorting, so the OB
    observed first comes first.
    """
    ordered = sorted(files, key=lambda h: _sort_key(h.get(spec.sort)) if spec.sort else (0, 0))
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for headers in ordered:
        label = format_value(headers.get(spec.group), "%s") if spec.group else ""
        grouped.setdefault(label, []).append(headers)
    columns = tuple(Column(c.title, c.width, c.numeric) for c in spec.columns)
    groups: list[Group] = []
    if spec.rows == "group":
        rows = tuple(
            tuple(
                format_value(_aggregate([h.get(c.keyword) for h in members], c.aggregate), c.fmt)
                for c in spec.columns
            )
            for members in grouped.values()
        )
        groups.append(Group("", rows))
    else:
        for label, members in grouped.items():
            rows = tuple(
                tuple(format_value(h.get(c.keyword), c.fmt) for c in spec.columns) for h in members
            )
            groups.append(Group(label, rows))
    return Table(spec.report_id, spec.title, spec.group if spec.rows == "file" else "",
                 columns, tuple(groups))


def build_tables(
    specs: Iterable[ReportSpec],
    raw_files: list[Mapping[str, Any]],
    product_files: list[Mapping[str, Any]],
) -> tuple[Table, ...]:
    """Every report section of the configuration, over the raw frames or the products."""
    return tuple(
        build_table(spec, raw_files if spec.source == "raw" else product_files) for spec in specs
    )
