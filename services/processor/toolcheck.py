"""The required-tools consistency check of processPreImg (``preimg check -i INSTR``).

processPreImg refused to run when a dfos tool it needs was missing. Here the
same idea covers what a pre-imaging run of one instrument needs:

1. the tools of the profile (``required_tools``, normally ``esorex``);
2. the pipeline's plugin directory, and every recipe that the OCA rules run
   for SCIENCE frames installed in it (``esorex --recipe-dir=... --recipes``);
3. the calibration directories ``<cal_root>/<INSTR>/2099-99-99`` and
   ``<cal_root>/<INSTR>/gen`` holding, for each calibration those actions
   require (``minRet >= 1`` from ``calibFiles``), at least one file with that
   PRO.CATG, plus the profile's ``required_calibrations`` (catalogues the
   recipes need although the shipped rules do not mention them).

"Actions for SCIENCE" are found from the rules themselves. First a prototype
pre-imaging header (``DPR.CATG=SCIENCE``, ``DPR.TYPE=OBJECT``,
``DPR.TECH=IMAGE,PRE``) is classified by the rules, and the organisation
rules (``select execute(ACTION) ...``) whose condition names its category
give the actions. When none does, that is reported as missing (the shipped
``hawki.oca`` classifies ``IMAGE,PRE`` frames as JITTER_OBS and runs nothing
for them: an overlay must), and the check goes on with every action reached
from a category that classification rules assign when ``DPR.CATG`` is
SCIENCE, so the rest of the report is still useful. A profile may name the
actions itself with ``science_actions``. Association keys (DIT, filter, ...) are not matched here:
that is createAB's job; this check answers "can anything work at all".

An instrument without pipeline support (``pipe_support = false``) only needs
its tools.

A SCIENCE recipe the profile has no ``[recipe_checks.<recipe>]`` for is a
*warning*, not a missing piece: the run works, but is judged SUCCESSFUL on
rc 0 and no ``[ ERROR ]`` line alone, with no expected products. A new
instrument can start that way; the warning keeps it from staying so unnoticed.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.layout import CAL_SUBDIRS, is_fits_name
from shared.oca import profile_rules
from shared.profiles import Profile

_log = logging.getLogger(__name__)

#: A recipe line of ``esorex --recipes``: two spaces, the name, padding, a colon.
_RECIPE_LINE = re.compile(r"^\s{2}([A-Za-z_][A-Za-z0-9_]*)\s*:")
#: ``DO.CATG == "X"`` / ``PRO.CATG == "X"`` inside a select condition (printed form).
_CATG_TEST = re.compile(r'\b(?:DO|PRO)\.CATG\s*==\s*"([^"]+)"')
_CAL_POOL = "calibFiles"


@dataclass(frozen=True)
class CheckReport:
    """Result of the consistency check.

    Attributes
    ----------
    instrument : str
    missing : tuple of str
        One line per missing thing, each saying what and where it was looked for.
    found : tuple of str
        What was verified, for the operator's confidence.
    warnings : tuple of str
        What works but is weaker than it should be (does not make the check fail).
    """

    instrument: str
    missing: tuple[str, ...] = ()
    found: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.missing

    def format(self) -> str:
        lines = [f"{self.instrument}: {'OK' if self.ok else 'MISSING ' + str(len(self.missing))}"]
        lines += [f"  ok       {item}" for item in self.found]
        lines += [f"  WARNING  {item}" for item in self.warnings]
        lines += [f"  MISSING  {item}" for item in self.missing]
        return "\n".join(lines)


@dataclass(frozen=True)
class ScienceNeeds:
    """What the rules ask for SCIENCE frames.

    Attributes
    ----------
    recipes : dict
        Action name -> recipe name.
    calibrations : dict
        Action name -> required calibration categories (DO.CATG/PRO.CATG values).
    """

    recipes: dict[str, str] = field(default_factory=dict)
    calibrations: dict[str, tuple[str, ...]] = field(default_factory=dict)


def installed_recipes(recipe_dir: Path, esorex: Path | None = None) -> set[str]:
    """Recipes esorex finds in ``recipe_dir``; the ``.so`` names when esorex is absent."""
    from services.processor.esorex import find_esorex, recipe_environment

    exe = esorex or find_esorex()
    if exe is not None:
        try:
            proc = subprocess.run(
                [str(exe), f"--recipe-dir={recipe_dir}", "--recipes"],
                capture_output=True, text=True, timeout=60, cwd="/", env=recipe_environment(), check=False,
            )
            names = {m.group(1) for line in proc.stdout.splitlines() if (m := _RECIPE_LINE.match(line))}
            if names:
                return names
        except (OSError, subprocess.TimeoutExpired) as e:
            _log.warning("esorex --recipes failed: %s", e)
    return {p.stem for p in Path(recipe_dir).glob("*.so")}


#: DPR keywords of a pre-imaging frame (the trigger of the whole process).
PREIMAGING_DPR = {"DPR.CATG": "SCIENCE", "DPR.TYPE": "OBJECT", "DPR.TECH": "IMAGE,PRE"}


def preimaging_category(rules: Any, instrument: str) -> str:
    """DO.CATG the rules give a pre-imaging frame of ``instrument`` ("" if none)."""
    from shared.oca.classify import classify

    header = {"INSTRUME": instrument, **PREIMAGING_DPR}
    result = classify(rules, {Path("prototype"): header})
    category = result[Path("prototype")].values.get("DO.CATG", "")
    return str(category or "")


def _science_categories(rules: Any) -> set[str]:
    from shared.oca.printer import format_expr

    catgs: set[str] = set()
    for rule in rules.classification:
        cond = format_expr(rule.condition)
        if "DPR.CATG" in cond and "SCIENCE" in cond:
            for a in rule.assignments:
                if a.key == "DO.CATG":
                    catgs.add(str(getattr(a.value, "value", a.value)))
    return catgs


def science_needs(rules: Any, only_actions: Iterable[str] = (), categories: Iterable[str] | None = None) -> ScienceNeeds:
    """Recipes and required calibrations of the actions run for SCIENCE frames.

    Parameters
    ----------
    rules : RuleSet
    only_actions : iterable of str
        Take exactly these actions (the profile's ``science_actions``).
    categories : iterable of str, optional
        Frame categories whose actions count; default: every category that
        classification rules assign when ``DPR.CATG`` is SCIENCE.
    """
    from shared.oca.printer import format_expr

    science_catgs = set(categories) if categories is not None else _science_categories(rules)
    wanted = set(only_actions)
    dropped = set(getattr(rules, "dropped", ()))
    actions: list[str] = []
    for org in rules.organisation:
        if org.action in dropped or org.action in actions:
            continue
        cond = format_expr(org.condition)
        named = set(re.findall(r'"([^"]+)"', cond))
        if (wanted and org.action in wanted) or (not wanted and named & science_catgs):
            actions.append(org.action)
    needs = ScienceNeeds()
    for name in actions:
        action = rules.action(name)
        recipe = action.recipe.name if action is not None and action.recipe else name
        needs.recipes[name] = recipe
        cats: list[str] = []
        for sel in action.selects if action is not None else ():
            if sel.pool != _CAL_POOL or sel.min_ret < 1:
                continue
            match = _CATG_TEST.search(format_expr(sel.condition))
            cats.append(match.group(1) if match else sel.tag)
        needs.calibrations[name] = tuple(cats)
    return needs


def calibration_catalogue(dirs: Iterable[Path]) -> dict[str, list[Path]]:
    """PRO.CATG -> files, for every FITS file directly in ``dirs``."""
    from astropy.io import fits

    found: dict[str, list[Path]] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for path in sorted(d.iterdir()):
            if not path.is_file() or not is_fits_name(path.name):
                continue
            try:
                catg = str(fits.getheader(path, 0).get("HIERARCH ESO PRO CATG", "") or "")
            except (OSError, ValueError) as e:
                _log.warning("unreadable calibration %s: %s", path, e)
                continue
            if catg:
                found.setdefault(catg, []).append(path)
    return found


def check_instrument(profile: Profile, cal_root: Path, *, esorex: Path | None = None) -> CheckReport:
    """Everything a pre-imaging run of ``profile.instrument`` needs, and what is missing.

    Parameters
    ----------
    profile : Profile
    cal_root : Path
        ``$DFO_CAL_DIR``; the instrument's sets are in ``<cal_root>/<INSTR>/{2099-99-99,gen}``.
    esorex : Path, optional
        esorex executable (default: found on the recipe PATH).

    Returns
    -------
    CheckReport
    """
    from services.processor.esorex import DEFAULT_PATH, find_esorex

    missing: list[str] = []
    found: list[str] = []
    warnings: list[str] = []
    instr = profile.instrument

    for tool in profile.required_tools:
        exe = find_esorex(esorex) if tool == "esorex" else find_esorex(tool)
        if exe is None:
            missing.append(f"tool {tool!r} not found on {DEFAULT_PATH}")
        else:
            found.append(f"tool {tool} ({exe})")
    if not profile.pipe_support:
        found.append("no pipeline support (PIPE_SUPPORT=NO): raw frames are packaged, no recipes needed")
        return CheckReport(instr, tuple(missing), tuple(found), tuple(warnings))

    recipe_dir = profile.resolve_recipe_dir()
    if recipe_dir is None:
        missing.append(f"pipeline plugin directory: nothing matches {profile.recipe_dir!r}")
    else:
        found.append(f"plugin directory {recipe_dir}")

    try:
        rules = profile_rules(profile)
    except (OSError, ValueError) as e:
        missing.append(f"OCA rules: {e}")
        rules = None

    needs = ScienceNeeds()
    if rules is not None:
        needs = ScienceNeeds()
        if not profile.science_actions:
            category = preimaging_category(rules, instr)
            needs = science_needs(rules, categories={category} if category else set())
            if not needs.recipes:
                missing.append(
                    f"OCA rules: a pre-imaging frame (DPR.TECH=IMAGE,PRE) is classified "
                    f"{category or 'by no rule'} and no action is run for it (an overlay must add one)"
                )
        if not needs.recipes:
            needs = science_needs(rules, profile.science_actions)
        found.append(f"OCA rules {getattr(rules, 'source_label', profile.oca_rules)}: "
                     f"SCIENCE actions {', '.join(needs.recipes) or 'none'}")
        if not needs.recipes:
            missing.append("OCA rules: no action is run for SCIENCE frames")

    if recipe_dir is not None and needs.recipes:
        have = installed_recipes(recipe_dir, find_esorex(esorex))
        for action, recipe in needs.recipes.items():
            if recipe in have:
                found.append(f"recipe {recipe} (action {action})")
            else:
                missing.append(f"recipe {recipe} (action {action}) not installed in {recipe_dir}")
    for recipe in dict.fromkeys(needs.recipes.values()):
        check = profile.recipe_checks.get(recipe)
        if check is None:
            warnings.append(f"recipe {recipe}: no [recipe_checks.{recipe}] in the profile, so a run with "
                            "rc 0 and no [ ERROR ] line counts as SUCCESSFUL whatever it wrote")
        else:
            per = check.per_exposure
            found.append(f"recipe check {recipe}: {len(check.expected_products)} expected products"
                         + (f", one {per.product} per {per.files} {per.raw_tag}" if per else ""))

    root = Path(cal_root) / instr
    dirs = [root / sub for sub in CAL_SUBDIRS]
    for d in dirs:
        if not d.is_dir():
            missing.append(f"calibration directory {d} does not exist")
    pool = calibration_catalogue(dirs)
    tag_of = getattr(rules, "sof_tag", lambda c: c)
    required: dict[str, list[str]] = {}
    for action, cats in needs.calibrations.items():
        for cat in cats:
            required.setdefault(cat, []).append(f"action {action}")
    for cat in profile.required_calibrations:
        required.setdefault(cat, []).append("profile required_calibrations")
    for cat, why in required.items():
        files = pool.get(cat) or pool.get(tag_of(cat))
        if files:
            found.append(f"calibration {cat}: {files[0].name}" + (f" (+{len(files) - 1})" if len(files) > 1 else ""))
        else:
            missing.append(
                f"calibration {cat} (needed by {', '.join(sorted(set(why)))}): "
                f"no file with PRO.CATG={cat} in {dirs[0]} or {dirs[1]}"
            )
    return CheckReport(instr, tuple(missing), tuple(found), tuple(warnings))
