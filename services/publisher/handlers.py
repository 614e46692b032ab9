"""Publisher: ReportsReady -> QC server package, monitor row, e-mail -> PreImagingCompleted.

Steps 9 to 11 of processPreImg, plus what AOG used to do after seeing the
``EXECUTED`` flag: the package goes to the QC server (S3 bucket or local
directory) with a SHA-256 per file, and a completion event tells AOG where.

Order matters, because the event is the promise that the package is there:

1. fetch the PI README from the QC server (missing: a note in the REPORT);
2. upload README, REPORT, USERREPORT, list_mcalib, products and logs, then
   ``SHA256SUMS`` and the run's monitor row (in one batch: on the local QC
   server they appear together, their bytes synced in one round); an S3 outage
   raises RetryableError here and nothing below runs. Each file is read once: a SHA-256 the message carries (the processor's, for
   products) is trusted, and the file is skipped when the server already holds
   it with that SHA-256 and size (a replay); other files are hashed while read
   for the upload;
3. ask for ``preimgMonitor.html`` to be rebuilt from the newest rows (the
   ``monitor`` port: in the service, on a thread of its own once the
   completion is on its way, see :mod:`services.publisher.pages`);
4. e-mail the operator when EMAIL_NOTE is on, once per run (recorded in the
   run's state directory); an SMTP failure is logged and counted, not fatal;
5. the legacy ``EXECUTED`` file, when configured;
6. return PreImagingCompleted.

Layout on the QC server, under the instrument's ``qc_prefix`` (``PREIMG/HAWKI``):
``preimgMonitor.html``, ``<readme_name>`` (maintained by the QC scientist),
``monitor/rows/<run_id>.json`` and ``runs/<run_id>/`` holding the package:
reports, list_mcalib, README and ``SHA256SUMS`` at the top, ``products/`` and ``logs/``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

import jinja2
from markupsafe import Markup

from services.publisher.mailer import MAIL_ERRORS, Mailer
from services.publisher.monitor import (
    MonitorRow,
    drop_moved_entry,
    page_key,
    read_row,
    write_row,
)
from services.publisher.qcserver import HEX_SHA256, QcServer
from services.publisher.runlinks import RUN_PAGE, run_links
from services.publisher.trends import trend_charts
from shared.errors import PermanentError
from shared.files import sha256_of
from shared.layout import is_fits_name, path_inside
from shared.messages import (
    Envelope,
    ManifestEntry,
    PreImagingCompleted,
    ReportsReady,
    RunFailed,
)
from shared.profiles import Profile, ProfileError
from shared.settings import Settings

_log = logging.getLogger(__name__)

README_NOTE_MARKER = "NOTE (publisher): PI README"
NOTIFIED_FILE = "publisher.notified.json"
EXECUTED_FILE = "EXECUTED"
CHECKSUM_FILE = "SHA256SUMS"
REPORT_PREFIXES = ("REPORT_", "USERREPORT_", "list_mcalib_")


@dataclass(frozen=True)
class PublisherPorts:
    """What the publisher handler needs from the outside world.

    Attributes
    ----------
    settings
        Typed settings (state directories, operator address, EXECUTED flag).
    qc
        The QC server: :class:`~services.publisher.qc_s3.S3QcServer` or
        :class:`~services.publisher.qc_local.LocalQcServer`.
    mailer
        Sends the operator note.
    templates
        jinja2 environment with ``preimgMonitor.html.j2`` (HTML-escaping).
    clock
        Current time, aware UTC.
    load_profile
        Instrument profile by name (qc_prefix, readme_name, email_note, email_to).
    count_notification_failure
        Called with the instrument each time an e-mail cannot be sent.
    files
        The run's local files (README copy, REPORT note, e-mail marker, EXECUTED).
    monitor
        Rebuilds an instrument's monitor page from its rows, now or soon after.
    """

    settings: Settings
    qc: QcServer
    mailer: Mailer
    templates: jinja2.Environment
    clock: Callable[[], datetime]
    load_profile: Callable[[str], Profile]
    count_notification_failure: Callable[[str], None]
    files: RunFiles
    monitor: MonitorPages


class RunFiles(Protocol):
    """The run's local files the publisher reads and marks (the README copy, the REPORT's
    note, the e-mail marker, the legacy EXECUTED flag); writes are atomic, and durable unless asked not."""

    def read_text(self, path: Path) -> str | None:
        """The file's text, or None when it does not exist."""

    def write(self, path: Path, data: bytes, durable: bool = True) -> None:
        """Replace the file's content atomically; durably unless ``durable`` is False."""

    def exists(self, path: Path) -> bool:
        """Whether the file exists."""

    def touch(self, path: Path) -> None:
        """Create the (empty) file if it is missing, durably."""


class MonitorPages(Protocol):
    """Brings an instrument's monitor page up to date with its rows."""

    def refresh(self, instrument: str, base: str, now: datetime) -> None:
        """Rebuild the page under ``base`` from its newest rows, now or soon after (``now``: its
        "generated at"); raises only when it rebuilds at once and that fails."""


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def qc_base(profile: Profile) -> str:
    """Key prefix of the instrument on the QC server (``PREIMG/<INSTR>`` by default)."""
    return profile.qc_prefix.strip("/") or f"PREIMG/{profile.instrument}"


def package_prefix(base: str, run_id: str) -> str:
    return f"{base}/runs/{run_id}/"


def _content_type(name: str) -> str:
    if name.endswith(".html"):
        return "text/html; charset=utf-8"
    if name.endswith(".png"):
        return "image/png"
    if is_fits_name(name):
        return "application/fits"
    if name.endswith((".log", ".txt", ".ab", ".sof")) or name.startswith(REPORT_PREFIXES) \
            or name == CHECKSUM_FILE:
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


def package_name(path: Path, msg: ReportsReady) -> str:
    """Where a file of the run goes inside the package.

    The paths are compared as written (made absolute and normalised, no
    symlink lookups): the processor names every file under the run's own
    directories, so a file outside them is a log of some other origin.
    The reporter's run page (``<log_dir>/index.html``) goes to the top.
    """
    if path.name.startswith(REPORT_PREFIXES):
        return path.name
    for directory, folder in ((msg.sci_dir, "products"), (msg.log_dir, "logs")):
        inside = path_inside(path, directory)
        if inside is not None:
            return RUN_PAGE if (folder, inside) == ("logs", RUN_PAGE) else f"{folder}/{inside}"
    return "logs/" + path.name


MONITOR_TEMPLATE = "preimgMonitor.html.j2"
MONITOR_ROW_TEMPLATE = "preimgMonitorRow.html.j2"


@dataclass
class RowFragments:
    """The monitor rows one publisher process already rendered, so a rebuild renders only new rows.

    ``rows`` maps ``id(row)`` to (row, its HTML); holding the row keeps its id from being
    reused. Rows come from the :class:`RowCache`, which hands out the same object while the
    row's object is unchanged. Emptied when the row template is compiled again (edited).
    """

    template: jinja2.Template | None = None
    rows: dict[int, tuple[MonitorRow, Markup]] = field(default_factory=dict)


def render_monitor(templates: jinja2.Environment, instrument: str, now: datetime,
                   max_rows: int, fragments: RowFragments | None = None) -> Callable[[list[MonitorRow]], str]:
    """The page renderer: newest first, at most ``max_rows`` rows; ``fragments``: rows rendered before."""
    fragments = RowFragments() if fragments is None else fragments

    def render(rows: list[MonitorRow]) -> str:
        ordered = sorted(rows, key=lambda r: (r.delivered_at, r.run_id), reverse=True)
        shown = ordered[:max_rows]
        row_template = templates.get_template(MONITOR_ROW_TEMPLATE)
        if fragments.template is not row_template:
            fragments.template, fragments.rows = row_template, {}
        kept, html = {}, []
        for row in shown:
            hit = fragments.rows.get(id(row))
            if hit is None or hit[0] is not row:
                hit = (row, Markup(row_template.render(row=row)))
            kept[id(row)] = hit
            html.append(hit[1])
        fragments.rows = kept
        return templates.get_template(MONITOR_TEMPLATE).render(
            instrument=instrument,
            rows=shown,
            row_html=html,
            total=len(rows),
            generated_at=now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            trends=trend_charts(shown),
        )

    return render


@dataclass(frozen=True)
class PackageFile:
    """A file of the run and where it goes in the package.

    ``sha256`` is its hex digest when known without reading the file (computed
    upstream while the bytes were written); None: hashed while uploaded.
    """

    path: Path
    name: str
    sha256: str | None = None


def known_checksums(msg: ReportsReady) -> dict[str, str]:
    """Hex SHA-256 by path for the files whose digest the message carries.

    ``ReportsReady.checksums`` (path -> ``sha256:<hex>``, the processor's
    ``Product.checksum``); files it does not name are hashed while uploaded.
    Other algorithms (an ``md5:`` AOG announced for a raw frame packaged as
    is) are not what the QC server records, so those files are hashed too.
    """
    known = {}
    for path, checksum in msg.checksums.items():
        algorithm, _, digest = checksum.lower().partition(":")
        if algorithm == "sha256" and HEX_SHA256.match(digest):
            known[str(Path(path))] = digest
    return known


def _fetch_readme(msg: ReportsReady, ports: PublisherPorts, profile: Profile,
                  base: str) -> tuple[PackageFile | None, str]:
    """Copy the PI README into the log dir; when it is missing, say so in the REPORT."""
    key = f"{base}/{profile.readme_name}"
    data = ports.qc.get(key)
    if data is not None:
        local = Path(msg.log_dir) / profile.readme_name
        ports.files.write(local, data)
        return PackageFile(local, local.name, sha256_of(data)), ""
    note = (
        f"{README_NOTE_MARKER} {profile.readme_name} was not found on the QC server "
        f"({ports.qc.url(key)}). The package was delivered without it. The QC scientist "
        f"maintains this file: upload it there and send it to the PI separately."
    )
    _log.warning("run %s: %s", msg.run_id, note)
    report = Path(msg.report)
    text = ports.files.read_text(report) or ""
    if README_NOTE_MARKER not in text:  # a replay must not add the note twice
        # Not synced here: the package's REPORT is copied from this file (no digest is known for it)
        # in the package's batch, which makes that copy durable before the completion is returned.
        ports.files.write(report, (text.rstrip("\n") + "\n\n" + note + "\n").encode(), durable=False)
    return None, note


def _collect(msg: ReportsReady, readme: PackageFile | None) -> list[PackageFile]:
    """Every file of the run, each once, with its name in the package and its known SHA-256."""
    known = known_checksums(msg)
    # The REPORT may carry the README note, written unsynced: always copied (and synced) into the package.
    known.pop(str(Path(msg.report)), None)
    paths = [msg.report, msg.userreport, msg.list_mcalib, *msg.files]
    files: dict[str, PackageFile] = {}
    for text in paths:
        path = Path(text)
        name = package_name(path, msg)
        if name not in files:
            files[name] = PackageFile(path, name, known.get(str(path)))
    if readme is not None:
        files[readme.name] = readme
    missing = [str(f.path) for f in files.values() if not f.path.is_file()]
    if missing:
        # The reporter listed them; if they are gone, retrying will not bring them back.
        raise PermanentError(
            f"run {msg.run_id}: {len(missing)} file(s) of the package are missing: "
            f"{', '.join(missing[:5])}; re-run the processing of this delivery",
            missing=missing,
        )
    return list(files.values())


def upload_package(msg: ReportsReady, ports: PublisherPorts, base: str,
                   files: list[PackageFile]) -> tuple[ManifestEntry, ...]:
    """Upload every file, then SHA256SUMS; each file is read at most once.

    A file with a known SHA-256 is skipped when the server already holds it
    with that SHA-256 and size (a replay: nothing is read); otherwise it is
    uploaded with the digest, which the server checks. A file without one is
    uploaded and hashed from the bytes read for the upload. The package's
    objects are listed once, so only those already there are asked for their
    SHA-256: a first publish makes one LIST request instead of a HEAD per file.
    """
    prefix = package_prefix(base, msg.run_id)
    with ports.qc.batch():  # all of the package durable before the manifest is returned
        manifest = _upload_files(ports, prefix, files)
        sums = "".join(f"{m.checksum.split(':', 1)[1]}  {m.name}\n" for m in manifest).encode()
        ports.qc.put(prefix + CHECKSUM_FILE, sums, content_type=_content_type(CHECKSUM_FILE))
    return tuple(manifest)


def _upload_files(ports: PublisherPorts, prefix: str, files: list[PackageFile]) -> list[ManifestEntry]:
    manifest = []
    present = ports.qc.list(prefix)  # an object put after this listing is simply put again
    for file in sorted(files, key=lambda f: f.name):
        size = file.path.stat().st_size
        key = prefix + file.name
        content_type = _content_type(file.path.name)
        digest = file.sha256
        if digest is None:
            digest = ports.qc.put(key, file.path, content_type=content_type)
        else:
            there = ports.qc.head(key) if key in present else None
            if there is None or there.sha256 != digest or there.size != size:
                ports.qc.put(key, file.path, content_type=content_type, sha256=digest)
        manifest.append(ManifestEntry(name=file.name, size=size, checksum=f"sha256:{digest}",
                                      url=ports.qc.url(key)))
    return manifest


def _notify(msg: ReportsReady, ports: PublisherPorts, profile: Profile, package_url: str,
            monitor_url: str, notes: list[str]) -> None:
    """E-mail the operator once per run; a failure is logged and counted, never fatal."""
    state = ports.settings.run_dirs(msg.instrument, msg.run_id).state
    marker = state / NOTIFIED_FILE
    if ports.files.exists(marker):
        _log.info("run %s: operator already notified, not mailing again", msg.run_id)
        return
    recipients = [a for a in (ports.settings.operator_email, *profile.email_to) if a]
    if not recipients:
        _log.warning("run %s: EMAIL_NOTE is on but no operator address is configured "
                     "(PREIMG_OPERATOR_EMAIL)", msg.run_id)
        return
    mail = EmailMessage()
    mail["Subject"] = (f"[preimg] {msg.instrument} {msg.run_id}: {msg.status}"
                       + (" (TEST)" if msg.test else ""))
    mail["From"] = ports.settings.smtp_from
    mail["To"] = ", ".join(recipients)
    report = Path(msg.report)
    body = [msg.summary or f"{msg.instrument} run {msg.run_id}: {msg.status}", "",
            f"package : {package_url}", f"monitor : {monitor_url}", *notes, "", "-" * 72, ""]
    body.append(ports.files.read_text(report) or "")
    mail.set_content("\n".join(body))
    try:
        ports.mailer.send(mail)
    except MAIL_ERRORS as e:
        _log.error("run %s: operator e-mail to %s failed, run completes anyway: %s",
                   msg.run_id, mail["To"], e)
        ports.count_notification_failure(msg.instrument)
        return
    ports.files.write(marker, json.dumps({"to": recipients, "at": ports.clock().isoformat()}).encode())


def _profile(ports: PublisherPorts, instrument: str) -> Profile:
    try:
        return ports.load_profile(instrument)
    except ProfileError as e:
        raise PermanentError(f"no publisher configuration for {instrument}: {e}") from e


# ---------------------------------------------------------------------------
# handlers
# ---------------------------------------------------------------------------


def handle_reports_ready(msg: ReportsReady, ports: PublisherPorts) -> list[Envelope]:
    """Publish the run's package and monitor row; announce completion.

    Parameters
    ----------
    msg
        The reporter's event: report paths, every file of the package, counts.
    ports
        QC server, mailer, templates, clock, profiles, failure counter.

    Returns
    -------
    list of Envelope
        One PreImagingCompleted with the package location and manifest.

    Raises
    ------
    RetryableError
        The QC server is unreachable (after the adapter's own retries); nothing
        has been reported complete.
    PermanentError
        Files of the package are missing, or the instrument has no profile.
    """
    profile = _profile(ports, msg.instrument)
    base = qc_base(profile)
    readme, readme_note = _fetch_readme(msg, ports, profile, base)
    notes = [readme_note] if readme_note else []
    files = _collect(msg, readme)
    now = ports.clock()
    previous = read_row(ports.qc, base, msg.run_id)
    # A replay keeps the first completion time, so the row's duration stays put.
    completed_at = previous.completed_at if previous and not previous.reason else now
    # The package and its monitor row appear together, made durable in one round of syncs.
    with ports.qc.batch():
        manifest = upload_package(msg, ports, base, files)
        row = MonitorRow(
            run_id=msg.run_id, instrument=msg.instrument, test=msg.test,
            delivered_at=msg.delivered_at, completed_at=completed_at, n_files=msg.n_files,
            abs_ok=msg.abs_ok, abs_failed=msg.abs_failed,
            duration_s=max((completed_at - msg.delivered_at).total_seconds(), 0.0),
            status=msg.status, report_url=f"runs/{msg.run_id}/{Path(msg.report).name}",
            objects=msg.objects, prog_ids=msg.prog_ids, first_failure=msg.reason,
            **run_links(msg, {m.name for m in manifest}),
        )
        write_row(ports.qc, base, row)
    package_url = ports.qc.url(package_prefix(base, msg.run_id))
    monitor_url = ports.qc.url(page_key(base))
    drop_moved_entry(ports.qc, base, row, previous)
    ports.monitor.refresh(msg.instrument, base, now)

    if profile.email_note:
        _notify(msg, ports, profile, package_url, monitor_url, notes)
    if ports.settings.write_executed_flag:
        ports.files.touch(Path(msg.sci_dir) / EXECUTED_FILE)

    summary = " ".join([msg.summary, *notes]).strip()
    _log.info("run %s published: %d file(s) at %s", msg.run_id, len(manifest), package_url)
    return [
        PreImagingCompleted(
            **msg.follow_up("completed"),
            status=msg.status,
            package_dir=msg.sci_dir,
            package_url=package_url,
            monitor_url=monitor_url,
            manifest=manifest,
            summary=summary,
            reason=msg.reason,
            run_page_url=ports.qc.url(package_prefix(base, msg.run_id) + RUN_PAGE)
            if RUN_PAGE in {m.name for m in manifest} else "",
        )
    ]


def handle_run_failed(msg: RunFailed, ports: PublisherPorts) -> list[Envelope]:
    """Show a failed run on the monitor page; emits nothing.

    A run that already completed keeps its row: a late or replayed RunFailed
    must not hide a package that was delivered.
    """
    try:
        profile = ports.load_profile(msg.instrument)
        base = qc_base(profile)
    except ProfileError:
        # No monitor page exists for an instrument preimg does not know; the RunFailed
        # event itself already told AOG and the operators.
        _log.info("RunFailed for unknown instrument %s: no monitor row", msg.instrument)
        return []
    previous = read_row(ports.qc, base, msg.run_id)
    if previous is not None and not previous.reason:
        _log.info("run %s already has a completed monitor row; RunFailed from %s not shown",
                  msg.run_id, msg.failed_stage)
        return []
    now = ports.clock()
    delivered_at = previous.delivered_at if previous else msg.created_at
    page = ports.templates.get_template("runFailed.html.j2").render(
        run_id=msg.run_id, instrument=msg.instrument, test=msg.test, failed_stage=msg.failed_stage,
        reason=msg.reason, delivered_at=delivered_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        failed_at=now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"))
    ports.qc.put(package_prefix(base, msg.run_id) + RUN_PAGE, page.encode(),
                 content_type=_content_type(RUN_PAGE))
    row = MonitorRow(
        run_id=msg.run_id, instrument=msg.instrument, test=msg.test,
        delivered_at=delivered_at, completed_at=now, status="failed",
        reason=f"{msg.failed_stage}: {msg.reason}", run_url=f"runs/{msg.run_id}/{RUN_PAGE}",
    )
    write_row(ports.qc, base, row)
    drop_moved_entry(ports.qc, base, row, previous)
    ports.monitor.refresh(msg.instrument, base, now)
    return []
