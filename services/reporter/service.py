"""Composition root of the reporter: real adapters for :class:`ReporterPorts`."""

from __future__ import annotations

import functools
import logging
from datetime import UTC, datetime
from pathlib import Path

import jinja2

from services.reporter.fitsreport import fit, parse_config
from services.reporter.handlers import ReporterPorts, write_report_files
from shared.settings import Settings

_log = logging.getLogger(__name__)

SERVICE_DIR = Path(__file__).resolve().parent
TEMPLATE_DIR = SERVICE_DIR / "templates"
FITSREPORT_CONFIG = SERVICE_DIR / "fitsreport_preimg.cfg"


def utc_now() -> datetime:
    return datetime.now(UTC)


def report_keywords(source: str, config_path: Path = FITSREPORT_CONFIG) -> tuple[str, ...]:
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


def _is_html(name: str | None) -> bool:
    return name is not None and ".html" in name


@functools.lru_cache(maxsize=4)
def build_templates(directory: Path = TEMPLATE_DIR) -> jinja2.Environment:
    """jinja2 environment of the report templates; HTML templates escape every value.

    One per process and directory: compiling the templates costs about 130 ms,
    which every embedded run (`preimg run`) would otherwise pay again. An
    edited template is still picked up (jinja2 checks the file's mtime).
    """
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
        report_specs=lambda: parse_config(config_path),
        write_reports=write_report_files,
    )
