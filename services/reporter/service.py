"""Composition root of the reporter: real adapters for :class:`ReporterPorts`."""

from __future__ import annotations

import functools
import logging
from collections.abc import Hashable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2

from services.reporter.fitsreport import fit, fit_row, html_cells
from services.reporter.handlers import ReporterPorts, handle_products_ready, write_report_files
from shared.bus.runner import Handlers
from shared.files import reuse_while_unchanged
from shared.messages import ProductsReady
from shared.metrics import Metrics
from shared.profiles import load_profile
from shared.settings import Settings
from shared.userreport_config import USERREPORT_CONFIG, ReportSpec, parse_config

_log = logging.getLogger(__name__)

SERVICE_DIR = Path(__file__).resolve().parent
TEMPLATE_DIR = SERVICE_DIR / "templates"


def utc_now() -> datetime:
    return datetime.now(UTC)


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
    env.filters["fit_row"] = fit_row
    env.filters["html_cells"] = html_cells
    return env


def report_specs(path: Path, kept: dict[Hashable, Any]) -> tuple[ReportSpec, ...]:
    """The fitsreport configuration of ``path``, parsed again only when the file changed.

    ``kept`` holds the last parse: an operator's edit takes effect on the next run
    without parsing the file for every run.
    """
    return reuse_while_unchanged(kept, path, (path,), lambda: parse_config(path))


def build(settings: Settings, metrics: Metrics, instrument: str | None = None) -> Handlers:
    """The reporter's handler bound to real ports (the composition root's entry point). No I/O here."""
    if instrument:
        raise ValueError("the reporter serves every instrument: no --instrument")
    return {ProductsReady: functools.partial(handle_products_ready, ports=build_ports(settings))}


def build_ports(settings: Settings, config_path: Path = USERREPORT_CONFIG) -> ReporterPorts:
    """Wire the reporter's real adapters. No I/O happens here.

    ``settings`` is taken for the uniform ``build_ports(settings)`` entry point
    of every service; the reporter needs nothing from it yet.
    """
    return ReporterPorts(
        templates=build_templates(),
        clock=utc_now,
        report_specs=functools.partial(report_specs, config_path, {}),
        write_reports=write_report_files,
        load_profile=load_profile,
    )
