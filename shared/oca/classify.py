"""Classify files by a rule set's classification rules.

Rules in file order, every matching rule assigns, so the last match wins;
:class:`Classification` records the rule line of each value. A type error in
one rule (:class:`~shared.oca.evaluate.OcaTypeError`) is recorded with the file
and the rule line, and the next rule is tried: one bad keyword never stops a
delivery. Expression semantics: :mod:`shared.oca.evaluate`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.oca.evaluate import (
    Compiled,
    OcaTypeError,
    compile_expr,
    compile_value,
    normalise_record,
)
from shared.oca.keywords import to_dotted
from shared.oca.model import RuleSet

_log = logging.getLogger(__name__)

#: Keywords a classification result may be stored under, in the order looked at.
CATEGORY_KEYWORDS = ("DO.CATG", "RAW.TYPE", "DO.CLASS", "CATG", "REFLEX.CATG", "PACK.DIR")
UNCLASSIFIED = "UNCLASSIFIED"


@dataclass
class Classification:
    """The outcome of classifying one file.

    Attributes
    ----------
    path
        The file.
    values
        Keyword → value assigned by the rules (``{"DO.CATG": "OBJECT"}``).
    rule_lines
        Keyword → ``file:line`` of the rule that set the value (the last match).
    errors
        Type errors met while evaluating, each naming file, rule and keyword.
    """

    path: Path
    values: dict[str, Any] = field(default_factory=dict)
    rule_lines: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: The file's own PRO.CATG (products): its category when no rule assigned one.
    pro_catg: str | None = None

    @property
    def category(self) -> str:
        """The first of DO.CATG, RAW.TYPE, ... assigned; else the file's PRO.CATG
        (Gasgano's VLT.oca: an unclassified product is classified by PRO.CATG);
        else UNCLASSIFIED."""
        for key in CATEGORY_KEYWORDS:
            value = self.values.get(key)
            if isinstance(value, str) and value:
                return value
        if self.pro_catg:
            return self.pro_catg
        return UNCLASSIFIED


@dataclass
class CompiledClassifier:
    """Classification rules compiled once, applied to many files."""

    rules: list[tuple[Compiled, list[tuple[str, Compiled]], str]]

    @classmethod
    def from_rules(cls, rules: RuleSet) -> CompiledClassifier:
        compiled = []
        for rule in rules.classification:
            where = f"{Path(rule.source).name or '<rules>'}:{rule.line}"
            compiled.append((
                compile_expr(rule.condition),
                [(a.key, compile_value(a.value)) for a in rule.assignments],
                where,
            ))
        return cls(compiled)

    def classify_record(self, path: Path, record: dict[str, Any]) -> Classification:
        """Classify a normalised dotted record in place (assigned values are added to it)."""
        pro_catg = record.get("PRO.CATG")
        result = Classification(Path(path), pro_catg=pro_catg if type(pro_catg) is str else None)
        for condition, assignments, where in self.rules:
            try:
                if not condition(record, None, None):
                    continue
                for key, value_fn in assignments:
                    value = value_fn(record, None, None)
                    record[key] = value
                    result.values[key] = value
                    result.rule_lines[key] = where
            except OcaTypeError as e:
                message = f"{path}: rule {where}: {e}"
                _log.warning("classification: %s", message)
                result.errors.append(message)
        return result


def classify(
    rules: RuleSet | CompiledClassifier,
    headers: Mapping[str | Path, Mapping[str, Any]],
) -> dict[Path, Classification]:
    """Classify files by the rules.

    Parameters
    ----------
    rules
        A rule set (or a classifier compiled from one, to reuse it).
    headers
        Path → header; a header may be an astropy ``Header``, the dict from
        :class:`shared.fitsheader.HeaderReader` or a dict keyed by dotted names.

    Returns
    -------
    dict
        Path → :class:`Classification`, in the order given.
    """
    classifier = rules if isinstance(rules, CompiledClassifier) else (
        CompiledClassifier.from_rules(rules))
    out: dict[Path, Classification] = {}
    for path, header in headers.items():
        record = normalise_record(to_dotted(header))
        out[Path(path)] = classifier.classify_record(Path(path), record)
    return out

