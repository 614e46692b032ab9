"""Processor's composition: the instrument profile, createAB (OCA) and processAB (esorex)."""

from __future__ import annotations

import shutil

from services.processor.handlers import ProcessorPorts
from shared.metrics import Metrics
from shared.profiles import Profile, load_profile
from shared.settings import RunDirs, Settings


def build_ports(settings: Settings, instrument: str, metrics: Metrics) -> ProcessorPorts:
    profile = load_profile(instrument)
    return ProcessorPorts(
        profile=profile,
        run_dirs=settings.run_dirs,
        plan=lambda msg, dirs: [],
        execute=_not_available,
    )


def _not_available(ab: object, dirs: RunDirs):
    raise RuntimeError("processAB is not wired yet")


def check_instrument(profile: Profile, settings: Settings) -> list[str]:
    """What is missing for this instrument to be processed (empty when all is there)."""
    problems = [f"required tool {tool!r} is not on PATH" for tool in profile.required_tools if shutil.which(tool) is None]
    return problems
