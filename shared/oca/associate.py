"""Organisation (raw files → groups) and association (group → calibrations).

Organisation, per ``select execute(ACTION) from inputFiles where COND ...``:

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

Association, per ``select file as TAG from POOL where COND`` of the action:

- the group's reference raw file (``inputFile``) is its earliest file (MJD-OBS);
  a bare ``KEY`` is the candidate;
- POOL ``calibFiles`` is the :class:`CalibPool`, ``inputFiles``/``rawFiles`` the
  raw files of the delivery;
- minRet/maxRet in force at the select bound the files taken; when more qualify
  than maxRet, the closest in time (``|MJD-OBS(candidate) - MJD-OBS(raw)|``,
  then path) are taken; ``maxRet = 0`` disables the tag;
- a tag short of minRet makes the AB INCOMPLETE; ``missing`` says for each such
  tag which condition rejected the nearest candidates.

Pools are indexed: equality conjuncts ``KEY == "literal"`` pick candidates from
a hash index and ``inputFile.A == B`` conjuncts from a second hash keyed by the
raw file's values, so association does not scan every calibration per AB.
"""

from __future__ import annotations

import bisect
import logging
import math
import shlex
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.oca.evaluate import (
    CATEGORY_KEYWORDS,
    Classification,
    CompiledClassifier,
    OcaTypeError,
    _as_number,
    compile_expr,
    expression_keywords,
    normalise_record,
)
from shared.oca.keywords import to_dotted
from shared.oca.model import (
    SCOPE_FILE,
    SCOPE_INPUT,
    SCOPE_LAST_FRAME,
    And,
    Between,
    Compare,
    Expr,
    FileSelect,
    Keyword,
    Literal,
    Or,
    OrganisationRule,
    RuleSet,
)
from shared.oca.printer import format_expr

_log = logging.getLogger(__name__)

#: Time matching (docs/oca.md "Association"): DFOS's MJD-OBS_MOD, or plain MJD-OBS.
MJD_OBS_MOD = "MJD-OBS_MOD"
MJD_OBS = "MJD-OBS"
TIME_MATCHES = (MJD_OBS_MOD, MJD_OBS)

#: How many of the nearest rejected candidates ``missing`` explains.
EXPLAIN_NEAREST = 3
RAW_POOLS = ("inputFiles", "rawFiles")


@dataclass(eq=False)
class FileRecord:
    """A file with its header (dotted names) and classification.

    ``header`` keeps the values as read (ints stay ints) plus the values the
    classification assigned; ``values`` is the normalised copy the rules see;
    ``mjd`` is MJD-OBS (None when absent or not a number).
    """

    path: Path
    header: dict[str, Any]
    values: dict[str, Any]
    classification: Classification
    mjd: float | None = field(init=False)
    #: MJD-OBS_MOD (DFOS): the middle of the exposure, MJD-OBS + EXPTIME/2 (EXPTIME in
    #: seconds, so /86400); MJD-OBS when EXPTIME is missing.
    mjd_mod: float | None = field(init=False)

    def __post_init__(self) -> None:
        value = self.values.get("MJD-OBS")
        self.mjd = value if type(value) is float else None
        exptime = self.values.get("EXPTIME")
        if self.mjd is not None and type(exptime) is float:
            self.mjd_mod = self.mjd + exptime / 2.0 / 86400.0
        else:
            self.mjd_mod = self.mjd

    def time(self, time_match: str = MJD_OBS_MOD) -> float | None:
        """The time association matches on: MJD-OBS_MOD (default) or MJD-OBS."""
        return self.mjd if time_match == MJD_OBS else self.mjd_mod

    @property
    def category(self) -> str:
        return self.classification.category


class _TimeSorted:
    """Records in time order with their times, for nearest-in-time lookups by bisection."""

    __slots__ = ("mjds", "records")

    def __init__(self, records: list[FileRecord], time_match: str = MJD_OBS_MOD):
        times = [r.time(time_match) for r in records]
        times = [t if t is not None else math.inf for t in times]
        if any(times[k] > times[k + 1] for k in range(len(times) - 1)):
            order = sorted(range(len(records)), key=lambda k: (times[k], str(records[k].path)))
            records = [records[k] for k in order]
            times = [times[k] for k in order]
        self.records = records
        self.mjds = times

    def nearest(self, mjd: float | None, count: int) -> list[FileRecord]:
        """The ``count`` records closest to ``mjd`` (ties: path order)."""
        records = self.records
        n = len(records)
        if n <= count:
            return list(records)
        if mjd is None:
            return sorted(records, key=lambda r: str(r.path))[:count]
        mjds = self.mjds
        i = bisect.bisect_left(mjds, mjd)
        lo, hi = max(0, i - count), min(n, i + count)
        while lo > 0 and mjds[lo - 1] == mjds[lo]:
            lo -= 1
        while hi < n and mjds[hi] == mjds[hi - 1]:
            hi += 1
        order = sorted(range(lo, hi), key=lambda k: (abs(mjds[k] - mjd), str(records[k].path)))
        return [records[k] for k in order[:count]]


def make_records(
    rules: RuleSet | CompiledClassifier, headers: Mapping[str | Path, Mapping[str, Any]]
) -> list[FileRecord]:
    """Classify headers (path → header mapping) into :class:`FileRecord` objects."""
    classifier = rules if isinstance(rules, CompiledClassifier) else (
        CompiledClassifier.from_rules(rules))
    records = []
    names: dict[str, str] = {}
    for path, header in headers.items():
        dotted = to_dotted(header, names)
        values = normalise_record(dotted)
        result = classifier.classify_record(Path(path), values)
        dotted.update(result.values)
        records.append(FileRecord(Path(path), dotted, values, result))
    return records


def classified_records(
    entries: Iterable[tuple[str | Path, Mapping[str, Any], Mapping[str, Any]]],
) -> list[FileRecord]:
    """Records of files classified before (path, dotted header, classification): no rule runs again.

    What ingest read and classified reaches the processor in the message;
    this rebuilds the records :func:`make_records` would have made from it.
    """
    records = []
    for path, header, assigned in entries:
        dotted = dict(header)
        values = normalise_record(dotted)
        assigned_values = normalise_record(assigned)
        values.update(assigned_values)
        dotted.update(assigned)
        pro_catg = values.get("PRO.CATG")
        records.append(FileRecord(Path(path), dotted, values, Classification(
            Path(path), assigned_values, pro_catg=pro_catg if type(pro_catg) is str else None)))
    return records


def index_key(value: Any) -> Any:
    """Hash key under which values equal by OCA ``==`` fall together."""
    if type(value) is bool:
        return "T" if value else "F"
    number = _as_number(value)
    return number if number is not None else value


class CalibPool:
    """Calibration files, classified with the same rules and indexed by keyword value.

    Parameters
    ----------
    records
        Classified files (see :func:`make_records` or :meth:`from_headers`).
    """

    def __init__(self, records: Iterable[FileRecord] = (), time_match: str = MJD_OBS_MOD):
        if time_match not in TIME_MATCHES:
            raise ValueError(f"time_match must be one of {TIME_MATCHES}, not {time_match!r}")
        #: What "closest in time" measures: MJD-OBS_MOD (DFOS) or MJD-OBS.
        self.time_match = time_match
        #: In time order (then path), so every index list is in time order too.
        self.records: list[FileRecord] = sorted(records, key=self._order)
        self._by_value: dict[str, dict[Any, list[FileRecord]]] = {}
        self._joins: dict[tuple, dict[tuple, _TimeSorted]] = {}
        self._all: _TimeSorted | None = None

    def _order(self, rec: FileRecord) -> tuple[float, str]:
        t = rec.time(self.time_match)
        return (t if t is not None else math.inf, str(rec.path))

    @classmethod
    def from_headers(
        cls, rules: RuleSet | CompiledClassifier, headers: Mapping[str | Path, Mapping[str, Any]],
        time_match: str = MJD_OBS_MOD,
    ) -> CalibPool:
        return cls(make_records(rules, headers), time_match)

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: FileRecord) -> None:
        self.records.append(record)
        self.records.sort(key=self._order)
        self._by_value.clear()
        self._joins.clear()
        self._all = None

    def lookup(self, keyword: str, value: Any) -> list[FileRecord]:
        """Files whose ``keyword`` equals ``value`` (OCA ``==``)."""
        index = self._by_value.get(keyword)
        if index is None:
            index = defaultdict(list)
            for rec in self.records:
                v = rec.values.get(keyword)
                if v is not None:
                    index[index_key(v)].append(rec)
            self._by_value[keyword] = index
        return index.get(index_key(value), [])

    def joined(
        self, base_key: tuple, base: list[FileRecord], keys: tuple[str, ...]
    ) -> dict[tuple, _TimeSorted]:
        """``base`` hashed by the values of ``keys`` (built once per select shape)."""
        cache_key = (base_key, keys)
        table = self._joins.get(cache_key)
        if table is None:
            lists: dict[tuple, list[FileRecord]] = defaultdict(list)
            for rec in base:
                vals = rec.values
                try:
                    lists[tuple(index_key(vals[k]) for k in keys)].append(rec)
                except KeyError:
                    continue  # a missing keyword never satisfies ==
            table = {k: _TimeSorted(v, self.time_match) for k, v in lists.items()}
            self._joins[cache_key] = table
        return table


@dataclass
class AssociationBlock:
    """One unit of processing: a recipe run on a group of raw files and its calibrations.

    Attributes
    ----------
    name
        AB name (``HAWKI.2024-01-01T01:02:03.000_tpl``).
    action, recipe, recipe_options
        From the action block (options split as a shell would).
    raw
        (path, SOF tag) of each raw file, earliest first.
    calibs
        SOF tag → chosen calibration paths (closest in time first).
    missing
        SOF tag → why it could not be filled (empty when complete).
    complete
        True when every tag reached its minRet.
    """

    name: str
    action: str
    recipe: str
    recipe_options: tuple[str, ...]
    raw: list[tuple[Path, str]]
    calibs: dict[str, list[Path]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    complete: bool = True
    event: str = ""
    rule: str = ""
    match_keys: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    raw_category: str = ""
    #: Remarks of the association (a tryBetween range dropped, ...): AB comments.
    notes: list[str] = field(default_factory=list)
    #: SOF tag → products of other ABs of the run this AB needs (DFOS virtual
    #: calibrations, ``MCALIB VIRTUAL``): (path the product will have, producing AB).
    virtual: dict[str, list[tuple[Path, str]]] = field(default_factory=dict)
    #: CONFIG_VERSION: the rule set that made the AB (``RuleSet.version``).
    config_version: str = ""
    #: BATCH_ID: the run (delivery) the AB belongs to, when the caller gives one.
    batch_id: str = ""
    #: The time association matched on (``MJD-OBS_MOD`` or ``MJD-OBS``).
    time_match: str = MJD_OBS_MOD

    @property
    def completeness(self) -> str:
        return "COMPLETE" if self.complete else "INCOMPLETE"

    def sof_entries(self) -> list[tuple[Path, str]]:
        """(path, tag) of every file esorex reads, raw files first."""
        return [*self.raw, *((p, tag) for tag, paths in self.calibs.items() for p in paths)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": self.action,
            "recipe": self.recipe,
            "recipe_options": list(self.recipe_options),
            "raw": [{"path": str(p), "tag": t} for p, t in self.raw],
            "calibs": {t: [str(p) for p in ps] for t, ps in self.calibs.items()},
            "complete": self.complete,
            "missing": dict(self.missing),
            "event": self.event,
            "rule": self.rule,
            "notes": list(self.notes),
            "virtual": {t: [{"path": str(p), "producer": ab} for p, ab in vs]
                        for t, vs in self.virtual.items()},
        }


def _conjuncts(expr: Expr) -> list[Expr]:
    return list(expr.items) if isinstance(expr, And) else [expr]


def _literal_eq(expr: Expr) -> tuple[str, list[Any]] | None:
    """``KEY == "v"`` (or an ``or`` of them on one KEY) → (KEY, values)."""
    if isinstance(expr, Compare) and expr.op == "==":
        pair = (expr.left, expr.right)
        for k, lit in (pair, pair[::-1]):
            if isinstance(k, Keyword) and k.scope == SCOPE_FILE and isinstance(lit, Literal):
                return k.name, [lit.value]
    if isinstance(expr, Or):
        parts = [_literal_eq(i) for i in expr.items]
        if all(parts) and len({p[0] for p in parts}) == 1:
            return parts[0][0], [v for p in parts for v in p[1]]
    return None


def _join_eq(expr: Expr) -> tuple[str, str] | None:
    """``inputFile.A == B`` → (A, B)."""
    if isinstance(expr, Compare) and expr.op == "==":
        pair = (expr.left, expr.right)
        for a, b in (pair, pair[::-1]):
            if (isinstance(a, Keyword) and a.scope == SCOPE_INPUT
                    and isinstance(b, Keyword) and b.scope == SCOPE_FILE):
                return a.name, b.name
    return None


class _SelectPlan:
    """A ``select file as TAG`` compiled for indexed lookup and for explanations."""

    def __init__(self, select: FileSelect):
        self.select = select
        self.condition = compile_expr(select.condition)
        self.parts = [(format_expr(c), compile_expr(c), c) for c in _conjuncts(select.condition)]
        self.literal: tuple[str, list[Any]] | None = None
        joins: list[tuple[str, str]] = []
        residual: list[Expr] = []
        #: ``tryBetween`` conjuncts: a preference, applied only when some candidate meets it.
        self.soft: list[tuple[str, Any]] = []
        for c in _conjuncts(select.condition):
            if isinstance(c, Between) and c.soft:
                self.soft.append((format_expr(c), compile_expr(c)))
                continue
            lit = _literal_eq(c)
            if lit and self.literal is None:
                self.literal = lit
                continue
            join = _join_eq(c)
            if join:
                joins.append(join)
                continue
            residual.append(c)
        self.join_input = tuple(a for a, _ in joins)
        self.join_candidate = tuple(b for _, b in joins)
        # What the indexes do not already guarantee (they use the same equality as ==).
        self.residual = compile_expr(And(tuple(residual))) if residual else None

    def base(self, pool: CalibPool) -> tuple[tuple, list[FileRecord]]:
        if self.literal is None:
            return ("*",), pool.records
        key, values = self.literal
        if len(values) == 1:
            return (key, index_key(values[0])), pool.lookup(key, values[0])
        seen: dict[int, FileRecord] = {}
        for v in values:
            for rec in pool.lookup(key, v):
                seen[id(rec)] = rec
        return (key, tuple(index_key(v) for v in values)), list(seen.values())

    def choose(self, pool: CalibPool, raw: FileRecord, exclude: set[int]) -> list[FileRecord]:
        """The files this select takes for ``raw``: qualifying, at most maxRet, nearest in time."""
        return self.choose_noted(pool, raw, exclude)[0]

    def choose_noted(self, pool: CalibPool, raw: FileRecord, exclude: set[int]
                     ) -> tuple[list[FileRecord], str]:
        """:meth:`choose`, and a note when a ``tryBetween`` range had to be dropped."""
        base_key, base = self.base(pool)
        if not base:
            return [], ""
        probe = ()
        if self.join_input:
            try:
                probe = tuple(index_key(raw.values[a]) for a in self.join_input)
            except KeyError:
                return [], ""  # a missing keyword never satisfies ==
        bucket = pool.joined(base_key, base, self.join_candidate).get(probe)
        if bucket is None:
            return [], ""
        limit = self.select.max_ret
        when = raw.time(pool.time_match)
        if self.residual is None and not exclude and not self.soft:
            return bucket.nearest(when, limit), ""
        cond, rv = self.residual, raw.values
        out = []
        for rec in bucket.records:
            if id(rec) in exclude:
                continue
            try:
                if cond is None or cond(rec.values, rv, None):
                    out.append(rec)
            except OcaTypeError as e:
                _log.warning("association: %s: select %s: %s", rec.path, self.select.tag, e)
        note = ""
        if self.soft and out:
            inside = []
            for rec in out:
                try:
                    if all(fn(rec.values, rv, None) for _, fn in self.soft):
                        inside.append(rec)
                except OcaTypeError as e:
                    _log.warning("association: %s: select %s: %s", rec.path, self.select.tag, e)
            if inside:
                out = inside
            else:
                note = (f"{self.select.tag}: no candidate within "
                        f"{' and '.join(text for text, _ in self.soft)}; the nearest outside taken")
        return _TimeSorted(out, pool.time_match).nearest(when, limit), note

    def explain(self, pool: CalibPool, raw: FileRecord, found: int) -> str:
        """Why this tag got fewer than minRet files."""
        sel = self.select
        _, base = self.base(pool)
        if not base:
            if self.literal:
                key, values = self.literal
                wanted = " or ".join(f"{key} == {v!r}" for v in values)
                return f"no file with {wanted} in {sel.pool}"
            return f"no file in {sel.pool}"
        if found:
            return f"only {found} of minRet={sel.min_ret} files qualify"
        mode = pool.time_match
        nearest = sorted(base, key=lambda r: (_distance(r, raw, mode), str(r.path)))[
            :EXPLAIN_NEAREST]
        reasons = []
        for rec in nearest:
            for text, fn, expr in self.parts:
                try:
                    ok = fn(rec.values, raw.values, None)
                    problem = ""
                except OcaTypeError as e:
                    ok, problem = False, f" ({e})"
                if not ok:
                    shown = ", ".join(
                        f"{k.text}={_show(rec, raw, k)}" for k in _ordered_keywords(expr)
                    )
                    reasons.append(f"{rec.path.name} rejected by '{text}' ({shown}){problem}")
                    break
        return "; ".join(reasons) or "no candidate qualifies"


def _ordered_keywords(expr: Expr) -> list[Keyword]:
    seen: dict[str, Keyword] = {}
    for k in sorted(expression_keywords(expr), key=lambda k: (k.line, k.column, k.text)):
        seen.setdefault(k.text, k)
    return list(seen.values())


def _show(rec: FileRecord, raw: FileRecord, key: Keyword) -> str:
    source = raw if key.scope == SCOPE_INPUT else rec
    value = source.header.get(key.name)
    return "missing" if value is None else repr(value)


def _distance(rec: FileRecord, raw: FileRecord, time_match: str = MJD_OBS_MOD) -> float:
    a, b = rec.time(time_match), raw.time(time_match)
    if a is None or b is None:
        return math.inf
    return abs(a - b)


def _template_id(rec: FileRecord) -> Any:
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


def _mode(rule: OrganisationRule) -> str:
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
        templates[_template_id(rec)].append(rec)
    last_frame = {tid: max(files, key=_frame_order) for tid, files in templates.items()}

    groups: list[Group] = []
    seen: set[tuple] = set()
    for rule in rules.organisation:
        if rule.pool not in RAW_POOLS:
            _log.warning("organisation rule %s:%s selects from %r; only inputFiles is known",
                         rule.source, rule.line, rule.pool)
            continue
        mode = _mode(rule)
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


class Associator:
    """Rules compiled once for organisation and association of many groups."""

    def __init__(self, rules: RuleSet):
        self.rules = rules
        self.plans = {a.name: [_SelectPlan(s) for s in a.selects] for a in rules.actions}

    def associate(self, group: Group, calib_pool: CalibPool, raw_pool: CalibPool,
                  templates: Mapping[Any, list[FileRecord]] | None = None) -> AssociationBlock:
        rules = self.rules
        raw = group.files[0]
        action = rules.action(group.action)
        recipe = action.recipe if action else None
        options: list[str] = []
        for opt in (recipe.options if recipe else ()):
            options += shlex.split(opt)
        ab = AssociationBlock(
            name="",
            action=group.action,
            recipe=recipe.name if recipe else group.action,
            recipe_options=tuple(options),
            raw=[(f.path, rules.sof_tag(f.category)) for f in group.files],
            event=group.rule.qualifier[0] if group.rule.qualifier else "",
            rule=f"{Path(group.rule.source).name}:{group.rule.line}",
            match_keys=dict(group.keys),
            reference=dict(raw.header),
            raw_category=raw.category,
            config_version=rules.version,
            time_match=calib_pool.time_match,
        )
        if action is None:
            ab.missing["(action)"] = f"no action {group.action!r} in the rules"
            ab.complete = False
        if len(group.files) < group.rule.min_files:
            ab.missing["(raw)"] = (f"{len(group.files)} raw files, the rule needs "
                                   f"minRet={group.rule.min_files}")
            ab.complete = False
        if templates is not None and _mode(group.rule) in ("template", "last-frame"):
            short = _template_shortfall(group, templates)
            if short:
                ab.missing["(template)"] = short
                ab.complete = False
        for plan in self.plans.get(group.action, []):
            sel = plan.select
            tag = rules.sof_tag(sel.tag)
            if sel.max_ret <= 0:
                continue
            if sel.pool in RAW_POOLS:
                pool, exclude = raw_pool, {id(f) for f in group.files}
            else:
                pool, exclude = calib_pool, set()
            found, note = plan.choose_noted(pool, raw, exclude)
            if note:
                ab.notes.append(note)
            if found:
                ab.calibs.setdefault(tag, []).extend(f.path for f in found)
            if len(found) < sel.min_ret:
                ab.complete = False
                ab.missing[tag] = plan.explain(pool, raw, len(found))
        return ab

    def add_virtual(self, ab: AssociationBlock, raw: FileRecord,
                    products: list[tuple[FileRecord, str]]) -> bool:
        """Fill the AB's missing calibFiles tags with products of other ABs (DFOS virtual
        calibrations); True when something was filled."""
        changed = False
        rules = self.rules
        for plan in self.plans.get(ab.action, []):
            sel = plan.select
            tag = rules.sof_tag(sel.tag)
            if tag not in ab.missing or sel.pool in RAW_POOLS or sel.max_ret <= 0:
                continue
            have = len(ab.calibs.get(tag, ()))
            candidates = []
            for rec, producer in products:
                if producer == ab.name:
                    continue
                try:
                    if plan.condition(rec.values, raw.values, None):
                        candidates.append((rec, producer))
                except OcaTypeError:
                    continue
            if have + len(candidates) < sel.min_ret or not candidates:
                continue
            when = raw.time(ab.time_match)
            candidates.sort(key=lambda c: (
                abs(c[0].time(ab.time_match) - when)
                if when is not None and c[0].time(ab.time_match) is not None else math.inf,
                str(c[0].path)))
            ab.virtual[tag] = [(rec.path, producer)
                               for rec, producer in candidates[: sel.max_ret - have]]
            del ab.missing[tag]
            changed = True
        if changed and not ab.missing:
            ab.complete = True
        return changed


def _template_shortfall(group: Group, templates: Mapping[Any, list[FileRecord]]) -> str:
    """Why the group's templates lack exposures (TPL.NEXP), or "" when none does.

    Exposures are counted over the whole delivery (an OBJECT group of a template
    that also has SKY frames is not short of them); by distinct TPL.EXPNO when the
    frames carry it (VIMOS writes one file per quadrant and exposure), else by file.
    """
    reasons = []
    seen: set[Any] = set()
    for rec in group.files:
        tid = _template_id(rec)
        if tid in seen or tid[0] == "FILE":
            continue
        seen.add(tid)
        files = templates.get(tid, [])
        nexps = [f.values.get("TPL.NEXP") for f in files]
        nexps = [n for n in nexps if type(n) is float]
        if not nexps:
            continue
        nexp = int(max(nexps))
        expnos = [f.values.get("TPL.EXPNO") for f in files]
        if all(type(e) is float for e in expnos):
            present = {int(e) for e in expnos}
            count = len(present)
            missing_nos = [n for n in range(1, nexp + 1) if n not in present]
            detail = f" (missing TPL.EXPNO {', '.join(map(str, missing_nos))})" if missing_nos else ""
        else:
            count, detail = len(files), ""
        if count < nexp:
            reasons.append(f"template {tid[0]}={tid[1]}: {count} of TPL.NEXP={nexp} exposures"
                           f"{detail}")
    return "; ".join(reasons)


def _ab_base_name(group: Group) -> str:
    first = group.files[0].header
    for key in ("ARCFILE", "ORIGFILE"):
        value = first.get(key)
        if isinstance(value, str) and value:
            return value.removesuffix(".fits")
    instrument, date = first.get("INSTRUME"), first.get("DATE-OBS")
    if isinstance(instrument, str) and isinstance(date, str):
        return f"{instrument}.{date}"
    return group.files[0].path.name.removesuffix(".fits")


def build_abs(
    rules: RuleSet,
    raw_files: Mapping[str | Path, Mapping[str, Any]] | Sequence[FileRecord],
    calib_pool: CalibPool | None = None,
    actions: Iterable[str] | None = None,
    *,
    time_match: str | None = None,
    virtual: bool = False,
    vcal_dir: str | Path = "VCAL",
    batch_id: str = "",
) -> list[AssociationBlock]:
    """Organise raw files into groups and associate calibrations: the ABs.

    Parameters
    ----------
    rules
        Rule set (with the overlay applied, see :func:`shared.oca.load_rules`).
    raw_files
        Path → header, or records from :func:`make_records`.
    calib_pool
        Calibrations to choose from; empty when None.
    actions
        Keep only ABs of these actions (``Profile.science_actions``); all when None.
    time_match
        ``"MJD-OBS_MOD"`` (DFOS, mid-exposure) or ``"MJD-OBS"``; default: the pool's.
    virtual
        Fill calibration tags no file satisfies with products of other ABs of these raw
        files (DFOS virtual calibrations, ``MCALIB VIRTUAL``); the producing ABs are
        returned too, before the ABs that need them.
    vcal_dir
        Directory the virtual products are named in.
    batch_id
        BATCH_ID written in every AB (the run).

    Returns
    -------
    list of AssociationBlock
        Earliest first (with ``virtual``: producers before their consumers); names are
        unique.
    """
    if isinstance(raw_files, Mapping):
        records = make_records(rules, raw_files)
    else:
        records = list(raw_files)
    calib_pool = calib_pool if calib_pool is not None else CalibPool()
    if time_match is not None and time_match != calib_pool.time_match:
        calib_pool = CalibPool(calib_pool.records, time_match)
    raw_pool = CalibPool(records, calib_pool.time_match)
    templates: dict[Any, list[FileRecord]] = defaultdict(list)
    for rec in records:
        templates[_template_id(rec)].append(rec)
    wanted = set(actions) if actions is not None else None
    associator = Associator(rules)
    abs_: list[AssociationBlock] = []
    refs: dict[int, FileRecord] = {}
    names: set[str] = set()
    for group in organise(rules, records):
        if wanted is not None and group.action not in wanted and not virtual:
            continue
        ab = associator.associate(group, calib_pool, raw_pool, templates)
        ab.batch_id = batch_id
        name = _ab_base_name(group)
        if len(group.rule.qualifier) > 1:
            name += f"_{group.rule.qualifier[1]}"
        if name in names:
            name = f"{name}_{group.action}"
        base, n = name, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.add(name)
        ab.name = name
        refs[id(ab)] = group.files[0]
        abs_.append(ab)
    if not virtual:
        return abs_
    return _with_virtual(rules, associator, abs_, refs, wanted, Path(vcal_dir))


def _virtual_products(rules: RuleSet, classifier: CompiledClassifier, ab: AssociationBlock,
                      ref: FileRecord, vcal_dir: Path) -> list[tuple[FileRecord, str]]:
    """The products an AB's action declares, as records: the AB's reference raw header
    with the product's assignments (``PRO.CATG = ...``), classified by the rules."""
    action = rules.action(ab.action)
    if action is None:
        return []
    out = []
    for product in action.products:
        header = {k: v for k, v in ref.header.items() if k not in CATEGORY_KEYWORDS}
        for a in product.assignments:
            if isinstance(a.value, Literal):
                header[a.key] = a.value.value
        ext = header.pop("PRO.EXT", None)
        suffix = ext if isinstance(ext, str) and ext else f"{product.name}.fits"
        path = vcal_dir / f"r.{ab.name}_{suffix}"
        values = normalise_record(header)
        result = classifier.classify_record(path, values)
        header.update(result.values)
        out.append((FileRecord(path, header, values, result), ab.name))
    return out


def _with_virtual(rules: RuleSet, associator: Associator, abs_: list[AssociationBlock],
                  refs: dict[int, FileRecord], wanted: set[str] | None,
                  vcal_dir: Path) -> list[AssociationBlock]:
    products: dict[str, list[tuple[FileRecord, str]]] = {}
    classifier = CompiledClassifier.from_rules(rules)
    changed = True
    while changed:  # a flat completed by a virtual dark can in turn give a virtual flat
        changed = False
        pool = [p for ab in abs_ if ab.complete for p in products.setdefault(
            ab.name, _virtual_products(rules, classifier, ab, refs[id(ab)], vcal_dir))]
        for ab in abs_:
            if ab.missing and associator.add_virtual(ab, refs[id(ab)], pool):
                changed = True
    by_name = {ab.name: ab for ab in abs_}
    ordered: list[AssociationBlock] = []
    placed: set[str] = set()

    def place(ab: AssociationBlock) -> None:
        if ab.name in placed:
            return
        placed.add(ab.name)
        for entries in ab.virtual.values():
            for _, producer in entries:
                place(by_name[producer])
        ordered.append(ab)

    for ab in abs_:
        if wanted is None or ab.action in wanted:
            place(ab)
    return ordered
