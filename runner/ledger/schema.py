"""The ledger's row schema: the typed event model, its Arrow schema, and the
conversions between an event, a journal line's JSON and an Arrow table.

Every ledger row is an *event* about one job. Journal lines hold the *encoded*
form of an event (plain JSON: times as integer microseconds since the epoch,
money as decimal strings), which converts losslessly to Arrow columns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

import pyarrow as pa

from runner.endpoints.money import MONEY_SCALE, trim_usd


def utcnow() -> datetime:
    """The wall clock every event is stamped with (tests inject their own)."""
    return datetime.now(UTC)


SCHEMA_VERSION = 4
# Version 2 appended possible_duplicate, payload_sha256, the acknowledged URLs, how an
# unknown outcome was reconciled, billed duplicates and the price's source; a
# version-1 file is read as if those columns were null (runner.ledger.parts.read_part).
# Version 3 appended flagged (fal's safety checker), the re-rolls of flagged outputs and
# what they cost, and where a cached output came from.
# Version 4 appended run_id: which invocation of `runner run` wrote the event (null in
# older parts, whose events no invocation claims).
OLDEST_SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"runner.ledger.schema_version"

TIMESTAMP = pa.timestamp("us", tz="UTC")
# 20 integer and 18 fractional digits: every USD amount fal bills, exactly.
MONEY = pa.decimal128(38, MONEY_SCALE)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

OUTPUT_TYPE = pa.struct(
    [
        ("url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("content_type", pa.string()),
        ("local_path", pa.string()),
        ("sha256", pa.string()),
    ]
)


class JobState(StrEnum):
    """A job's state as recorded by its latest event."""

    SUBMITTING = "submitting"  # intent recorded and committed before the POST
    UNKNOWN = "unknown"  # the POST was sent but its outcome is unknown
    QUEUED = "queued"  # acknowledged by the queue: has a request_id
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INVALID = "invalid"  # the manifest row could not become a request


@dataclass(frozen=True, slots=True)
class OutputImage:
    """One output image: where it is, its size and, once downloaded, its local copy."""

    url: str
    width: int | None = None
    height: int | None = None
    content_type: str | None = None
    local_path: str | None = None
    sha256: str | None = None


# Columns whose last non-null value survives into later events of the same job.
JOB_FIELDS = (
    "row_id",
    "line",
    "source",
    "variant",
    "endpoint",
    "request",
    "metadata",
    "estimated_usd",
    "attempt",
    "possible_duplicate",
    "reconciled",
    "duplicate_request_ids",
    "price_source",
    "rerolls",
    "reroll_usd",
)
# Columns that a new attempt's `submitting` event clears.
ATTEMPT_FIELDS = (
    "request_id",
    "gateway_request_id",
    "submitted_at",
    "started_at",
    "completed_at",
    "queue_s",
    "inference_s",
    "outputs",
    "seed",
    "nsfw",
    "megapixels",
    "billed_usd",
    "payload_sha256",
    "status_url",
    "response_url",
    "cancel_url",
    "flagged",
    "cached_from",
)
# Columns that describe the latest event only: a failure's reason is not carried into a
# later event (a download retried successfully, a job that completed after all).
OUTCOME_FIELDS = ("error_type", "error_message", "retryable")
# Columns that always come from the latest event.
EVENT_FIELDS = ("seq", "at", "job_key", "state", "run_id")

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("at", TIMESTAMP, nullable=False),
        pa.field("job_key", pa.string(), nullable=False),
        pa.field("state", pa.string(), nullable=False),
        pa.field("row_id", pa.string()),
        pa.field("line", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("variant", pa.int32()),
        pa.field("endpoint", pa.string()),
        pa.field("request", pa.string()),
        pa.field("metadata", pa.string()),
        pa.field("estimated_usd", MONEY),
        pa.field("attempt", pa.int32()),
        pa.field("request_id", pa.string()),
        pa.field("gateway_request_id", pa.string()),
        pa.field("submitted_at", TIMESTAMP),
        pa.field("started_at", TIMESTAMP),
        pa.field("completed_at", TIMESTAMP),
        pa.field("queue_s", pa.float64()),
        pa.field("inference_s", pa.float64()),
        pa.field("outputs", pa.list_(OUTPUT_TYPE)),
        pa.field("seed", pa.int64()),
        pa.field("nsfw", pa.list_(pa.bool_())),
        pa.field("megapixels", pa.int64()),
        pa.field("billed_usd", MONEY),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("retryable", pa.bool_()),
        # Version 2 from here on.
        pa.field("possible_duplicate", pa.bool_()),
        pa.field("payload_sha256", pa.string()),
        pa.field("status_url", pa.string()),
        pa.field("response_url", pa.string()),
        pa.field("cancel_url", pa.string()),
        pa.field("reconciled", pa.string()),
        pa.field("duplicate_request_ids", pa.list_(pa.string())),
        pa.field("price_source", pa.string()),
        # Version 3 from here on.
        pa.field("flagged", pa.bool_()),
        pa.field("rerolls", pa.int32()),
        pa.field("reroll_usd", MONEY),
        pa.field("cached_from", pa.string()),
        # Version 4 from here on.
        pa.field("run_id", pa.string()),
    ],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)
TIME_FIELDS = frozenset({"at", "submitted_at", "started_at", "completed_at"})
MONEY_FIELDS = frozenset({"estimated_usd", "billed_usd", "reroll_usd"})


# json.dumps with options builds a new encoder per call; these are made once.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
_METADATA = json.JSONEncoder(sort_keys=True, ensure_ascii=False).encode


def encode_request(payload: Mapping[str, Any]) -> str:
    """Canonical JSON for a request body (sorted keys, no spaces)."""
    return _CANONICAL(payload)


def payload_fingerprint(payload: Any) -> str:
    """sha256 of the canonical JSON of what was sent: how fal's history recognises it."""
    return hashlib.sha256(encode_request(payload).encode()).hexdigest()


def _check_money(name: str, value: Decimal | None) -> None:
    if value is None:
        return
    if not isinstance(value, Decimal) or not value.is_finite():
        raise ValueError(f"{name} must be a finite Decimal, got {value!r}")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > MONEY_SCALE:
        raise ValueError(f"{name}={value} has more than {MONEY_SCALE} decimal places")


def _check_time(name: str, value: datetime | None) -> None:
    if value is not None and value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware")


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    """One thing that happened to one job. Only job_key, state and at are required."""

    job_key: str
    state: JobState
    at: datetime
    row_id: str | None = None
    line: int | None = None
    source: str | None = None
    variant: int | None = None
    endpoint: str | None = None
    request: str | None = None  # canonical JSON, see encode_request()
    metadata: Mapping[str, str] | None = None
    estimated_usd: Decimal | None = None
    attempt: int | None = None
    request_id: str | None = None
    gateway_request_id: str | None = None
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    queue_s: float | None = None
    inference_s: float | None = None
    outputs: tuple[OutputImage, ...] | None = None
    seed: int | None = None
    nsfw: tuple[bool, ...] | None = None
    megapixels: int | None = None
    billed_usd: Decimal | None = None
    error_type: str | None = None
    error_message: str | None = None
    retryable: bool | None = None
    # A submit that followed one of unknown outcome: it may have been billed twice. Sticky.
    possible_duplicate: bool | None = None
    payload_sha256: str | None = None  # sha256 of the canonical JSON actually sent
    status_url: str | None = None  # the acknowledged URLs, followed verbatim
    response_url: str | None = None
    cancel_url: str | None = None
    # How fal's request history settled an unknown outcome (see runner.execution.reconcile):
    # adopted, resubmitted_safe, history_unavailable. Sticky.
    reconciled: str | None = None
    # Other requests of the same payload the history showed: billed duplicates. Sticky.
    duplicate_request_ids: tuple[str, ...] | None = None
    price_source: str | None = None  # where the estimate's unit price came from. Sticky.
    # fal's safety checker flagged an output of this attempt (has_nsfw_concepts): derived
    # from ``nsfw`` so it can be queried as a plain column.
    flagged: bool | None = None
    # Flagged outputs re-rolled with a new seed (--flagged reroll) so far, and what those
    # discarded attempts were billed. Sticky.
    rerolls: int | None = None
    reroll_usd: Decimal | None = None
    # Fulfilled from the cross-run cache (--cache): the run directory the outputs came
    # from; request_id is the source run's request. Null for an output fal made for this run.
    cached_from: str | None = None
    # The invocation of `runner run` that wrote this event (run.json's ``invocations``);
    # stamped by the Ledger that appends it. Null in parts written before version 4.
    run_id: str | None = None

    def __post_init__(self) -> None:
        if self.state.__class__ is not JobState:
            object.__setattr__(self, "state", JobState(self.state))
        for name in TIME_FIELDS:
            _check_time(name, getattr(self, name))
        if self.estimated_usd is not None:
            _check_money("estimated_usd", self.estimated_usd)
        if self.billed_usd is not None:
            _check_money("billed_usd", self.billed_usd)
        if self.reroll_usd is not None:
            _check_money("reroll_usd", self.reroll_usd)


@dataclass(frozen=True, slots=True)
class JobRecord(LedgerEvent):
    """The folded latest view of one job: its last event plus carried-forward fields."""

    seq: int = 0

    @property
    def cost_nothing(self) -> bool:
        """A failure recorded as certainly free (billed 0): a rerun retries it unasked."""
        return self.billed_usd is not None and self.billed_usd == 0


_EVENT_NAMES = tuple(f.name for f in fields(LedgerEvent))
_MICROSECOND = timedelta(microseconds=1)


def _micros(value: datetime) -> int:
    return (value - _EPOCH) // _MICROSECOND


def _metadata_json(value: Mapping[str, str]) -> str:
    return _METADATA(dict(value))


def _outputs_json(value: tuple[OutputImage, ...]) -> list[dict[str, Any]]:
    return [_output_dict(o) for o in value]


def _encoder(name: str) -> Callable[[Any], Any] | None:
    if name in TIME_FIELDS:
        return _micros
    if name in MONEY_FIELDS:
        return str
    special: dict[str, Callable[[Any], Any]] = {
        "outputs": _outputs_json,
        "nsfw": list,
        "duplicate_request_ids": list,
        "metadata": _metadata_json,
        "state": str,
    }
    return special.get(name)


def encode_event(event: LedgerEvent, seq: int) -> dict[str, Any]:
    """The JSON-ready form of an event written to the journal (None fields omitted)."""
    out: dict[str, Any] = {"seq": seq}
    for name, convert in _ENCODERS:
        value = getattr(event, name)
        if value is not None:
            out[name] = value if convert is None else convert(value)
    return out


def _output_dict(output: OutputImage) -> dict[str, Any]:
    return {
        "url": output.url,
        "width": output.width,
        "height": output.height,
        "content_type": output.content_type,
        "local_path": output.local_path,
        "sha256": output.sha256,
    }


_ENCODERS = tuple((name, _encoder(name)) for name in _EVENT_NAMES)


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """An Arrow table in LEDGER_SCHEMA from encoded events (journal form)."""
    arrays = []
    for field in LEDGER_SCHEMA:
        values = [row.get(field.name) for row in rows]
        if field.name in TIME_FIELDS:
            arrays.append(pa.array(values, pa.int64()).cast(TIMESTAMP))
        elif field.name in MONEY_FIELDS:
            arrays.append(pa.array([_dec(v) for v in values], MONEY))
        else:
            arrays.append(pa.array(values, field.type))
    return pa.Table.from_arrays(arrays, schema=LEDGER_SCHEMA)


def _dec(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


def empty_table() -> pa.Table:
    return LEDGER_SCHEMA.empty_table()


def record_from_row(row: Mapping[str, Any]) -> JobRecord:
    """A JobRecord from one folded Arrow row as Python values (``Table.slice().to_pylist()``)."""
    kwargs: dict[str, Any] = {name: row.get(name) for name in _EVENT_NAMES}
    if kwargs["metadata"] is not None:
        kwargs["metadata"] = json.loads(kwargs["metadata"])
    if kwargs["outputs"] is not None:
        kwargs["outputs"] = tuple(OutputImage(**o) for o in kwargs["outputs"])
    for name in ("nsfw", "duplicate_request_ids"):
        if kwargs[name] is not None:
            kwargs[name] = tuple(kwargs[name])
    for name in MONEY_FIELDS:
        if kwargs[name] is not None:
            kwargs[name] = trim_usd(kwargs[name])
    return JobRecord(seq=int(row["seq"]), **kwargs)


def check_schema(schema: pa.Schema, where: str) -> None:
    """Refuse a file written with a newer or unknown schema version."""
    meta = schema.metadata or {}
    version = meta.get(SCHEMA_VERSION_KEY)
    if version is None or not OLDEST_SCHEMA_VERSION <= int(version) <= SCHEMA_VERSION:
        raise ValueError(f"{where}: unsupported ledger schema version {version!r}")
