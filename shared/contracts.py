"""JSON Schema and AsyncAPI documents generated from the message models.

``python -m shared.contracts docs/`` rewrites ``docs/schemas/*.json`` and
``docs/asyncapi.json``; a test fails when the committed files drift from the
models, so AOG always codes against what the services really send. Nothing in
those files is edited by hand: what they promise is written here.

The AsyncAPI document is AOG's side of the conversation: AOG *sends*
DeliveryAnnounced and *receives* PreImagingCompleted and RunFailed. The
messages between the services are listed as channels without operations.
"""

from __future__ import annotations

import json
import math
import sys
import tomllib
from pathlib import Path
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import CoreSchema

from shared.bus.topology import (
    EXCHANGE,
    SERVICES,
    UNROUTABLE_QUEUE,
    alternate_exchange,
    binding_keys,
    queue_name,
    retry_tier,
)
from shared.messages import MESSAGE_TYPES, type_name
from shared.profiles import PROFILE_DIR, Profile
from shared.settings import Settings

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
AMQP_BINDING_VERSION = "0.3.0"

_DESCRIPTIONS = {
    "delivery": "AOG announces a delivery of raw pre-imaging frames (replaces launching processPreImg).",
    "raw_ready": "Ingest verified and staged the frames and read their headers.",
    "products_ready": "The processor ran every Association Block through esorex.",
    "reports_ready": "The reporter wrote REPORT, USERREPORT and list_mcalib.",
    "completed": "The publisher uploaded the package: the run is complete (replaces the EXECUTED flag).",
    "run_failed": "A stage gave up on the run; the reason says what to do.",
}

#: AOG's operations: (action, stage).
_AOG_OPERATIONS = {"DeliveryAnnounced": "send", "PreImagingCompleted": "receive", "RunFailed": "receive"}


def schema_id(name: str) -> str:
    """The ``$id`` of a message type's schema (an identifier, not a download address)."""
    return f"urn:eso:preimg:schema:{name}"


class ContractJsonSchema(GenerateJsonSchema):
    """Pydantic's JSON Schema plus what a wire contract needs.

    ``$schema`` and ``$id``; and ``type`` among the required fields: the models
    give it a default so that code need not spell it, but on the wire a message
    without ``type`` is refused, so the schema must say it is required.
    """

    def generate(self, schema: CoreSchema, mode: JsonSchemaMode = "validation") -> JsonSchemaValue:
        doc = super().generate(schema, mode)
        name = doc["properties"]["type"]["const"]
        doc["required"] = ["type", *(f for f in doc.get("required", ()) if f != "type")]
        return {"$schema": JSON_SCHEMA_DIALECT, "$id": schema_id(name), **doc}


def json_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema per message type, keyed by its type name."""
    return {
        type_name(m): m.model_json_schema(mode="serialization", schema_generator=ContractJsonSchema)
        for m in MESSAGE_TYPES
    }


# --------------------------------------------------------------------------
# How long AOG waits: from the defaults of the settings and the shipped profiles
# --------------------------------------------------------------------------


def retry_window_s() -> float:
    """Seconds a stage keeps retrying a transient fault before it gives up (the default settings)."""
    delays = Settings.model_fields["retry_delays_ms"].default
    attempts = Settings.model_fields["max_attempts"].default
    return sum(delays[retry_tier(a, len(delays))] for a in range(1, attempts)) / 1000


def _profiles() -> list[Profile]:
    return [Profile.model_validate(tomllib.loads(p.read_text())) for p in sorted(PROFILE_DIR.glob("*.toml"))]


def processing_limits() -> tuple[float, int]:
    """(longest recipe_timeout_s, fewest max_parallel_abs) over the shipped profiles with a pipeline."""
    piped = [p for p in _profiles() if p.pipe_support]
    return max(p.recipe_timeout_s for p in piped), min(p.max_parallel_abs for p in piped)


def recommended_wait_s(n_abs: int = 1, margin_s: float = 600) -> float:
    """Upper bound on the wait for a terminal answer, for a delivery of ``n_abs`` Association Blocks."""
    timeout, parallel = processing_limits()
    return len(SERVICES) * retry_window_s() + math.ceil(n_abs / parallel) * timeout + margin_s


def guarantees() -> str:
    """What AOG can rely on, as the AsyncAPI document states it (CommonMark)."""
    window = retry_window_s()
    delays = Settings.model_fields["retry_delays_ms"].default
    attempts = Settings.model_fields["max_attempts"].default
    timeout, _ = processing_limits()
    n = len(SERVICES)
    wait = recommended_wait_s()
    hours = math.ceil(wait / 3600)
    per_instrument = ", ".join(f"{p.instrument} {p.max_parallel_abs}" for p in _profiles() if p.pipe_support)
    return f"""\
Events between AOG and the preimg services over RabbitMQ. Every message is persistent JSON
(AMQP properties: `content_type` application/json, `delivery_mode` 2, `message_id` equal to the
payload's `message_id`) and carries `type`, `message_id`, `run_id`, `delivery_id`, `instrument`,
`created_at` and `test`. `delivery_id` and `run_id` together identify a run.

AOG publishes `DeliveryAnnounced` to the topic exchange `{EXCHANGE}` with routing key
`delivery.<INSTRUMENT>`, and binds a durable queue of its own to `completed.<INSTRUMENT>` and
`run_failed.<INSTRUMENT>` (or `completed.*` and `run_failed.*`), acknowledging each message
after it has acted on it.

## Guarantees

* **Exactly one terminal answer per delivery**: a `PreImagingCompleted` (status `ok`, `partial`
  or `failed`) or a `RunFailed`. Delivery is at least once, so the same answer can arrive more
  than once; the copies carry the same `message_id`. **Suppress duplicates by `message_id`.**
  Two different failures never share a `message_id`.
* **After an operator's replay**: a `RunFailed` of a stage that gave up on a transient fault
  (`details.attempts` is set) may be followed, once the operators mended the fault and replayed
  the dead letter, by the run's real answer: a `PreImagingCompleted`, or another `RunFailed` with a
  `message_id` of its own. For one `run_id` the latest answer counts, and a resend returns it.
* **Invalid message with readable ids**: a message that fails validation (a bad field, a missing
  or unknown `type`) but carries a readable `delivery_id`, `run_id` and `instrument` (matching
  their patterns) is answered with a `RunFailed` whose reason names the field (e.g. `files: Tuple
  should have at least 1 item`); the original is dead-lettered for the operators.
* **Invalid message without them** (not JSON, or no readable `delivery_id`, `run_id` and
  `instrument`): nobody can be answered, so it is dead-lettered silently; the operators see it in
  `preimg dlq list {queue_name("ingest")}` and the alert PreimgDeadLetters fires.
* **Resend**: a `run_id` names one run. A `DeliveryAnnounced` sent again with the same
  `delivery_id` and `run_id` never starts a second run; once the run has finished it is answered
  with the recorded terminal event again (same `message_id`). A `run_id` already used by another
  delivery is answered with a `RunFailed`.
* **Unroutable messages** (a routing key no queue is bound to) are not lost: the exchange
  `{EXCHANGE}` has the alternate exchange `{alternate_exchange(EXCHANGE)}` (fanout), which delivers them to
  the queue `{UNROUTABLE_QUEUE}` for the operators.
* **Checksums** in `DeliveredFile.checksum` are `sha256:` (64 hex digits) or `md5:` (32), the
  digits in either case; preimg stores and reports them in lower case.

## How long to wait

Each of the {n} stages ({", ".join(SERVICES)}) retries a transient fault (broker, disk,
S3, SMTP) for its retry window before it gives up with a `RunFailed`: {attempts} attempts, the
retries after {", ".join(f"{d / 1000:g} s" for d in delays)} (later ones reuse the last delay),
{window:g} s (about {window / 60:.0f} minutes) per stage with the default settings. The processor
runs up to `max_parallel_abs` Association Blocks at once ({per_instrument}) and
stops a recipe after `recipe_timeout_s` ({timeout:g} s). So, while the services run, the terminal
answer comes within

    {n} x {window:g} s + ceil(N_AB / max_parallel_abs) x recipe_timeout_s + a margin for staging and uploads

For a typical pre-imaging delivery (one Association Block) and a 10-minute margin that is
{wait:g} s: **AOG should wait {hours} hour{"s" if hours > 1 else ""}** (`preimg deliver --wait {hours * 3600}`),
{timeout:g} s more for each further Association Block. Without an answer by then, ask the
operators: the run's message waits in the queue of a service that is down, or lies in a
dead-letter queue (`preimg dlq list`).
"""


# --------------------------------------------------------------------------
# AsyncAPI 3.0
# --------------------------------------------------------------------------


def _operation_bindings(action: str) -> dict[str, Any]:
    """Both sides publish persistent and ``mandatory`` (returned only if even the alternate
    exchange cannot take it); AOG consumes with manual acknowledgement."""
    amqp: dict[str, Any] = {"deliveryMode": 2, "mandatory": True}
    if action == "receive":
        amqp["ack"] = True
    return {"amqp": {**amqp, "bindingVersion": AMQP_BINDING_VERSION}}


def asyncapi() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    instruments = [p.instrument for p in _profiles()]
    for model in MESSAGE_TYPES:
        name = model.__name__
        stage = model.stage
        action = _AOG_OPERATIONS.get(name)
        messages[name] = {
            "name": type_name(model),
            "title": name,
            "summary": _DESCRIPTIONS[stage],
            "contentType": "application/json",
            "payload": {"$ref": f"schemas/{type_name(model)}.json"},
            "correlationId": {"$ref": "#/components/correlationIds/run"},
        }
        channels[stage] = {
            "address": f"{stage}.{{instrument}}",
            "description": f"Routing key on the durable topic exchange '{EXCHANGE}'. " + _DESCRIPTIONS[stage]
            + ("" if action else " Between the services; AOG does not need it."),
            "parameters": {"instrument": {"description": "Instrument name", "examples": instruments}},
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {"name": EXCHANGE, "type": "topic", "durable": True, "autoDelete": False},
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }
        if action:
            operations[f"{action}{name}"] = {
                "action": action,
                "title": f"AOG {action}s {name}",
                "summary": _DESCRIPTIONS[stage],
                "channel": {"$ref": f"#/channels/{stage}"},
                "messages": [{"$ref": f"#/channels/{stage}/messages/{name}"}],
                "bindings": _operation_bindings(action),
            }
    queues = {s: queue_name(s, "{instrument}" if s == "processor" else None) for s in SERVICES}
    topology = "; ".join(
        f"{s}: {q} (binds {', '.join(binding_keys(s, '{instrument}' if s == 'processor' else None))})"
        for s, q in queues.items()
    )
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "preimg message contracts",
            "version": "1",
            "description": guarantees() + f"\nService queues: {topology}.\n",
        },
        "servers": {
            "rabbitmq": {
                "host": "{host}:{port}",
                "protocol": "amqp",
                "protocolVersion": "0-9-1",
                "description": (
                    "The deployment's RabbitMQ broker. Virtual host: the one in the services' "
                    "PREIMG_AMQP_URL (default '/', written %2F in the URL). Credentials: a RabbitMQ user and "
                    "password that ESO operations give AOG, with write permission on the exchange "
                    f"'{EXCHANGE}' and configure/read permission on AOG's own queue; guest/guest works only "
                    "from localhost."
                ),
                "variables": {
                    "host": {"default": "rabbitmq", "description": "Broker host (the compose service name by default)"},
                    "port": {"default": "5672", "description": "AMQP port"},
                },
                "security": [{"$ref": "#/components/securitySchemes/rabbitmqUser"}],
            }
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "correlationIds": {
                "run": {
                    "description": "delivery_id and run_id together identify a run: every event of the run "
                    "carries both, copied from the DeliveryAnnounced (run_id at $message.payload#/run_id).",
                    "location": "$message.payload#/delivery_id",
                }
            },
            "securitySchemes": {
                "rabbitmqUser": {"type": "userPassword", "description": "RabbitMQ user and password (AMQP PLAIN)"}
            },
        },
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
