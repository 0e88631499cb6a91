"""HTTP routes of the emulator: fal's queue protocol, plus storage, CDN, JWKS and stats.

Path layout, one host::

    POST /{owner}/{app}[/{path...}]                       submit (full endpoint id)
    GET  /{owner}/{app}/requests/{id}/status[/]           status (?logs=1|0|true|false)
    GET  /{owner}/{app}/requests/{id}/status/stream       server-sent events
    GET  /{owner}/{app}/requests/{id}[/]                  result
    PUT  /{owner}/{app}/requests/{id}/cancel[/]           cancel
    /rest/storage/..., /cdn/files/...                     storage, CDN (.storage_api, .images)
    GET  /rest/.well-known/jwks.json                      webhook public key
    GET  /api/v1/models/requests/by-endpoint, /pricing    Platform API (.platform_api)
    GET  /_emulator/stats, POST /_emulator/reset          accounting

The ``/api`` mount comes before the queue's patterns, so they cannot shadow it (a queue app
owned by ``api`` could not be reached; fal has none). A submit with ``X-Fal-Store-IO: 0``
keeps no payloads in the request history.

Every queue and storage route needs ``Authorization: Key <key>`` (401 otherwise);
CDN downloads and the JWKS are public. Gateway faults answer before auth, as
fal's ingress does.

A submit whose answer is "lost" (fault ``reset_after_accept`` /
``timeout_after_accept``) is queued and billed, and a result read hit by
``result_reset`` leaves its job as it was; both are then cut short mid-answer
(:mod:`runner.emulator.breakage` says how the client sees that).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from runner.emulator import results
from runner.emulator.breakage import AbortResponse, nginx_error
from runner.emulator.platform_api import PREFIX as PLATFORM_PREFIX
from runner.emulator.platform_api import platform_routes
from runner.emulator.queue import Job, Phase
from runner.emulator.storage_api import origin, storage_routes
from runner.emulator.webhooks import jwks_routes
from runner.endpoints import catalog

if TYPE_CHECKING:
    from runner.emulator.app import Emulator

TRUE_VALUES = frozenset({"1", "true", "yes"})


def _json(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status_code, headers=headers)


class QueueRoutes:
    """The queue handlers, bound to one emulator."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self._key = emu.config.key.get_secret_value().encode()

    def _authorised(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "key" and hmac.compare_digest(value.encode(), self._key)

    async def _gate(self, request: Request) -> Response | None:
        """Faults at the ingress, then auth; None means go on."""
        emu = self.emu
        if emu.faults.slow():
            emu.stats.fault("slow")
            await anyio.sleep(emu.config.scaled(emu.config.faults.slow_s))
        code = emu.faults.gateway_error()
        if code is not None:
            emu.stats.fault(f"gateway_{code}")
            return nginx_error(code)
        if not self._authorised(request):
            return _json({"detail": "Unauthorized: missing or invalid Key credentials"}, 401)
        emu.advance()
        return None

    def _job(self, request: Request) -> Job | None:
        params = request.path_params
        return self.emu.lookup(f"{params['owner']}/{params['app']}", params["request_id"])

    async def submit(self, request: Request) -> Response:
        refused = await self._gate(request)
        if refused is not None:
            return refused
        emu = self.emu
        endpoint = f"{request.path_params['owner']}/{request.path_params['path']}".rstrip("/")
        if endpoint not in catalog.CATALOG:
            return _json({"detail": f"Application '{endpoint}' not found"}, 404)
        if emu.faults.submit_429():
            emu.stats.fault("submit_429")
            return _json({"detail": "Too many requests: rate limit exceeded"}, 429)
        parsed = await _parse_body(request, endpoint)
        if isinstance(parsed, Response):
            return parsed
        body, fal_request = parsed
        try:
            timeout_s = _start_timeout(request)
        except ValueError:
            return _json({"detail": "X-Fal-Request-Timeout must be a number of seconds"}, 400)
        plan = await emu.plan(
            fal_request,
            body,
            origin=origin(request),
            webhook_url=request.query_params.get("fal_webhook") or None,
            output_retention_s=_lifecycle_s(request),
        )
        owner, app = endpoint.split("/")[:2]
        job = emu.accept(
            endpoint,
            f"{owner}/{app}",
            plan,
            low_priority=request.headers.get("x-fal-queue-priority", "").lower() == "low",
            start_timeout_s=timeout_s,
            store_io=_store_io(request),
        )
        lost = emu.faults.lost_answer()
        if lost is not None:
            emu.stats.fault(f"{lost}_after_accept")
            return AbortResponse(lost, emu.config.scaled(emu.config.faults.timeout_hang_s))
        body_out = results.submit_body(origin(request), job, emu.position(job))
        return _json(body_out, headers={"x-fal-request-id": job.request_id})

    async def status(self, request: Request) -> Response:
        job = await self._gated_job(request)
        if isinstance(job, Response):
            return job
        return self._status_answer(request, job)

    def _status_answer(self, request: Request, job: Job) -> Response:
        body = self._status_body(request, job)
        code = 200 if job.phase is Phase.DONE else 202
        return _json(body, code, headers={"x-fal-request-id": job.request_id})

    async def _gated_job(
        self, request: Request, *, not_found: Mapping[str, Any] = results.NOT_FOUND
    ) -> Job | Response:
        """The request's job after the gate (auth, faults), or the answer to send instead."""
        refused = await self._gate(request)
        if refused is not None:
            return refused
        return self._found(request, not_found)

    def _found(
        self, request: Request, not_found: Mapping[str, Any] = results.NOT_FOUND
    ) -> Job | Response:
        job = self._job(request)
        return _json(dict(not_found), 404) if job is None else job

    def _status_body(self, request: Request, job: Job) -> dict[str, Any]:
        emu = self.emu
        return results.status_body(
            origin(request),
            job,
            position=emu.position(job),
            with_logs=request.query_params.get("logs", "0").lower() in TRUE_VALUES,
            now=emu.clock(),
            time_scale=emu.config.time_scale,
        )

    async def result(self, request: Request) -> Response:
        refused = await self._gate(request)
        if refused is not None:
            return refused
        # Drawn for every authorised read, known id or not, so schedules count reads;
        # the job is left alone, so the next read may succeed.
        fault = self.emu.faults.result_fault()
        if fault == "reset":
            self.emu.stats.fault("result_reset")
            return AbortResponse("reset", after="a result read", partial=b'{"')
        if fault is not None:
            self.emu.stats.fault("result_5xx")
            return nginx_error(fault)
        job = self._found(request)
        if isinstance(job, Response):
            return job
        headers = {"x-fal-request-id": job.request_id}
        if job.result is None:
            return _json(results.STILL_RUNNING, 400, headers=headers)
        return _json(job.result.body, job.result.status_code, {**job.result.headers, **headers})

    async def cancel(self, request: Request) -> Response:
        job = await self._gated_job(request, not_found={"status": "NOT_FOUND"})
        if isinstance(job, Response):
            return job
        if job.phase is Phase.DONE:
            return _json({"status": "ALREADY_COMPLETED"}, 400)
        self.emu.cancel(job)
        return _json({"status": "CANCELLATION_REQUESTED"}, 202)

    async def stream(self, request: Request) -> Response:
        refused = await self._gate(request)
        if refused is not None:
            return refused
        not_sse = self.emu.faults.stream_not_sse()  # drawn for every authorised stream request
        job = self._found(request)
        if isinstance(job, Response):
            return job
        if not_sse:
            self.emu.stats.fault("stream_not_sse")
            return self._status_answer(request, job)
        headers = {"x-fal-request-id": job.request_id, "Cache-Control": "no-cache"}
        events = self._events(request, job)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def _events(self, request: Request, job: Job) -> AsyncIterator[str]:
        """One ``data:`` event per change, ``: keep-alive`` when quiet, close after COMPLETED.

        With the fault ``stream_drop_after=N`` the body ends cleanly after N events instead.
        """
        emu = self.emu
        keepalive_s = emu.config.scaled(emu.config.keepalive_s)
        next_keepalive = anyio.current_time() + keepalive_s
        drop_after = emu.config.faults.stream_drop_after
        last, sent = "", 0
        while True:
            event = emu.change_event()
            emu.advance()
            text = json.dumps(self._status_body(request, job))
            if text != last:
                last, sent = text, sent + 1
                yield f"data: {text}\n\n"
            if job.phase is Phase.DONE:
                return
            if drop_after and sent >= drop_after:
                emu.stats.fault("stream_drop_after")
                return
            wait_s = next_keepalive - anyio.current_time()
            due = emu.scheduler.next_event_at()
            if due is not None:
                wait_s = min(wait_s, due - emu.clock())
            await emu.wait_change(wait_s, event)
            if anyio.current_time() >= next_keepalive:
                next_keepalive = anyio.current_time() + keepalive_s
                yield ": keep-alive\n\n"


async def _parse_body(request: Request, endpoint: str) -> Response | tuple[dict[str, Any], Any]:
    """The JSON body and its typed request, or fal's 422 answer."""
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        problem = {"loc": ["body"], "msg": "Input should be a JSON object", "type": "dict_type"}
        return _json({"detail": [problem]}, 422)
    try:
        return body, catalog.parse_request(endpoint, body)
    except ValidationError as exc:
        detail: list[dict[str, Any]] = [
            {"loc": ["body", *error["loc"]], "msg": error["msg"], "type": error["type"]}
            for error in exc.errors(include_url=False)
        ]
        return _json({"detail": detail}, 422)


def _lifecycle_s(request: Request) -> float | None:
    """``X-Fal-Object-Lifecycle-Preference: {"expiration_duration_seconds": N}``, if usable."""
    try:
        value = json.loads(request.headers.get("x-fal-object-lifecycle-preference", "{}"))
        seconds = value.get("expiration_duration_seconds")
    except (ValueError, AttributeError):
        return None
    ok = isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds > 0
    return float(seconds) if ok else None


def _store_io(request: Request) -> bool:
    """False when the submit opts out of payload storage (``X-Fal-Store-IO: 0``)."""
    return request.headers.get("x-fal-store-io", "1").strip().lower() not in {"0", "false"}


def _start_timeout(request: Request) -> float | None:
    raw = request.headers.get("x-fal-request-timeout")
    if raw is None:
        return None
    value = float(raw)
    if not value > 0:
        raise ValueError(raw)
    return value


async def _stats(emu: Emulator) -> Response:
    return _json(emu.snapshot())


def build_app(emu: Emulator) -> ASGIApp:
    """The whole emulator as one ASGI app, wrapped so every call is counted by kind."""
    queue = QueueRoutes(emu)
    item = "/{owner}/{app}/requests/{request_id}"

    async def stats(request: Request) -> Response:
        return await _stats(emu)

    async def reset(request: Request) -> Response:
        emu.reset_stats()
        return _json({"ok": True})

    routes: list[BaseRoute] = [
        Route("/_emulator/stats", stats, methods=["GET"]),
        Route("/_emulator/reset", reset, methods=["POST"]),
        *platform_routes(emu),
        *jwks_routes(emu.signer),
        *storage_routes(emu.files, key=emu.config.key, clock=emu.clock),
        *emu.images.routes(),
        Route(item + "/status/stream", queue.stream, methods=["GET"]),
    ]
    for suffix in ("", "/"):
        routes += [
            Route(item + "/status" + suffix, queue.status, methods=["GET"]),
            Route(item + "/cancel" + suffix, queue.cancel, methods=["PUT"]),
            Route(item + suffix, queue.result, methods=["GET"]),
        ]
    routes.append(Route("/{owner}/{path:path}", queue.submit, methods=["POST"]))
    return CountedCalls(Starlette(routes=routes), emu)


def route_kind(method: str, path: str) -> str:
    """The accounting bucket of one HTTP call."""
    path = path.rstrip("/")
    if path.startswith("/_emulator"):
        return "emulator"
    if path.startswith(PLATFORM_PREFIX + "/"):
        return "platform"
    if path == "/rest/.well-known/jwks.json":
        return "jwks"
    if path.startswith("/rest/") or (path.startswith("/cdn/") and method != "GET"):
        return "storage"
    if path.startswith("/cdn/"):
        return "cdn"
    if method == "POST":
        return "submit"
    for suffix, kind in (
        ("/status/stream", "stream"),
        ("/status", "status"),
        ("/cancel", "cancel"),
    ):
        if path.endswith(suffix):
            return kind
    return "result" if "/requests/" in path else "other"


class CountedCalls:
    """ASGI wrapper counting every HTTP call by :func:`route_kind`."""

    def __init__(self, app: ASGIApp, emu: Emulator) -> None:
        self.app = app
        self.emu = emu

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.emu.stats.call(route_kind(scope["method"], scope["path"]))
        await self.app(scope, receive, send)
