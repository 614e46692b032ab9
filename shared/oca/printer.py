"""Print a :class:`~shared.oca.model.RuleSet` back as OCA text.

``parse_rules(format_rules(rules)) == rules`` for every rule set the parser
produces (comments and layout are not kept).
"""

from __future__ import annotations

from shared.oca.model import (
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


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_literal(value: object) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, (int, float)):
        return repr(value)
    return _quote(str(value))


_ARITH_LEVEL = {"+": 1, "-": 1, "*": 2, "/": 2}


def format_expr(expr: Expr, parent: str = "") -> str:
    """OCA text of an expression; ``parent`` adds parentheses where precedence needs them."""
    if isinstance(expr, Keyword):
        return expr.text
    if isinstance(expr, Literal):
        return format_literal(expr.value)
    if isinstance(expr, Arith):
        level = _ARITH_LEVEL[expr.op]
        text = (f"{format_expr(expr.left, f'arith{level}')} {expr.op} "
                f"{format_expr(expr.right, f'arith{level}r')}")
        if parent.startswith("arith"):
            outer = int(parent[5])
            # parse is left-associative: a right operand of the same level needs parentheses
            if level < outer or (level == outer and parent.endswith("r")):
                return f"({text})"
        return text
    if isinstance(expr, Between):
        word = "tryBetween" if expr.soft else "between"
        text = (f"{format_expr(expr.item, 'cmp')} {word} {format_expr(expr.low, 'cmp')} and "
                f"{format_expr(expr.high, 'cmp')}")
        return f"({text})" if parent == "cmp" or parent.startswith("arith") else text
    if isinstance(expr, Compare):
        text = f"{format_expr(expr.left, 'cmp')} {expr.op} {format_expr(expr.right, 'cmp')}"
        return f"({text})" if parent == "cmp" or parent.startswith("arith") else text
    if isinstance(expr, Not):
        text = f"not {format_expr(expr.item, 'not')}"
        return f"({text})" if parent == "cmp" or parent.startswith("arith") else text
    if isinstance(expr, And):
        text = " and ".join(format_expr(i, "and") for i in expr.items)
        return f"({text})" if parent in ("and", "not", "cmp") or parent.startswith("arith") else text
    if isinstance(expr, Or):
        text = " or ".join(format_expr(i, "or") for i in expr.items)
        return f"({text})" if parent else text
    raise TypeError(f"not an OCA expression: {expr!r}")


def _assignments(items: tuple[Assignment, ...], indent: str) -> list[str]:
    return [f"{indent}{a.key} = {format_expr(a.value)};" for a in items]


def format_classification(rule: ClassificationRule) -> str:
    lines = [f"if {format_expr(rule.condition)} then", "{"]
    lines += _assignments(rule.assignments, "  ")
    lines.append("}")
    return "\n".join(lines)


def format_organisation(rule: OrganisationRule) -> str:
    text = "".join(f"{st.name} = {format_expr(st.value)};\n" for st in rule.settings)
    text += f"select execute({rule.action}) from {rule.pool} where {format_expr(rule.condition)}"
    if rule.group_by:
        text += " group by " + ",".join(rule.group_by)
        if rule.qualifier:
            text += " as (" + ",".join(rule.qualifier) + ")"
    return text + ";"


def format_action(action: Action) -> str:
    lines = [f"action {action.name}", "{"]
    for st in action.statements:
        if isinstance(st, Setting):
            lines.append(f"  {st.name} = {format_expr(st.value)};")
        elif isinstance(st, FileSelect):
            lines.append(
                f"  select file as {st.tag} from {st.pool} where {format_expr(st.condition)};"
            )
        elif isinstance(st, Recipe):
            if st.options:
                lines.append(f"  recipe {st.name}")
                lines.append("  {")
                lines += [f"    {_quote(o)};" for o in st.options]
                lines.append("  }")
            else:
                lines.append(f"  recipe {st.name};")
        elif isinstance(st, ProductRule):
            lines.append(f"  product {st.name}")
            lines.append("  {")
            lines += _assignments(st.assignments, "    ")
            lines.append("  }")
    lines.append("}")
    return "\n".join(lines)


def format_rules(rules: RuleSet) -> str:
    """The whole rule set as OCA text: classification, organisation, actions, overlay parts."""
    parts = [format_classification(r) for r in rules.classification]
    parts += [format_organisation(r) for r in rules.organisation]
    parts += [format_action(a) for a in rules.actions]
    if rules.tag_map:
        body = "\n".join(f"  {k} = {_quote(v)};" for k, v in rules.tag_map)
        parts.append("tagmap\n{\n" + body + "\n}")
    parts += [f"drop action {name};" for name in rules.dropped]
    return "\n".join(parts) + "\n"
