"""Fault injection for tests: damage a file the way a real delivery can arrive damaged.

Test tooling only: nothing in ``services``, ``shared`` or ``synth`` uses it.
"""

from __future__ import annotations

from pathlib import Path


def truncate_file(path: Path, keep_bytes: int | None = None) -> Path:
    """Cut a file short in place (a transfer that died half-way).

    ``keep_bytes`` defaults to half the file, rounded down to a FITS block,
    which leaves the primary header readable but the data incomplete.
    """
    path = Path(path)
    n = path.stat().st_size
    if keep_bytes is None:
        keep_bytes = max(2880, (n // 2) // 2880 * 2880)
    with open(path, "r+b") as f:
        f.truncate(min(keep_bytes, n))
    return path
