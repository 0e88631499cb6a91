"""The webhook receiver on a real socket: uvicorn serving :func:`runner.fal.webhook.build_app`.

:func:`webhook_server` binds (port 0: any free port), starts uvicorn inside a task group and
is ready when its block starts; uvicorn is kept off SIGINT/SIGTERM, which the runner owns.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import anyio
import uvicorn
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from runner.errors import UsageError
from runner.fal.jwks import KeySource
from runner.fal.webhook import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_BODY_READS,
    DEFAULT_MAX_SKEW_S,
    SeenIds,
    WebhookEvent,
    WebhookStats,
    build_app,
)


@dataclass(frozen=True)
class WebhookReceiver:
    """A running receiver: where it listens, its events and its counters."""

    host: str
    port: int
    events: MemoryObjectReceiveStream[WebhookEvent]
    stats: WebhookStats

    @property
    def local_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.on_started: Callable[[], None] = lambda: None
        self.stopped = False

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The runner owns Ctrl-C and SIGTERM (first drains, second exits): uvicorn must not.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets=sockets)
        self.stopped = True


async def _serve(server: _Server, sock: socket.socket, *, task_status: TaskStatus[None]) -> None:
    server.on_started = task_status.started
    try:
        await server.serve(sockets=[sock])
    finally:
        if server.started and not server.stopped:  # cancelled: close what uvicorn opened
            server.force_exit = True
            with anyio.move_on_after(1.0, shield=True):
                await server.shutdown(sockets=[sock])


async def _listen_socket(host: str, port: int) -> socket.socket:
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, socktype, proto, _, address = infos[0]
        sock = socket.socket(family, socktype, proto)
    except OSError as exc:
        raise UsageError(f"cannot listen for webhooks on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen for webhooks on {host}:{port}: {exc}") from exc
    return sock


@asynccontextmanager
async def webhook_server(
    host: str,
    port: int,
    *,
    keys: KeySource,
    queue_size: int = 1024,
    seen: SeenIds | None = None,
    wall_clock: Callable[[], float] = time.time,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_skew_s: float = DEFAULT_MAX_SKEW_S,
    max_body_reads: int = DEFAULT_MAX_BODY_READS,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    shutdown_timeout_s: int = 5,
) -> AsyncIterator[WebhookReceiver]:
    """Serve the receiver on ``host:port`` (0: any free port) until the block exits.

    It is accepting connections when the block starts. On exit the send side of the event
    stream closes, so a consumer iterating ``receiver.events`` ends after the events already
    buffered. The receive side is the caller's: close it (``async with receiver.events``).
    The body limits are :func:`runner.fal.webhook.build_app`'s. asyncio only (uvicorn).
    """
    sock = await _listen_socket(host, port)
    send, receive = anyio.create_memory_object_stream[WebhookEvent](queue_size)
    stats = WebhookStats()
    app = build_app(
        keys=keys,
        events=send,
        seen=seen,
        stats=stats,
        wall_clock=wall_clock,
        max_body_bytes=max_body_bytes,
        max_skew_s=max_skew_s,
        max_body_reads=max_body_reads,
        body_timeout_s=body_timeout_s,
    )
    config = uvicorn.Config(
        app,
        lifespan="off",
        access_log=False,
        log_config=None,
        log_level="warning",
        timeout_graceful_shutdown=shutdown_timeout_s,
    )
    server = _Server(config)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(_serve, server, sock)
            try:
                yield WebhookReceiver(host, sock.getsockname()[1], receive, stats)
            finally:
                server.should_exit = True  # uvicorn notices within 0.1 s and shuts down
    finally:
        send.close()  # a consumer's receive() then ends with EndOfStream
        sock.close()
