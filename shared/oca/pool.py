"""The files association chooses from: classified records, and pools indexed by keyword value.

A :class:`FileRecord` is a file with its header and classification. A
:class:`FramePool` holds records in time order and answers equality lookups
from hash indexes: equality conjuncts ``KEY == "literal"`` pick candidates
from one index and ``inputFile.A == B`` conjuncts from a second keyed by the
raw file's values, so association does not scan every calibration per AB.
The same class holds a delivery's raw files (``inputFiles``) and the
calibration files (``calibFiles``).
"""


from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.oca.classify import Classification, CompiledClassifier
from shared.oca.evaluate import _as_number, normalise_record
from shared.oca.keywords import to_dotted
from shared.oca.model import (
    RuleSet,
)

#: Time matching (docs/oca.md "Association"): DFOS's MJD-OBS_MOD, or plain MJD-OBS.
MJD_OBS_MOD = "MJD-OBS_MOD"


MJD_OBS = "MJD-OBS"


TIME_MATCHES = (MJD_OBS_MOD, MJD_OBS)


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


class TimeSorted:
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


class FramePool:
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
        self._joins: dict[tuple, dict[tuple, TimeSorted]] = {}
        self._all: TimeSorted | None = None

    def _order(self, rec: FileRecord) -> tuple[float, str]:
        t = rec.time(self.time_match)
        return (t if t is not None else math.inf, str(rec.path))

    @classmethod
    def from_headers(
        cls, rules: RuleSet | CompiledClassifier, headers: Mapping[str | Path, Mapping[str, Any]],
        time_match: str = MJD_OBS_MOD,
    ) -> FramePool:
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
    ) -> dict[tuple, TimeSorted]:
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
            table = {k: TimeSorted(v, self.time_match) for k, v in lists.items()}
            self._joins[cache_key] = table
        return table
