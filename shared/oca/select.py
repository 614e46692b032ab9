"""One ``select file as TAG from POOL where COND``, compiled for an indexed pool.

A :class:`SelectPlan` splits COND into the conjuncts an index answers (an
equality with a literal, ``inputFile.A == B`` joins), soft ``tryBetween``
preferences and a residual condition; it takes the qualifying files closest
in time (``|MJD-OBS(candidate) - MJD-OBS(raw)|``, then path), at most maxRet,
and explains why the nearest candidates were rejected when too few qualify.
"""


from __future__ import annotations

import logging
import math
from typing import Any

from shared.oca.evaluate import (
    OcaTypeError,
    compile_expr,
    expression_keywords,
)
from shared.oca.model import (
    SCOPE_FILE,
    SCOPE_INPUT,
    And,
    Between,
    Compare,
    Expr,
    FileSelect,
    Keyword,
    Literal,
    Or,
)
from shared.oca.pool import MJD_OBS_MOD, FileRecord, FramePool, TimeSorted, index_key
from shared.oca.printer import format_expr

_log = logging.getLogger(__name__)


#: How many of the nearest rejected candidates ``missing`` explains.
EXPLAIN_NEAREST = 3


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


class SelectPlan:
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

    def base(self, pool: FramePool) -> tuple[tuple, list[FileRecord]]:
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

    def choose(self, pool: FramePool, raw: FileRecord, exclude: set[int]) -> list[FileRecord]:
        """The files this select takes for ``raw``: qualifying, at most maxRet, nearest in time."""
        return self.choose_noted(pool, raw, exclude)[0]

    def choose_noted(self, pool: FramePool, raw: FileRecord, exclude: set[int]
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
        return TimeSorted(out, pool.time_match).nearest(when, limit), note

    def explain(self, pool: FramePool, raw: FileRecord, found: int) -> str:
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
