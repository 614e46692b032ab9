"""Tokenizer and recursive-descent parser for the OCA rule language.

The grammar is the one used by the rule files ESO ships with its pipelines
(Gasgano ``.oca`` files)::

    file        := statement*
    statement   := classify | organise | action | tagmap | drop
    classify    := "if" expr "then" "{" assignment* "}"
    assignment  := NAME "=" expr ";"
    organise    := "select" "execute" "(" NAME ")" "from" NAME "where" expr
                   ["group" "by" NAME ("," NAME)* ["as" "(" NAME ("," NAME)* ")"]] ";"
    action      := "action" NAME "{" action_item* "}"
    action_item := NAME "=" expr ";"                       (minRet, maxRet, priority, ...)
                 | "select" "file" "as" NAME "from" NAME "where" expr ";"
                 | "recipe" NAME (";" | "{" (STRING [";"])* "}")
                 | "product" NAME "{" assignment* "}"
    expr        := and_expr ("or" and_expr)*
    and_expr    := not_expr ("and" not_expr)*
    not_expr    := "not" not_expr | comparison
    comparison  := sum [OP sum | ("between" | "tryBetween") sum "and" sum | "is" TYPE]
                   OP: == != < > <= >= ?= like regexp
                   TYPE: string number integer boolean undefined defined
    sum         := product (("+" | "-") product)*
    product     := unary (("*" | "/") unary)*
    unary       := "-" unary | "+" unary | operand
    operand     := "(" expr ")" | NAME | STRING | NUMBER

A setting's ``;`` may be left out when the next statement follows
(``minRet = 2`` then ``select ...``), as some Reflex rule files do.

Two statements exist only for overlays (see :mod:`shared.oca.overlay`):
``tagmap { CATG = "TAG"; ... }`` and ``drop action NAME;``.

Comments are ``// ...`` to the end of the line and ``/* ... */``.
Lines starting with ``#`` are C preprocessor output: line markers
(``# 12 "hawki_classification.h"``, ``#line 12 "file"``) set the file and line
that tokens, rules and errors are attributed to; ``#pragma``/``#ident`` are
ignored; any other directive (``#include``, ``#define``...) means the text was
not preprocessed and is a syntax error (see :mod:`shared.oca.preprocess`).

Keyword names may contain ``-`` (``MJD-OBS``, ``DATE-OBS``) only when a letter
or ``_`` follows it; ``-`` before a digit or a blank is subtraction, so
``MJD-OBS-3`` and ``MJD-OBS - 3`` both subtract 3, while ``MJD-OBS-EXPTIME``
is one (unknown) keyword: write ``MJD-OBS - EXPTIME``.
A bare ``T`` or ``F`` operand is the constant true or false (``if (T) then``).
Words (``and``, ``like``, ...) are matched case-insensitively.

Why one module of about 600 lines: a recursive-descent parser is one function
per production, and the productions call each other; split, the grammar above
would be read across files. The tokenizer, the only separable part, is short.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from shared.oca.model import (
    SCOPE_FILE,
    SCOPE_INPUT,
    SCOPE_LAST_FRAME,
    Action,
    And,
    Arith,
    Assignment,
    Between,
    ClassificationRule,
    Compare,
    Expr,
    FileSelect,
    Keyword,
    Literal,
    Not,
    Or,
    OrganisationRule,
    ProductRule,
    Recipe,
    RuleSet,
    Setting,
)

_log = logging.getLogger(__name__)

#: Comparison operators, longest first so that ``<=`` wins over ``<``.
COMPARE_SYMBOLS = ("==", "!=", "<=", ">=", "?=", "<", ">")
COMPARE_WORDS = ("like", "regexp", "is")

#: Type names allowed after ``is`` (``PRO.CATG is string`` in naco.oca and visir.oca,
#: ``USERTBL is undefined`` in MUSE's Reflex rules, muse_wkf.oca).
TYPE_NAMES = ("string", "number", "integer", "boolean", "undefined", "defined")
BETWEEN_WORDS = ("between", "trybetween")
ARITH_SYMBOLS = ("+", "-", "*", "/")

_NAME = r"[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z_][A-Za-z0-9_]*)*(?:\.[A-Za-z0-9_]+(?:-[A-Za-z_][A-Za-z0-9_]*)*)*"

_TOKEN_RE = re.compile(
    r"""
    (?P<directive>^[ \t]*\#[^\n]*)
  | (?P<ws>[ \t\r\f\v]+)
  | (?P<nl>\n)
  | (?P<comment>//[^\n]*)
  | (?P<block>/\*.*?\*/)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?![A-Za-z_]))
  | (?P<name>""" + _NAME + r""")
  | (?P<op>==|!=|<=|>=|\?=|<|>|=|\+|-|\*|/)
  | (?P<punct>[(){};,])
    """,
    re.VERBOSE | re.DOTALL | re.MULTILINE,
)
#: ``# 12 "file.h" 1 3`` (GNU cpp) or ``#line 12 "file.h"`` (pcpp, C99).
_LINE_MARKER = re.compile(r'[ \t]*\#[ \t]*(?:line[ \t]+)?(\d+)(?:[ \t]+"((?:[^"\\]|\\.)*)")?')
_DIRECTIVE = re.compile(r"[ \t]*\#[ \t]*([A-Za-z_]\w*)?")
#: A keyword with an operator glued to its end (``DET.WIN1.BINYand``, uves_wkf_onlydflats.oca:1020)
#: or start (``andDET.DIT``).
_GLUED = re.compile(r"(.*[A-Z0-9_])(and|or|like|then|between)$")
_GLUED_START = re.compile(r"(and|or|not)([A-Z_].*)$")


class OcaSyntaxError(ValueError):
    """A rule file does not parse; the message is ``file:line:column: what was expected``."""

    def __init__(self, path: str, line: int, column: int, message: str):
        self.path = path
        self.line = line
        self.column = column
        self.message = message
        super().__init__(f"{path}:{line}:{column}: {message}")


@dataclass(frozen=True)
class Token:
    kind: str  # name, string, number, op, punct, eof
    text: str
    line: int
    column: int
    #: The file the token comes from (a line marker may change it).
    path: str = ""

    def describe(self) -> str:
        return "end of file" if self.kind == "eof" else repr(self.text)


def tokenize(text: str, path: str = "<string>") -> list[Token]:
    """Split rule text into tokens, dropping blanks and comments.

    Line markers of a C preprocessor (``# 12 "file.h"``) re-attribute the
    following lines to that file and line; errors name the original place.
    """
    tokens: list[Token] = []
    pos, line, line_start = 0, 1, 0
    size = len(text)
    source, delta = path, 0  # original line = physical line + delta
    while pos < size:
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            col = pos - line_start + 1
            if text.startswith("/*", pos):
                raise OcaSyntaxError(source, line + delta, col, "unterminated /* comment")
            if text[pos] == '"':
                raise OcaSyntaxError(source, line + delta, col,
                                     "unterminated string (expected closing '\"')")
            raise OcaSyntaxError(source, line + delta, col, f"unexpected character {text[pos]!r}")
        kind = m.lastgroup
        value = m.group()
        if kind == "directive":
            marker = _LINE_MARKER.match(value)
            if marker:
                # the marker names the line that follows it
                delta = int(marker.group(1)) - (line + 1)
                if marker.group(2) is not None:
                    source = re.sub(r"\\(.)", r"\1", marker.group(2))
            else:
                name = (_DIRECTIVE.match(value).group(1) or "").lower()
                if name not in ("", "pragma", "ident"):
                    raise OcaSyntaxError(
                        source, line + delta, value.index("#") + 1,
                        f"preprocessor directive '#{name}': this text has not been through the "
                        "C preprocessor (load_rules preprocesses .h/.RLS entry files and files "
                        "with directives)")
        elif kind in ("string", "number", "name", "op", "punct"):
            tokens.append(Token(kind, value, line + delta, pos - line_start + 1, source))
        newlines = value.count("\n")
        if newlines:
            line += newlines
            line_start = pos + value.rindex("\n") + 1
        pos = m.end()
    tokens.append(Token("eof", "", line + delta, pos - line_start + 1, source))
    return tokens


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text[1:-1])


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


class _Parser:
    """One pass over the tokens of one file; methods follow the grammar above."""

    def __init__(self, tokens: list[Token], path: str):
        self.tokens = tokens
        self.pos = 0
        self.path = path

    # -- token helpers -------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.tokens[self.pos]

    def error(self, expected: str, token: Token | None = None) -> OcaSyntaxError:
        token = token or self.tok
        message = f"expected {expected}, found {token.describe()}"
        prev = self.tokens[self.pos - 1] if self.pos > 0 and token is self.tok else None
        glued = _GLUED.match(prev.text) if prev is not None and prev.kind == "name" else None
        if glued:
            # the mistake is the keyword with the operator glued to it: point there
            head, word = glued.groups()
            message += (f" after {prev.text!r}: is '{word}' glued to the keyword? "
                        f"write '{head} {word}'")
            token = prev
        elif token.kind == "name" and (start := _GLUED_START.match(token.text)):
            word, rest = start.groups()
            message += f": is '{word}' glued to the keyword? write '{word} {rest}'"
        return OcaSyntaxError(token.path or self.path, token.line, token.column, message)

    def end_setting(self) -> None:
        """The ``;`` after a setting; it may be left out before the next statement."""
        if self.accept(";"):
            return
        tok, nxt = self.tok, self.tokens[min(self.pos + 1, len(self.tokens) - 1)]
        starts = (tok.kind == "eof" or (tok.kind == "punct" and tok.text == "}")
                  or (tok.kind == "name" and tok.text.lower() in (
                      "select", "recipe", "product", "action", "if", "tagmap", "drop"))
                  or (tok.kind == "name" and nxt.kind == "op" and nxt.text == "="))
        if not starts:
            raise self.error("';' after the value")

    def is_word(self, word: str) -> bool:
        return self.tok.kind == "name" and self.tok.text.lower() == word

    def accept_word(self, word: str) -> bool:
        if self.is_word(word):
            self.pos += 1
            return True
        return False

    def expect_word(self, word: str) -> Token:
        if not self.is_word(word):
            raise self.error(f"'{word}'")
        token = self.tok
        self.pos += 1
        return token

    def accept(self, text: str) -> bool:
        if self.tok.kind in ("punct", "op") and self.tok.text == text:
            self.pos += 1
            return True
        return False

    def expect(self, text: str, what: str | None = None) -> Token:
        if not (self.tok.kind in ("punct", "op") and self.tok.text == text):
            raise self.error(what or f"'{text}'")
        token = self.tok
        self.pos += 1
        return token

    def expect_name(self, what: str) -> Token:
        if self.tok.kind != "name":
            raise self.error(what)
        token = self.tok
        self.pos += 1
        return token

    # -- statements ----------------------------------------------------
    def parse_file(self) -> RuleSet:
        classification: list[ClassificationRule] = []
        organisation: list[OrganisationRule] = []
        actions: list[Action] = []
        tag_map: list[tuple[str, str]] = []
        dropped: list[str] = []
        pending: list[Setting] = []
        while self.tok.kind != "eof":
            if self.is_word("if"):
                classification.append(self.parse_classification())
            elif self.is_word("select"):
                organisation.append(self.parse_organisation(tuple(pending)))
                pending = []
            elif self.tok.kind == "name" and self.tokens[self.pos + 1].text == "=":
                token = self.expect_name("a setting")
                self.expect("=")
                value = self.parse_expr()
                self.end_setting()
                pending.append(Setting(token.text, value, line=token.line))
            elif self.is_word("action"):
                actions.append(self.parse_action())
            elif self.is_word("tagmap"):
                tag_map.extend(self.parse_tagmap())
            elif self.is_word("drop"):
                dropped.append(self.parse_drop())
            else:
                raise self.error("'if', 'select' or 'action'")
        if pending:
            token = self.tok
            raise OcaSyntaxError(token.path or self.path, token.line, token.column,
                                 "expected 'select execute' after a top-level setting")
        return RuleSet(
            classification=tuple(classification),
            organisation=tuple(organisation),
            actions=tuple(actions),
            tag_map=tuple(tag_map),
            dropped=tuple(dropped),
        )

    def parse_classification(self) -> ClassificationRule:
        start = self.expect_word("if")
        condition = self.parse_expr()
        self.expect_word("then")
        brace = self.expect("{", "'{' after 'then'")
        assignments = []
        while not self.accept("}"):
            self.check_unclosed(brace)
            assignments.append(self.parse_assignment())
        return ClassificationRule(condition, tuple(assignments), line=start.line,
                                  source=start.path or self.path)

    def check_unclosed(self, brace: Token) -> None:
        """A statement keyword (or the end) inside ``{ ... }``: the brace was never closed."""
        tok = self.tok
        nxt = self.tokens[min(self.pos + 1, len(self.tokens) - 1)]
        if tok.kind == "eof" or (tok.kind == "name" and tok.text.lower() in (
                "if", "select", "action", "tagmap", "drop") and nxt.text != "="):
            raise OcaSyntaxError(
                tok.path or self.path, tok.line, tok.column,
                f"expected '}}' closing the '{{' at {brace.path or self.path}:{brace.line}:"
                f"{brace.column}, found {tok.describe()}")

    def parse_assignment(self) -> Assignment:
        key = self.expect_name("a keyword to assign (e.g. DO.CATG) or '}'")
        self.expect("=", "'=' after the keyword")
        value = self.parse_expr()
        self.expect(";", "';' after the assigned value")
        return Assignment(key.text, value, line=key.line)

    def parse_organisation(self, settings: tuple[Setting, ...] = ()) -> OrganisationRule:
        start = self.expect_word("select")
        self.expect_word("execute")
        self.expect("(", "'(' after 'execute'")
        action = self.expect_name("an action name").text
        self.expect(")", "')' after the action name")
        self.expect_word("from")
        pool = self.expect_name("a file pool (inputFiles)").text
        self.expect_word("where")
        condition = self.parse_expr()
        group_by: list[str] = []
        qualifier: list[str] = []
        if self.accept_word("group"):
            self.expect_word("by")
            group_by.append(self.group_key())
            while self.accept(","):
                group_by.append(self.group_key())
            if self.accept_word("as"):
                self.expect("(", "'(' after 'as'")
                qualifier.append(self.expect_name("a grouping qualifier").text)
                while self.accept(","):
                    qualifier.append(self.expect_name("a grouping qualifier").text)
                self.expect(")", "')' after the qualifier")
        self.expect(";", "';' or 'group by' at the end of the select")
        return OrganisationRule(
            action, pool, condition, tuple(group_by), tuple(qualifier), settings,
            line=start.line, source=start.path or self.path,
        )

    def group_key(self) -> str:
        if self.is_word("as") and self.tokens[self.pos + 1].text == "(":
            raise self.error("a keyword to group by")  # e.g. a macro that expanded to nothing
        return self.expect_name("a keyword to group by").text

    def parse_action(self) -> Action:
        start = self.expect_word("action")
        name = self.expect_name("an action name").text
        brace = self.expect("{", "'{' after the action name")
        statements: list = []
        min_ret, max_ret = 1, 1
        while not self.accept("}"):
            if self.tok.kind == "eof" or self.is_word("action") or self.is_word("if"):
                self.check_unclosed(brace)
            if self.is_word("select"):
                token = self.tok
                self.pos += 1
                self.expect_word("file")
                self.expect_word("as")
                tag = self.expect_name("a tag after 'as'").text
                self.expect_word("from")
                pool = self.expect_name("a file pool (calibFiles or inputFiles)").text
                self.expect_word("where")
                condition = self.parse_expr()
                self.expect(";", "';' at the end of the select")
                statements.append(
                    FileSelect(tag, pool, condition, min_ret, max_ret, line=token.line)
                )
            elif self.is_word("recipe"):
                token = self.tok
                self.pos += 1
                recipe = self.expect_name("a recipe name").text
                options: list[str] = []
                if self.accept("{"):
                    while not self.accept("}"):
                        if self.tok.kind != "string":
                            raise self.error("a quoted recipe option or '}'")
                        options.append(_unquote(self.tok.text))
                        self.pos += 1
                        self.accept(";")
                else:
                    self.expect(";", "';' or '{' after the recipe name")
                statements.append(Recipe(recipe, tuple(options), line=token.line))
            elif self.is_word("product"):
                token = self.tok
                self.pos += 1
                product = self.expect_name("a product name").text
                brace = self.expect("{", "'{' after the product name")
                assignments = []
                while not self.accept("}"):
                    self.check_unclosed(brace)
                    assignments.append(self.parse_assignment())
                statements.append(ProductRule(product, tuple(assignments), line=token.line))
            elif self.tok.kind == "name":
                token = self.tok
                self.pos += 1
                self.expect("=", f"'=' after {token.text!r}")
                value = self.parse_expr()
                self.end_setting()
                setting = Setting(token.text, value, line=token.line)
                if token.text in ("minRet", "maxRet"):
                    if not (isinstance(value, Literal) and isinstance(value.value, int)
                            and not isinstance(value.value, bool)):
                        raise OcaSyntaxError(token.path or self.path, token.line, token.column,
                                             f"expected an integer for {token.text}")
                    if token.text == "minRet":
                        min_ret = value.value
                    else:
                        max_ret = value.value
                statements.append(setting)
            else:
                raise self.error("'select', 'recipe', 'product', a setting or '}'")
        return Action(name, tuple(statements), line=start.line, source=start.path or self.path)

    def parse_tagmap(self) -> list[tuple[str, str]]:
        self.expect_word("tagmap")
        self.expect("{", "'{' after 'tagmap'")
        pairs = []
        while not self.accept("}"):
            key = self.expect_name("a category (DO.CATG value) or '}'").text
            self.expect("=", "'=' after the category")
            if self.tok.kind != "string":
                raise self.error("a quoted SOF tag")
            pairs.append((key, _unquote(self.tok.text)))
            self.pos += 1
            self.expect(";", "';' after the SOF tag")
        return pairs

    def parse_drop(self) -> str:
        self.expect_word("drop")
        self.expect_word("action")
        name = self.expect_name("an action name").text
        self.expect(";", "';' after the action name")
        return name

    # -- expressions ---------------------------------------------------
    def parse_expr(self) -> Expr:
        items = [self.parse_and()]
        while self.accept_word("or"):
            items.append(self.parse_and())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def parse_and(self) -> Expr:
        items = [self.parse_not()]
        while self.accept_word("and"):
            items.append(self.parse_not())
        return items[0] if len(items) == 1 else And(tuple(items))

    def parse_not(self) -> Expr:
        if self.accept_word("not"):
            return Not(self.parse_not())
        return self.parse_comparison()

    def parse_comparison(self) -> Expr:
        left = self.parse_sum()
        token = self.tok
        op = None
        if token.kind == "op" and token.text in COMPARE_SYMBOLS:
            op = token.text
        elif token.kind == "name" and token.text.lower() in COMPARE_WORDS + BETWEEN_WORDS:
            op = token.text.lower()
        if op is None:
            return left
        self.pos += 1
        if op in BETWEEN_WORDS:
            low = self.parse_sum()
            self.expect_word("and")
            high = self.parse_sum()
            return Between(left, low, high, soft=op == "trybetween",
                           line=token.line, column=token.column)
        if op == "is":
            type_token = self.tok
            if type_token.kind != "name" or type_token.text.lower() not in TYPE_NAMES:
                raise self.error("a type name (" + ", ".join(TYPE_NAMES) + ")")
            self.pos += 1
            right: Expr = Keyword(type_token.text.lower(), line=type_token.line,
                                  column=type_token.column)
        else:
            right = self.parse_sum()
        return Compare(op, left, right, line=token.line, column=token.column)

    def _arith_op(self, ops: tuple[str, ...]) -> Token | None:
        token = self.tok
        if token.kind == "op" and token.text in ops:
            self.pos += 1
            return token
        return None

    def parse_sum(self) -> Expr:
        left = self.parse_product()
        while (token := self._arith_op(("+", "-"))) is not None:
            left = Arith(token.text, left, self.parse_product(),
                         line=token.line, column=token.column)
        return left

    def parse_product(self) -> Expr:
        left = self.parse_unary()
        while (token := self._arith_op(("*", "/"))) is not None:
            left = Arith(token.text, left, self.parse_unary(),
                         line=token.line, column=token.column)
        return left

    def parse_unary(self) -> Expr:
        token = self._arith_op(("-", "+"))
        if token is None:
            return self.parse_operand()
        inner = self.parse_unary()
        if token.text == "+":
            return inner
        if isinstance(inner, Literal) and type(inner.value) in (int, float):
            return Literal(-inner.value, line=token.line, column=token.column)
        return Arith("-", Literal(0), inner, line=token.line, column=token.column)

    def parse_operand(self) -> Expr:
        token = self.tok
        if self.accept("("):
            inner = self.parse_expr()
            self.expect(")", "')' or an operator ('and', 'or', '==', ...)")
            return inner
        if token.kind == "string":
            self.pos += 1
            return Literal(_unquote(token.text), line=token.line, column=token.column)
        if token.kind == "number":
            self.pos += 1
            return Literal(_number(token.text), line=token.line, column=token.column)
        if token.kind == "name" and token.text.lower() not in _RESERVED:
            self.pos += 1
            if token.text in ("T", "F"):
                return Literal(token.text == "T", line=token.line, column=token.column)
            scope, name = SCOPE_FILE, token.text
            head, _, rest = token.text.partition(".")
            if rest and head in (SCOPE_INPUT, SCOPE_LAST_FRAME):
                scope, name = head, rest
            return Keyword(name, scope, line=token.line, column=token.column)
        raise self.error("a keyword, a quoted string, a number or '('")


_RESERVED = frozenset(
    ["and", "or", "not", "like", "regexp", "is", "then", "if", "select", "from", "where", "group",
     "action", "recipe", "product", "between", "trybetween"]
)


def parse_rules(text: str, path: str | Path = "<string>") -> RuleSet:
    """Parse OCA rule text.

    Parameters
    ----------
    text
        The rule file's content.
    path
        Name used in error messages and recorded as the source of each rule.

    Returns
    -------
    RuleSet

    Raises
    ------
    OcaSyntaxError
        With file, line, column and what was expected.
    """
    label = str(path)
    rules = _Parser(tokenize(text, label), label).parse_file()
    sources = (Path(label),) if label != "<string>" else ()
    return RuleSet(
        classification=rules.classification,
        organisation=rules.organisation,
        actions=rules.actions,
        tag_map=rules.tag_map,
        dropped=rules.dropped,
        sources=sources,
        digest=hashlib.sha1(text.encode("utf-8", "replace")).hexdigest(),
    )


def parse_file(path: str | Path) -> RuleSet:
    """Read and parse one rule file (see :func:`parse_rules`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise OcaSyntaxError(str(path), 0, 0, f"cannot read rule file: {e.strerror}") from e
    return parse_rules(text, path)
