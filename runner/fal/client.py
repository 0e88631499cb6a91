"""QueueClient: the runner's side of fal's queue protocol over one injected httpx transport.

Each method makes exactly one HTTP call (one stream for :meth:`QueueClient.stream`);
retrying is the caller's job through :func:`runner.fal.retry.call_with_retry`, so the policy
lives in one place. httpx errors and unexpected answers are translated here, and only
here, into the runner's tree::

    httpx.TransportError            -> TransportError(sent=False) before any byte left
                                       (connect error, connect/pool timeout), else sent=True
    401 / 403                       -> AuthError
    504 + X-Fal-Request-Timeout-Type
        outside a result            -> ProtocolError (the job's own outcome, not a call's)
    other unexpected status         -> HTTPStatusError(status_code, body, request_id,
                                       retry_after_s)
    2xx that breaks the protocol    -> ProtocolError

The key is a ``SecretStr``; it goes only into the Authorization header of requests to
the configured queue origin (URLs from an ack that point elsewhere are refused) and is
removed, with its parts, from any server or library text copied into an error
(:func:`runner.fal.key.redactor`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, cast

import anyio
import httpx
from pydantic import SecretStr

from runner.errors import AuthError, HTTPStatusError, ProtocolError, TransportError, UsageError
from runner.fal.calls import Caller
from runner.fal.http1 import Answer
from runner.fal.key import redactor
from runner.fal.paths import request_urls, stream_url, submit_url
from runner.fal.protocol import (
    ERROR_TYPE_HEADER,
    FAL_NOT_READY,
    NOT_SENT_ERRORS,
    REQUEST_ID_HEADER,
    RETRY_AFTER_HEADER,
    TIMEOUT_TYPE_HEADER,
    CancelOutcome,
    Completed,
    NotReadyAnswer,
    RequestUrls,
    ResultResponse,
    Status,
    SubmitAck,
    body_error_type,
    is_gateway_error,
    is_stored_result,
    parse_ack,
    parse_cancel,
    parse_retry_after,
    parse_status,
    peek_verdict,
)
from runner.fal.sse import SSEParser, parse_event_status
from runner.fal.transport import CallTimeouts

BODY_LIMIT = 2000  # characters of an error body kept on HTTPStatusError


RequestRef = SubmitAck | RequestUrls


class QueueClient:
    """Submit, watch, fetch and cancel queue requests. Never retries by itself."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        queue_url: str,
        key: SecretStr,
        timeouts: CallTimeouts | None = None,
        wall_clock: Callable[[], float] = time.time,
        max_requests: int | None = None,
        user_agent: str = "runner",
        calls: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        # Calls go straight to the transport (runner.fal.calls.Caller): AsyncClient's auth,
        # redirect and cookie layers cost CPU on every call and none of them is used here.
        # ``calls`` (default: ``transport``) carries the one-shot calls, streams stay on
        # ``transport`` (runner.fal.keepalive.KeepAliveTransport is the lean one).
        self._transport = transport
        self._queue = httpx.URL(queue_url.rstrip("/"))
        if self._queue.scheme not in ("http", "https") or not self._queue.host:
            raise UsageError(f"queue URL must be http(s)://host[:port], got {queue_url!r}")
        # scheme://netloc/ exactly as configured: a URL that starts with it is on the queue's
        # origin (the slash ends the host, so queue.fal.run.evil.com does not match).
        self._origin_prefix = f"{self._queue.scheme}://{self._queue.netloc.decode('ascii')}/"
        self._key = key
        self._redact = redactor(key)
        timeouts = timeouts or CallTimeouts()
        self._stream_extensions = timeouts.extensions()["stream"]
        self._calls = Caller(
            calls if calls is not None else transport, queue=self._queue, key=key,
            user_agent=user_agent, timeouts=timeouts, max_requests=max_requests,
        )  # fmt: skip
        self._wall_clock = wall_clock  # only to read HTTP-date Retry-After values

    def __repr__(self) -> str:
        return f"QueueClient(queue_url={str(self._queue)!r}, key={self._key!r})"

    @property
    def queue_url(self) -> str:
        return str(self._queue)

    # --- URLs ------------------------------------------------------------------------

    def submit_url(self, endpoint_id: str) -> str:
        """``{queue}/{owner}/{app}[/{path}]``: the full id, sub-path included."""
        return submit_url(str(self._queue), endpoint_id)

    def urls_for(self, endpoint_id: str, request_id: str) -> RequestUrls:
        """Derive a request's URLs from its id alone (owner/app only, no sub-path), to
        re-attach to a request recorded in the ledger without its ack."""
        return request_urls(str(self._queue), endpoint_id, request_id)

    # --- calls -----------------------------------------------------------------------

    async def submit(
        self,
        endpoint_id: str,
        payload: Mapping[str, Any],
        *,
        webhook_url: str | None = None,
        priority: str | None = None,
        start_timeout_s: float | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> SubmitAck:
        """POST one request to the queue; one call, never retried here."""
        headers = dict(extra_headers or {})
        if any(name.lower() == "authorization" for name in headers):
            raise UsageError("extra_headers must not set Authorization")
        if priority is not None:
            if priority not in ("normal", "low"):
                raise UsageError(f"priority must be normal or low, got {priority!r}")
            headers["X-Fal-Queue-Priority"] = priority
        if start_timeout_s is not None:
            if start_timeout_s <= 1:
                raise UsageError("start timeout must be more than 1 second")
            headers["X-Fal-Request-Timeout"] = str(float(start_timeout_s))
        params = {"fal_webhook": webhook_url} if webhook_url is not None else None
        url = self.submit_url(endpoint_id)
        response = await self._send(
            "POST", url, json=dict(payload), params=params, headers=headers, kind="submit"
        )
        if not response.is_success:
            self._raise_for(response, "POST", url)
        return parse_ack(_json(response, "submit acknowledgement"))

    async def status(self, ref: RequestRef, *, logs: bool = False) -> Status:
        """GET the status once (202 while queued or running, 200 once completed)."""
        params = {"logs": "1" if logs else "0"}
        response = await self._send("GET", ref.status_url, params=params, kind="read")
        if response.status_code not in (200, 202):
            self._raise_for(response, "GET", ref.status_url)
        return parse_status(_json(response, "status"))

    async def result(self, ref: RequestRef) -> ResultResponse:
        """GET the stored result. The model's own code is replayed: 2xx, 422 and fal-marked
        error answers (request id or error type present) are returned as results; 404
        (expired or unknown), throttling and bare gateway errors raise."""
        url = ref.response_url
        response = await self._send("GET", url, kind="read")
        code = response.status_code
        # Only an error answer needs its body read here (a success body is parsed below).
        stored = not response.is_success and is_stored_result(
            response.headers, _json_or_none(response)
        )
        if code in (401, 403, 404, 408, 409, 429) or not (
            response.is_success or code == 422 or stored
        ):
            self._raise_for(response, "GET", url, allow_timeout_type=True)
        try:
            body: Any = response.json()
        except ValueError:
            if response.is_success:
                raise ProtocolError(f"GET {url}: result is not JSON") from None
            body = self._redact(response.text)
        return _result_response(response, body)

    async def peek_result(self, ref: RequestRef, not_ready: NotReadyAnswer = FAL_NOT_READY) -> Peek:
        """GET the result once, before the job is known to be done (one call, no retry).

        A success is the result, and saves the status read; fal's "still running" answer
        says look again later; anything else is left for a status read to explain.
        """
        url = ref.response_url
        response = await self._send("GET", url, kind="read")
        if response.status_code in (401, 403):
            self._raise_for(response, "GET", url)
        body = _json_or_none(response)
        verdict = peek_verdict(response.status_code, body, not_ready)
        if verdict == "result":
            return Peek(_result_response(response, body))
        return Peek(None, not_ready=verdict == "not_ready")

    async def cancel(self, ref: RequestRef) -> CancelOutcome:
        """PUT the cancel once: 202 CANCELLATION_REQUESTED, 400 ALREADY_COMPLETED,
        404 NOT_FOUND (a 404 without that body is a wrong URL and raises)."""
        url = ref.cancel_url
        response = await self._send("PUT", url, kind="read")
        try:
            outcome = parse_cancel(response.json())
        except ValueError:
            outcome = None
        if outcome is not None and response.status_code in (200, 202, 400, 404):
            return outcome
        if response.status_code in (200, 202):
            return "CANCELLATION_REQUESTED"
        self._raise_for(response, "PUT", url)

    @asynccontextmanager
    async def stream(
        self, ref: RequestRef, *, logs: bool = False
    ) -> AsyncIterator[AsyncIterator[Status]]:
        """Open the SSE status stream: ``async with client.stream(ack) as events:``.

        ``events`` yields each status and ends after COMPLETED; a stream that closes
        before COMPLETED raises TransportError(sent=True) so the caller reconnects.
        The connection is closed when the ``async with`` block exits.
        """
        url = stream_url(ref.status_url)
        self._check_origin(url)
        headers = {**self._calls.headers(), "Accept": "text/event-stream"}
        params = {"logs": "1" if logs else "0"}
        request = httpx.Request(
            "GET", url, params=params, headers=headers, extensions=self._stream_extensions
        )
        with self._translated("GET", url):
            response = await self._transport.handle_async_request(request)
        response.request = request
        try:
            if response.status_code != 200:
                with self._translated("GET", url):
                    await response.aread()
                self._raise_for(Answer.of(response), "GET", url)
            events = self._events(response, url)
            try:
                yield events
            finally:
                with anyio.CancelScope(shield=True):  # cleanup must finish when cancelled
                    await events.aclose()
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    # --- the one boundary --------------------------------------------------------------

    async def _events(self, response: httpx.Response, url: str) -> AsyncGenerator[Status, None]:
        parser = SSEParser()
        # Close the byte iterator ourselves when leaving early (after COMPLETED), so it is
        # not left for the garbage collector to finalise.
        chunks = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
        with self._translated("GET", url):
            async with aclosing(chunks):
                async for chunk in chunks:
                    for data in parser.feed(chunk):
                        status = parse_event_status(data)
                        yield status
                        if isinstance(status, Completed):
                            return
        raise TransportError(f"GET {url}: status stream ended before COMPLETED", sent=True)

    async def _send(
        self,
        method: str,
        url: str,
        *,
        kind: Literal["submit", "read"],
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        self._check_origin(url)
        with self._translated(method, url):
            return await self._calls.send(
                method, url, kind=kind, json=json, params=params, headers=headers
            )

    @contextmanager
    def _translated(self, method: str, url: str) -> Iterator[None]:
        try:
            yield
        except httpx.TransportError as exc:
            sent = not isinstance(exc, NOT_SENT_ERRORS)
            detail = self._redact(str(exc)) or "no detail"
            raise TransportError(
                f"{method} {url}: {type(exc).__name__}: {detail}", sent=sent
            ) from exc

    def _raise_for(
        self,
        response: Answer,
        method: str,
        url: str,
        *,
        allow_timeout_type: bool = False,
    ) -> NoReturn:
        code = response.status_code
        request_id = response.headers.get(REQUEST_ID_HEADER)
        where = f"{method} {url}: HTTP {code}"
        if code in (401, 403):
            raise AuthError(f"{where}: the queue refused the key")
        if code == 504 and response.headers.get(TIMEOUT_TYPE_HEADER) and not allow_timeout_type:
            raise ProtocolError(f"{where} with X-Fal-Request-Timeout-Type outside a result")
        body = self._redact(response.text)[:BODY_LIMIT]
        retry_after = parse_retry_after(
            response.headers.get(RETRY_AFTER_HEADER), now_s=self._wall_clock()
        )
        gateway = " from the gateway" if is_gateway_error(code, body, request_id) else ""
        rid = f" (request {request_id})" if request_id else ""
        snippet = " ".join(body[:200].split())
        raise HTTPStatusError(
            f"{where}{gateway}{rid}: {snippet}" if snippet else f"{where}{gateway}{rid}",
            status_code=code,
            body=body,
            request_id=request_id,
            retry_after_s=retry_after,
        )

    def _check_origin(self, url: str) -> None:
        if url.startswith(self._origin_prefix):
            return  # the common case, without parsing: the queue's own scheme://host[:port]/
        target = httpx.URL(url)
        if (target.scheme, target.host, target.port) != (
            self._queue.scheme,
            self._queue.host,
            self._queue.port,
        ):
            # The ports too: on loopback they are all that tells two origins apart.
            raise ProtocolError(
                f"refusing to send the key to {target.scheme}://{target.netloc.decode('ascii')}: "
                f"not the queue origin {self._origin_prefix.rstrip('/')}"
            )


@dataclass(frozen=True, slots=True)
class Peek:
    """What a result read before completion found: the result, or whether to wait."""

    result: ResultResponse | None
    not_ready: bool = False


def _result_response(response: Answer, body: Any) -> ResultResponse:
    return ResultResponse(
        status_code=response.status_code,
        body=body,
        request_id=response.headers.get(REQUEST_ID_HEADER),
        error_type=response.headers.get(ERROR_TYPE_HEADER) or body_error_type(body),
        timeout_type=response.headers.get(TIMEOUT_TYPE_HEADER),
    )


def _json_or_none(response: Answer) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _json(response: Answer, what: str) -> Any:
    try:
        return response.json()
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError included
        raise ProtocolError(f"{response.method} {response.url}: {what} is not JSON") from exc
