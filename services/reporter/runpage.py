"""The page of one run, ``runs/<run_id>/index.html`` on the QC server.

What the QC scientist on shift needs to judge a run in a minute: status and
the first failure's reason, the time each stage took, the ABs with recipe,
calibrations and outcome (failures with their reason and log), the products
with PRO.CATG and quick-looks, the key QC values coloured against the
instrument profile's ranges, and links to REPORT, USERREPORT, list_mcalib and
the PI README. It is written by the reporter beside the reports and uploaded
with the package; every link is relative to the package's layout (reports at
the top, ``products/``, ``logs/``). Every value comes from the message and is
escaped by the template (jinja2 autoescape): FITS header text is never markup.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.layout import path_inside
from shared.messages import ProductsReady

#: The page's file name in the log directory and at the top of the package.
RUN_PAGE = "index.html"


def package_link(path: str, msg: ProductsReady) -> str:
    """Where a file of the run sits in the package, relative to the run page (as the publisher lays it out)."""
    for directory, prefix in ((msg.sci_dir, "products/"), (msg.log_dir, "logs/")):
        inside = path_inside(path, directory)  # as written, like the publisher's package_name
        if inside is not None:
            return prefix + inside
    return "logs/" + os.path.basename(os.path.normpath(os.path.abspath(path)))


def first_failure(msg: ProductsReady) -> str:
    """``<AB>: <reason>`` of the first AB that did not succeed (in the processor's order); "" if none."""
    for ab in msg.abs:
        if ab.status != "SUCCESSFUL":
            return f"{ab.name}: {ab.reason or ab.status}"
    return ""


def key_qc(msg: ProductsReady, ranges: Mapping[str, Any]) -> dict[str, float]:
    """Each key QC keyword's mean over the chips of its product (the first product of that PRO.CATG)."""
    values: dict[str, float] = {}
    for keyword, spec in ranges.items():
        for product in msg.products:
            if spec.pro_catg and product.pro_catg != spec.pro_catg:
                continue
            found = [float(v) for k, v in product.qc.items()
                     if (k == keyword or k.endswith(":" + keyword)) and _number(v)]
            if found:
                values[keyword] = round(sum(found) / len(found), 6)
                break
    return values


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def qc_rows(values: Mapping[str, float], ranges: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for keyword, spec in ranges.items():
        value = values.get(keyword)
        if value is None:
            state = "missing"
        elif (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
            state = "out"
        else:
            state = "in"
        rows.append({"keyword": keyword, "label": spec.label, "value": value, "min": spec.min, "max": spec.max,
                     "state": state})
    return rows


def thumbnail(msg: ProductsReady) -> str:
    """Path of the run's first quick-look thumbnail, preferring one drawn on the sky."""
    looks = [p.quicklook for p in msg.products if p.quicklook is not None]
    looks.sort(key=lambda q: q.kind != "sky")
    return looks[0].thumbnail if looks else ""


def stage_timings(msg: ProductsReady, reported_at: Any) -> list[dict[str, Any]]:
    """Delivery -> processing start -> processing end -> reports, from the message's timestamps."""
    starts = [ab.started_at for ab in msg.abs if ab.started_at]
    ends = [ab.finished_at for ab in msg.abs if ab.finished_at]
    rows = []
    if starts and ends:
        first, last = min(starts), max(ends)
        rows.append({"stage": "ingest and queue (delivery to first AB)", "seconds": (first - msg.delivered_at).total_seconds()})
        rows.append({"stage": "processor (ABs)", "seconds": (last - first).total_seconds()})
        rows.append({"stage": "reporter (to the reports)", "seconds": (reported_at - last).total_seconds()})
    rows.append({"stage": "delivery to reports", "seconds": (reported_at - msg.delivered_at).total_seconds()})
    return rows


def render(templates: Any, msg: ProductsReady, context: Mapping[str, Any], ranges: Mapping[str, Any],
           readme_name: str, reported_at: Any) -> str:
    """The run page's HTML (``runpage.html.j2``)."""
    values = key_qc(msg, ranges)
    products = []
    for product in msg.products:
        look = product.quicklook
        products.append({
            "name": Path(product.path).name, "link": package_link(product.path, msg), "pro_catg": product.pro_catg,
            "ab": product.ab,
            "quicklook": package_link(look.path, msg) if look else "",
            "thumbnail": package_link(look.thumbnail, msg) if look else "",
            "quicklook_kind": look.kind if look else "", "quicklook_note": look.note if look else "",
        })
    names = context["names"]
    abs_ = [{**row, "log_link": package_link(row["log_path"], msg) if row["log_path"] else ""}
            for row in context["abs"]]
    return templates.get_template("runpage.html.j2").render(
        msg=msg, reason=first_failure(msg), timings=stage_timings(msg, reported_at), abs=abs_,
        failures=[row for row in abs_ if row["status"] != "SUCCESSFUL"], products=products,
        looks=[p for p in products if p["quicklook"]], qc=qc_rows(values, ranges),
        report=names.report.name, report_html=names.report_html.name, userreport=names.userreport.name,
        userreport_html=names.userreport_html.name, list_mcalib=names.list_mcalib.name, readme=readme_name,
        objects=context["objects"], prog_ids=context["prog_ids"], summary=context["summary"],
        reported_at=context["reported_at"], delivered_at=context["delivered_at"],
    )
