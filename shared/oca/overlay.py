"""Per-instrument overlays on a shipped rule file.

An overlay is an OCA file (``shared/profiles/<instr>_overlay.oca``) read with
the same parser, merged onto the shipped rules by name:

- ``if ... then { ... }`` rules are **appended** after the shipped ones; as the
  last match wins, an overlay rule overrides the shipped classification.
- ``select execute(ACTION) ...`` rules **replace** all shipped organisation
  rules of the same ACTION (an overlay that wants to keep them repeats them);
  rules for a new ACTION are added.
- ``action NAME { ... }`` **replaces** the shipped action of that name, or adds it.
- ``tagmap { IMG_PREIMAGING = "OBJECT"; }`` maps a DO.CATG value (for raw files)
  or a select tag (for calibrations) to the SOF tag the installed recipe wants.
- ``drop action NAME;`` removes an action and the organisation rules executing it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from shared.oca.model import RuleSet
from shared.oca.parser import OcaSyntaxError, parse_rules
from shared.oca.preprocess import empty_macros, explain_empty_macro, needs_preprocessing, preprocess

_log = logging.getLogger(__name__)


def apply_overlay(base: RuleSet, overlay: RuleSet) -> RuleSet:
    """The rules of ``base`` with ``overlay`` merged in (see the module docstring)."""
    replaced_org = {r.action for r in overlay.organisation}
    dropped = set(overlay.dropped)
    organisation = [
        r for r in base.organisation
        if r.action not in replaced_org and r.action not in dropped
    ] + [r for r in overlay.organisation if r.action not in dropped]
    overlay_actions = {a.name: a for a in overlay.actions}
    actions = []
    for act in base.actions:
        if act.name in dropped:
            continue
        actions.append(overlay_actions.pop(act.name, act))
    actions += [a for a in overlay.actions if a.name in overlay_actions and a.name not in dropped]
    tag_map = dict(base.tag_map)
    tag_map.update(dict(overlay.tag_map))
    return RuleSet(
        classification=base.classification + overlay.classification,
        organisation=tuple(organisation),
        actions=tuple(actions),
        tag_map=tuple(tag_map.items()),
        dropped=(),
        sources=base.sources + overlay.sources,
        digest=hashlib.sha1(f"{base.digest}+{overlay.digest}".encode()).hexdigest()
        if base.digest or overlay.digest else "",
    )


def read_rules(
    path: str | Path,
    include_dirs: Iterable[str | os.PathLike[str]] = (),
    defines: Mapping[str, object] | Iterable[str] | None = None,
    preprocessor: str = "auto",
) -> RuleSet:
    """Parse one rule file; a ``.h`` entry file, or any file with ``#include``/``#define``/
    ``#if``, goes through the C preprocessor first (:mod:`shared.oca.preprocess`).

    A DFOS ``<instr>.RLS`` (already preprocessed, with or without line markers) is
    parsed as it is. Errors name the original header and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise OcaSyntaxError(str(path), 0, 0, f"cannot read rule file: {e.strerror}") from e
    if not needs_preprocessing(path, text):
        return parse_rules(text, path)
    include_dirs = list(include_dirs)
    expanded = preprocess(path, include_dirs, defines, engine=preprocessor)
    try:
        return parse_rules(expanded, path)
    except OcaSyntaxError as e:
        raise explain_empty_macro(e, empty_macros(path, include_dirs, defines),
                                  [path.parent, *include_dirs]) from None


def load_rules(
    rule_file: str | Path,
    overlay: str | Path | None = None,
    *,
    include_dirs: Iterable[str | os.PathLike[str]] = (),
    defines: Mapping[str, object] | Iterable[str] | None = None,
    preprocessor: str = "auto",
) -> RuleSet:
    """Parse a rule file (preprocessed when it is a ``.h`` entry or has directives) and,
    when given, merge an overlay onto it.

    Parameters
    ----------
    rule_file
        A Gasgano/Reflex ``.oca`` file, a DFOS ``<instr>.RLS``, or a DFOS entry
        header ``<instr>.h`` that ``#include``s the others.
    overlay
        preimg overlay (``shared/profiles/<instr>_overlay.oca``), read the same way.
    include_dirs, defines
        For the C preprocessor: ``#include`` search path after the entry's own
        directory; macros ``{"NAME": value}`` or ``["NAME=value"]``.
    preprocessor
        ``"auto"`` (pcpp, else cpp), ``"pcpp"`` or ``"cpp"``.

    Raises
    ------
    shared.oca.parser.OcaSyntaxError
        For either file, naming the original file, line and column.
    """
    include_dirs = list(include_dirs)
    rules = read_rules(rule_file, include_dirs, defines, preprocessor)
    if overlay:
        rules = apply_overlay(rules, read_rules(overlay, include_dirs, defines, preprocessor))
        _log.debug("rules %s with overlay %s", rule_file, overlay)
    return rules
