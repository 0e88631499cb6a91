"""The receiver for ``--completion webhook``: verify, dedup and hand fal's deliveries on.

fal POSTs a JSON event when a request completes, signed with Ed25519 over
``request_id \\n user_id \\n timestamp \\n hex(sha256(body))``. This module owns

- :func:`verify_signature`, pure: headers + raw body + keys + now -> :class:`WebhookHeaders`
  or :class:`WebhookRejected` (never escapes the receiver; it becomes a 401);
- :class:`WebhookEvent`, the typed delivery (payload stays opaque JSON);
- :func:`build_app`, a Starlette app that checks a delivery's headers before reading a byte
  of its body (missing, malformed, stale or future: 401 unread), then reads the body capped
  in size (413), in time (408) and in how many are read at once (503 when no reader frees
  up in time), then checks the signature (401) and the JSON (400); it answers 200 to every
  valid delivery including duplicates (so fal stops retrying), forwards each first-seen
  request_id once through a bounded memory stream, and answers 503 when that stream is
  full (fal retries later);
- (:mod:`runner.fal.receiver` serves that app on a real socket.)

Webhooks can be lost; the engine must never rely on them alone. So a refusal costs at most a
poll: a genuine delivery that is refused (too large, say) is retried by fal and its job is
polled when the webhook is late.

Until the signature is checked anyone can post, so the bodies a stranger can make it hold
come to at most ``max_body_reads * max_body_bytes`` (uvicorn reads at most 64 KiB ahead on
any other connection). Whether the request id is one the run waits for is not checked: the
receiver is not told, and a delivery can arrive before the submit's answer has been
recorded (the engine keeps such early deliveries).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol, TypeVar, TypeVarTuple

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from runner.errors import FalError
from runner.fal.jwks import KeySource

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
"""fal's results carry URLs; one carrying a larger data URI is refused and its job polled."""
DEFAULT_MAX_BODY_READS = 16
"""Bodies read at once before their signature is checked."""
DEFAULT_BODY_TIMEOUT_S = 10.0
"""To wait for a reader and read a body: a slow sender cannot hold a reader for longer."""
DEFAULT_MAX_SKEW_S = 300.0
DEFAULT_MAX_REMEMBERED = 1_000_000

HEADER_REQUEST_ID = "x-fal-webhook-request-id"
HEADER_USER_ID = "x-fal-webhook-user-id"
HEADER_TIMESTAMP = "x-fal-webhook-timestamp"
HEADER_SIGNATURE = "x-fal-webhook-signature"

RejectReason = Literal[
    "missing_header",
    "bad_signature_format",
    "bad_timestamp",
    "stale",
    "future",
    "bad_signature",
]

_OFF_LOOP_BYTES = 1024 * 1024
_SIGNATURE_HEX = re.compile(r"[0-9a-fA-F]{128}")
_TIMESTAMP = re.compile(r"[0-9]{1,15}")

T = TypeVar("T")
PosArgsT = TypeVarTuple("PosArgsT")

log = logging.getLogger(__name__)


class WebhookRejected(Exception):
    """A delivery whose signature headers do not check out. Becomes an HTTP 401."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        self.reason: RejectReason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class WebhookHeaders:
    """The signature headers of one delivery, syntactically valid and within the skew."""

    request_id: str
    user_id: str
    timestamp: str  # exactly as sent: it is part of the signed message
    timestamp_s: int
    signature: bytes  # 64 bytes

    def message(self, body: bytes) -> bytes:
        digest = hashlib.sha256(body).hexdigest()
        return f"{self.request_id}\n{self.user_id}\n{self.timestamp}\n{digest}".encode()


def read_headers(
    headers: Mapping[str, str], *, now_s: float, max_skew_s: float = DEFAULT_MAX_SKEW_S
) -> WebhookHeaders:
    """Check the signature headers' presence, syntax and age (no key needed)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    values: dict[str, str] = {}
    for name in (HEADER_REQUEST_ID, HEADER_USER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE):
        value = lowered.get(name)
        if not value:
            raise WebhookRejected("missing_header", f"no {name} header")
        values[name] = value
    signature_hex = values[HEADER_SIGNATURE]
    if not _SIGNATURE_HEX.fullmatch(signature_hex):
        raise WebhookRejected("bad_signature_format", "signature is not 128 hex digits")
    timestamp = values[HEADER_TIMESTAMP]
    if not _TIMESTAMP.fullmatch(timestamp):
        raise WebhookRejected("bad_timestamp", "timestamp is not an integer of unix seconds")
    timestamp_s = int(timestamp)
    if now_s - timestamp_s > max_skew_s:
        raise WebhookRejected("stale", f"timestamp is {now_s - timestamp_s:.0f} s old")
    if timestamp_s - now_s > max_skew_s:
        raise WebhookRejected("future", f"timestamp is {timestamp_s - now_s:.0f} s ahead")
    return WebhookHeaders(
        request_id=values[HEADER_REQUEST_ID],
        user_id=values[HEADER_USER_ID],
        timestamp=timestamp,
        timestamp_s=timestamp_s,
        signature=bytes.fromhex(signature_hex),
    )


def check_signature(
    parsed: WebhookHeaders, body: bytes, public_keys: Sequence[Ed25519PublicKey]
) -> None:
    """Raise ``WebhookRejected("bad_signature")`` unless one of the keys verifies."""
    message = parsed.message(body)
    for key in public_keys:  # every key: fal rotates them
        try:
            key.verify(parsed.signature, message)
        except InvalidSignature:
            continue
        return
    raise WebhookRejected("bad_signature", f"no key of {len(public_keys)} verifies")


def verify_signature(
    *,
    body: bytes,
    headers: Mapping[str, str],
    public_keys: Sequence[Ed25519PublicKey],
    now_s: float,
    max_skew_s: float = DEFAULT_MAX_SKEW_S,
) -> WebhookHeaders:
    """Verify one delivery: headers present and well formed, fresh, signed by one of the keys."""
    parsed = read_headers(headers, now_s=now_s, max_skew_s=max_skew_s)
    check_signature(parsed, body, public_keys)
    return parsed


def _text_or_none(value: Any) -> Any:
    # fal documents these as text; anything else is kept readable rather than refused,
    # since refusing a genuine delivery only makes fal retry it for two hours.
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


class WebhookEvent(BaseModel):
    """One completion delivered by fal. ``payload`` is the result (or error body), opaque."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    request_id: str = Field(min_length=1)
    gateway_request_id: str | None = None
    status: Literal["OK", "ERROR"]
    payload: Any = None
    error: Annotated[str | None, BeforeValidator(_text_or_none)] = None
    payload_error: Annotated[str | None, BeforeValidator(_text_or_none)] = None


class SeenIds(Protocol):
    """Request ids already forwarded; a plain ``set[str]`` will do."""

    def __contains__(self, request_id: object, /) -> bool: ...

    def add(self, request_id: str, /) -> None: ...


class DeliveredIds:
    """The last ``capacity`` forwarded request ids, oldest forgotten first."""

    def __init__(self, capacity: int = DEFAULT_MAX_REMEMBERED) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, request_id: object, /) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, request_id: str, /) -> None:
        self._ids[request_id] = None
        self._ids.move_to_end(request_id)
        while len(self._ids) > self._capacity:
            self._ids.popitem(last=False)


@dataclass
class WebhookStats:
    """Counters for the run's stats: every POST is ``received``; outcomes below."""

    received: int = 0
    valid: int = 0
    forwarded: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class _Refused(Exception):
    """A delivery answered before its body is read (or read whole)."""

    def __init__(self, status_code: int, reason: str) -> None:
        self.status_code = status_code
        self.reason = reason
        super().__init__(f"{status_code} {reason}")


async def _read_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # chunked, or a Content-Length that lied
                raise _Refused(413, "too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise _Refused(400, "disconnected") from None
    return b"".join(chunks)


async def _off_loop_if_large(body: bytes, func: Callable[[*PosArgsT], T], *args: *PosArgsT) -> T:
    # Hashing or parsing a data-URI-sized body takes tens of milliseconds: not on the loop.
    if len(body) < _OFF_LOOP_BYTES:
        return func(*args)
    return await anyio.to_thread.run_sync(func, *args)


def _answer(status_code: int, outcome: str) -> JSONResponse:
    return JSONResponse({"outcome": outcome}, status_code=status_code)


@dataclass
class _Handler:
    keys: KeySource
    events: MemoryObjectSendStream[WebhookEvent]
    seen: SeenIds
    stats: WebhookStats
    wall_clock: Callable[[], float]
    max_body_bytes: int
    max_skew_s: float
    body_timeout_s: float
    readers: anyio.Semaphore

    async def handle(self, request: Request) -> JSONResponse:
        self.stats.received += 1
        try:
            # Headers first: a post that cannot be a fresh delivery is answered unread.
            parsed = read_headers(
                request.headers, now_s=self.wall_clock(), max_skew_s=self.max_skew_s
            )
        except WebhookRejected as exc:
            log.debug("webhook rejected: %s", exc)
            return self._reject(401, exc.reason)
        try:
            body = await self._read(request)
        except _Refused as exc:
            return self._reject(exc.status_code, exc.reason)
        try:
            await self._authenticate(parsed, body)
        except WebhookRejected as exc:
            log.debug("webhook rejected: %s", exc)
            return self._reject(401, exc.reason)
        except FalError as exc:
            log.warning("cannot verify a webhook yet: %s", exc)
            return self._reject(503, "keys_unavailable")
        try:
            event = await _off_loop_if_large(body, WebhookEvent.model_validate_json, body)
        except ValidationError:
            return self._reject(400, "malformed")
        self.stats.valid += 1
        return self._deliver(event)

    async def _read(self, request: Request) -> bytes:
        """The body, read whole only if small enough, soon enough, with a reader free."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _Refused(413, "too_large")
        reading = False
        with anyio.move_on_after(self.body_timeout_s):
            async with self.readers:
                reading = True
                return await _read_body(request, self.max_body_bytes)
        raise _Refused(408, "slow_body") if reading else _Refused(503, "readers_busy")

    async def _authenticate(self, parsed: WebhookHeaders, body: bytes) -> None:
        try:
            await _off_loop_if_large(body, check_signature, parsed, body, await self.keys.keys())
        except WebhookRejected:
            # Perhaps fal rotated its key: one (rate-limited) refetch, then a final answer.
            fresh = await self.keys.refresh_after_miss()
            if fresh is None:
                raise
            await _off_loop_if_large(body, check_signature, parsed, body, fresh)

    def _deliver(self, event: WebhookEvent) -> JSONResponse:
        # No await between the check and the add: concurrent duplicates cannot both pass.
        if event.request_id in self.seen:
            self.stats.duplicates += 1
            return _answer(200, "duplicate")
        try:
            self.events.send_nowait(event)
        except anyio.WouldBlock:
            return self._reject(503, "busy")  # not remembered: fal's retry will deliver it
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return self._reject(503, "closed")
        self.seen.add(event.request_id)
        self.stats.forwarded += 1
        return _answer(200, "accepted")

    def _reject(self, status_code: int, reason: str) -> JSONResponse:
        self.stats.rejected[reason] += 1
        return _answer(status_code, reason)


def build_app(
    *,
    keys: KeySource,
    events: MemoryObjectSendStream[WebhookEvent],
    seen: SeenIds | None = None,
    stats: WebhookStats | None = None,
    wall_clock: Callable[[], float] = time.time,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_skew_s: float = DEFAULT_MAX_SKEW_S,
    max_body_reads: int = DEFAULT_MAX_BODY_READS,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> Starlette:
    """The receiver as an ASGI app; ``app.state.webhook_stats`` holds its counters.

    ``wall_clock`` gives unix seconds (the signed timestamps are wall-clock time). At most
    ``max_body_reads`` bodies of at most ``max_body_bytes`` are read at once, each within
    ``body_timeout_s`` of its headers passing (waiting for a reader included).
    """
    if max_body_bytes < 0 or max_body_reads < 1 or not body_timeout_s > 0:
        raise ValueError("need max_body_bytes >= 0, max_body_reads >= 1, body_timeout_s > 0")
    handler = _Handler(
        keys=keys,
        events=events,
        seen=DeliveredIds() if seen is None else seen,
        stats=WebhookStats() if stats is None else stats,
        wall_clock=wall_clock,
        max_body_bytes=max_body_bytes,
        max_skew_s=max_skew_s,
        body_timeout_s=body_timeout_s,
        readers=anyio.Semaphore(max_body_reads),
    )
    # A tunnel may forward to a path of its own, so every path is the receiver.
    routes = [
        Route("/", handler.handle, methods=["POST"]),
        Route("/{path:path}", handler.handle, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.webhook_stats = handler.stats
    return app
