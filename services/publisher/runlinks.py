"""Links from the monitor page into a run's package: its page and its thumbnail."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from shared.messages import ReportsReady

#: The run page the reporter writes beside the reports; at the top of the package.
RUN_PAGE = "index.html"


def _package_name(path: Path, msg: ReportsReady) -> str:
    from services.publisher.handlers import package_name

    return package_name(path, msg)


def run_links(msg: ReportsReady, published: Collection[str]) -> dict[str, object]:
    """``run_url``, ``thumbnail_url`` (relative to the monitor page) and ``key_qc`` of a monitor row.

    Only files that are in the package (``published``: manifest names) are linked.
    """
    prefix = f"runs/{msg.run_id}/"
    links: dict[str, object] = {"key_qc": dict(msg.key_qc)}
    links["run_url"] = prefix + RUN_PAGE if RUN_PAGE in published else ""
    thumb = _package_name(Path(msg.thumbnail), msg) if msg.thumbnail else ""
    links["thumbnail_url"] = prefix + thumb if thumb and thumb in published else ""
    return links
