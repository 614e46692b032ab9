"""Ingest's composition: fast header reading and OCA classification per instrument."""

from __future__ import annotations

from services.ingest.handlers import IngestPorts
from services.ingest.staging import DeliveryArea
from shared.headers import FrameInspector
from shared.profiles import available_instruments
from shared.settings import Settings


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
