"""A fitsreport equivalent: tables of header values driven by a configuration file.

DFOS's ``fitsreport`` tabulated header keywords of a set of FITS files with the
columns named in a configuration file; processPreImg ran it twice (OB report,
frame report) with ``fitsreport_preimg.cfg`` and merged the output into the
USERREPORT. ``shared.userreport_config`` reads that file and
:func:`build_tables` turns header dictionaries into :class:`Table` objects the
templates render as text or HTML.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup, escape

from shared.userreport_config import ReportSpec, normalise_keyword

_log = logging.getLogger(__name__)

MISSING = "-"


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


def normalise_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Header values keyed by dotted keyword, whatever spelling the producer used."""
    return {normalise_keyword(k): v for k, v in headers.items()}


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


def fit_row(cells: Iterable[Any], columns: Iterable[Column]) -> str:
    """A table line of the text report: each cell :func:`fit` to its column, one blank between."""
    return " ".join(fit(cell, column.width, column.numeric) for cell, column in zip(cells, columns))


def html_cells(cells: Iterable[Any], columns: Iterable[Column]) -> Markup:
    """The ``<td>`` cells of an HTML report line, each value escaped; numeric columns right-aligned."""
    return Markup("".join(
        f'<td class="num">{escape(cell)}</td>' if column.numeric else f"<td>{escape(cell)}</td>"
        for cell, column in zip(cells, columns)
    ))


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
