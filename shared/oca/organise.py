"""Organisation: the raw files of a delivery into groups, one per future AB.

Per ``select execute(ACTION) from inputFiles where COND ...``:

- ``SIG.FRAME == 1`` in COND: every file that satisfies COND is its own group.
- ``SIG.TEMPLATE == 1`` or any ``LF.KEY`` in COND: files are taken template by
  template (template = same ``TPL.START``, else same ``OBS.START``, else the
  file alone); ``LF.`` is the template's last frame (highest ``TPL.EXPNO``, then
  latest ``MJD-OBS``). With ``SIG.TEMPLATE`` a group never spans two templates;
  with ``LF.`` alone (hawki.oca's SCIENCE_FRAMES) the selected files of all
  templates are grouped by the ``group by`` keys only.
- Otherwise COND is applied to each file and the selected files are grouped by
  the ``group by`` keys (one group when there are none).
- ``group by K1,K2`` splits further by equal values; ``as (TPL_A,tpl)`` gives
  the AB_EVENT (``TPL_A``) and a suffix of the AB name (``tpl``).
- A top-level ``minRet = N;`` before the select (uves.oca) is the least number
  of raw files of a group; a smaller group becomes an INCOMPLETE AB.
"""


from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.oca.evaluate import (
    OcaTypeError,
    compile_expr,
    expression_keywords,
)
from shared.oca.model import (
    SCOPE_FILE,
    SCOPE_LAST_FRAME,
    OrganisationRule,
    RuleSet,
)
from shared.oca.pool import FileRecord, index_key

_log = logging.getLogger(__name__)


RAW_POOLS = ("inputFiles", "rawFiles")


def template_id(rec: FileRecord) -> Any:
    for key in ("TPL.START", "OBS.START"):
        value = rec.values.get(key)
        if value is not None:
            return (key, value)
    return ("FILE", str(rec.path))


def _frame_order(rec: FileRecord) -> tuple:
    expno = rec.values.get("TPL.EXPNO")
    mjd = rec.mjd
    return (expno if type(expno) is float else -1.0, mjd if mjd is not None else -math.inf,
            str(rec.path))


@dataclass
class Group:
    """Raw files one organisation rule put together; becomes one AB."""

    rule: OrganisationRule
    files: list[FileRecord]
    keys: dict[str, Any]

    @property
    def action(self) -> str:
        return self.rule.action


def grouping_mode(rule: OrganisationRule) -> str:
    names = {(k.scope, k.name) for k in expression_keywords(rule.condition)}
    if (SCOPE_FILE, "SIG.FRAME") in names:
        return "frame"
    if (SCOPE_FILE, "SIG.TEMPLATE") in names:
        return "template"
    if any(scope == SCOPE_LAST_FRAME for scope, _ in names):
        return "last-frame"
    return "files"


def organise(rules: RuleSet, records: Sequence[FileRecord]) -> list[Group]:
    """Group raw files by the organisation rules (see the module docstring)."""
    templates: dict[Any, list[FileRecord]] = defaultdict(list)
    for rec in records:
        templates[template_id(rec)].append(rec)
    last_frame = {tid: max(files, key=_frame_order) for tid, files in templates.items()}

    groups: list[Group] = []
    seen: set[tuple] = set()
    for rule in rules.organisation:
        if rule.pool not in RAW_POOLS:
            _log.warning("organisation rule %s:%s selects from %r; only inputFiles is known",
                         rule.source, rule.line, rule.pool)
            continue
        mode = grouping_mode(rule)
        constants = {"SIG.FRAME": 1.0 if mode == "frame" else 0.0,
                     "SIG.TEMPLATE": 1.0 if mode == "template" else 0.0}
        cond = compile_expr(rule.condition, constants)
        buckets: dict[tuple, list[FileRecord]] = defaultdict(list)
        for tid, files in templates.items():
            lf = last_frame[tid].values
            for rec in files:
                try:
                    if not cond(rec.values, None, lf):
                        continue
                except OcaTypeError as e:
                    _log.warning("organisation: %s: rule %s:%s: %s",
                                 rec.path, rule.source, rule.line, e)
                    continue
                key = tuple(index_key(rec.values.get(k)) for k in rule.group_by)
                if mode == "frame":
                    key = (str(rec.path),) + key
                elif mode == "template":
                    key = (tid,) + key
                buckets[key].append(rec)
        for files in buckets.values():
            files.sort(key=lambda r: (r.mjd if r.mjd is not None else math.inf, str(r.path)))
            ident = (rule.action, tuple(str(f.path) for f in files))
            if ident in seen:
                continue
            seen.add(ident)
            keys = {k: files[0].header.get(k) for k in rule.group_by}
            groups.append(Group(rule, files, keys))
    groups.sort(key=lambda g: (g.files[0].mjd if g.files[0].mjd is not None else math.inf,
                               str(g.files[0].path), g.action))
    return groups
