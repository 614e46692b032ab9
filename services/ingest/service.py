"""Ingest's composition: real header reading and OCA classification."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.ingest.handlers import Classifier, IngestPorts
from shared.profiles import available_instruments
from shared.settings import Settings


def build_ports(settings: Settings) -> IngestPorts:
    return IngestPorts(
        delivery_dir=settings.delivery_dir(),
        run_dirs=settings.run_dirs,
        known_instruments=available_instruments,
        read_header=read_summary_header,
        classifier_for=functools.lru_cache(maxsize=None)(classifier_for),
    )


def read_summary_header(path: Path) -> Mapping[str, Any]:
    from shared.headers import read_summary

    return read_summary(path)


def classifier_for(instrument: str) -> Classifier:
    from shared.headers import classifier_for_instrument

    return classifier_for_instrument(instrument)
