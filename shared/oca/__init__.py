"""OCA rule engine: classification, organisation and association by ESO's rule files.

Typical use (the processor; ingest read and classified the raw headers)::

    rules = profile_rules(profile)
    reader = HeaderReader(rule_header_keys(rules))
    headers, bad = reader.read_many(calib_paths)
    pool = FramePool(make_records(rules, headers))
    raw = classified_records((f.path, f.headers, f.classification) for f in msg.frames)
    for ab in build_abs(rules, raw, pool, actions=profile.science_actions or None):
        write_ab(ab, ab_dir); write_sof(ab, sof_dir / f"{ab.name}.sof")

See ``docs/oca.md`` for the semantics and the overlay format.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared.fitsheader import FitsHeaderError
from shared.layout import FITS_GLOBS
from shared.oca.abfiles import format_ab, read_ab, write_ab, write_sof
from shared.oca.associate import AssociationBlock, build_abs
from shared.oca.classify import Classification, CompiledClassifier, classify
from shared.oca.evaluate import OcaTypeError, rule_keywords
from shared.oca.keywords import ENGINE_KEYWORDS, fits_card_name, header_key, header_keys
from shared.oca.model import RuleSet
from shared.oca.organise import Group, organise
from shared.oca.overlay import apply_overlay, load_rules, read_rules
from shared.oca.parser import OcaSyntaxError, parse_file, parse_rules
from shared.oca.pool import FileRecord, FramePool, classified_records, make_records
from shared.oca.preprocess import preprocess
from shared.oca.printer import format_rules

__all__ = [
    "AssociationBlock",
    "Classification",
    "CompiledClassifier",
    "FileRecord",
    "FitsHeaderError",
    "FramePool",
    "Group",
    "OcaSyntaxError",
    "OcaTypeError",
    "RuleSet",
    "apply_overlay",
    "build_abs",
    "classified_records",
    "classify",
    "fits_card_name",
    "format_ab",
    "format_rules",
    "header_key",
    "header_keys",
    "load_rules",
    "make_records",
    "organise",
    "parse_file",
    "parse_rules",
    "preprocess",
    "profile_rules",
    "read_ab",
    "read_rules",
    "rule_header_keys",
    "rule_keywords",
    "write_ab",
    "write_sof",
]


def profile_rules(profile: Any) -> RuleSet | None:
    """The rules an instrument profile names, with its overlay; None when it names none.

    Raises
    ------
    FileNotFoundError
        The profile names a rule file but no installed package provides it.
    OcaSyntaxError
        The rule file or the overlay does not parse.
    """
    if not profile.oca_rules:
        return None
    rule_file = profile.resolve_rules()
    if rule_file is None:
        raise FileNotFoundError(
            f"{profile.instrument}: no OCA rule file matches {profile.oca_rules!r}; "
            "install the instrument's pipeline package")
    # Preprocessed rule sets (DFOS <instr>.h): the profile's include path and macros.
    return load_rules(rule_file, profile.resolve_overlay(),
                      include_dirs=profile.resolve_include_dirs(),
                      defines=profile.oca_defines or None)


def rule_header_keys(rules: RuleSet) -> list[str]:
    """astropy keys of every keyword the rules and the engine read (for a ``shared.fitsheader.HeaderReader``)."""
    return header_keys(rule_keywords(rules) | set(ENGINE_KEYWORDS))


def fits_files(directories: Iterable[str | os.PathLike]) -> list[Path]:
    """FITS files (:data:`shared.layout.FITS_GLOBS`) under the directories, sorted."""
    out: list[Path] = []
    for d in directories:
        d = Path(d)
        if d.is_file():
            out.append(d)
            continue
        for pattern in FITS_GLOBS:
            out.extend(d.rglob(pattern))
    return sorted(set(out))
