"""The parsed form of an OCA rule file: plain frozen dataclasses.

Source positions (``line``, ``column``) are kept for messages but take no part
in equality, so that parse → print → parse gives equal rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Scopes a keyword reference can have: the candidate file (bare ``KEY``), the
#: group's raw file (``inputFile.KEY``) or the template's last frame (``LF.KEY``).
SCOPE_FILE = ""
SCOPE_INPUT = "inputFile"
SCOPE_LAST_FRAME = "LF"


@dataclass(frozen=True)
class Keyword:
    """A reference to a header keyword, written dotted (``DPR.CATG``)."""

    name: str
    scope: str = SCOPE_FILE
    line: int = field(default=0, compare=False)
    column: int = field(default=0, compare=False)

    @property
    def text(self) -> str:
        return f"{self.scope}.{self.name}" if self.scope else self.name


@dataclass(frozen=True)
class Literal:
    """A string, number or boolean constant."""

    value: str | int | float | bool
    line: int = field(default=0, compare=False)
    column: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Compare:
    """``left OP right`` with OP one of ``== != < > <= >= ?= like regexp is``.

    For ``is`` the right side is a :class:`Keyword` naming a type (``string``,
    ``number``, ``integer``, ``boolean``, ``undefined``, ``defined``).
    """

    op: str
    left: Expr
    right: Expr
    line: int = field(default=0, compare=False)
    column: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Arith:
    """``left OP right`` with OP one of ``+ - * /`` (``inputFile.MJD-OBS - 3``).

    Numbers give numbers; ``+`` on two strings joins them; a missing operand makes
    the result missing (see docs/oca.md, "Arithmetic").
    """

    op: str
    left: Expr
    right: Expr
    line: int = field(default=0, compare=False)
    column: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Between:
    """``value between low and high`` (inclusive), or ``tryBetween``.

    ``soft`` (tryBetween): in association, the range is a preference; when no
    candidate of the select lies in it, the select is evaluated without it.
    Everywhere else it is ``between``.
    """

    item: Expr
    low: Expr
    high: Expr
    soft: bool = False
    line: int = field(default=0, compare=False)
    column: int = field(default=0, compare=False)


@dataclass(frozen=True)
class And:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Not:
    item: Expr


Expr = Keyword | Literal | Compare | Arith | Between | And | Or | Not


@dataclass(frozen=True)
class Assignment:
    """``KEY = expr;`` inside a classification rule or a product block."""

    key: str
    value: Expr
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class ClassificationRule:
    condition: Expr
    assignments: tuple[Assignment, ...]
    line: int = field(default=0, compare=False)
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class OrganisationRule:
    """``select execute(ACTION) from POOL where COND [group by K,... [as (A,b)]];``"""

    action: str
    pool: str
    condition: Expr
    group_by: tuple[str, ...] = ()
    qualifier: tuple[str, ...] = ()
    #: Top-level settings written just before the select (``minRet = 3;`` in uves.oca):
    #: ``minRet`` there is the least number of raw files a group needs.
    settings: tuple[Setting, ...] = ()
    line: int = field(default=0, compare=False)
    source: str = field(default="", compare=False)

    @property
    def min_files(self) -> int:
        for st in self.settings:
            if st.name == "minRet" and isinstance(st.value, Literal):
                return int(st.value.value)
        return 1


@dataclass(frozen=True)
class Setting:
    """``minRet = 1;``, ``priority = 30;`` and any other ``NAME = value;`` in an action."""

    name: str
    value: Expr
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class FileSelect:
    """``select file as TAG from POOL where COND;`` with the minRet/maxRet in force."""

    tag: str
    pool: str
    condition: Expr
    min_ret: int
    max_ret: int
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Recipe:
    name: str
    options: tuple[str, ...] = ()
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class ProductRule:
    """A ``product NAME { KEY = VALUE; ... }`` statement of an action: a product the rules describe."""

    name: str
    assignments: tuple[Assignment, ...] = ()
    line: int = field(default=0, compare=False)


ActionStatement = Setting | FileSelect | Recipe | ProductRule


@dataclass(frozen=True)
class Action:
    name: str
    statements: tuple[ActionStatement, ...]
    line: int = field(default=0, compare=False)
    source: str = field(default="", compare=False)

    @property
    def selects(self) -> tuple[FileSelect, ...]:
        return tuple(s for s in self.statements if isinstance(s, FileSelect))

    @property
    def recipe(self) -> Recipe | None:
        recipes = [s for s in self.statements if isinstance(s, Recipe)]
        return recipes[-1] if recipes else None

    @property
    def products(self) -> tuple[ProductRule, ...]:
        return tuple(s for s in self.statements if isinstance(s, ProductRule))


@dataclass(frozen=True)
class RuleSet:
    """Everything one rule file (optionally with an overlay applied) says."""

    classification: tuple[ClassificationRule, ...] = ()
    organisation: tuple[OrganisationRule, ...] = ()
    actions: tuple[Action, ...] = ()
    #: DO.CATG (or select tag) → SOF tag, from an overlay's ``tagmap`` block.
    tag_map: tuple[tuple[str, str], ...] = ()
    #: Actions and organisation rules an overlay removes (``drop action X;``).
    dropped: tuple[str, ...] = ()
    sources: tuple[Path, ...] = field(default=(), compare=False)
    #: SHA-1 of the rule text (of base and overlay together after a merge): the
    #: AB's CONFIG_VERSION names exactly which rules made it.
    digest: str = field(default="", compare=False)

    def action(self, name: str) -> Action | None:
        for act in self.actions:
            if act.name == name:
                return act
        return None

    def sof_tag(self, category: str) -> str:
        """The esorex tag for a DO.CATG or select tag (identity unless mapped)."""
        return dict(self.tag_map).get(category, category)

    @property
    def source_label(self) -> str:
        return "+".join(p.name for p in self.sources) or "<rules>"

    @property
    def version(self) -> str:
        """CONFIG_VERSION of the ABs: the rule files and a digest of their text."""
        return f"{self.source_label} sha1:{self.digest[:12]}" if self.digest else self.source_label
