"""Processor's composition: the instrument profile, createAB (OCA rules) and processAB (esorex).

``AbPlanner.plan`` is createAB: it rebuilds the run's raw-frame records from
the headers and classification ingest put in ``RawDataReady`` (no raw frame
is opened again), takes the static calibrations (``$DFO_CAL_DIR/<INSTR>/
2099-99-99`` and ``gen``) from a pool read once per process, organises and
associates, and returns the run's ABs (plus a note for every frame whose
header could not be read). ``AbExecutor.execute`` is processAB +
renameProducts + moveProducts + updateAB for one AB.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from services.processor.esorex import run_recipe
from services.processor.handlers import ABOutcome, ProcessorPorts, handle_raw_ready
from services.processor.products import first_date_obs, move_logs, move_products, package_raw_frames
from services.processor.quicklook import preload as preload_quicklook
from services.processor.quicklook import with_quicklook
from services.processor.recipe_processes import kill_leftover_recipes
from shared.bus.runner import Handlers
from shared.errors import PermanentError
from shared.files import make_dirs, sync_later, write_atomic
from shared.fitsheader import HeaderReader
from shared.layout import CAL_SUBDIRS
from shared.messages import ABResult, CalibrationUsed, Product, RawDataReady
from shared.metrics import Metrics
from shared.oca import (
    AssociationBlock,
    FileRecord,
    FramePool,
    RuleSet,
    build_abs,
    classified_records,
    fits_files,
    header_keys,
    make_records,
    profile_rules,
    rule_header_keys,
)
from shared.oca.abfiles import format_ab
from shared.profiles import Profile, load_profile
from shared.settings import RunDirs, Settings
from shared.userreport_config import report_keywords

_log = logging.getLogger(__name__)



@dataclass(frozen=True)
class UnreadableFrame:
    """A delivered frame createAB could not use: reported as a FAILED entry of the run."""

    name: str
    path: Path
    problem: str


@dataclass(frozen=True)
class PlannedAB:
    """An AB with what processing it needs from the headers already read.

    ``date_obs`` is the earliest DATE-OBS of its raw frames (from the message;
    "" when none has one); ``calibrations`` describe the chosen calibration
    files from the calibration pool's headers.
    """

    ab: AssociationBlock
    date_obs: str
    calibrations: tuple[CalibrationUsed, ...]

    @property
    def name(self) -> str:
        return self.ab.name


def build(settings: Settings, metrics: Metrics, instrument: str | None = None,
          ab_finished: Callable[[int, int, ABResult], None] | None = None) -> Handlers:
    """The processor's handlers for ``instrument``, bound to real ports (the composition root's entry point).

    ``ab_finished`` is told of each finished AB (the embedded run's progress).
    """
    if not instrument:
        raise ValueError("the processor serves one instrument: give --instrument")
    ports = build_ports(settings, instrument, metrics, report_keys=report_keywords("products"))
    if ab_finished is not None:
        ports = dataclasses.replace(ports, ab_finished=ab_finished)
    return {RawDataReady: functools.partial(handle_raw_ready, ports=ports)}


def build_ports(settings: Settings, instrument: str, metrics: Metrics, profile: Profile | None = None,
                report_keys: tuple[str, ...] = ()) -> ProcessorPorts:
    """The processor's ports; ``report_keys`` are read from every product's header (the USERREPORT's)."""
    profile = profile or load_profile(instrument)
    planner = AbPlanner(profile, settings.cal_dir() / instrument)
    executor = AbExecutor(profile, metrics, report_keys)
    if profile.quicklook_catgs:
        preload_quicklook()
    return ProcessorPorts(profile=profile, run_dirs=settings.run_dirs, plan=planner.plan, execute=executor.execute,
                          prepare_workspace=prepare_workspace, package_raw=package_raw_frames,
                          quicklook=functools.partial(with_quicklook, stretch=profile.quicklook_stretch))


def prepare_workspace(dirs: RunDirs) -> None:
    """Start a run clean: first stop any recipe an attempt that died left running (it would write
    into the new directories), then empty the run's sci/ and logs/ and remove its work/.

    The new sci/ and logs/ directories' names are made durable with the stage's outputs
    (``sync_later``: under the runner, in the round of the state record); on a file system
    without a journal nothing else would, and the run's products would vanish in a crash.
    work/ is made by the first recipe (``run_recipe`` makes each AB's working directory): a
    run without recipes (no pipeline, or no complete AB) makes none.
    """
    kill_leftover_recipes(dirs.work)
    # Each AB's directory is removed again before its recipe; one that cannot be is refused by
    # run_recipe (not empty).
    shutil.rmtree(dirs.work, ignore_errors=True)
    for d in (dirs.sci, dirs.logs):
        shutil.rmtree(d, ignore_errors=True)
        make_dirs(d.parent)  # sci/<INSTR> of a new instrument: its name synced too
        d.mkdir()  # fails if the old one could not be removed
    sync_later([dirs.sci.parent, dirs.logs.parent])


class CalibrationPool:
    """The instrument's static calibrations, classified once and re-read only where files changed.

    Every run of the instrument associates against the same files
    (``$DFO_CAL_DIR/<INSTR>/2099-99-99`` and ``gen``); their headers are read
    on first use and again only for files whose size or modification time
    changed (a scan of the directories, no inotify). Removed files drop out.
    """

    #: Keywords kept besides the rules' own: PRO.CATG and the date for list_mcalib.
    REPORT_KEYS = ("PRO.CATG", "DATE-OBS", "DATE")

    def __init__(self, cal_dir: Path):
        self._cal_dir = cal_dir
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._records: dict[Path, FileRecord] = {}
        self._pool = FramePool()

    def current(self, rules: RuleSet, reader: HeaderReader) -> FramePool:
        files = fits_files([self._cal_dir / sub for sub in CAL_SUBDIRS if (self._cal_dir / sub).is_dir()])
        stamps = {}
        for path in files:
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            stamps[path] = (info.st_size, info.st_mtime_ns)
        if stamps == self._stamps:
            return self._pool
        changed = [p for p, stamp in stamps.items() if self._stamps.get(p) != stamp]
        headers, bad = reader.read_many(changed)
        for path, error in bad.items():
            _log.warning("calibration %s left out: %s", path, error)
        records = {p: r for p, r in self._records.items() if p in stamps and p not in changed}
        records.update({r.path: r for r in make_records(rules, headers)})
        self._records, self._stamps = records, stamps
        self._pool = FramePool(records.values())
        _log.info("calibration pool: %d files (%d read now)", len(records), len(changed))
        return self._pool

    def describe_empty(self, instrument: str) -> str:
        """Why the pool is empty, naming the directories searched (one message, not one per AB)."""
        searched = [self._cal_dir / sub for sub in CAL_SUBDIRS]
        states = [f"{d} ({'empty' if d.is_dir() else 'missing'})" for d in searched]
        return (f"no calibrations found for {instrument}: searched {', '.join(states)}; install the static "
                f"calibrations there (or set PREIMG_CAL_ROOT / --cal-root) and run `preimg check -i {instrument}` "
                "to see what is missing")

    def describe(self, path: Path, tag: str) -> CalibrationUsed:
        header = self._records[path].header if path in self._records else {}
        date = header.get("DATE-OBS") or header.get("DATE") or ""
        return CalibrationUsed(tag=tag, path=str(path), pro_catg=str(header.get("PRO.CATG", "") or ""),
                               date=str(date))


class AbPlanner:
    """createAB for one instrument: the rules are loaded on first use and kept, so is the calibration pool.

    The raw frames are not read again: ingest read and classified their
    headers, and the records are rebuilt from ``RawDataReady.frames``.
    """

    def __init__(self, profile: Profile, cal_dir: Path):
        self._profile = profile
        self._rules: RuleSet | None = None
        self._reader: HeaderReader | None = None
        self._calibrations = CalibrationPool(cal_dir)
        self._lock = threading.Lock()

    def rules(self) -> RuleSet:
        with self._lock:
            if self._rules is None:
                try:
                    rules = profile_rules(self._profile)
                except FileNotFoundError as e:
                    raise PermanentError(f"{e} (preimg check -i {self._profile.instrument} lists what is missing)") from e
                if rules is None:
                    raise PermanentError(f"{self._profile.instrument}: the profile names no OCA rule file")
                self._rules = rules
                keys = set(rule_header_keys(rules)) | set(header_keys(CalibrationPool.REPORT_KEYS))
                self._reader = HeaderReader(sorted(keys))
            return self._rules

    def plan(self, msg: RawDataReady, dirs: RunDirs) -> list[PlannedAB | UnreadableFrame]:
        rules = self.rules()
        assert self._reader is not None
        readable = [f for f in msg.frames if f.headers]
        unreadable = [f for f in msg.frames if not f.headers]
        records = classified_records((f.path, f.headers, f.classification) for f in readable)
        with self._lock:
            pool = self._calibrations.current(rules, self._reader)
        if not len(pool):
            raise PermanentError(self._calibrations.describe_empty(self._profile.instrument))
        abs_ = build_abs(rules, records, pool, actions=self._profile.science_actions or None,
                         time_match=self._profile.oca_time_match)
        _log.info("createAB: %d raw frames, %d calibrations -> %d ABs (%d complete)",
                  len(records), len(pool), len(abs_), sum(ab.complete for ab in abs_))
        used = {str(p) for ab in abs_ for p, _ in ab.raw}
        unused = [f for f in readable if f.path not in used]
        if unused:
            _log.info("frames in no SCIENCE AB: %s", ", ".join(f.name for f in unused))
        date_obs = {f.path: f.headers.get("DATE-OBS") for f in readable}
        planned: list[PlannedAB | UnreadableFrame] = []
        for ab in abs_:
            dates = [str(date_obs[str(p)]).strip() for p, _ in ab.raw if date_obs.get(str(p))]
            calibrations = tuple(self._calibrations.describe(p, tag) for tag, paths in ab.calibs.items()
                                 for p in paths)
            planned.append(PlannedAB(ab, min(dates) if dates else "", calibrations))
        planned += [UnreadableFrame(f.name, Path(f.path), f.problem or "header unreadable") for f in unreadable]
        return planned


class AbExecutor:
    """processAB + renameProducts + moveProducts + updateAB for one AB."""

    def __init__(self, profile: Profile, metrics: Metrics, report_keys: tuple[str, ...] = ()):
        self._profile = profile
        self._metrics = metrics
        self._report_keys = tuple(report_keys)

    def execute(self, item: PlannedAB | UnreadableFrame, dirs: RunDirs) -> ABOutcome:
        started = _now()
        if isinstance(item, UnreadableFrame):
            return self._finish(ABResult(name=item.name, status="FAILED", raw=(str(item.path),),
                                         reason=f"frame {item.name} not processed: {item.problem}",
                                         started_at=started, finished_at=started))
        ab = item.ab
        common = {"name": ab.name, "action": ab.action, "recipe": ab.recipe, "raw": tuple(str(p) for p, _ in ab.raw),
                  "calibrations": item.calibrations, "missing": tuple(ab.missing), "started_at": started}
        if not ab.complete:
            ab_path = self._write_ab(ab, dirs, "NOT_PROCESSED")
            reason = "INCOMPLETE: " + "; ".join(f"{tag}: {why}" for tag, why in ab.missing.items())
            return self._finish(ABResult(**common, status="INCOMPLETE", reason=reason, finished_at=_now(),
                                         ab_path=str(ab_path)))

        workdir = dirs.work / ab.name
        kill_leftover_recipes(workdir)  # a recipe of an attempt that died must not write into the new one
        shutil.rmtree(workdir, ignore_errors=True)  # left by an attempt that died
        options = (*ab.recipe_options, *self._profile.recipe_options.get(ab.recipe, ()))
        result = run_recipe(
            ab.recipe,
            ab.sof_entries(),
            workdir,
            recipe_dir=self._profile.resolve_recipe_dir(),
            options=options,
            timeout_s=self._profile.recipe_timeout_s,
            check=self._profile.recipe_checks.get(ab.recipe),
            header_keywords=self._report_keys,
        )
        self._metrics.recipe_duration.labels(self._profile.instrument, ab.recipe, result.status).observe(result.duration_s)
        products: list[Product] = []
        reason = result.reason
        if result.ok:
            try:
                date_obs = first_date_obs([item.date_obs])
                for moved in move_products(result.products, dirs.sci, self._profile.instrument, date_obs):
                    products.append(Product(path=str(moved.path), pro_catg=moved.pro_catg, ab=ab.name,
                                            qc=dict(moved.qc), header=dict(moved.header),
                                            checksum=moved.checksum))
            except (OSError, ValueError) as e:
                reason = f"products could not be renamed and moved: {e}"
        status = "SUCCESSFUL" if result.ok and not reason else "FAILED"
        ab_path = self._write_ab(ab, dirs, status)
        logs = move_logs(workdir, dirs.logs, ab.name)
        shutil.rmtree(workdir, ignore_errors=True)  # partial products of a failed recipe are discarded
        return self._finish(
            ABResult(**common, status=status, reason=reason, finished_at=_now(), duration_s=round(result.duration_s, 3),
                     log_path=str(logs.get("rblog") or logs.get("out") or ""), ab_path=str(ab_path)),
            products,
        )

    def _finish(self, result: ABResult, products: list[Product] | None = None) -> ABOutcome:
        self._metrics.ab_outcomes.labels(self._profile.instrument, result.status).inc()
        return ABOutcome(result, tuple(products or ()))

    @staticmethod
    def _write_ab(ab: AssociationBlock, dirs: RunDirs, status: str) -> Path:
        """The AB as DFOS writes it, into the run's log directory: PROD_PATH is the run's
        science directory, BATCH_ID the run (DFOS's SCIENCE_<date> batch is one delivery here)."""
        path = dirs.logs / f"{ab.name}.ab"
        text = format_ab(ab, process_status=status, prod_path=dirs.sci, batch_id=f"SCIENCE_{dirs.sci.name}")
        write_atomic(path, text.encode())
        return path


def _now() -> datetime:
    return datetime.now(UTC)


def check_instrument(profile: Profile, settings: Settings) -> list[str]:
    """What is missing for this instrument to be processed (empty when all is there)."""
    from services.processor.toolcheck import check_instrument as consistency_check

    report = consistency_check(profile, settings.cal_dir())
    for warning in report.warnings:
        _log.warning("%s: %s", profile.instrument, warning)
    return list(report.missing)
