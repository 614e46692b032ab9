"""Synthetic pre-imaging data: raw frames and the static calibration set (``preimg synth``).

Test-data tooling, not a service: ``preimg synth``, ``make demo``, the tests
and the benchmarks use it. It lives beside ``services`` and ``shared`` rather
than inside the processor because it changes for other reasons (what test
data look like) and is not part of what the services run; it sits *above*
the services, like ``bench``, because the masters are made by the real
calibration recipes through the processor's ``run_recipe``
(synth -> services -> shared). The service image (ingest, reporter,
publisher) does not carry it; the processor image does, for the demo.

What is made, and why it looks the way it does, follows the measurements in
``shared/design/ESOREX.md``:

* **Raw science frames** (``DPR.CATG=SCIENCE``, ``DPR.TYPE=OBJECT``,
  ``DPR.TECH=IMAGE,PRE``) named like ESO archive files
  (``HAWKI.2026-11-20T01:02:03.456.fits``), with every keyword the recipes
  read (§3.5, §4.6) and every keyword the OCA rules classify, group and
  associate on (``hawki.oca`` / ``vimos.oca``).

  - HAWK-I (:mod:`synth.hawki`): PHU without data + 4 IMAGE extensions, each
    the lower-left ``size``² window of a 2048² chip. 128² by default; 64² to
    2048² (the whole chip) are accepted (:func:`check_size`). From 512² up
    the science recipe runs with its default options; smaller windows (the
    default too) need smaller background cells, which go into a profile
    overlay beside the calibration set (:func:`synthetic_recipe_options`),
    never into the shipped profile.
  - VIMOS (:mod:`synth.vimos`): one single-HDU file per quadrant, 4 per
    exposure, at the real raw size 2148×2440, 16-bit with BZERO.
  - FORS2 (:mod:`synth.fors2`): two single-HDU chip files per exposure; no
    pipeline runs on them.

* **The calibration set** (:mod:`synth.calibration_set`) in
  ``<cal_root>/<INSTR>/2099-99-99`` (masters, one per setup and PRO.CATG)
  and ``<cal_root>/<INSTR>/gen`` (static tables, :mod:`synth.tables`).
  Masters are made by the real calibration recipes on synthetic raw
  calibrations (:mod:`synth.masters`), then stamped with the keywords the
  OCA association compares. A manifest with :data:`SYNTH_VERSION` makes the
  build cacheable; a lock serialises builders.

* **The profile overlay** ``<cal_root>/<INSTR>/profile-overlay.toml``, only
  when the data need recipe options the operational profile does not have
  (``PREIMG_PROFILE_OVERLAY`` points the services at it; ``shared.profiles``).

The star field is deterministic per instrument: the raw frames and the local
catalogue are drawn from the same list, so the recipes find their standards.
The pieces every frame shares (times, noise, stars, common header keywords,
the setups) are in :mod:`synth.common`; which frames to make, and at which
sizes, in :mod:`synth.frames`.

This module is the package's public face: the names below are what callers use.
"""

from __future__ import annotations

from synth.calibration_set import (
    MANIFEST_NAME,
    OVERLAY_NAME,
    SYNTH_VERSION,
    CalibrationSet,
    make_calibrations,
    read_manifest,
    science_sof,
)
from synth.common import DEFAULT_SETUPS, DEFAULT_START, Setup, SynthError, archive_name
from synth.frames import check_size, make_raw_frames, synthetic_recipe_options
from synth.hawki import HAWKI_CHIP, HAWKI_DEFAULT_SIZE, HAWKI_EXTNAMES, HAWKI_FLAT_SIZE
from synth.vimos import VIMOS_CHIPS, VIMOS_NX, VIMOS_NY

__all__ = [
    "DEFAULT_SETUPS",
    "DEFAULT_START",
    "HAWKI_CHIP",
    "HAWKI_DEFAULT_SIZE",
    "HAWKI_EXTNAMES",
    "HAWKI_FLAT_SIZE",
    "MANIFEST_NAME",
    "OVERLAY_NAME",
    "SYNTH_VERSION",
    "VIMOS_CHIPS",
    "VIMOS_NX",
    "VIMOS_NY",
    "CalibrationSet",
    "Setup",
    "SynthError",
    "archive_name",
    "check_size",
    "make_calibrations",
    "make_raw_frames",
    "read_manifest",
    "science_sof",
    "synthetic_recipe_options",
]
