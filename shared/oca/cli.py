"""``preimg oca check`` and ``preimg explain``: the OCA engine from the command line.

    preimg oca check DIR_OR_FILE... [--overlay FILE] [-I DIR] [-D NAME=VALUE]
        Parse rule files (a directory: its .oca, .RLS and entry .h files; .h
        files go through the C preprocessor); one JSON line of rule counts per
        file on stdout, ``file:line:column: message`` on stderr for one that
        does not parse. Exit 0 all parsed, 1 some did not, 2 nothing to check.
    preimg explain -i INSTR [--rules FILE] [--calib DIR ...] FILE... [--json]
        Classify the files, organise them into ABs and associate calibrations;
        say which rule set each value and why a tag could not be filled.
        ``--rules`` evaluates that rule file alone, without the instrument's overlay.
        Exit 1 when a file could not be read or a keyword had the wrong type.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from shared.fitsheader import HeaderReader
from shared.oca import (
    FramePool,
    OcaSyntaxError,
    build_abs,
    fits_files,
    load_rules,
    make_records,
    profile_rules,
    rule_header_keys,
)

_log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``oca check`` and ``explain`` to the ``preimg`` command."""
    oca = subparsers.add_parser("oca", help="OCA rule files")
    oca_sub = oca.add_subparsers(dest="oca_command", metavar="SUBCOMMAND")
    check = oca_sub.add_parser(
        "check", help="parse rule files (or every rule file of a directory) and count their rules")
    check.add_argument("paths", nargs="+", type=Path, metavar="DIR_OR_FILE",
                       help="rule files (.oca, .RLS, DFOS entry .h) or directories of them")
    check.add_argument("--overlay", type=Path, help="also parse and merge this overlay")
    check.add_argument("-I", "--include-dir", dest="include_dirs", type=Path, action="append",
                       default=[], metavar="DIR", help="#include search path (repeatable)")
    check.add_argument("-D", "--define", dest="defines", action="append", default=[],
                       metavar="NAME[=VALUE]", help="preprocessor macro (repeatable)")
    check.add_argument("--preprocessor", choices=("auto", "pcpp", "cpp"), default="auto")
    check.set_defaults(func=cmd_oca_check)
    oca.set_defaults(func=lambda args: _usage(oca))

    explain = subparsers.add_parser(
        "explain", help="classify files, build ABs and explain the association")
    explain.add_argument("-i", "--instrument", required=True, type=str.upper)
    explain.add_argument("--rules", type=Path,
                         help="evaluate this rule file alone (no instrument overlay)")
    explain.add_argument("--calib", type=Path, action="append", default=[], metavar="DIR",
                         help="calibration directory or file (repeatable)")
    explain.add_argument("files", nargs="+", type=Path, help="raw FITS files")
    explain.add_argument("--json", action="store_true", help="print one JSON object")
    explain.set_defaults(func=cmd_explain)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def rule_files(paths: list[Path]) -> list[Path]:
    """The rule files to check: files as given; in a directory, every ``.oca`` and
    ``.RLS`` file and every ``.h`` no other header of the directory includes (the
    entry files of a DFOS rule set: ``<instr>.h``, not its ``_classification.h``)."""
    out: list[Path] = []
    for path in paths:
        if not path.is_dir():
            out.append(path)
            continue
        headers = sorted(path.rglob("*.h"))
        included: set[str] = set()
        for h in headers:
            try:
                text = h.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            included |= set(re.findall(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', text,
                                       re.MULTILINE))
        entries = [h for h in headers if h.name not in {Path(i).name for i in included}]
        found = sorted({*path.rglob("*.oca"), *path.rglob("*.RLS"), *entries})
        out.extend(found)
    return out


def cmd_oca_check(args: argparse.Namespace) -> int:
    """Exit 0 when every file parsed, 1 when one did not, 2 when there was nothing to check."""
    files = rule_files(list(args.paths))
    if not files:
        print("oca check: no rule files (.oca, .RLS, .h) found", file=sys.stderr)
        return 2
    failed = 0
    for path in files:
        try:
            rules = load_rules(path, args.overlay, include_dirs=args.include_dirs,
                               defines=args.defines, preprocessor=args.preprocessor)
        except OcaSyntaxError as e:
            failed += 1
            print(str(e), file=sys.stderr)
            continue
        print(json.dumps({
            "file": str(path),
            "classification_rules": len(rules.classification),
            "organisation_rules": len(rules.organisation),
            "actions": len(rules.actions),
            "version": rules.version,
        }))
    if len(files) > 1:
        print(f"oca check: {len(files)} files, {len(files) - failed} parsed, {failed} with errors",
              file=sys.stderr)
    return 1 if failed else 0


def _load_instrument_rules(args: argparse.Namespace):
    if args.rules:
        return load_rules(args.rules)
    from shared.profiles import ProfileError, load_profile

    try:
        profile = load_profile(args.instrument)
    except ProfileError as e:
        raise SystemExit(f"explain: {e}") from e
    try:
        rules = profile_rules(profile)
    except FileNotFoundError as e:
        raise SystemExit(f"explain: {e} (or give --rules FILE)") from e
    if rules is None:
        raise SystemExit(f"explain: {args.instrument} has no OCA rules (give --rules FILE)")
    return rules


def explain(instrument_rules, files: list[Path], calib: list[Path]) -> dict[str, Any]:
    """The explanation as a dict (``files`` and ``abs``), as ``--json`` prints it."""
    rules = instrument_rules
    reader = HeaderReader(rule_header_keys(rules))
    raw_headers, raw_bad = reader.read_many(files)
    calib_headers, calib_bad = reader.read_many(fits_files(calib))
    records = make_records(rules, raw_headers)
    pool = FramePool.from_headers(rules, calib_headers)
    by_path = {r.path: r for r in records}
    out_files = []
    for path in files:
        path = Path(path)
        if path in raw_bad:
            out_files.append({"path": str(path), "classification": {}, "rules": {},
                              "errors": [str(raw_bad[path])]})
            continue
        rec = by_path[path]
        out_files.append({
            "path": str(path),
            "category": rec.classification.category,
            "classification": rec.classification.values,
            "rules": rec.classification.rule_lines,
            "errors": rec.classification.errors,
        })
    abs_ = build_abs(rules, records, pool)
    return {
        "rules": rules.source_label,
        "files": out_files,
        "calib_errors": [str(e) for e in calib_bad.values()],
        "abs": [ab.to_dict() for ab in abs_],
    }


def _print_text(result: dict[str, Any]) -> None:
    print(f"rules: {result['rules']}")
    for f in result["files"]:
        print(f"file {f['path']}")
        if not f["classification"] and not f["errors"]:
            if f.get("category", "UNCLASSIFIED") != "UNCLASSIFIED":
                print(f"  {f['category']} (no rule matched: the file's PRO.CATG)")
            else:
                print("  UNCLASSIFIED (no rule matched)")
        for key, value in f["classification"].items():
            print(f"  {key} = {value!r}   set by {f['rules'].get(key, '?')}")
        for err in f["errors"]:
            print(f"  ERROR {err}")
    for err in result["calib_errors"]:
        print(f"calibration skipped: {err}")
    if not result["abs"]:
        print("no AB: no organisation rule selected these files")
    for ab in result["abs"]:
        state = "COMPLETE" if ab["complete"] else "INCOMPLETE"
        print(f"AB {ab['name']}: action {ab['action']}, recipe {ab['recipe']}, {state}")
        if ab["recipe_options"]:
            print(f"  options {' '.join(ab['recipe_options'])}")
        for raw in ab["raw"]:
            print(f"  raw   {raw['tag']:<30} {raw['path']}")
        for tag, paths in ab["calibs"].items():
            for p in paths:
                print(f"  calib {tag:<30} {p}")
        for tag, reason in ab["missing"].items():
            print(f"  MISSING {tag}: {reason}")


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        rules = _load_instrument_rules(args)
    except OcaSyntaxError as e:
        print(str(e), file=sys.stderr)
        return 1
    result = explain(rules, list(args.files), list(args.calib))
    if args.json:
        print(json.dumps(result, default=str))
    else:
        _print_text(result)
    return 1 if any(f["errors"] for f in result["files"]) else 0
