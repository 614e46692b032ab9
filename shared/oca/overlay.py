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

import logging
from pathlib import Path

from shared.oca.model import RuleSet
from shared.oca.parser import parse_file

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
    )


def load_rules(rule_file: str | Path, overlay: str | Path | None = None) -> RuleSet:
    """Parse a rule file and, when given, merge an overlay onto it.

    Raises
    ------
    shared.oca.parser.OcaSyntaxError
        For either file, naming file, line and column.
    """
    rules = parse_file(rule_file)
    if overlay:
        rules = apply_overlay(rules, parse_file(overlay))
        _log.debug("rules %s with overlay %s", rule_file, overlay)
    return rules
