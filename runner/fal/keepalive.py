"""A lean HTTP/1.1 keep-alive transport for the queue's small JSON calls.

The queue's submit, status, result and cancel calls are short requests with short JSON
answers, hundreds a second at zero service time. Through httpcore each one costs a scan
of the whole pool (every connection asked whether it is idle, expired, readable), h11's
event machinery, and several anyio cancel scopes; cProfile over ``bench/bench_overhead.py``
put the transport at about half of the runner's CPU. :class:`KeepAliveTransport` does
the same exchange with less: a stack of idle connections per origin (the last returned is
the next used), one ``poll(0)`` on the one connection it takes, the request written in one
piece, and the answer parsed from the bytes (status line, headers, a ``Content-Length`` or
chunked body).

It is an ``httpx.AsyncBaseTransport`` and speaks httpx's errors, so it is swappable: the
:class:`runner.fal.client.QueueClient` takes it for its one-shot calls only. Streams (SSE),
storage uploads and downloads stay on httpx. It refuses what it does not do (a streaming
request body, ``Expect``, HTTP/1.0 servers are fine but their connections are not reused)
rather than half-doing it; a response without a length is read to the close.
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import httpx

_DEFAULT_PORTS = {b"http": 80, b"https": 443}
_READ = 65536
_HEAD_LIMIT = 64 * 1024  # bytes of status line and headers before the answer is refused
_NO_BODY = frozenset({204, 304})


@dataclass(slots=True)
class _Conn:
    stream: anyio.abc.ByteStream
    sock: Any  # socket.socket or asyncio's wrapper of it; None if the stream hides it
    poll: Any
    idle_since: float = 0.0
    buffer: bytearray = field(default_factory=bytearray)

    def is_readable(self) -> bool:
        """Data or a close waiting while idle: the server hung up (or broke the protocol)."""
        if self.sock is None or self.sock.fileno() < 0:
            return True
        if self.poll is None:
            return False
        return bool(self.poll.poll(0))


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
        self._idle: dict[tuple[bytes, bytes, int], list[_Conn]] = {}
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
        origin = (scheme, url.raw_host, url.port or _DEFAULT_PORTS[scheme])
        timeouts = request.extensions.get("timeout") or {}
        head = _request_head(request)
        conn = await self._take(origin)
        if conn is None:
            conn = await self._connect(origin, timeouts.get("connect"))
        try:
            status, headers, body, reusable = await self._exchange(conn, head, request, timeouts)
        except BaseException:
            await _close(conn)
            raise
        if reusable:
            await self._give(origin, conn)
        else:
            await _close(conn)
        return httpx.Response(
            status_code=status,
            headers=headers,
            content=body,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await _close(conn)

    # --- the pool: a stack per origin ----------------------------------------------------

    async def _take(self, origin: tuple[bytes, bytes, int]) -> _Conn | None:
        conns = self._idle.get(origin)
        now = self._clock()
        while conns:
            conn = conns.pop()
            if now - conn.idle_since < self._expiry_s and not conn.is_readable():
                self.stats.reused += 1
                return conn
            self.stats.dropped += 1
            await _close(conn)
        return None

    async def _give(self, origin: tuple[bytes, bytes, int], conn: _Conn) -> None:
        conns = self._idle.setdefault(origin, [])
        if len(conns) >= self._max_idle:
            await _close(conn)
            return
        conn.idle_since = self._clock()
        conns.append(conn)

    async def _connect(self, origin: tuple[bytes, bytes, int], timeout: float | None) -> _Conn:
        scheme, host, port = origin
        hostname = host.decode("ascii")
        try:
            with anyio.fail_after(timeout):
                if scheme == b"https":
                    if self._ssl is None:
                        self._ssl = httpx.create_ssl_context()
                    stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                        hostname, port, ssl_context=self._ssl, tls_hostname=hostname
                    )
                else:
                    stream = await anyio.connect_tcp(hostname, port)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connect to {hostname}:{port} timed out") from exc
        except (OSError, anyio.BrokenResourceError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"connect to {hostname}:{port}: {exc}") from exc
        # On asyncio this is the transport's socket wrapper: fileno() and setsockopt() work.
        sock: Any = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)  # noqa: S610
        poll = None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if hasattr(select, "poll"):
                poll = select.poll()
                poll.register(sock.fileno(), select.POLLIN)
        self.stats.opened += 1
        return _Conn(stream, sock, poll)

    # --- one exchange ---------------------------------------------------------------------

    async def _exchange(
        self, conn: _Conn, head: bytes, request: httpx.Request, timeouts: dict[str, Any]
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        body = request.content  # raises httpx.RequestNotRead for a streaming body
        wait = _longest(timeouts.get("write"), timeouts.get("read"))
        sent = False
        try:
            with anyio.fail_after(wait):
                await conn.stream.send(head + body if body else head)
                sent = True
                return await _read_response(conn, request.method)
        except TimeoutError as exc:
            kind = httpx.ReadTimeout if sent else httpx.WriteTimeout
            raise kind(f"{request.method} {request.url}: timed out") from exc
        except (OSError, anyio.BrokenResourceError, anyio.EndOfStream, ssl.SSLError) as exc:
            if not sent:
                raise httpx.WriteError(f"{request.method} {request.url}: {exc!r}") from exc
            raise httpx.ReadError(f"{request.method} {request.url}: {exc!r}") from exc
        except anyio.ClosedResourceError as exc:
            raise httpx.ReadError(f"{request.method} {request.url}: closed") from exc


def _longest(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if len(present) == len(values) else None


def _request_head(request: httpx.Request) -> bytes:
    url = request.url
    target = url.raw_path or b"/"
    lines = [request.method.encode("ascii") + b" " + target + b" HTTP/1.1"]
    for name, value in request.headers.raw:
        if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
            raise httpx.LocalProtocolError("header with a line break")
        if name.lower() == b"expect":
            raise httpx.LocalProtocolError("Expect is not supported here")
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _read_response(
    conn: _Conn, method: str
) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    while True:  # 1xx answers (none expected) are skipped
        status, version, headers = await _read_head(conn)
        if status >= 200:
            break
    length: int | None = None
    chunked = False
    keep = version == b"HTTP/1.1"
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise httpx.RemoteProtocolError(f"bad Content-Length {value!r}") from None
        elif lower == b"transfer-encoding":
            chunked = value.lower().endswith(b"chunked")
        elif lower == b"connection":
            token = value.lower()
            keep = b"close" not in token and (keep or b"keep-alive" in token)
    if method == "HEAD" or status in _NO_BODY:
        return status, headers, b"", keep
    if chunked:
        return status, headers, await _read_chunked(conn), keep
    if length is not None:
        return status, headers, await _read_exact(conn, length), keep
    return status, headers, await _read_to_close(conn), False


async def _fill(conn: _Conn) -> None:
    """Read more into the buffer; the server closing here is a protocol error."""
    data = await conn.stream.receive(_READ)
    if not data:
        raise anyio.EndOfStream
    conn.buffer += data


async def _read_head(conn: _Conn) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    while True:
        end = conn.buffer.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(conn.buffer) > _HEAD_LIMIT:
            raise httpx.RemoteProtocolError("response head too long")
        try:
            await _fill(conn)
        except anyio.EndOfStream:
            raise httpx.RemoteProtocolError(
                "server closed the connection before answering"
            ) from None
    raw = bytes(conn.buffer[:end])
    del conn.buffer[: end + 4]
    first, _, rest = raw.partition(b"\r\n")
    parts = first.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"bad status line {first[:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in rest.split(b"\r\n") if rest else ():
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"bad header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return int(parts[1]), parts[0], headers


async def _read_exact(conn: _Conn, size: int) -> bytes:
    while len(conn.buffer) < size:
        try:
            await _fill(conn)
        except anyio.EndOfStream:
            raise httpx.RemoteProtocolError("server closed the connection mid-body") from None
    body = bytes(conn.buffer[:size])
    del conn.buffer[:size]
    return body


async def _read_line(conn: _Conn) -> bytes:
    while (end := conn.buffer.find(b"\r\n")) < 0:
        if len(conn.buffer) > _HEAD_LIMIT:
            raise httpx.RemoteProtocolError("chunk line too long")
        try:
            await _fill(conn)
        except anyio.EndOfStream:
            raise httpx.RemoteProtocolError("server closed the connection mid-body") from None
    line = bytes(conn.buffer[:end])
    del conn.buffer[: end + 2]
    return line


async def _read_chunked(conn: _Conn) -> bytes:
    body = bytearray()
    while True:
        size_text = (await _read_line(conn)).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise httpx.RemoteProtocolError(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            while await _read_line(conn):  # trailers, up to the empty line
                pass
            return bytes(body)
        body += await _read_exact(conn, size)
        if await _read_line(conn):
            raise httpx.RemoteProtocolError("chunk not followed by CRLF")


async def _read_to_close(conn: _Conn) -> bytes:
    while True:
        try:
            await _fill(conn)
        except anyio.EndOfStream:
            body = bytes(conn.buffer)
            conn.buffer.clear()
            return body


async def _close(conn: _Conn) -> None:
    """Close a connection at once (for TLS: without waiting for the close_notify)."""
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await anyio.aclose_forcefully(conn.stream)  # a broken one: nothing left to do
