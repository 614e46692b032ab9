"""Header summaries of raw frames and their OCA classification, as ingest records them.

Per instrument, one fast header reader (``shared.fitsheader``) extracts the
keywords the reports show plus every keyword the instrument's OCA rules use,
in one pass over the header blocks; the classification is the instrument's
rule file with its overlay. Keys are written the OCA way: ``DPR.CATG`` for
``HIERARCH ESO DPR CATG``; standard keywords stay plain.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.fitsheader import FitsHeaderError, HeaderReader
from shared.oca import CompiledClassifier, header_keys, profile_rules, rule_header_keys
from shared.oca.evaluate import normalise_record
from shared.oca.keywords import to_dotted
from shared.profiles import load_profile

SUMMARY_KEYS = (
    "INSTRUME", "OBJECT", "DATE-OBS", "MJD-OBS", "EXPTIME", "RA", "DEC", "ARCFILE", "PI-COI",
    "DPR.CATG", "DPR.TYPE", "DPR.TECH", "OBS.ID", "OBS.NAME", "OBS.PROG.ID", "OBS.START",
    "TPL.ID", "TPL.START", "TPL.EXPNO", "TPL.NEXP", "INS.FILT1.NAME", "INS.FILT2.NAME",
    "DET.DIT", "DET.NDIT", "DET.CHIP1.ID", "TEL.AIRM.START",
)


class FrameInspector:
    """Reads and classifies raw frames, per instrument; rules are loaded on first use.

    Parameters
    ----------
    extra_keys
        Dotted keywords later stages need besides the summary and the rule
        keywords (the USERREPORT's columns): read in the same pass, so no
        later stage opens a raw frame for its header.
    """

    def __init__(self, extra_keys: tuple[str, ...] = ()) -> None:
        self._extra_keys = tuple(extra_keys)
        self._per_instrument: dict[str, tuple[HeaderReader, CompiledClassifier | None]] = {}
        self._lock = threading.Lock()

    def _tools(self, instrument: str) -> tuple[HeaderReader, CompiledClassifier | None]:
        with self._lock:
            tools = self._per_instrument.get(instrument)
            if tools is None:
                profile = load_profile(instrument)
                try:
                    rules = profile_rules(profile)
                except FileNotFoundError:
                    rules = None  # classified by DPR; `preimg check` and the processor report the gap
                keys = header_keys((*SUMMARY_KEYS, *self._extra_keys))
                classifier = None
                if rules is not None:
                    keys += rule_header_keys(rules)
                    classifier = CompiledClassifier.from_rules(rules)
                tools = self._per_instrument[instrument] = (HeaderReader(keys), classifier)
            return tools

    def read(self, instrument: str, path: Path) -> dict[str, Any]:
        """The summary and rule keywords of ``path`` (dotted names); ValueError when unreadable."""
        reader, _ = self._tools(instrument)
        try:
            return to_dotted(reader.read(path))
        except FitsHeaderError as e:
            raise ValueError(f"{path.name}: not a readable FITS file ({e.problem})") from e

    def classify(self, instrument: str, headers: Mapping[str, Any]) -> dict[str, Any]:
        """The instrument's OCA classification; by the DPR keys when it has no rule file."""
        _, classifier = self._tools(instrument)
        if classifier is None:
            return classify_by_dpr(headers)
        result = classifier.classify_record(Path(str(headers.get("ARCFILE", "-"))), normalise_record(dict(headers)))
        if result.errors:
            raise ValueError("; ".join(result.errors))
        return dict(result.values)


def classify_by_dpr(headers: Mapping[str, Any]) -> dict[str, str]:
    """Classification of an instrument without rule file (FORS2 here): DFOS's RAW_TYPE from DPR."""
    parts = [str(headers.get(k, "")).strip() for k in ("DPR.CATG", "DPR.TYPE", "DPR.TECH")]
    return {"RAW.TYPE": "_".join(p for p in parts if p)} if any(parts) else {}
