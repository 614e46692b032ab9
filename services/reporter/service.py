"""Composition root of the reporter: real adapters for :class:`ReporterPorts`."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2

from services.reporter.fitsreport import fit, parse_config
from services.reporter.handlers import ReporterPorts
from shared.settings import Settings

_log = logging.getLogger(__name__)

SERVICE_DIR = Path(__file__).resolve().parent
TEMPLATE_DIR = SERVICE_DIR / "templates"
FITSREPORT_CONFIG = SERVICE_DIR / "fitsreport_preimg.cfg"


def utc_now() -> datetime:
    return datetime.now(UTC)


def read_primary_header(path: Path) -> dict[str, Any] | None:
    """The primary header of a FITS file as {keyword: value}; None if it cannot be read.

    COMMENT/HISTORY cards are left out; HIERARCH keywords keep astropy's
    spelling (``ESO OBS ID``), which the reporter normalises to ``OBS.ID``.
    """
    from astropy.io import fits  # astropy is slow to import; only when a header is read

    try:
        header = fits.getheader(path, 0)
    except (OSError, ValueError) as e:
        _log.warning("cannot read the FITS header of %s: %s", path, e)
        return None
    values: dict[str, Any] = {}
    for card in header.cards:
        if card.keyword in ("", "COMMENT", "HISTORY"):
            continue
        value = card.value
        if isinstance(value, (bool, int, float, str)):
            values[card.keyword] = value
    return values


def _is_html(name: str | None) -> bool:
    return name is not None and ".html" in name


def build_templates(directory: Path = TEMPLATE_DIR) -> jinja2.Environment:
    """jinja2 environment of the report templates; HTML templates escape every value."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(directory)),
        autoescape=_is_html,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["fit"] = fit
    return env


def build_ports(settings: Settings, config_path: Path = FITSREPORT_CONFIG) -> ReporterPorts:
    """Wire the reporter's real adapters. No I/O happens here.

    ``settings`` is taken for the uniform ``build_ports(settings)`` entry point
    of every service; the reporter needs nothing from it yet.
    """
    return ReporterPorts(
        templates=build_templates(),
        clock=utc_now,
        read_header=read_primary_header,
        report_specs=lambda: parse_config(config_path),
    )
