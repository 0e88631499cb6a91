"""A lean HTTP/1.1 keep-alive transport for the queue's small JSON calls.

The queue's submit, status, result and cancel calls are short requests with short JSON
answers, hundreds a second at zero service time. Through httpcore each one costs a scan
of the whole pool, h11's event machinery and several anyio cancel scopes; through httpx's
``Request`` and ``Response`` it costs a URL parse and two header tables more.
:class:`KeepAliveTransport` does the same exchange with less: a stack of idle connections
per origin (the last returned is the next used), one ``poll(0)`` on the one connection it
takes, the request written in one piece, and the answer parsed from the bytes
(:class:`runner.fal.http1.ResponseParser`).

Two drivers under one pool. On asyncio a connection is an ``asyncio.Protocol``: the loop
feeds the parser as bytes arrive and wakes the caller once, when the response is whole;
the timeout is one timer. (anyio's byte stream pauses and resumes reading around every
receive, two ``epoll_ctl`` calls, and a cancel scope per call costs as much as the call.)
On any other anyio backend a connection is an anyio byte stream read in a loop under
``fail_after``.

It is an ``httpx.AsyncBaseTransport`` and speaks httpx's errors, so it is swappable: the
:class:`runner.fal.client.QueueClient` takes it for its one-shot calls only, and calls
:meth:`KeepAliveTransport.call` with the request already in bytes. Streams (SSE), storage
uploads and downloads stay on httpx. It refuses what it does not do (a streaming request
body, ``Expect``; HTTP/1.0 servers are fine but their connections are not reused) rather
than half-doing it; a response without a length is read to the close.
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import httpx

from runner.fal.http1 import RawHeaders, ResponseParser, request_head

_DEFAULT_PORTS = {b"http": 80, b"https": 443}
_READ = 65536
Origin = tuple[bytes, bytes, int]  # scheme, host, port
Exchanged = tuple[int, RawHeaders, bytes, bool]  # status, headers, body, reusable


class _Idle:
    """What the pool needs of a connection between calls."""

    __slots__ = ("idle_since", "poll", "sock")

    def __init__(self, sock: Any) -> None:
        self.idle_since = 0.0
        # asyncio's socket wrapper or the raw socket: fileno() is all that is used.
        self.sock = sock
        self.poll: Any = None
        if sock is not None and hasattr(select, "poll"):
            self.poll = select.poll()
            self.poll.register(sock.fileno(), select.POLLIN)

    def is_readable(self) -> bool:
        """Data or a close waiting while idle: the server hung up (or broke the protocol)."""
        if self.sock is None or self.sock.fileno() < 0:
            return True
        if self.poll is None:
            return False
        return bool(self.poll.poll(0))


class _WireConn(asyncio.Protocol, _Idle):
    """One connection on asyncio: the loop feeds the parser; the caller wakes once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        _Idle.__init__(self, None)
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser: ResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.broken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        _Idle.__init__(self, transport.get_extra_info("socket"))

    def is_readable(self) -> bool:
        return self.broken or _Idle.is_readable(self)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            self.broken = True  # bytes nobody asked for: the connection is not reusable
            return
        try:
            if parser.feed(data):
                self._wake(None)
        except httpx.HTTPError as exc:
            self._wake(exc)

    def eof_received(self) -> bool:
        self._ended(None)
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)

    def _ended(self, exc: Exception | None) -> None:
        self.broken = True
        parser = self._parser
        if parser is None or parser.done:
            return
        if exc is not None:
            self._wake(httpx.ReadError(repr(exc)))
            return
        try:
            parser.feed_eof()
        except httpx.HTTPError as error:
            self._wake(error)
        else:
            self._wake(None)

    def _wake(self, exc: Exception | None) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)

    def _time_out(self) -> None:
        self._wake(httpx.ReadTimeout("timed out"))

    async def exchange(self, data: bytes, method: str, timeout_s: float | None) -> Exchanged:
        if self.broken or self.transport is None:
            raise httpx.WriteError("connection closed")
        parser = ResponseParser(method)
        waiter = self._loop.create_future()
        self._parser, self._waiter = parser, waiter
        timer = self._loop.call_later(timeout_s, self._time_out) if timeout_s is not None else None
        try:
            self.transport.write(data)
            await waiter
        finally:
            self._parser = self._waiter = None
            if timer is not None:
                timer.cancel()
        return parser.status, parser.headers, parser.body, parser.keep and not parser.spare

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _StreamConn(_Idle):
    """One connection on any other anyio backend: a byte stream read in a loop."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)  # noqa: S610
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(sock)
        self.stream = stream

    async def exchange(self, data: bytes, method: str, timeout_s: float | None) -> Exchanged:
        parser = ResponseParser(method)
        sent = False
        try:
            with anyio.fail_after(timeout_s):
                await self.stream.send(data)
                sent = True
                while True:
                    try:
                        chunk = await self.stream.receive(_READ)
                    except anyio.EndOfStream:
                        parser.feed_eof()
                        break
                    if parser.feed(chunk):
                        break
        except TimeoutError as exc:
            raise (httpx.ReadTimeout if sent else httpx.WriteTimeout)("timed out") from exc
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError) as exc:
            raise (httpx.ReadError if sent else httpx.WriteError)(repr(exc)) from exc
        return parser.status, parser.headers, parser.body, parser.keep and not parser.spare

    async def close(self) -> None:
        """At once (for TLS: without waiting for the close_notify)."""
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await anyio.aclose_forcefully(self.stream)  # a broken one: nothing left to do


_Conn = _WireConn | _StreamConn


@dataclass(slots=True)
class KeepAliveStats:
    """Connections opened and reused; idle ones dropped as expired or closed by the server."""

    opened: int = 0
    reused: int = 0
    dropped: int = 0


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over a small stack of kept-alive connections per origin (plain or TLS)."""

    def __init__(
        self,
        *,
        max_idle: int = 32,
        keepalive_expiry_s: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle: dict[Origin, list[_Conn]] = {}
        self._max_idle = max_idle
        self._expiry_s = keepalive_expiry_s
        self._ssl = ssl_context
        self._clock = clock
        self.stats = KeepAliveStats()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.raw_scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}")
        timeouts = request.extensions.get("timeout") or {}
        head = request_head(request.method, url.raw_path, request.headers.raw)
        body = request.content  # raises httpx.RequestNotRead for a streaming body
        status, headers, content = await self.call(
            (scheme, url.raw_host, url.port or _DEFAULT_PORTS[scheme]),
            head + body if body else head,
            method=request.method,
            label=f"{request.method} {url}",
            timeout_s=_longest(timeouts.get("write"), timeouts.get("read")),
            connect_timeout_s=timeouts.get("connect"),
        )
        return httpx.Response(
            status_code=status,
            headers=headers,
            content=content,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def call(
        self,
        origin: Origin,
        data: bytes,
        *,
        method: str,
        label: str,
        timeout_s: float | None,
        connect_timeout_s: float | None,
    ) -> tuple[int, RawHeaders, bytes]:
        """Send one request already in bytes (head and body) to ``origin``; its answer.

        ``label`` names the call in errors; ``timeout_s`` bounds the exchange (sending
        and the whole answer), ``connect_timeout_s`` a new connection."""
        conn = await self._take(origin)
        if conn is None:
            conn = await self._connect(origin, connect_timeout_s)
        try:
            status, headers, body, reusable = await conn.exchange(data, method, timeout_s)
        except BaseException as exc:
            await conn.close()
            if isinstance(exc, httpx.TransportError):
                raise type(exc)(f"{label}: {exc}") from exc
            raise
        if reusable:
            await self._give(origin, conn)
        else:
            await conn.close()
        return status, headers, body

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.close()

    # --- the pool: a stack per origin ----------------------------------------------------

    async def _take(self, origin: Origin) -> _Conn | None:
        conns = self._idle.get(origin)
        now = self._clock()
        while conns:
            conn = conns.pop()
            if now - conn.idle_since < self._expiry_s and not conn.is_readable():
                self.stats.reused += 1
                return conn
            self.stats.dropped += 1
            await conn.close()
        return None

    async def _give(self, origin: Origin, conn: _Conn) -> None:
        conns = self._idle.setdefault(origin, [])
        if len(conns) >= self._max_idle:
            await conn.close()
            return
        conn.idle_since = self._clock()
        conns.append(conn)

    async def _connect(self, origin: Origin, timeout: float | None) -> _Conn:
        scheme, host, port = origin
        hostname = host.decode("ascii")
        context = None
        if scheme == b"https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            context = self._ssl
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # not asyncio: anyio's streams
        try:
            with anyio.fail_after(timeout):
                if loop is not None:
                    _, wire = await loop.create_connection(
                        lambda: _WireConn(loop), hostname, port, ssl=context,
                        server_hostname=hostname if context is not None else None,
                    )  # fmt: skip
                    conn: _Conn = wire
                elif context is not None:
                    conn = _StreamConn(await anyio.connect_tcp(
                        hostname, port, ssl_context=context, tls_hostname=hostname
                    ))  # fmt: skip
                else:
                    conn = _StreamConn(await anyio.connect_tcp(hostname, port))
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connect to {hostname}:{port} timed out") from exc
        except (OSError, anyio.BrokenResourceError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"connect to {hostname}:{port}: {exc}") from exc
        self.stats.opened += 1
        return conn


def _longest(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if len(present) == len(values) else None
