"""The cached static calibration set: ``<cal_root>/<INSTR>/{2099-99-99,gen}``, its manifest and lock.

A manifest (``synth-manifest.json``, with :data:`SYNTH_VERSION` and the build
parameters) makes the build cacheable: an up-to-date set is reused. A file
lock serialises builders of the same set (a test session and ``make demo``
may race). One set per ``<cal_root>/<INSTR>``: a set of another size
replaces it, so keep sets of different sizes under different calibration roots.
The profile overlay (``profile-overlay.toml``) is written beside the set when
its data need recipe options the operational profile does not have.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.layout import CAL_SUBDIRS, DATED_CAL_DIR, GEN_CAL_DIR
from synth import hawki, vimos
from synth.common import DEFAULT_SETUPS, Setup
from synth.frames import check_size, synthetic_recipe_options
from synth.hawki import HAWKI_DEFAULT_SIZE, HAWKI_FLAT_SIZE
from synth.tables import write_gen
from synth.vimos import VIMOS_NX, VIMOS_NY

_log = logging.getLogger(__name__)

#: Bump when the generated data change in a way that needs a rebuild.
SYNTH_VERSION = 1
MANIFEST_NAME = "synth-manifest.json"

#: The profile overlay written beside a calibration set whose data need recipe options.
OVERLAY_NAME = "profile-overlay.toml"


@dataclass(frozen=True)
class CalibrationSet:
    """A static calibration set on disk.

    Attributes
    ----------
    instrument : str
    root : Path
        ``<cal_root>/<INSTR>``.
    files : dict
        SOF tag -> path, for every file the science recipe needs.
    built : bool
        True when this call ran the recipes, False when a cached set was reused.
    profile_overlay : Path or None
        The profile overlay with the recipe options these data need
        (``PREIMG_PROFILE_OVERLAY``), None when the shipped profile does.
    """

    instrument: str
    root: Path
    files: dict[str, Path]
    built: bool = False
    profile_overlay: Path | None = None

    @property
    def dated_dir(self) -> Path:
        return self.root / DATED_CAL_DIR

    @property
    def gen_dir(self) -> Path:
        return self.root / GEN_CAL_DIR



def _params(instrument: str, size: int | None, setups: Sequence[Setup]) -> dict[str, Any]:
    if instrument != "HAWKI":
        return {"instrument": instrument, "version": SYNTH_VERSION, "science_size": [VIMOS_NY, VIMOS_NX],
                "setups": [s.__dict__ for s in setups]}
    assert size is not None
    return {
        "instrument": instrument,
        "version": SYNTH_VERSION,
        "science_size": size,
        # Sets built before the flat followed a science window above 1792² had flats too small.
        "flat_size": max(size, HAWKI_FLAT_SIZE),
        "recipe_options": {k: list(v) for k, v in synthetic_recipe_options(instrument, size).items()},
        "setups": [s.__dict__ for s in setups],
    }


def _overlay_text(instrument: str, size: int | None, options: dict[str, tuple[str, ...]]) -> str:
    window = f"{size}x{size} pixels per chip" if size else "full-size frames"
    lines = [
        f"# Written by `preimg synth` with the synthetic {instrument} calibration set ({window}).",
        "# Recipe options that only these synthetic data need; the shipped profile keeps the",
        "# pipeline's defaults. Use it with PREIMG_PROFILE_OVERLAY=<this file> (shared/profiles).",
        f"instrument = {json.dumps(instrument)}",
        "",
        "[recipe_options]",
    ]
    lines += [f"{recipe} = {json.dumps(list(opts))}" for recipe, opts in sorted(options.items())]
    return "\n".join(lines) + "\n"


def _sync_overlay(root: Path, instrument: str, size: int | None) -> Path | None:
    """Write (or remove) the set's profile overlay so that it matches the data's needs."""
    path = root / OVERLAY_NAME
    options = synthetic_recipe_options(instrument, size)
    if not options:
        path.unlink(missing_ok=True)
        return None
    text = _overlay_text(instrument, size, options)
    try:
        if path.read_text() == text:
            return path
    except OSError:
        pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _manifest_current(root: Path, params: dict[str, Any]) -> dict[str, Path] | None:
    """The files of an up-to-date set, or None when it must be (re)built."""
    manifest = read_manifest(root)
    if not manifest or manifest.get("params") != params:
        return None
    files = {}
    for key, entry in manifest.get("files", {}).items():
        path = root / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return None
        files[key] = path
    return files


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise builders of the same set (a test session and ``make demo`` may race)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".synth.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _science_tags(files: dict[str, Path]) -> dict[str, Path]:
    """SOF tag -> file for the first setup (keys like ``MASTER_CONF:J`` lose their suffix)."""
    tags: dict[str, Path] = {}
    for key, path in files.items():
        tags.setdefault(key.split(":")[0], path)
    return tags



def make_calibrations(instrument: str, cal_root: Path, *, size: int | None = None,
                      setups: Sequence[Setup] | None = None, force: bool = False,
                      recipe_dir: Path | None = None) -> CalibrationSet:
    """Build (or reuse) the static calibration set of ``instrument`` under ``cal_root``.

    Parameters
    ----------
    instrument : str
        HAWKI or VIMOS.
    cal_root : Path
        ``$DFO_CAL_DIR``; the set goes to ``<cal_root>/<INSTR>/{2099-99-99,gen}``.
    size : int, optional
        HAWK-I science window size the masters are cropped to (default 128;
        :func:`check_size`). Not for VIMOS, whose set is always full size.
    setups : sequence of Setup, optional
        Default :data:`DEFAULT_SETUPS`.
    force : bool
        Rebuild even when an up-to-date set exists.
    recipe_dir : Path, optional
        Plugin directory; default from the instrument profile.

    Returns
    -------
    CalibrationSet

    Raises
    ------
    SynthError
        A calibration recipe failed (the message names the log).
    ValueError
        No pipeline for the instrument, or a size the recipes cannot take.
    """
    instrument = instrument.upper()
    if instrument not in DEFAULT_SETUPS:
        raise ValueError(f"no calibration set for {instrument} (no pipeline): only raw frames are synthesised")
    size = check_size(instrument, size)
    setups = tuple(setups or DEFAULT_SETUPS[instrument])
    root = Path(cal_root).resolve() / instrument
    params = _params(instrument, size, setups)
    with _locked(root):
        files = None if force else _manifest_current(root, params)
        if files is not None:
            _log.info("reusing synthetic %s calibrations in %s", instrument, root)
            return CalibrationSet(instrument, root, _science_tags(files), built=False,
                                  profile_overlay=_sync_overlay(root, instrument, size))
        if recipe_dir is None:
            from shared.profiles import load_profile

            recipe_dir = load_profile(instrument).resolve_recipe_dir()
        _log.info("building synthetic %s calibrations in %s", instrument, root)
        (root / MANIFEST_NAME).unlink(missing_ok=True)
        (root / OVERLAY_NAME).unlink(missing_ok=True)
        for sub in CAL_SUBDIRS:
            (root / sub).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            if instrument == "HAWKI":
                assert size is not None
                files = hawki.build_masters(root / DATED_CAL_DIR, work, size, setups, recipe_dir)
            else:
                files = vimos.build_masters(root / DATED_CAL_DIR, work, setups, recipe_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        files.update(write_gen(root / GEN_CAL_DIR, instrument, size or HAWKI_DEFAULT_SIZE))
        overlay = _sync_overlay(root, instrument, size)
        manifest = {
            "generator": "preimg.synth",
            "params": params,
            "files": {
                key: {"path": str(p.relative_to(root)), "bytes": p.stat().st_size, "pro_catg": key.split(":")[0]}
                for key, p in files.items()
            },
        }
        # Written last: a set without a manifest is incomplete and gets rebuilt.
        tmp = root / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, root / MANIFEST_NAME)
        return CalibrationSet(instrument, root, _science_tags(files), built=True, profile_overlay=overlay)



def science_sof(raw_files: Sequence[Path], calibrations: CalibrationSet) -> list[tuple[Path, str]]:
    """The SOF of the science recipe for these raw frames, without the OCA engine.

    Used by tests and the benchmark; in the services the OCA rules build it.
    """
    sof = [(Path(p), "OBJECT") for p in raw_files]
    sof += [(path, tag) for tag, path in sorted(calibrations.files.items())]
    return sof
