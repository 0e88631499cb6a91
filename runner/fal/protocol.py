"""Typed models of fal's queue wire format, parsed at the boundary.

Owns: the submit acknowledgement, the three status shapes, the result envelope, the FLUX
output model, the infrastructure error-type table, the gateway-error heuristic,
``Retry-After`` parsing (the status stream's parser is :mod:`runner.fal.sse`). Everything
here is pure: no I/O, no clock (callers pass ``now_s``). Unknown extra fields are ignored
everywhere; missing required keys and unknown status strings are :class:`ProtocolError`.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from runner.errors import ProtocolError

REQUEST_ID_HEADER = "x-fal-request-id"
ERROR_TYPE_HEADER = "x-fal-error-type"
TIMEOUT_TYPE_HEADER = "x-fal-request-timeout-type"
RETRY_AFTER_HEADER = "retry-after"

_FROZEN = ConfigDict(frozen=True, extra="ignore")

CancelOutcome = Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]


class _Wire(BaseModel):
    model_config = _FROZEN


class RequestUrls(_Wire):
    """Where one request lives: enough to poll, fetch and cancel it."""

    request_id: str
    status_url: str
    response_url: str
    cancel_url: str


class SubmitAck(RequestUrls):
    """The 200 answer to a submit POST. URLs are used verbatim (owner/app, no sub-path)."""

    gateway_request_id: str | None = None
    queue_position: int | None = None


class LogEntry(_Wire):
    """One log line; every field is optional because logs are informational only."""

    message: str | None = None
    level: str | None = None
    source: str | None = None
    timestamp: str | None = None


class Queued(_Wire):
    """IN_QUEUE: ``position`` requests are ahead (0 = next)."""

    position: int = Field(ge=0)


class InProgress(_Wire):
    """IN_PROGRESS: ``logs`` is None unless asked for with ``logs=1``."""

    logs: tuple[LogEntry, ...] | None


class Completed(_Wire):
    """COMPLETED (sticky). A failed request is still COMPLETED, with ``error``/``error_type``."""

    logs: tuple[LogEntry, ...] | None
    inference_time_s: float | None = None
    error: str | None = None
    error_type: str | None = None


Status = Queued | InProgress | Completed


def parse_status(data: Any) -> Status:
    """Turn a status JSON object into a typed :data:`Status` or raise :class:`ProtocolError`."""
    if not isinstance(data, Mapping):
        raise ProtocolError(f"status is not a JSON object: {type(data).__name__}")
    status = data.get("status")
    try:
        if status == "IN_QUEUE":
            if "queue_position" not in data:
                raise ProtocolError("IN_QUEUE status without queue_position")
            return Queued(position=data["queue_position"])
        if status in ("IN_PROGRESS", "COMPLETED") and "logs" not in data:
            raise ProtocolError(f"{status} status without the logs key")
        if status == "IN_PROGRESS":
            return InProgress(logs=data["logs"])
        if status == "COMPLETED":
            metrics = data.get("metrics")
            inference = metrics.get("inference_time") if isinstance(metrics, Mapping) else None
            return Completed(
                logs=data["logs"],
                inference_time_s=inference,
                error=data.get("error"),
                error_type=data.get("error_type"),
            )
    except ValidationError as exc:
        raise ProtocolError(f"malformed {status} status: {_first_error(exc)}") from exc
    raise ProtocolError(f"unknown status {status!r}")


def parse_ack(data: Any) -> SubmitAck:
    """Parse a submit acknowledgement or raise :class:`ProtocolError`."""
    try:
        return SubmitAck.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(f"malformed submit acknowledgement: {_first_error(exc)}") from exc


def parse_cancel(data: Any) -> CancelOutcome | None:
    """The cancel outcome named in a cancel answer body, or None when it names none.

    fal's own enum also has ``OK``; it means the cancel was accepted.
    """
    status = data.get("status") if isinstance(data, Mapping) else None
    if status == "OK":
        return "CANCELLATION_REQUESTED"
    if status in ("CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"):
        return status  # type: ignore[no-any-return]
    return None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "<root>"
    return f"{loc}: {err['msg']}"


# --- results -----------------------------------------------------------------------------


class ResultResponse(_Wire):
    """A stored result as replayed by the queue: the model's own status code and body.

    200 is success, 422 carries validation ``detail``, 5xx carries an infrastructure
    error body. These are *results*; the client raises only for answers that are not.
    """

    status_code: int
    body: Any
    request_id: str | None = None
    error_type: str | None = None
    timeout_type: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300


class ImageOut(_Wire):
    url: str
    width: int
    height: int
    content_type: str
    file_name: str | None = None
    file_size: int | None = None


class FluxResult(_Wire):
    """The fields the runner uses from a FLUX result; the whole payload is kept in ``raw``."""

    images: tuple[ImageOut, ...]
    seed: int = Field(ge=-(2**63), le=2**63 - 1)  # the ledger's int64 column
    has_nsfw_concepts: tuple[bool, ...]
    timings: Mapping[str, Any]
    prompt: str | None = None
    # A plain default, not a factory: pydantic asks inspect.signature() whether a private
    # attribute's factory takes the validated data, on every instance (~40% of a parse).
    _raw: Mapping[str, Any] | None = PrivateAttr(default=None)

    @property
    def raw(self) -> Mapping[str, Any]:
        return self._raw if self._raw is not None else {}

    @classmethod
    def from_payload(cls, payload: Any) -> FluxResult:
        try:
            result = cls.model_validate(payload)
        except ValidationError as exc:
            raise ProtocolError(f"malformed FLUX result: {_first_error(exc)}") from exc
        result._raw = payload
        return result


# --- infrastructure error types ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorType:
    """One of fal's infrastructure error types and whether a fresh submit may succeed.

    ``status_code`` None means the spec gives no code; ``confirmed`` False means the code
    comes from the spec's condensed notes rather than fal's own docs.
    """

    name: str
    status_code: int | None
    confirmed: bool
    retryable: bool
    why: str


# Retryable = a new submit of the same input can reasonably succeed. 5xx results are never
# billed, so retrying them costs time, not money; the engine still bounds it by --max-attempts.
ERROR_TYPES: Mapping[str, ErrorType] = {
    e.name: e
    for e in (
        ErrorType("request_timeout", 504, False, True, "queue or runner was slow this time"),
        ErrorType("startup_timeout", 504, False, True, "a runner failed to start in time"),
        ErrorType("runner_scheduling_failure", 503, False, True, "no runner could be scheduled"),
        ErrorType("runner_connection_timeout", 503, False, True, "runner did not answer"),
        ErrorType("runner_disconnected", 503, False, True, "runner went away mid-request"),
        ErrorType("runner_connection_refused", None, False, True, "runner refused connection"),
        ErrorType("internal_error", None, False, True, "fal-side fault, not the input's"),
    )
}


def is_retryable_error_type(error_type: str | None, *, timeout_type: str | None = None) -> bool:
    """Whether a failed job with this ``error_type`` deserves a new submit.

    Unknown types are *not* retryable: a type we cannot name may be a deterministic app
    failure, and failing fast with the type recorded is cheaper than repeating it. A
    ``user`` timeout type is the caller's own start deadline expiring: not retried either.
    """
    if timeout_type == "user":
        return False
    known = ERROR_TYPES.get(error_type or "")
    return known.retryable if known is not None else False


# --- gateway answers and Retry-After -----------------------------------------------------

GATEWAY_STATUS_CODES = frozenset({502, 503, 504})


def body_error_type(body: Any) -> str | None:
    """The ``error_type`` an error body names, if any."""
    value = body.get("error_type") if isinstance(body, Mapping) else None
    return value if isinstance(value, str) else None


def is_stored_result(headers: Mapping[str, str], body: Any) -> bool:
    """Whether an error answer was replayed by fal's queue (a result), not the gateway's."""
    marks = (REQUEST_ID_HEADER, ERROR_TYPE_HEADER, TIMEOUT_TYPE_HEADER)
    return any(h in headers for h in marks) or body_error_type(body) is not None


@dataclass(frozen=True, slots=True)
class NotReadyAnswer:
    """How the queue answers a result read before the request has finished.

    fal's documentation does not say; third-party clients match a 400 whose ``detail`` is
    "Request is still in progress", and the emulator answers that. It is data so that a
    different answer only costs calls (an unrecognised answer falls back to a status
    read), never a wrong outcome.
    """

    status_codes: frozenset[int] = frozenset({400})
    detail_contains: str = "in progress"


FAL_NOT_READY = NotReadyAnswer()
PeekVerdict = Literal["result", "not_ready", "unknown"]
_RUNNING_STATES = frozenset({"IN_QUEUE", "IN_PROGRESS"})


def peek_verdict(
    status_code: int, body: Any, not_ready: NotReadyAnswer = FAL_NOT_READY
) -> PeekVerdict:
    """Read the answer to a result GET sent before the job was known to be done.

    Only a success is taken as the result, and not one shaped like a status (a queue that
    answered the result URL with the status would otherwise finish a running job).
    Anything that is neither a success nor the recognised "still running" answer, an
    error result included, is "unknown": the caller asks the status URL what it means.
    """
    if 200 <= status_code < 300:
        if status_code == 200 and not (
            isinstance(body, Mapping) and body.get("status") in _RUNNING_STATES
        ):
            return "result"
        return "unknown"
    if status_code in not_ready.status_codes and isinstance(body, Mapping):
        detail = body.get("detail")
        if isinstance(detail, str) and not_ready.detail_contains in detail.lower():
            return "not_ready"
    return "unknown"


def is_gateway_error(status_code: int, body: str, request_id: str | None) -> bool:
    """True when the ingress (nginx) answered, not fal's queue: the request never got in.

    Same heuristic as fal-client: a 502/503/504 whose body says nginx and that carries no
    ``x-fal-request-id``.
    """
    return status_code in GATEWAY_STATUS_CODES and request_id is None and "nginx" in body


def parse_retry_after(value: str | None, *, now_s: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP date.

    ``now_s`` is the current Unix time (wall clock, because an HTTP date is wall time).
    Garbage gives None; a date in the past gives 0.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        return None
    return max(0.0, when.timestamp() - now_s)


# Errors raised before any byte of the request left: a submit that hit one of these
# certainly did not reach fal. Everything else may have been sent.
NOT_SENT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)
