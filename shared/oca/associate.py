"""Association: each group of raw files with its calibrations, as an Association Block.

Per ``select file as TAG from POOL where COND`` of the group's action:

- the group's reference raw file (``inputFile``) is its earliest file (MJD-OBS);
  a bare ``KEY`` is the candidate;
- POOL ``calibFiles`` is the calibration :class:`~shared.oca.pool.FramePool`,
  ``inputFiles``/``rawFiles`` the pool of the delivery's raw files;
- minRet/maxRet in force at the select bound the files taken; when more qualify
  than maxRet, the closest in time are taken (:mod:`shared.oca.select`);
  ``maxRet = 0`` disables the tag;
- a tag short of minRet makes the AB INCOMPLETE; ``missing`` says for each such
  tag which condition rejected the nearest candidates;
- products of other ABs of the run a tag needs (DFOS virtual calibrations)
  are placed as ``virtual`` entries.
"""


from __future__ import annotations

import logging
import math
import shlex
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.oca.classify import CATEGORY_KEYWORDS, CompiledClassifier
from shared.oca.evaluate import OcaTypeError, normalise_record
from shared.oca.model import (
    Literal,
    RuleSet,
)
from shared.oca.organise import RAW_POOLS, Group, grouping_mode, organise, template_id
from shared.oca.pool import MJD_OBS_MOD, FileRecord, FramePool, make_records
from shared.oca.select import SelectPlan

_log = logging.getLogger(__name__)


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


class Associator:
    """Rules compiled once for organisation and association of many groups."""

    def __init__(self, rules: RuleSet):
        self.rules = rules
        self.plans = {a.name: [SelectPlan(s) for s in a.selects] for a in rules.actions}

    def associate(self, group: Group, calib_pool: FramePool, raw_pool: FramePool,
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
        if templates is not None and grouping_mode(group.rule) in ("template", "last-frame"):
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
        tid = template_id(rec)
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
    calib_pool: FramePool | None = None,
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
    calib_pool = calib_pool if calib_pool is not None else FramePool()
    if time_match is not None and time_match != calib_pool.time_match:
        calib_pool = FramePool(calib_pool.records, time_match)
    raw_pool = FramePool(records, calib_pool.time_match)
    templates: dict[Any, list[FileRecord]] = defaultdict(list)
    for rec in records:
        templates[template_id(rec)].append(rec)
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
