"""Reporter: ProductsReady -> REPORT, USERREPORT, list_mcalib -> ReportsReady.

Steps 6 to 8 of processPreImg. The handler renders the run's reports from
jinja2 templates into the run's log directory (each file written atomically)
and returns the ReportsReady event; it never touches the broker.

Files written into ``ProductsReady.log_dir``:

- ``REPORT_<instr>_<date>_<runid>.log`` (+ ``.html``): what ran, each AB's
  status, recipe, calibrations and timings, every failure with its reason;
- ``USERREPORT_<instr>_<date>_<runid>.log`` (+ ``.html``): the OB and frame
  reports of ``fitsreport_preimg.cfg`` over raw frames and products, for the PI;
- ``list_mcalib_<date>``: every calibration used, with PRO.CATG and date.

``<date>`` is the UTC date of the delivery, so a replayed message rewrites the
same files instead of adding new ones.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2

from services.reporter import runpage
from services.reporter.fitsreport import ReportSpec, build_tables, normalise_headers
from shared.errors import RetryableError
from shared.files import write_all_atomic
from shared.messages import ABResult, Envelope, Product, ProductsReady, ReportsReady

_log = logging.getLogger(__name__)

OK_STATUSES = ("SUCCESSFUL",)
FAILED_STATUSES = ("FAILED", "INCOMPLETE")
#: Keywords a product inherits from the raw frames of its AB when its own header
#: lacks them, so that products are grouped under their OB in the frame report.
INHERITED_KEYWORDS = ("OBS.ID", "OBS.NAME", "OBS.PROG.ID", "OBJECT")


@dataclass(frozen=True)
class ReporterPorts:
    """What the reporter handler needs from the outside world.

    Attributes
    ----------
    templates
        jinja2 environment loading ``services/reporter/templates``.
    clock
        Returns the current time (aware, UTC); fixed in golden-file tests.
    report_specs
        Returns the parsed fitsreport configuration (read on each call, so an
        operator's edit takes effect on the next run).
    write_reports
        Writes the rendered reports (path -> text), durably, before the
        handler returns; raises OSError when it cannot.
    """

    templates: jinja2.Environment
    clock: Callable[[], datetime]
    report_specs: Callable[[], tuple[ReportSpec, ...]]
    write_reports: Callable[[Mapping[Path, str]], None]
    #: The instrument's profile (key QC ranges, README name) for the run page; None: no profile.
    load_profile: Callable[[str], Any] | None = None


@dataclass(frozen=True)
class ReportNames:
    report: Path
    report_html: Path
    userreport: Path
    userreport_html: Path
    list_mcalib: Path


def report_date(msg: ProductsReady) -> str:
    """The ``<date>`` of the report names: the UTC day the delivery arrived."""
    return msg.delivered_at.astimezone(UTC).strftime("%Y-%m-%d")


def report_names(msg: ProductsReady) -> ReportNames:
    log_dir = Path(msg.log_dir)
    date = report_date(msg)
    stem = f"{msg.instrument}_{date}_{msg.run_id}"
    return ReportNames(
        report=log_dir / f"REPORT_{stem}.log",
        report_html=log_dir / f"REPORT_{stem}.html",
        userreport=log_dir / f"USERREPORT_{stem}.log",
        userreport_html=log_dir / f"USERREPORT_{stem}.html",
        list_mcalib=log_dir / f"list_mcalib_{date}",
    )


def _first_value(mapping: Mapping[str, str]) -> str:
    for key in ("DO.CATG", "RAW.TYPE", "CATG"):
        if mapping.get(key):
            return mapping[key]
    return next(iter(mapping.values()), "")


def _distinct(values: list[Any]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(v).strip() for v in values if v not in (None, "")))


def _iso(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _raw_files(msg: ProductsReady) -> list[dict[str, Any]]:
    files = []
    for frame in msg.frames:
        headers = normalise_headers(frame.headers)
        headers["@file"] = frame.name
        headers["@catg"] = _first_value(frame.classification)
        files.append(headers)
    return files


def _product_files(
    msg: ProductsReady, raw_by_name: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Header dictionaries of the products, from what the processor read of them."""
    raw_of_ab = {ab.name: ab.raw for ab in msg.abs}
    files = []
    for product in msg.products:
        path = Path(product.path)
        headers = normalise_headers(product.header)
        headers.update(normalise_headers(product.qc))
        for raw_name in raw_of_ab.get(product.ab, ()):
            raw = raw_by_name.get(Path(raw_name).name)
            if raw is None:
                continue
            for key in INHERITED_KEYWORDS:
                if headers.get(key) in (None, "") and raw.get(key) not in (None, ""):
                    headers[key] = raw[key]
            break
        headers["@file"] = path.name
        headers["@catg"] = product.pro_catg or headers.get("PRO.CATG", "")
        headers["@ab"] = product.ab
        files.append(headers)
    return files


def _product_note(product: Product) -> str:
    """Why a product shows up in the notes: gone since the processor moved it, or a header without PRO.CATG."""
    path = Path(product.path)
    if not path.is_file():
        return f"product {path.name}: file missing ({path})"
    return f"product {path.name}: its header could not be read (no PRO.CATG)"


def _calibrations(abs_: tuple[ABResult, ...]) -> list[dict[str, Any]]:
    """Every calibration file used, once, with PRO.CATG and date as the processor read them."""
    by_path: dict[str, dict[str, Any]] = {}
    for ab in abs_:
        for cal in ab.calibrations:
            entry = by_path.get(cal.path)
            if entry is None:
                entry = {
                    "name": Path(cal.path).name,
                    "path": cal.path,
                    "pro_catg": cal.pro_catg or "-",
                    "date": cal.date or "-",
                    "tags": [],
                    "abs": [],
                }
                by_path[cal.path] = entry
            if cal.tag not in entry["tags"]:
                entry["tags"].append(cal.tag)
            if ab.name not in entry["abs"]:
                entry["abs"].append(ab.name)
    return sorted(by_path.values(), key=lambda e: (e["pro_catg"], e["date"], e["name"]))


def _ab_rows(msg: ProductsReady) -> list[dict[str, Any]]:
    products_of: dict[str, list[str]] = {}
    for product in msg.products:
        products_of.setdefault(product.ab, []).append(Path(product.path).name)
    rows = []
    for ab in msg.abs:
        duration = ab.duration_s
        if not duration and ab.started_at and ab.finished_at:
            duration = (ab.finished_at - ab.started_at).total_seconds()
        rows.append(
            {
                "name": ab.name,
                "action": ab.action or "-",
                "recipe": ab.recipe or "-",
                "status": ab.status,
                "reason": ab.reason,
                "raw": list(ab.raw),
                "missing": list(ab.missing),
                "calibrations": list(ab.calibrations),
                "started": _iso(ab.started_at),
                "finished": _iso(ab.finished_at),
                "duration": duration,
                "log_path": ab.log_path,
                "log_name": Path(ab.log_path).name if ab.log_path else "",
                "products": products_of.get(ab.name, []),
            }
        )
    return rows


def _summary(msg: ProductsReady, abs_ok: int, abs_failed: int) -> str:
    not_processed = sum(1 for ab in msg.abs if ab.status == "NOT_PROCESSED")
    text = (
        f"{msg.instrument} run {msg.run_id}: status {msg.status}; {len(msg.frames)} raw frame(s), "
        f"{len(msg.abs)} AB(s): {abs_ok} successful, {abs_failed} failed"
    )
    if not_processed:
        text += f", {not_processed} not processed"
    return text + f"; {len(msg.products)} product(s)"


def handle_products_ready(msg: ProductsReady, ports: ReporterPorts) -> list[Envelope]:
    """Write the run's reports into its log directory and announce them.

    Parameters
    ----------
    msg
        The processor's result: raw frames with headers, ABs, products.
    ports
        Templates, clock, fitsreport configuration. No FITS file is opened: the
        header values come in the message.

    Returns
    -------
    list of Envelope
        One ReportsReady whose ``files`` lists every file of the package and whose
        ``checksums`` give the SHA-256 of the reports written here and of the products.

    Raises
    ------
    RetryableError
        The log directory cannot be written (disk full, volume away).
    """
    now = ports.clock()
    names = report_names(msg)
    raw_files = _raw_files(msg)
    raw_by_name = {f["@file"]: f for f in raw_files}
    product_files = _product_files(msg, raw_by_name)
    notes = [_product_note(p) for p in msg.products if not p.pro_catg or not Path(p.path).is_file()]
    calibrations = _calibrations(msg.abs)
    tables = build_tables(ports.report_specs(), raw_files, product_files)
    ab_rows = _ab_rows(msg)
    abs_ok = sum(1 for ab in msg.abs if ab.status in OK_STATUSES)
    abs_failed = sum(1 for ab in msg.abs if ab.status in FAILED_STATUSES)
    objects = _distinct([f.get("OBJECT") for f in raw_files])
    prog_ids = _distinct([f.get("OBS.PROG.ID") for f in raw_files])
    summary = _summary(msg, abs_ok, abs_failed)
    context = {
        "msg": msg,
        "date": report_date(msg),
        "reported_at": _iso(now),
        "delivered_at": _iso(msg.delivered_at),
        "abs": ab_rows,
        "abs_ok": abs_ok,
        "abs_failed": abs_failed,
        "failures": [row for row in ab_rows if row["status"] in FAILED_STATUSES],
        "products": [
            {"name": f["@file"], "pro_catg": f["@catg"], "ab": f["@ab"], "qc": p.qc}
            for f, p in zip(product_files, msg.products)
        ],
        "calibrations": calibrations,
        "tables": tables,
        "objects": objects,
        "prog_ids": prog_ids,
        "notes": notes,
        "summary": summary,
        "names": names,
    }
    outputs = {
        names.report: "report.txt.j2",
        names.report_html: "report.html.j2",
        names.userreport: "userreport.txt.j2",
        names.userreport_html: "userreport.html.j2",
        names.list_mcalib: "list_mcalib.txt.j2",
    }
    texts = {}
    for path, template in outputs.items():
        text = ports.templates.get_template(template).render(context)
        if ".html" not in template:
            # Padded last columns leave trailing blanks; diff and mail tools flag them.
            text = "\n".join(line.rstrip() for line in text.split("\n"))
        texts[path] = text
    profile = ports.load_profile(msg.instrument) if ports.load_profile else None
    ranges = profile.qc_ranges if profile else {}
    run_page = Path(msg.log_dir) / runpage.RUN_PAGE
    texts[run_page] = runpage.render(ports.templates, msg, context, ranges,
                                     profile.readme_name if profile else "README", now)
    try:
        ports.write_reports(texts)
    except OSError as e:
        raise RetryableError(f"cannot write the reports into {msg.log_dir}: {e}") from e
    _log.info("reports written for %s run %s: %s", msg.instrument, msg.run_id, summary)

    files = [str(path) for path in outputs] + [str(run_page)]
    files += [p.path for p in msg.products]
    looks = [p.quicklook for p in msg.products if p.quicklook is not None]
    files += [f for q in looks for f in (q.path, q.thumbnail)]
    # The reports' digests, from the bytes just written (and synced): the publisher can then link
    # them into the package instead of copying and hashing them again.
    checksums = {str(path): "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
                 for path, text in texts.items()}
    checksums.update({p.path: p.checksum for p in msg.products if p.checksum})
    checksums.update({q.path: q.checksum for q in looks})
    checksums.update({q.thumbnail: q.thumbnail_checksum for q in looks})
    files += [ab.log_path for ab in msg.abs if ab.log_path]
    return [
        ReportsReady(
            **msg.follow_up("reports_ready"),
            report=str(names.report),
            userreport=str(names.userreport),
            list_mcalib=str(names.list_mcalib),
            raw_dir=msg.raw_dir,
            sci_dir=msg.sci_dir,
            log_dir=msg.log_dir,
            status=msg.status,
            n_files=len(msg.frames),
            abs_ok=abs_ok,
            abs_failed=abs_failed,
            delivered_at=msg.delivered_at,
            summary=summary,
            files=tuple(dict.fromkeys(files)),
            checksums=checksums,
            objects=objects,
            prog_ids=prog_ids,
            reason=runpage.first_failure(msg) if msg.status != "ok" else "",
            thumbnail=runpage.thumbnail(msg),
            key_qc=runpage.key_qc(msg, ranges),
        )
    ]


def write_report_files(texts: Mapping[Path, str]) -> None:
    """Every report atomically, synced together: at once, or under a runner with the stage's record.

    The reports are rendered and written again whenever the stage runs again before it
    recorded its result, so their bytes need not be durable before their renames
    (``write_all_atomic(rewritten=True)``): one round of syncs fewer.
    """
    write_all_atomic(texts, rewritten=True)
