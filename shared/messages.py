"""Message contracts between AOG and the four preimg services.

Every message is a frozen, versioned pydantic model. The ``type`` field names
the event and its schema version (``preimg.<event>.v<N>``); a consumer rejects
any type it does not know, so a schema change is a new type, never a silent
reinterpretation of an old one.

All messages carry the same envelope fields: ``type``, ``message_id``,
``run_id``, ``delivery_id``, ``instrument``, ``created_at`` and ``test``.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from shared.layout import INSTRUMENT_PATTERN

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
#: sha256 (64 hex digits) or md5 (32); the digits in either case on the wire.
CHECKSUM_PATTERN = r"^(sha256:[0-9a-fA-F]{64}|md5:[0-9a-fA-F]{32})$"

Instrument = Annotated[
    str, Field(pattern=INSTRUMENT_PATTERN, description="ESO instrument name, e.g. HAWKI")
]
RunId = Annotated[
    str,
    Field(
        pattern=RUN_ID_PATTERN,
        description="Identifier of one processing run; also the name of the run's directories. "
        "A run_id names one run: it may be sent again only with the same delivery_id (a resend of "
        "the same delivery, answered with the recorded terminal event when that run has finished); "
        "a run_id already used by another delivery is answered with a RunFailed.",
    ),
]
Status = Literal["ok", "partial", "failed"]


def _lower_hex_digest(value: Any) -> Any:
    """``sha256:ABCD...`` -> ``sha256:abcd...``: AOG's tools write either case."""
    if isinstance(value, str) and ":" in value:
        algorithm, digest = value.split(":", 1)
        return f"{algorithm}:{digest.lower()}"
    return value


Checksum = Annotated[
    str,
    BeforeValidator(_lower_hex_digest),
    Field(
        pattern=CHECKSUM_PATTERN,
        description="Algorithm-prefixed hex digest, either case, stored lower-case; algorithms sha256 "
        "(64 hex digits) or md5 (32), e.g. sha256:ab12...",
    ),
]


def _now() -> datetime:
    return datetime.now(UTC)


def new_message_id() -> str:
    return uuid.uuid4().hex


def derived_message_id(*parts: str) -> str:
    """A message id that is the same every time a stage emits the same event.

    A redelivered input makes a stage re-emit its recorded result; the
    deterministic id lets every consumer recognise the duplicate.
    """
    return uuid.uuid5(uuid.NAMESPACE_URL, "preimg:" + "/".join(parts)).hex


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Envelope(_Model):
    """Fields every preimg message carries."""

    message_id: str = Field(default_factory=new_message_id, min_length=1, max_length=64)
    run_id: RunId
    delivery_id: str = Field(min_length=1, max_length=200, description="AOG's id of the delivery")
    instrument: Instrument
    created_at: datetime = Field(default_factory=_now)
    test: bool = Field(False, description="A test run: marked in the monitor, prunable")

    @property
    def routing_key(self) -> str:
        return f"{self.stage}.{self.instrument}"

    #: First part of the routing key (``<stage>.<INSTRUMENT>``); set by each event.
    stage: ClassVar[str] = ""

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    def follow_up(self, *event: str) -> dict[str, Any]:
        """Envelope fields of the event a stage emits in answer to this message.

        The run's identity is carried over; the message id is derived from the
        run and the event, so a re-emitted event keeps its id.
        """
        return {
            "message_id": derived_message_id(self.run_id, *event),
            "run_id": self.run_id,
            "delivery_id": self.delivery_id,
            "instrument": self.instrument,
            "test": self.test,
        }


# --------------------------------------------------------------------------
# AOG -> ingest
# --------------------------------------------------------------------------


class DeliveredFile(_Model):
    name: str = Field(min_length=1, description="File name, e.g. HAWKI.2026-11-20T01:02:03.456.fits")
    path: str = Field(
        min_length=1,
        description="Path of the file, absolute or relative to the delivery area; "
        "it must lie inside the configured delivery area.",
    )
    size: int = Field(ge=0, description="Size in bytes")
    checksum: Checksum


class DeliveryAnnounced(Envelope):
    type: Literal["preimg.delivery_announced.v1"] = "preimg.delivery_announced.v1"
    stage: ClassVar[str] = "delivery"
    files: tuple[DeliveredFile, ...] = Field(min_length=1, description="The raw frames of the delivery")
    ob_ids: tuple[int, ...] = ()
    prog_ids: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# ingest -> processor
# --------------------------------------------------------------------------


class RawFrame(_Model):
    name: str
    path: str = Field(description="Absolute path of the staged file")
    size: int
    checksum: str
    headers: dict[str, Any] = Field(
        default_factory=dict, description="Header values the rules and reports use"
    )
    classification: dict[str, str | bool | int | float] = Field(
        default_factory=dict,
        description='OCA classification: the values the rules assigned, as assigned, e.g. {"DO.CATG": "OBJECT"}; '
        "the processor builds its Association Blocks from these and the headers without reading the frame again",
    )
    problem: str = Field(
        "", description="Why the frame's header could not be read or classified (empty when fine)"
    )


class RawDataReady(Envelope):
    type: Literal["preimg.raw_ready.v1"] = "preimg.raw_ready.v1"
    stage: ClassVar[str] = "raw_ready"
    raw_dir: str = Field(description="The run's staging directory")
    frames: tuple[RawFrame, ...]
    delivered_at: datetime = Field(description="When ingest received the delivery")


# --------------------------------------------------------------------------
# processor -> reporter
# --------------------------------------------------------------------------


class QuickLookImage(_Model):
    """The quick-look PNG of a science product and its thumbnail, next to the product."""

    path: str = Field(description="The PNG (RA/Dec axes, target, N/E arrows, scale bar)")
    thumbnail: str = Field(description="A small PNG of the same field, no axes")
    checksum: Checksum = Field(description="sha256:<hex> of the PNG, computed from the bytes written")
    thumbnail_checksum: Checksum
    kind: Literal["sky", "pixel", "placeholder"] = Field(
        "sky", description="sky: drawn with the WCS; pixel: no usable WCS; placeholder: no usable pixels"
    )
    note: str = Field("", description="What the quick-look could not show, for a person")


class Product(_Model):
    path: str
    pro_catg: str
    ab: str
    qc: dict[str, Any] = Field(default_factory=dict)
    header: dict[str, Any] = Field(
        default_factory=dict,
        description="Primary-header values of the keywords the USERREPORT tabulates (dotted names); "
        "read once by the processor, so the reporter opens no FITS file",
    )
    checksum: str = Field("", description="sha256:<hex> of the file, computed once by the processor")
    quicklook: QuickLookImage | None = Field(None, description="The quick-look of a science product")


class CalibrationUsed(_Model):
    tag: str
    path: str
    pro_catg: str = ""
    date: str = ""


class ABResult(_Model):
    name: str
    action: str = ""
    recipe: str = ""
    status: Literal["SUCCESSFUL", "FAILED", "INCOMPLETE", "NOT_PROCESSED"]
    reason: str = ""
    raw: tuple[str, ...] = ()
    calibrations: tuple[CalibrationUsed, ...] = ()
    missing: tuple[str, ...] = ()
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float = 0.0
    log_path: str = ""
    ab_path: str = ""


class ProductsReady(Envelope):
    type: Literal["preimg.products_ready.v1"] = "preimg.products_ready.v1"
    stage: ClassVar[str] = "products_ready"
    raw_dir: str
    sci_dir: str
    log_dir: str
    frames: tuple[RawFrame, ...]
    abs: tuple[ABResult, ...]
    products: tuple[Product, ...]
    status: Status
    delivered_at: datetime
    pipe_support: bool = True


# --------------------------------------------------------------------------
# reporter -> publisher
# --------------------------------------------------------------------------


class ReportsReady(Envelope):
    type: Literal["preimg.reports_ready.v1"] = "preimg.reports_ready.v1"
    stage: ClassVar[str] = "reports_ready"
    report: str = Field(description="Path of REPORT_<instr>_<date>_<runid>.log")
    userreport: str = Field(description="Path of USERREPORT_<instr>_<date>_<runid>.log")
    list_mcalib: str = Field(description="Path of list_mcalib_<date>")
    raw_dir: str
    sci_dir: str
    log_dir: str
    status: Status
    n_files: int
    abs_ok: int
    abs_failed: int
    delivered_at: datetime
    summary: str = ""
    files: tuple[str, ...] = Field(
        default=(), description="Every file of the package (products, logs, reports)"
    )
    checksums: dict[str, Checksum] = Field(
        default_factory=dict,
        description="sha256:<hex> of files listed in `files`, keyed by the same path string, where an earlier "
        "stage computed it while reading or writing the file (the processor's Product.checksum, the reporter's for the "
        "reports it wrote): the publisher trusts it",
    )
    objects: tuple[str, ...] = Field(
        default=(), description="OBJECT values of the raw frames (FITS header text, not escaped)"
    )
    prog_ids: tuple[str, ...] = Field(
        default=(), description="Programme ids (OBS.PROG.ID) of the raw frames"
    )
    reason: str = Field("", description="The first failure's reason when the status is partial or failed")
    thumbnail: str = Field("", description="Path of the run's first quick-look thumbnail (a file in `files`)")
    key_qc: dict[str, float] = Field(
        default_factory=dict,
        description="The run's key QC values (the profile's qc_ranges keywords), averaged over its products",
    )


# --------------------------------------------------------------------------
# publisher -> AOG
# --------------------------------------------------------------------------


class ManifestEntry(_Model):
    name: str = Field(description="Path inside the package")
    size: int
    checksum: str
    url: str = ""


class PreImagingCompleted(Envelope):
    type: Literal["preimg.completed.v1"] = "preimg.completed.v1"
    stage: ClassVar[str] = "completed"
    status: Status
    package_dir: str = Field(description="Local directory holding the package (the old $DFO_SCI_DIR/PREIMAGING)")
    package_url: str = Field(description="Location of the package on the QC server (s3://... or file://...)")
    monitor_url: str = ""
    manifest: tuple[ManifestEntry, ...]
    summary: str = ""
    reason: str = Field("", description="The first failure's reason when the status is partial or failed")
    run_page_url: str = Field("", description="The run's page on the QC server (runs/<run_id>/index.html)")


# --------------------------------------------------------------------------
# any stage -> AOG, operators
# --------------------------------------------------------------------------


class RunFailed(Envelope):
    type: Literal["preimg.run_failed.v1"] = "preimg.run_failed.v1"
    stage: ClassVar[str] = "run_failed"
    failed_stage: str = Field(description="The service that gave up: ingest, processor, reporter or publisher")
    reason: str = Field(min_length=1, description="What went wrong and what to do about it")
    details: dict[str, Any] = Field(default_factory=dict)


Message = Annotated[
    DeliveryAnnounced | RawDataReady | ProductsReady | ReportsReady | PreImagingCompleted | RunFailed,
    Field(discriminator="type"),
]

MESSAGE_TYPES: tuple[type[Envelope], ...] = (
    DeliveryAnnounced,
    RawDataReady,
    ProductsReady,
    ReportsReady,
    PreImagingCompleted,
    RunFailed,
)

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)


class MessageDecodeError(ValueError):
    """The bytes are not a valid preimg message; ``reason`` says why, for a person."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def type_name(model: type[Envelope]) -> str:
    return model.model_fields["type"].default


def decode(body: bytes) -> Envelope:
    """Parse and validate a message body; raise MessageDecodeError with a readable reason.

    A valid body is parsed and validated in one pass by pydantic-core (about 40 % less CPU
    per message than ``json.loads`` and then validating the objects); an invalid one is
    parsed again below, to say what is wrong in terms a sender can act on.
    """
    try:
        return _ADAPTER.validate_json(body)
    except ValidationError:
        pass
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MessageDecodeError(f"body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise MessageDecodeError(f"body must be a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    known = [type_name(m) for m in MESSAGE_TYPES]
    if kind not in known:
        raise MessageDecodeError(f"unknown message type {kind!r}; known types: {', '.join(known)}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        raise MessageDecodeError(f"invalid {kind}: {describe_validation_error(e)}") from e


def describe_validation_error(error: ValidationError) -> str:
    """``field.path: problem; ...`` — what a person needs to fix the input."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in error.errors())
