"""The one retry policy: a frozen policy object, a pure classifier, a pure backoff, one loop.

Two kinds of call are classified differently:

- ``read`` (status, result, cancel, stream): idempotent, so retry every transient
  failure: no HTTP answer, 408, 409, 429 and 5xx, waiting ``Retry-After`` when given.
  A 504 carrying ``X-Fal-Request-Timeout-Type`` is the job's own outcome: never retried.
- ``submit`` (the POST): fal has no idempotency key, so a resubmit may pay twice. Retry
  only when the request certainly did not get in: nothing was sent (connect error,
  connect/pool timeout), 429, or a gateway (nginx) 502/503/504 without a request id.
  Anything that may have been accepted is ``UNKNOWN_OUTCOME``: the caller records it and
  never resubmits blindly.

:func:`call_with_retry` re-raises the last exception unchanged when it stops (gave up,
unknown outcome, attempts or time used up); the caller classifies it again to record why.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import anyio
import httpx

from runner.errors import (
    AuthError,
    HTTPStatusError,
    ProtocolError,
    TransportError,
)
from runner.fal.protocol import (
    NOT_SENT_ERRORS,
    REQUEST_ID_HEADER,
    RETRY_AFTER_HEADER,
    TIMEOUT_TYPE_HEADER,
    is_gateway_error,
    parse_retry_after,
)

T = TypeVar("T")
CallKind = Literal["submit", "read"]

# Idempotent reads also retry these; 5xx are added by range below.
READ_RETRY_CODES = frozenset({408, 409, 429})


class Action(enum.Enum):
    RETRY = "retry"
    GIVE_UP = "give_up"
    UNKNOWN_OUTCOME = "unknown_outcome"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do about one failure; ``after_s`` is a server-requested wait (Retry-After)."""

    action: Action
    after_s: float | None = None


GIVE_UP = Decision(Action.GIVE_UP)
UNKNOWN_OUTCOME = Decision(Action.UNKNOWN_OUTCOME)


def retry(after_s: float | None = None) -> Decision:
    return Decision(Action.RETRY, after_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Limits of one retry loop: both an attempt count and a total time, like stamina."""

    attempts: int = 10
    timeout_s: float = 60.0
    base_s: float = 0.25
    max_s: float = 10.0
    jitter: tuple[float, float] = (0.5, 1.5)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.timeout_s < 0 or self.base_s < 0 or self.max_s < self.base_s:
            raise ValueError("need timeout_s >= 0 and 0 <= base_s <= max_s")
        low, high = self.jitter
        if not 0 <= low <= high:
            raise ValueError("jitter must be (low, high) with 0 <= low <= high")


@dataclass(frozen=True, slots=True)
class RetryPolicies:
    """The one table of retry policies of a run, one per kind of call, built once.

    Submits get a long total time because 429 storms pass slowly and a submit that was
    certainly not accepted costs nothing to try again; a cancel is short because it runs
    while a run winds down. Tests shrink the waits, never the rules.
    """

    submit: RetryPolicy = RetryPolicy(attempts=8)
    read: RetryPolicy = RetryPolicy(timeout_s=300.0)
    cancel: RetryPolicy = RetryPolicy(attempts=3, timeout_s=10.0)
    upload: RetryPolicy = RetryPolicy(attempts=5, timeout_s=120.0)
    download: RetryPolicy = RetryPolicy(attempts=3, timeout_s=300.0)
    history: RetryPolicy = RetryPolicy(attempts=5, timeout_s=60.0)


def is_throttled(failure: BaseException | httpx.Response) -> bool:
    """A 429: the signal :class:`runner.execution.ratelimit.AdaptiveRate` lowers its rate on."""
    if isinstance(failure, httpx.Response):
        return failure.status_code == 429
    if isinstance(failure, httpx.HTTPStatusError):
        return failure.response.status_code == 429
    return isinstance(failure, HTTPStatusError) and failure.status_code == 429


def backoff_s(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    rng_value: float,
    jitter: tuple[float, float] = (0.5, 1.5),
) -> float:
    """Wait after failed attempt ``attempt`` (1-based): ``base_s * 2**(attempt-1)``, capped,
    scaled by a jitter factor picked by ``rng_value`` in [0, 1), and capped again so
    ``max_s`` is a hard ceiling."""
    low, high = jitter
    exponential = min(base_s * 2.0 ** max(attempt - 1, 0), max_s)
    return min(exponential * (low + (high - low) * rng_value), max_s)


def classify(
    failure: BaseException | httpx.Response,
    *,
    kind: CallKind,
    now_s: float | None = None,
) -> Decision:
    """Decide about one failed call. Accepts the runner's own errors (what the client
    raises), raw httpx errors, or a raw error response. ``now_s`` (Unix time) is only used
    to turn an HTTP-date ``Retry-After`` into seconds."""
    if isinstance(failure, httpx.Response):
        return _classify_response(failure, kind=kind, now_s=now_s)
    if isinstance(failure, httpx.HTTPStatusError):
        return _classify_response(failure.response, kind=kind, now_s=now_s)
    if isinstance(failure, httpx.TransportError):
        return _classify_transport(sent=not isinstance(failure, NOT_SENT_ERRORS), kind=kind)
    if isinstance(failure, TransportError):
        return _classify_transport(sent=failure.sent, kind=kind)
    if isinstance(failure, AuthError):
        return GIVE_UP
    if isinstance(failure, HTTPStatusError):
        return _classify_status(
            failure.status_code,
            body=failure.body,
            request_id=failure.request_id,
            retry_after_s=failure.retry_after_s,
            timeout_type=None,
            kind=kind,
        )
    if isinstance(failure, ProtocolError):
        # A submit answered with something unparseable may still have been queued.
        return UNKNOWN_OUTCOME if kind == "submit" else GIVE_UP
    return GIVE_UP


def _classify_transport(*, sent: bool, kind: CallKind) -> Decision:
    if kind == "read" or not sent:
        return retry()
    return UNKNOWN_OUTCOME


def _classify_response(
    response: httpx.Response, *, kind: CallKind, now_s: float | None
) -> Decision:
    if response.status_code < 400:
        return GIVE_UP  # not a failure: nothing to retry
    try:
        body = response.text
    except httpx.ResponseNotRead:
        body = ""
    retry_after = parse_retry_after(
        response.headers.get(RETRY_AFTER_HEADER), now_s=time.time() if now_s is None else now_s
    )
    return _classify_status(
        response.status_code,
        body=body,
        request_id=response.headers.get(REQUEST_ID_HEADER),
        retry_after_s=retry_after,
        timeout_type=response.headers.get(TIMEOUT_TYPE_HEADER),
        kind=kind,
    )


def _classify_status(
    status_code: int,
    *,
    body: str,
    request_id: str | None,
    retry_after_s: float | None,
    timeout_type: str | None,
    kind: CallKind,
) -> Decision:
    if status_code in (401, 403):
        return GIVE_UP
    if status_code == 504 and timeout_type:
        return UNKNOWN_OUTCOME if kind == "submit" else GIVE_UP
    if kind == "read":
        if status_code in READ_RETRY_CODES or status_code >= 500:
            return retry(retry_after_s)
        return GIVE_UP
    if status_code == 429 or is_gateway_error(status_code, body, request_id):
        return retry(retry_after_s)
    # fal's own 5xx (or any 5xx we cannot prove came from the gateway) may follow acceptance.
    return UNKNOWN_OUTCOME if status_code >= 500 else GIVE_UP


OnRetry = Callable[[int, Exception, float], None]


async def call_with_retry(
    fn: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    kind: CallKind,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    rng: Callable[[], float] = random.random,
    on_retry: OnRetry | None = None,
) -> T:
    """Call ``fn`` until it returns, retrying what :func:`classify` allows.

    Stops (re-raising the last exception) on GIVE_UP, UNKNOWN_OUTCOME, after
    ``policy.attempts`` calls, or when the next wait would end past ``policy.timeout_s``
    from the first call. ``on_retry(attempt, exc, wait_s)`` runs before each wait.
    """
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except Exception as exc:
            wait = _next_wait(exc, attempt, policy=policy, kind=kind, rng=rng)
            if wait is None or clock() - started + wait > policy.timeout_s:
                raise
            if on_retry is not None:
                on_retry(attempt, exc, wait)
        await sleep(wait)


def _next_wait(
    exc: Exception,
    attempt: int,
    *,
    policy: RetryPolicy,
    kind: CallKind,
    rng: Callable[[], float],
) -> float | None:
    decision = classify(exc, kind=kind)
    if decision.action is not Action.RETRY or attempt >= policy.attempts:
        return None
    if decision.after_s is not None:
        return decision.after_s  # the server said when; backoff would only guess
    return backoff_s(
        attempt, base_s=policy.base_s, max_s=policy.max_s, rng_value=rng(), jitter=policy.jitter
    )
