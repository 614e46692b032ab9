"""JSON Schema and AsyncAPI documents generated from the message models.

``python -m shared.contracts docs/`` rewrites ``docs/schemas/*.json`` and
``docs/asyncapi.json``; a test fails when the committed files drift from the
models, so AOG always codes against what the services really send.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from shared.bus.topology import EXCHANGE, binding_keys, queue_name
from shared.messages import MESSAGE_TYPES, type_name

_DESCRIPTIONS = {
    "delivery": "AOG announces a delivery of raw pre-imaging frames (replaces launching processPreImg).",
    "raw_ready": "Ingest verified and staged the frames and read their headers.",
    "products_ready": "The processor ran every Association Block through esorex.",
    "reports_ready": "The reporter wrote REPORT, USERREPORT and list_mcalib.",
    "completed": "The publisher uploaded the package: the run is complete (replaces the EXECUTED flag).",
    "run_failed": "A stage gave up on the run; the reason says what to do.",
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema per message type, keyed by its type name."""
    return {type_name(m): m.model_json_schema(mode="serialization") for m in MESSAGE_TYPES}


def asyncapi() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for model in MESSAGE_TYPES:
        name = model.__name__
        stage = model.stage
        messages[name] = {
            "name": type_name(model),
            "title": name,
            "summary": _DESCRIPTIONS[stage],
            "contentType": "application/json",
            "payload": {"$ref": f"schemas/{type_name(model)}.json"},
        }
        channels[stage] = {
            "address": f"{stage}.{{instrument}}",
            "description": f"Routing key on the durable topic exchange '{EXCHANGE}'. " + _DESCRIPTIONS[stage],
            "parameters": {"instrument": {"description": "Instrument name, e.g. HAWKI"}},
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": {"amqp": {"is": "routingKey", "exchange": {"name": EXCHANGE, "type": "topic", "durable": True}}},
        }
        operations[f"send{name}"] = {"action": "send", "channel": {"$ref": f"#/channels/{stage}"}}
    queues = {s: queue_name(s, "{instrument}" if s == "processor" else None) for s in ("ingest", "processor", "reporter", "publisher")}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "preimg message contracts",
            "version": "1",
            "description": (
                "Events between AOG and the preimg services. Messages are persistent JSON; every message "
                "carries type, message_id, run_id, delivery_id, instrument, created_at and test. A consumer "
                "must ignore duplicates by message_id (delivery is at least once). Service queues: "
                + ", ".join(f"{k}: {v} (binds {', '.join(binding_keys(k, '{instrument}' if k == 'processor' else None))})" for k, v in queues.items())
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def render(out_dir: Path) -> dict[Path, str]:
    """The files to write under ``out_dir`` with their text."""
    files = {out_dir / "schemas" / f"{name}.json": _dump(schema) for name, schema in json_schemas().items()}
    files[out_dir / "asyncapi.json"] = _dump(asyncapi())
    return files


def _dump(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs")
    for path, text in render(out).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
