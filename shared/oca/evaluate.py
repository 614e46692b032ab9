"""Evaluate OCA expressions and classify files.

Semantics (the choices no ESO source states are marked *chosen*):

- **Keywords.** A bare ``KEY`` is the file under test (the candidate during
  association); ``inputFile.KEY`` the group's raw file; ``LF.KEY`` the last
  frame of the template. Values assigned by classification (``DO.CATG``...)
  are keywords like any other for later rules and for association.
- **Comparison types.** Header integers and reals are numbers; ``T``/``F`` are
  booleans; everything else is a string. ``==``, ``!=``, ``<``, ``>``, ``<=``,
  ``>=`` compare numerically when both sides are numbers and as strings when
  both are strings. *Chosen:* a number against a string that reads as a number
  (``"10"``) compares numerically; a number against any other string is not
  equal, and ordering them (``<``...) is a type error.
- **Missing keywords** (*chosen*): any comparison with a missing side is false,
  except ``!=``, which is ``not ==`` and therefore true, and ``?=``.
- **``?=``** (*chosen*, after OCA.md): true when the keyword is missing on
  either side, otherwise ``==``. It is used in vimos.oca on quadrant-indexed
  keywords (``inputFile.INS.FILT1.ID?=INS.FILT1.ID``): a file of another
  quadrant lacks ``INS.FILT1.ID`` and must not be rejected for it.
- **``like``**: SQL LIKE with ``%`` for any run of characters (``_`` is an
  ordinary character); without ``%`` it is exact equality; case-sensitive.
  The left side must be a string; a number or boolean there is a type error.
- **``regexp``** (*chosen*): Python regular expression that must match the whole
  value (as Java's ``String.matches`` does in Gasgano).
- **``is``**: ``KEY is string|number|integer|boolean`` tests the value's type.
- **Type errors** (:class:`OcaTypeError`) name the keyword, its value and the
  operator; classification records them with the file and the rule line and
  carries on with the next rule, so one bad keyword never stops a delivery.

Classifying files with these expressions: :mod:`shared.oca.classify`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from shared.oca.keywords import SIGNAL_KEYWORDS
from shared.oca.model import (
    SCOPE_INPUT,
    SCOPE_LAST_FRAME,
    And,
    Arith,
    Between,
    Compare,
    Expr,
    Keyword,
    Literal,
    Not,
    Or,
    RuleSet,
)

_log = logging.getLogger(__name__)


_NUMBER_RE = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")

Record = Mapping[str, Any]
Compiled = Callable[[Record, Record | None, Record | None], Any]


class OcaTypeError(TypeError):
    """A keyword's value has a type the operator cannot use."""

    def __init__(self, keyword: str, value: Any, op: str, need: str):
        self.keyword = keyword
        self.value = value
        self.op = op
        super().__init__(
            f"keyword {keyword} = {value!r} ({_type_name(value)}): '{op}' needs {need}"
        )


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "string" if isinstance(value, str) else type(value).__name__


def normalise(value: Any) -> Any:
    """A header value as the engine compares it: int → float; others unchanged."""
    if type(value) is int:
        return float(value)
    return value


def normalise_record(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted-name record with normalised values and None (no value) left out."""
    return {k: (float(v) if type(v) is int else v) for k, v in values.items() if v is not None}


def _as_number(value: Any) -> float | None:
    if type(value) is float:
        return value
    if type(value) is str and _NUMBER_RE.fullmatch(value):
        return float(value)
    return None


def values_equal(a: Any, b: Any) -> bool:
    """``==`` on two present, normalised values."""
    if type(a) is type(b):
        return a == b
    if type(a) is bool or type(b) is bool:
        other, flag = (b, a) if type(a) is bool else (a, b)
        return isinstance(other, str) and other == ("T" if flag else "F")
    na, nb = _as_number(a), _as_number(b)
    return na is not None and nb is not None and na == nb


_ORDER = {
    "<": lambda x, y: x < y,
    ">": lambda x, y: x > y,
    "<=": lambda x, y: x <= y,
    ">=": lambda x, y: x >= y,
}


def _ordered(op: str, a: Any, b: Any, left: str, right: str) -> bool:
    if type(a) is type(b) and type(a) in (float, str):
        return _ORDER[op](a, b)
    na, nb = _as_number(a), _as_number(b)
    if na is None or type(a) is bool:
        raise OcaTypeError(left, a, op, f"a number like the other side ({b!r})")
    if nb is None or type(b) is bool:
        raise OcaTypeError(right, b, op, f"a number like the other side ({a!r})")
    return _ORDER[op](na, nb)


def like_matcher(pattern: str) -> Callable[[str], bool]:
    """A test for SQL LIKE with ``%`` wildcards."""
    parts = pattern.split("%")
    if len(parts) == 1:
        return pattern.__eq__
    if len(parts) == 2 and parts[0] == "":
        return lambda s, p=parts[1]: s.endswith(p)
    if len(parts) == 2 and parts[1] == "":
        return lambda s, p=parts[0]: s.startswith(p)
    if len(parts) == 3 and parts[0] == "" and parts[2] == "":
        return lambda s, p=parts[1]: p in s
    regex = re.compile(".*".join(re.escape(p) for p in parts), re.DOTALL)
    return lambda s: regex.fullmatch(s) is not None


def _arith_number(value: Any, text: str, op: str) -> float:
    number = _as_number(value) if type(value) is not bool else None
    if number is None:
        raise OcaTypeError(text, value, op, "a number")
    return number


def _compile_arith(expr: Arith, constants: Mapping[str, Any]) -> Compiled:
    """``a + b`` ... : numbers give numbers, ``+`` joins two strings, missing stays missing."""
    left, ltext = _getter(expr.left, constants)
    right, rtext = _getter(expr.right, constants)
    op = expr.op
    if isinstance(expr.left, Literal) and isinstance(expr.right, Literal):
        folded = _compile_arith(Arith(op, Keyword("_l"), Keyword("_r")), constants)
        value = folded({"_l": normalise(expr.left.value), "_r": normalise(expr.right.value)},
                       None, None)
        return lambda c, i, l: value

    def arith(c, i, l):
        a, b = left(c, i, l), right(c, i, l)
        if a is None or b is None:
            return None
        if type(a) is float and type(b) is float:
            x, y = a, b
        elif op == "+" and type(a) is str and type(b) is str:
            return a + b
        else:
            x, y = _arith_number(a, ltext, op), _arith_number(b, rtext, op)
        if op == "+":
            return x + y
        if op == "-":
            return x - y
        if op == "*":
            return x * y
        return x / y if y != 0 else None  # division by zero: no value
    return arith


def _compile_between(expr: Between, constants: Mapping[str, Any]) -> Compiled:
    """``v between lo and hi``: ``lo <= v <= hi`` (inclusive, as SQL's BETWEEN)."""
    value, vtext = _getter(expr.item, constants)
    low, ltext = _getter(expr.low, constants)
    high, htext = _getter(expr.high, constants)

    def between(c, i, l):
        v, lo, hi = value(c, i, l), low(c, i, l), high(c, i, l)
        if v is None or lo is None or hi is None:
            return False
        return _ordered(">=", v, lo, vtext, ltext) and _ordered("<=", v, hi, vtext, htext)
    return between


def _getter(expr: Expr, constants: Mapping[str, Any]) -> tuple[Compiled, str]:
    """A function giving the value of an operand, and its text for messages."""
    if isinstance(expr, Literal):
        value = normalise(expr.value)
        return (lambda c, i, l: value), repr(expr.value)
    if isinstance(expr, Keyword):
        name = expr.name
        if not expr.scope and name in constants:
            value = constants[name]
            return (lambda c, i, l: value), name
        if expr.scope == SCOPE_INPUT:
            return (lambda c, i, l: i.get(name) if i is not None else None), expr.text
        if expr.scope == SCOPE_LAST_FRAME:
            return (lambda c, i, l: l.get(name) if l is not None else None), expr.text
        return (lambda c, i, l: c.get(name)), expr.text
    if isinstance(expr, Arith):
        from shared.oca.printer import format_expr

        return _compile_arith(expr, constants), format_expr(expr)
    return compile_expr(expr, constants), "(...)"


def compile_value(expr: Expr) -> Compiled:
    """Like :func:`compile_expr`, but a bare keyword gives its value, not its truth."""
    if isinstance(expr, (Keyword, Literal, Arith)):
        return _getter(expr, {})[0]
    return compile_expr(expr)


def compile_expr(expr: Expr, constants: Mapping[str, Any] | None = None) -> Compiled:
    """Turn an expression into ``f(candidate, input_file, last_frame) -> value``.

    Parameters
    ----------
    expr
        Parsed expression.
    constants
        Values for bare keywords fixed at compile time (``SIG.FRAME``...).
    """
    constants = constants or {}
    if isinstance(expr, (Literal, Keyword)):
        get, _ = _getter(expr, constants)
        if isinstance(expr, Keyword):
            def truth(c, i, l, get=get):
                v = get(c, i, l)
                return v if type(v) is bool else v is not None
            return truth
        return get
    if isinstance(expr, Not):
        inner = compile_expr(expr.item, constants)
        return lambda c, i, l: not inner(c, i, l)
    if isinstance(expr, And):
        parts = [compile_expr(e, constants) for e in expr.items]
        if len(parts) == 2:
            p0, p1 = parts
            return lambda c, i, l: bool(p0(c, i, l)) and bool(p1(c, i, l))

        def all_of(c, i, l):
            for p in parts:
                if not p(c, i, l):
                    return False
            return True
        return all_of
    if isinstance(expr, Or):
        parts = [compile_expr(e, constants) for e in expr.items]

        def any_of(c, i, l):
            for p in parts:
                if p(c, i, l):
                    return True
            return False
        return any_of
    if isinstance(expr, Compare):
        return _compile_compare(expr, constants)
    if isinstance(expr, Between):
        return _compile_between(expr, constants)
    if isinstance(expr, Arith):
        get = _compile_arith(expr, constants)

        def arith_truth(c, i, l):
            v = get(c, i, l)
            return v if type(v) is bool else v is not None
        return arith_truth
    raise TypeError(f"not an OCA expression: {expr!r}")


def _compile_compare(expr: Compare, constants: Mapping[str, Any]) -> Compiled:
    op = expr.op
    left, ltext = _getter(expr.left, constants)
    if op == "is":
        type_name = expr.right.name if isinstance(expr.right, Keyword) else str(expr.right)
        checks = {
            "string": lambda v: type(v) is str,
            "number": lambda v: type(v) is float,
            "integer": lambda v: type(v) is float and v.is_integer(),
            "boolean": lambda v: type(v) is bool,
        }
        if type_name == "undefined":
            return lambda c, i, l: left(c, i, l) is None
        if type_name == "defined":
            return lambda c, i, l: left(c, i, l) is not None
        check = checks[type_name]
        return lambda c, i, l: (v := left(c, i, l)) is not None and check(v)
    right, rtext = _getter(expr.right, constants)

    if op in ("like", "regexp"):
        if not isinstance(expr.right, Literal) or not isinstance(expr.right.value, str):
            def dynamic(c, i, l):
                v, p = left(c, i, l), right(c, i, l)
                if v is None or p is None:
                    return False
                if type(v) is not str:
                    raise OcaTypeError(ltext, v, op, "a string")
                if op == "like":
                    return like_matcher(str(p))(v)
                return re.fullmatch(str(p), v) is not None
            return dynamic
        if op == "like":
            match = like_matcher(expr.right.value)
        else:
            regex = re.compile(expr.right.value)
            match = lambda s: regex.fullmatch(s) is not None

        def like(c, i, l):
            v = left(c, i, l)
            if type(v) is str:
                return match(v)
            if v is None:
                return False
            raise OcaTypeError(ltext, v, op, "a string")
        return like

    if op == "==":
        if isinstance(expr.left, Keyword) and not expr.left.scope and isinstance(
            expr.right, Literal
        ) and expr.left.name not in constants:
            name, lit = expr.left.name, normalise(expr.right.value)
            lit_type = type(lit)

            def eq_literal(c, i, l):
                v = c.get(name)
                if type(v) is lit_type:
                    return v == lit
                return v is not None and values_equal(v, lit)
            return eq_literal

        def eq(c, i, l):
            a, b = left(c, i, l), right(c, i, l)
            if a is None or b is None:
                return False
            return a == b if type(a) is type(b) else values_equal(a, b)
        return eq
    if op == "!=":
        def ne(c, i, l):
            a, b = left(c, i, l), right(c, i, l)
            return a is None or b is None or not values_equal(a, b)
        return ne
    if op == "?=":
        def maybe_eq(c, i, l):
            a, b = left(c, i, l), right(c, i, l)
            return a is None or b is None or values_equal(a, b)
        return maybe_eq
    if op in _ORDER:
        def order(c, i, l):
            a, b = left(c, i, l), right(c, i, l)
            if a is None or b is None:
                return False
            return _ordered(op, a, b, ltext, rtext)
        return order
    raise ValueError(f"unknown operator {op!r}")


def expression_keywords(expr: Expr) -> set[Keyword]:
    """Every keyword reference in an expression."""
    if isinstance(expr, Keyword):
        return {expr}
    if isinstance(expr, Literal):
        return set()
    if isinstance(expr, Compare):
        if expr.op == "is":
            return expression_keywords(expr.left)
        return expression_keywords(expr.left) | expression_keywords(expr.right)
    if isinstance(expr, Arith):
        return expression_keywords(expr.left) | expression_keywords(expr.right)
    if isinstance(expr, Between):
        return (expression_keywords(expr.item) | expression_keywords(expr.low)
                | expression_keywords(expr.high))
    if isinstance(expr, Not):
        return expression_keywords(expr.item)
    out: set[Keyword] = set()
    for item in expr.items:  # And / Or
        out |= expression_keywords(item)
    return out


def rule_keywords(rules: RuleSet) -> set[str]:
    """Dotted names of every header keyword the rules read (for the header reader).

    Keywords the classification assigns (``DO.CATG``...) are not header keywords.
    """
    names: set[str] = set()
    assigned = {a.key for rule in rules.classification for a in rule.assignments}
    for rule in rules.classification:
        names |= {k.name for k in expression_keywords(rule.condition)}
        for a in rule.assignments:
            names |= {k.name for k in expression_keywords(a.value)}
    for org in rules.organisation:
        names |= {k.name for k in expression_keywords(org.condition)}
        names |= set(org.group_by)
    for action in rules.actions:
        for sel in action.selects:
            names |= {k.name for k in expression_keywords(sel.condition)}
    return names - SIGNAL_KEYWORDS - assigned
