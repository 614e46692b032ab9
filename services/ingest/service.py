"""Ingest's composition: fast header reading and OCA classification per instrument."""

from __future__ import annotations

import functools

from services.ingest.frames import FrameInspector
from services.ingest.handlers import IngestPorts, handle_delivery
from services.ingest.staging import DeliveryArea
from shared.bus.runner import Handlers
from shared.messages import DeliveryAnnounced
from shared.metrics import Metrics
from shared.profiles import available_instruments
from shared.settings import Settings
from shared.userreport_config import report_keywords


def build(settings: Settings, metrics: Metrics, instrument: str | None = None) -> Handlers:
    """Ingest's handlers bound to real ports (the composition root's entry point). No I/O here."""
    if instrument:
        raise ValueError("ingest serves every instrument: no --instrument")
    ports = build_ports(settings, report_keys=report_keywords("raw"))
    return {DeliveryAnnounced: functools.partial(handle_delivery, ports=ports)}


def build_ports(settings: Settings, report_keys: tuple[str, ...] = ()) -> IngestPorts:
    """Ingest's ports; ``report_keys`` are read from every raw header too (see FrameInspector)."""
    inspector = FrameInspector(extra_keys=report_keys)
    return IngestPorts(
        stage=DeliveryArea(settings.delivery_dir()).stage,
        run_dirs=settings.run_dirs,
        known_instruments=available_instruments,
        read_header=inspector.read,
        classify=inspector.classify,
    )
