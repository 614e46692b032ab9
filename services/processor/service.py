"""Processor's composition: the instrument profile, createAB (OCA rules) and processAB (esorex).

``AbPlanner.plan`` is createAB: it reads the rule-relevant header keywords of
the run's raw frames and of the static calibrations (``$DFO_CAL_DIR/<INSTR>/
2099-99-99`` and ``gen``), classifies, organises and associates them, and
returns the run's ABs (plus a note for every frame whose header could not be
read). ``AbExecutor.execute`` is processAB + renameProducts + moveProducts +
updateAB for one AB.
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from services.processor.esorex import kill_leftover_recipes, run_recipe
from services.processor.handlers import ABOutcome, ProcessorPorts
from services.processor.products import first_date_obs, move_logs, move_products, rename_products
from shared.errors import PermanentError
from shared.files import file_digest, write_atomic
from shared.fitsheader import FitsHeaderError, read_keywords
from shared.messages import ABResult, CalibrationUsed, Product, RawDataReady
from shared.metrics import Metrics
from shared.oca import (
    AssociationBlock,
    HeaderReader,
    RuleSet,
    build_abs,
    calib_pool_from_files,
    fits_files,
    profile_rules,
    rule_header_keys,
)
from shared.oca.abfiles import format_ab
from shared.profiles import Profile, load_profile
from shared.settings import RunDirs, Settings

_log = logging.getLogger(__name__)

CAL_SUBDIRS = ("2099-99-99", "gen")


@dataclass(frozen=True)
class UnreadableFrame:
    """A delivered frame createAB could not use: reported as a FAILED entry of the run."""

    name: str
    path: Path
    problem: str


def build_ports(settings: Settings, instrument: str, metrics: Metrics, profile: Profile | None = None) -> ProcessorPorts:
    profile = profile or load_profile(instrument)
    planner = AbPlanner(profile, settings.cal_dir() / instrument)
    executor = AbExecutor(profile, metrics)
    return ProcessorPorts(profile=profile, run_dirs=settings.run_dirs, plan=planner.plan, execute=executor.execute,
                          before_start=lambda dirs: kill_leftover_recipes(dirs.work))


class AbPlanner:
    """createAB for one instrument; the rules are loaded on first use and kept."""

    def __init__(self, profile: Profile, cal_dir: Path):
        self._profile = profile
        self._cal_dir = cal_dir
        self._rules: RuleSet | None = None
        self._reader: HeaderReader | None = None
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
                self._reader = HeaderReader(rule_header_keys(self._rules))
            return self._rules

    def plan(self, msg: RawDataReady, dirs: RunDirs) -> list[AssociationBlock | UnreadableFrame]:
        rules = self.rules()
        assert self._reader is not None
        raw_headers, bad = self._reader.read_many([f.path for f in msg.frames])
        calib_files = fits_files([self._cal_dir / sub for sub in CAL_SUBDIRS if (self._cal_dir / sub).is_dir()])
        pool = calib_pool_from_files(rules, self._reader, calib_files)
        abs_ = build_abs(rules, raw_headers, pool, actions=self._profile.science_actions or None)
        _log.info("createAB: %d raw frames, %d calibrations -> %d ABs (%d complete)",
                  len(raw_headers), len(pool), len(abs_), sum(ab.complete for ab in abs_))
        used = {Path(p).resolve() for ab in abs_ for p, _ in ab.raw}
        unused = [f for f in msg.frames if Path(f.path).resolve() not in used and Path(f.path) not in bad]
        if unused:
            _log.info("frames in no SCIENCE AB: %s", ", ".join(f.name for f in unused))
        return [*abs_, *(UnreadableFrame(p.name, p, str(e)) for p, e in bad.items())]


class AbExecutor:
    """processAB + renameProducts + moveProducts + updateAB for one AB."""

    def __init__(self, profile: Profile, metrics: Metrics):
        self._profile = profile
        self._metrics = metrics

    def execute(self, item: AssociationBlock | UnreadableFrame, dirs: RunDirs) -> ABOutcome:
        started = _now()
        if isinstance(item, UnreadableFrame):
            return self._finish(ABResult(name=item.name, status="FAILED", raw=(str(item.path),),
                                         reason=f"frame {item.name} not processed: {item.problem}",
                                         started_at=started, finished_at=started))
        ab = item
        calibrations = tuple(
            CalibrationUsed(tag=tag, path=str(p), **_calib_info(p)) for tag, paths in ab.calibs.items() for p in paths
        )
        common = {"name": ab.name, "action": ab.action, "recipe": ab.recipe, "raw": tuple(str(p) for p, _ in ab.raw),
                  "calibrations": calibrations, "missing": tuple(ab.missing), "started_at": started}
        if not ab.complete:
            ab_path = self._write_ab(ab, dirs.logs, "NOT_PROCESSED")
            reason = "INCOMPLETE: " + "; ".join(f"{tag}: {why}" for tag, why in ab.missing.items())
            return self._finish(ABResult(**common, status="INCOMPLETE", reason=reason, finished_at=_now(),
                                         ab_path=str(ab_path)))

        workdir = dirs.work / ab.name
        kill_leftover_recipes(workdir)  # a recipe of an attempt that died must not write into the new one
        shutil.rmtree(workdir, ignore_errors=True)  # left by an attempt that died
        options = (*ab.recipe_options, *self._profile.recipe_options.get(ab.recipe, ()))
        result = run_recipe(
            ab.recipe,
            [(p, tag) for p, tag in ab.raw] + [(p, tag) for tag, paths in ab.calibs.items() for p in paths],
            workdir,
            recipe_dir=self._profile.resolve_recipe_dir(),
            options=options,
            timeout_s=self._profile.recipe_timeout_s,
        )
        self._metrics.recipe_duration.labels(self._profile.instrument, ab.recipe, result.status).observe(result.duration_s)
        products: list[Product] = []
        reason = result.reason
        if result.ok:
            try:
                date_obs = first_date_obs([Path(p) for p, _ in ab.raw])
                renamed = rename_products(result.products, self._profile.instrument, date_obs)
                for moved in move_products(renamed, dirs.sci):
                    products.append(Product(path=str(moved.path), pro_catg=moved.pro_catg, ab=ab.name,
                                            qc=dict(moved.qc), checksum="sha256:" + file_digest(moved.path)))
            except (OSError, ValueError) as e:
                reason = f"products could not be renamed and moved: {e}"
        status = "SUCCESSFUL" if result.ok and not reason else "FAILED"
        ab_path = self._write_ab(ab, dirs.work / "ab", status)
        logs = move_logs(workdir, dirs.logs, ab.name, ab_path)
        shutil.rmtree(workdir, ignore_errors=True)  # partial products of a failed recipe are discarded
        return self._finish(
            ABResult(**common, status=status, reason=reason, finished_at=_now(), duration_s=round(result.duration_s, 3),
                     log_path=str(logs.get("rblog") or logs.get("out") or ""), ab_path=str(logs.get("ab", ""))),
            products,
        )

    def _finish(self, result: ABResult, products: list[Product] | None = None) -> ABOutcome:
        self._metrics.ab_outcomes.labels(self._profile.instrument, result.status).inc()
        return ABOutcome(result, tuple(products or ()))

    @staticmethod
    def _write_ab(ab: AssociationBlock, directory: Path, status: str) -> Path:
        path = directory / f"{ab.name}.ab"
        write_atomic(path, format_ab(ab, process_status=status).encode())
        return path


def _calib_info(path: Path) -> dict[str, str]:
    """PRO.CATG and date of a calibration file, for the reports and list_mcalib."""
    try:
        header = read_keywords(path, ("ESO PRO CATG", "DATE-OBS", "DATE"))
    except FitsHeaderError:
        return {}
    return {"pro_catg": str(header.get("ESO PRO CATG", "")), "date": str(header.get("DATE-OBS", header.get("DATE", "")))}


def _now() -> datetime:
    return datetime.now(UTC)


def check_instrument(profile: Profile, settings: Settings) -> list[str]:
    """What is missing for this instrument to be processed (empty when all is there)."""
    from services.processor.toolcheck import check_instrument as consistency_check

    return list(consistency_check(profile, settings.cal_dir()).missing)
