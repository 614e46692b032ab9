"""Reporter: golden REPORT / USERREPORT / list_mcalib from a fixed run over real FITS files."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from services.reporter.fitsreport import build_table, fit, format_value
from services.reporter.handlers import handle_products_ready
from services.reporter.service import build_ports
from shared.errors import RetryableError
from shared.messages import ReportsReady, derived_message_id
from shared.settings import Settings
from shared.userreport_config import (
    USERREPORT_CONFIG,
    FitsreportConfigError,
    normalise_keyword,
    parse_config,
)
from tests.conftest import IN_CI
from tests.reporter.sample import REPORTED, XSS, products_ready

GOLDEN = Path(__file__).parent / "golden"
#: UPDATE_GOLDEN=1 rewrites the golden files (review the diff before committing).
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


@pytest.fixture
def ports(tmp_path):
    return dataclasses.replace(build_ports(Settings(data_root=tmp_path)), clock=lambda: REPORTED)


def _check_golden(actual: str, name: str, root: Path) -> None:
    actual = actual.replace(str(root), "<ROOT>")
    golden = GOLDEN / name
    if UPDATE and not (golden.is_file() and golden.read_text() == actual):
        # Rewriting never passes: the run that changed a golden file fails, and only a run
        # without UPDATE_GOLDEN, against the reviewed files, can pass.
        if IN_CI:
            pytest.fail("UPDATE_GOLDEN is set in CI: golden files are updated by a person, not by CI")
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(actual)
        pytest.fail(f"{golden} rewritten (UPDATE_GOLDEN=1): review the diff, then run again without it")
    assert golden.is_file(), f"no golden file {golden}; run with UPDATE_GOLDEN=1"
    assert actual == golden.read_text(), f"{name} differs from its golden file"


def test_reports_match_golden_files(tmp_path, ports):
    msg = products_ready(tmp_path)
    [event] = handle_products_ready(msg, ports)
    assert isinstance(event, ReportsReady)
    assert Path(event.report).name == "REPORT_HAWKI_2026-11-20_run-0001.log"
    assert Path(event.userreport).name == "USERREPORT_HAWKI_2026-11-20_run-0001.log"
    assert Path(event.list_mcalib).name == "list_mcalib_2026-11-20"
    for path in (event.report, event.userreport, event.list_mcalib):
        assert Path(path).parent == Path(msg.log_dir)
    _check_golden(Path(event.report).read_text(), "REPORT.log", tmp_path)
    _check_golden(Path(event.userreport).read_text(), "USERREPORT.log", tmp_path)
    _check_golden(Path(event.list_mcalib).read_text(), "list_mcalib", tmp_path)
    _check_golden(Path(event.report).with_suffix(".html").read_text(), "REPORT.html", tmp_path)
    _check_golden(Path(event.userreport).with_suffix(".html").read_text(), "USERREPORT.html",
                  tmp_path)


def test_event_copies_the_envelope_and_counts(tmp_path, ports):
    msg = products_ready(tmp_path, test=True)
    [event] = handle_products_ready(msg, ports)
    assert (event.run_id, event.delivery_id, event.instrument, event.test) == (
        msg.run_id, msg.delivery_id, msg.instrument, True)
    assert event.message_id == derived_message_id(msg.run_id, "reports_ready")
    assert (event.n_files, event.abs_ok, event.abs_failed, event.status) == (3, 1, 1, "partial")
    assert event.objects == ("NGC 1234", XSS)
    assert event.prog_ids == ("0116.A-0123(A)",)
    assert msg.products[0].path in event.files
    assert msg.abs[0].log_path in event.files
    assert all(Path(f).is_file() for f in event.files)


def test_report_names_every_failure_with_its_reason(tmp_path, ports):
    [event] = handle_products_ready(products_ready(tmp_path), ports)
    text = Path(event.report).read_text()
    assert "HAWKI.2026-11-19T03:10:00.000_tpl.ab: FAILED" in text
    assert "no master dark matches DIT 10.0" in text
    assert "MASTER_DARK(DIT=10.0)" in text


def test_list_mcalib_reads_pro_catg_and_date_from_the_calibration_header(tmp_path, ports):
    [event] = handle_products_ready(products_ready(tmp_path), ports)
    lines = [ln for ln in Path(event.list_mcalib).read_text().splitlines() if not ln.startswith("#")]
    assert len(lines) == 2, "each calibration once, however many ABs used it"
    dark = next(ln for ln in lines if "MASTER_DARK" in ln)
    assert "2026-11-01T10:00:00.000" in dark  # not in the message: read from the FITS header


def test_html_reports_escape_header_values(tmp_path, ports):
    [event] = handle_products_ready(products_ready(tmp_path), ports)
    for path in (Path(event.report).with_suffix(".html"), Path(event.userreport).with_suffix(".html")):
        html = path.read_text()
        assert XSS not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_missing_product_file_is_noted_not_fatal(tmp_path, ports):
    msg = products_ready(tmp_path)
    Path(msg.products[0].path).unlink()
    [event] = handle_products_ready(msg, ports)
    assert "file missing" in Path(event.report).read_text()


def test_replay_rewrites_the_same_files(tmp_path, ports):
    msg = products_ready(tmp_path)
    [first] = handle_products_ready(msg, ports)
    before = sorted(p.name for p in Path(msg.log_dir).iterdir())
    [second] = handle_products_ready(msg, ports)
    assert sorted(p.name for p in Path(msg.log_dir).iterdir()) == before
    assert first.message_id == second.message_id
    assert not [p for p in Path(msg.log_dir).iterdir() if p.name.endswith(".tmp")]


def test_shipped_config_parses():
    specs = parse_config(USERREPORT_CONFIG)
    assert [s.report_id for s in specs] == ["ob", "frames", "products"]
    assert specs[0].rows == "group" and specs[0].group == "OBS.ID"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("SOURCE raw\n", "before the first REPORT"),
        ("REPORT a A\nSOURCE tape\nCOLUMN OBJECT 10 %s - x\n", "SOURCE must be"),
        ("REPORT a A\nCOLUMN OBJECT ten %s - x\n", "width must be"),
        ("REPORT a A\nCOLUMN OBJECT 10 s - x\n", "printf"),
        ("REPORT a A\nCOLUMN OBJECT 10 %s median x\n", "aggregate"),
        ("REPORT a A\nROWS group\nCOLUMN OBJECT 10 %s first x\n", "needs GROUP"),
        ("REPORT a A\n", "has no COLUMN"),
        ("REPORT a A\nWIDTH 3\n", "unknown statement"),
    ],
)
def test_bad_config_names_file_and_line(tmp_path, text, problem):
    path = tmp_path / "bad.cfg"
    path.write_text(text)
    with pytest.raises(FitsreportConfigError, match=problem) as info:
        parse_config(path)
    assert str(path) in str(info.value)


def test_formatting_helpers():
    assert normalise_keyword("HIERARCH ESO OBS PROG ID") == "OBS.PROG.ID"
    assert normalise_keyword("ESO INS FILT1 NAME") == "INS.FILT1.NAME"
    assert normalise_keyword("MJD-OBS") == "MJD-OBS"
    assert format_value(None, "%d") == "-"
    assert format_value("12", "%d") == "12"
    assert format_value("n/a", "%.2f") == "n/a"
    assert format_value(1.23456, "%.2f") == "1.23"
    assert fit("abcdef", 4) == "abc~"
    assert fit("ab", 4, right=True) == "  ab"
    assert fit("a\nb", 4) == "a b "


def test_group_rows_aggregate(tmp_path):
    path = tmp_path / "c.cfg"
    path.write_text("REPORT ob OB\nROWS group\nGROUP OBS.ID\n"
                    "COLUMN @file 3 %d count n\nCOLUMN EXPTIME 6 %.1f sum t\n"
                    "COLUMN FILT 6 %s list f\nCOLUMN DATE 4 %s min d\n")
    [spec] = parse_config(path)
    files = [{"OBS.ID": 1, "@file": "a", "EXPTIME": 2, "FILT": "J", "DATE": "b"},
             {"OBS.ID": 1, "@file": "b", "EXPTIME": 3.5, "FILT": "H", "DATE": "a"},
             {"OBS.ID": 1, "@file": "c", "FILT": "J"}]
    table = build_table(spec, files)
    assert table.groups[0].rows == (("3", "5.5", "J,H", "a"),)


def test_handler_with_a_fake_writer_and_a_failing_disk(tmp_path, ports):
    written: dict = {}
    [event] = handle_products_ready(products_ready(tmp_path, with_files=False),
                                    dataclasses.replace(ports, write_reports=written.update))
    assert set(written) == {Path(event.report), Path(event.userreport), Path(event.list_mcalib),
                            Path(event.report).with_suffix(".html"), Path(event.userreport).with_suffix(".html"),
                            Path(event.log_dir) / "index.html"}  # the run page (services/reporter/runpage.py)
    assert "hawki_science_process" in written[Path(event.report)]

    def full(texts):
        raise OSError(28, "No space left on device")

    with pytest.raises(RetryableError, match="No space left on device"):
        handle_products_ready(products_ready(tmp_path, with_files=False), dataclasses.replace(ports, write_reports=full))
