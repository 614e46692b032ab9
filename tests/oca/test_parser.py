"""Parsing the shipped rule files, printing them back, and syntax errors."""

from __future__ import annotations

import pytest

from shared.oca import OcaSyntaxError, format_rules, parse_file, parse_rules
from shared.oca.model import And, Compare, Keyword, Literal, Not, Or

from .conftest import PIPELINES, PROFILES


@pytest.mark.parametrize("pipe", PIPELINES)
def test_shipped_rule_file_parses_and_round_trips(oca_rules_dir, pipe):
    rules = parse_file(oca_rules_dir / f"{pipe}.oca")
    assert rules.classification and rules.organisation
    again = parse_rules(format_rules(rules))
    assert again == rules
    # printing is stable: a second print is identical text
    assert format_rules(again) == format_rules(rules)


def test_hawki_counts(hawki_shipped):
    # hawki.oca: 77 "if" rules, 11 "select execute", 8 actions (counted with grep -c)
    assert len(hawki_shipped.classification) == 77
    assert len(hawki_shipped.organisation) == 11
    assert [a.name for a in hawki_shipped.actions] == [
        "DARKS", "SKY_FLATS", "STANDARD_STARS", "SCIENCE_FRAMES",
        "hawki_cal_illum", "hawki_cal_distortion", "detmon_ir_lg", "hawki_tec_filtchk"]


def test_action_structure(hawki_shipped, oca_rules_dir):
    sci = hawki_shipped.action("SCIENCE_FRAMES")
    assert sci.recipe.name == "hawki_science_process"
    tags = [(s.tag, s.pool, s.min_ret, s.max_ret) for s in sci.selects]
    assert tags[0] == ("MASTER_DARK", "calibFiles", 1, 1)
    assert ("MASTER_2MASS_CATALOGUE_ASTROM", "calibFiles", 0, 1) in tags
    assert hawki_shipped.action("detmon_ir_lg").recipe.options == ("--exts=-1",)
    org = hawki_shipped.organisation[4]  # hawki.oca:379
    assert org.action == "SCIENCE_FRAMES" and org.line == 379
    assert org.group_by[-1] == "OBS.START" and org.qualifier == ("TPL_A", "tpl")
    # vimos.oca uses ?= on quadrant keywords, uves.oca a top-level minRet
    vimos = parse_file(oca_rules_dir / "vimos.oca")
    assert "?=" in format_rules(vimos)
    uves = parse_file(oca_rules_dir / "uves.oca")
    assert any(r.min_files == 3 for r in uves.organisation)
    muse = parse_file(oca_rules_dir / "muse.oca")
    assert any(a.products for a in muse.actions)


def test_every_operator():
    text = '''
    // comment
    /* block
       comment */
    if (T) then { A = "1"; }
    if X != "a" and not (Y == 2 or Z < 3.5) and W >= -1 and V <= 1e3 and U > 0
       and inputFile.Q ?= Q and R like "%x%" and S regexp "a[bc]" and P is string then
    {
      DO.CATG = "B";
      FLAG = R like "x%";
    }
    select execute(ACT) from inputFiles where SIG.FRAME == 1 and LF.DO.CATG == "B"
      group by K1,K2 as (TPL_A,tpl);
    action ACT
    {
      minRet = 0; maxRet = 2;
      select file as TAG from calibFiles where DO.CATG == "M" and inputFile.K1 == K1;
      recipe rec { "--a=1"; "--b=2"; }
      product P1 { PRO.CATG = "P"; }
    }
    '''
    rules = parse_rules(text)
    assert rules.classification[0].condition == Literal(True)
    cond = rules.classification[1].condition
    assert isinstance(cond, And)
    ops = [c.op for c in cond.items if isinstance(c, Compare)]
    assert ops == ["!=", ">=", "<=", ">", "?=", "like", "regexp", "is"]
    negated = cond.items[1]
    assert isinstance(negated, Not) and isinstance(negated.item, Or)
    assert Keyword("Q", "inputFile") in (cond.items[5].left, cond.items[5].right)
    sel = rules.actions[0].selects[0]
    assert (sel.min_ret, sel.max_ret) == (0, 2)
    assert rules.actions[0].recipe.options == ("--a=1", "--b=2")
    assert parse_rules(format_rules(rules)) == rules


@pytest.mark.parametrize(
    ("text", "line", "column", "expected"),
    [
        ('if A == "x" then\n{\n  DO.CATG = "Y"\n}\n', 4, 1, "expected ';'"),
        ('if A == "x"\n{ DO.CATG = "Y"; }', 2, 1, "expected 'then'"),
        ('select execute(X from inputFiles where A == 1;', 1, 18, "expected ')'"),
        ('action X { minRet = 1; recipe ; }', 1, 31, "expected a recipe name"),
        ('if A == then { }', 1, 9, "expected a keyword, a quoted string"),
        ('if A == "x then { }', 1, 9, "unterminated string"),
        ('whatever', 1, 1, "expected 'if', 'select' or 'action'"),
    ],
)
def test_syntax_error_names_file_line_column(tmp_path, text, line, column, expected):
    path = tmp_path / "bad.oca"
    path.write_text(text)
    with pytest.raises(OcaSyntaxError) as err:
        parse_file(path)
    assert (err.value.line, err.value.column) == (line, column)
    assert str(err.value).startswith(f"{path}:{line}:{column}: ")
    assert expected in str(err.value)


@pytest.mark.parametrize("name", ["hawki_overlay.oca", "vimos_overlay.oca"])
def test_overlays_parse_and_round_trip(name):
    rules = parse_file(PROFILES / name)
    assert rules.tag_map and rules.actions
    assert parse_rules(format_rules(rules)) == rules
