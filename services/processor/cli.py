"""``preimg synth`` and ``preimg check``: registered into the ``preimg`` command.

    preimg synth -i INSTR --out DIR [--cal-root CALROOT] [--frames N] [--size N] [--start ISO] [--force] [--no-cal]
    preimg check -i INSTR [--cal-root DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

_log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``synth`` and ``check`` subcommands."""
    synth = subparsers.add_parser(
        "synth",
        help="write synthetic pre-imaging raw frames and the static calibration set",
        description="Synthetic pre-imaging raw frames into --out, and (HAWKI, VIMOS) the static "
        "calibration set into CALROOT/<INSTR>/{2099-99-99,gen}, built with the real calibration "
        "recipes and reused when up to date.",
    )
    synth.add_argument("-i", "--instrument", required=True, type=str.upper, help="HAWKI, VIMOS or FORS2")
    synth.add_argument("--out", required=True, type=Path, help="directory for the raw frames")
    synth.add_argument("--cal-root", type=Path,
                       help="calibration root, $DFO_CAL_DIR (default: $PREIMG_CAL_ROOT, else OUT/../cal)")
    synth.add_argument("--frames", type=int, help="exposures (default: HAWKI 3, VIMOS 1, FORS2 2)")
    synth.add_argument("--size", type=int,
                       help="HAWKI only: window per chip in pixels, 64 to 2048 (the whole chip); default 128. "
                       "Below 512 the science recipe needs smaller background cells: they go into "
                       "CALROOT/HAWKI/profile-overlay.toml, to be named in PREIMG_PROFILE_OVERLAY. "
                       "VIMOS and FORS2 frames always have the detector's size")
    synth.add_argument("--start", help="UTC time of the first exposure, ISO 8601 (default 2026-11-20T01:02:03.456)")
    synth.add_argument("--force", action="store_true", help="rebuild the calibration set even if up to date")
    synth.add_argument("--no-cal", action="store_true", help="raw frames only")
    synth.set_defaults(func=cmd_synth)

    check = subparsers.add_parser(
        "check",
        help="required-tools consistency check: esorex, recipes, calibrations",
        description="Exit 0 when everything a pre-imaging run of INSTR needs is present; "
        "otherwise exit 1 and list exactly what is missing.",
    )
    check.add_argument("-i", "--instrument", required=True, type=str.upper)
    check.add_argument("--cal-root", type=Path, help="$DFO_CAL_DIR (default: $PREIMG_CAL_ROOT or <data-root>/cal)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=cmd_check)


def _parse_start(text: str | None) -> datetime | None:
    if not text:
        return None
    t = datetime.fromisoformat(text)  # 3.11 accepts a trailing Z
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def cmd_synth(args: argparse.Namespace) -> int:
    # Test-data tooling beside the services (synth -> services -> shared), imported only here: an
    # image without it (the ingest/reporter/publisher image) says so instead of failing on import.
    try:
        import synth
    except ImportError as e:
        print(f"preimg synth: the synthetic-data package is not installed here ({e}); "
              "it ships with the repository and the processor image", file=sys.stderr)
        return 2

    try:
        start = _parse_start(args.start) or synth.DEFAULT_START
    except ValueError as e:
        print(f"preimg synth: bad --start: {e}", file=sys.stderr)
        return 2
    try:
        synth.check_size(args.instrument, args.size)  # refused before anything is written
        raw = synth.make_raw_frames(args.instrument, args.out, n_frames=args.frames, size=args.size, start=start)
        print(f"{len(raw)} raw frames in {args.out}")
        if args.instrument not in synth.DEFAULT_SETUPS:
            return 0
        if args.no_cal:
            options = synth.synthetic_recipe_options(args.instrument, args.size)
            if options:
                print("note: these frames need recipe options beyond the profile's: "
                      + "; ".join(f"{r} {' '.join(o)}" for r, o in options.items())
                      + f" (the calibration set's {synth.OVERLAY_NAME}, through PREIMG_PROFILE_OVERLAY)")
            return 0
        cal_root = args.cal_root or _env_cal_root() or args.out.resolve().parent / "cal"
        cal = synth.make_calibrations(args.instrument, cal_root, size=args.size, force=args.force)
    except ValueError as e:
        print(f"preimg synth: {e}", file=sys.stderr)
        return 2
    except synth.SynthError as e:
        print(f"preimg synth: {e}", file=sys.stderr)
        return 1
    print(f"calibrations {'built' if cal.built else 'up to date'} in {cal.root}")
    for tag, path in sorted(cal.files.items()):
        print(f"  {tag:<32} {path}")
    if cal.profile_overlay is not None:
        print(f"these frames need recipe options beyond the profile's: {cal.profile_overlay}")
        print(f"  export PREIMG_PROFILE_OVERLAY={cal.profile_overlay}")
    return 0


def _env_cal_root() -> Path | None:
    """``PREIMG_CAL_ROOT`` as the other commands read it (None when unset)."""
    from shared.settings import Settings

    return Settings().cal_root


def cmd_check(args: argparse.Namespace) -> int:
    from services.processor.toolcheck import check_instrument
    from shared.profiles import ProfileError, load_profile

    try:
        profile = load_profile(args.instrument)
    except ProfileError as e:
        print(f"preimg check: {e}", file=sys.stderr)
        return 2
    cal_root = args.cal_root
    if cal_root is None:
        from shared.settings import Settings

        cal_root = Settings().cal_dir()
    report = check_instrument(profile, cal_root)
    if args.json:
        print(json.dumps({"instrument": report.instrument, "ok": report.ok,
                          "missing": list(report.missing), "found": list(report.found),
                          "warnings": list(report.warnings)}))
    else:
        print(report.format())
    return 0 if report.ok else 1
