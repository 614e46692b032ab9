"""Processor: createAB, processAB, renameProducts, moveProducts and updateAB for one run.

The handler is the workflow; the work itself sits behind two ports:

* ``plan`` (createAB): classify, organise and associate the run's raw frames by
  the instrument's OCA rules and return the Association Blocks to run;
* ``execute`` (processAB + renameProducts + moveProducts + updateAB): run one
  AB's recipe with esorex in a fresh working directory and move its products
  and log into the run's science and log directories.

ABs run in parallel up to the profile's ``max_parallel_abs``. One AB failing
(a corrupt frame, a crash, a timeout) never stops the others; the run then
goes on to the reports with status ``partial``. With PIPE_SUPPORT=NO the raw
frames themselves are packaged, as processPreImg did.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.errors import PermanentError
from shared.messages import (
    ABResult,
    Envelope,
    Product,
    ProductsReady,
    RawDataReady,
    RawFrame,
)
from shared.profiles import Profile
from shared.settings import RunDirs

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ABOutcome:
    result: ABResult
    products: tuple[Product, ...] = ()


@dataclass(frozen=True)
class ProcessorPorts:
    profile: Profile
    run_dirs: Callable[[str, str], RunDirs]
    plan: Callable[[RawDataReady, RunDirs], Sequence[Any]]
    execute: Callable[[Any, RunDirs], ABOutcome]
    #: Starts the run clean: stops what an attempt that died left running, then empties the
    #: run's sci/, logs/ and work/ (no result was recorded, so what is there is that attempt's).
    prepare_workspace: Callable[[RunDirs], None]
    #: PIPE_SUPPORT=NO: puts the raw frames themselves into the run's science directory.
    package_raw: Callable[[Sequence[RawFrame], Path], list[Product]]
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    #: Draws the quick-look of a science product next to it (the profile's quicklook_catgs) and
    #: returns the product with it; None: no quick-looks.
    quicklook: Callable[[Product, Path], Product] | None = None
    #: Told each time an AB has finished: (ABs finished, ABs in the run, its result); e.g. progress.
    ab_finished: Callable[[int, int, ABResult], None] | None = None


def handle_raw_ready(msg: RawDataReady, ports: ProcessorPorts) -> list[Envelope]:
    """Run every AB of the delivery and emit ProductsReady."""
    if msg.instrument != ports.profile.instrument:
        raise PermanentError(
            f"raw data of {msg.instrument} reached the {ports.profile.instrument} processor; "
            "check the queue bindings"
        )
    dirs = ports.run_dirs(msg.instrument, msg.run_id)
    # No result was recorded for this run (else the runner would not call us), so anything in
    # these directories is left by an attempt that died midway: start clean, never duplicate.
    ports.prepare_workspace(dirs)

    if not ports.profile.pipe_support:
        products = ports.package_raw(msg.frames, dirs.sci)
        results: list[ABResult] = []
        status = "ok"
    else:
        planned = list(ports.plan(msg, dirs))
        if not planned:
            raise PermanentError(
                "no Association Block could be built from the delivered frames: none was classified "
                "as pre-imaging science by the instrument's OCA rules (see the frames' problems in "
                "RawDataReady, or run `preimg explain`)"
            )
        outcomes = _run_all(planned, dirs, ports)
        results = [o.result for o in outcomes]
        products = [p for o in outcomes for p in o.products]
        ok = sum(r.status == "SUCCESSFUL" for r in results)
        status = "ok" if ok == len(results) else ("partial" if ok else "failed")
    products = _with_quicklooks(products, dirs.sci, ports)

    return [
        ProductsReady(
            **msg.follow_up("products_ready"),
            raw_dir=msg.raw_dir,
            sci_dir=str(dirs.sci),
            log_dir=str(dirs.logs),
            frames=msg.frames,
            abs=tuple(results),
            products=tuple(products),
            status=status,
            delivered_at=msg.delivered_at,
            pipe_support=ports.profile.pipe_support,
        )
    ]


def _with_quicklooks(products: list[Product], sci: Path, ports: ProcessorPorts) -> list[Product]:
    wanted = set(ports.profile.quicklook_catgs)
    if ports.quicklook is None or not wanted:
        return products
    return [ports.quicklook(p, sci) if p.pro_catg in wanted else p for p in products]


def _run_all(planned: list[Any], dirs: RunDirs, ports: ProcessorPorts) -> list[ABOutcome]:
    def run_one(ab: Any) -> ABOutcome:
        try:
            return ports.execute(ab, dirs)
        except Exception as e:  # noqa: BLE001 - one AB's failure must not stop the others
            _log.exception("AB %s failed unexpectedly", getattr(ab, "name", ab))
            now = ports.clock()
            return ABOutcome(ABResult(name=str(getattr(ab, "name", ab)), status="FAILED",
                                      reason=f"internal error: {type(e).__name__}: {e}",
                                      started_at=now, finished_at=now))

    done = [0]
    lock = threading.Lock()

    def run_and_tell(ab: Any) -> ABOutcome:
        outcome = run_one(ab)
        if ports.ab_finished is not None:
            with lock:
                done[0] += 1
                ports.ab_finished(done[0], len(planned), outcome.result)
        return outcome

    with ThreadPoolExecutor(max_workers=ports.profile.max_parallel_abs, thread_name_prefix="ab") as pool:
        return list(pool.map(run_and_tell, planned))
