"""runner.fal.keepalive over real loopback sockets: keep-alive reuse, connections the server
closed, bodies by length, chunks and close, httpx's error types, TLS with the emulator."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import httpx
import pytest
from pydantic import SecretStr

from runner.emulator import DEFAULT_KEY, Emulator, EmulatorConfig, ServiceTime, serve
from runner.fal.client import QueueClient
from runner.fal.keepalive import KeepAliveTransport
from runner.fal.transport import fetch, open_call_transport

pytestmark = pytest.mark.anyio
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"
Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]


@asynccontextmanager
async def listening(handler: Handler) -> AsyncIterator[int]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def quietly(conn: anyio.abc.SocketStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            await handler(conn)  # until the client hangs up

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, quietly)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


async def read_request(conn: anyio.abc.SocketStream, buffer: bytearray) -> bytes:
    """One request (head and a Content-Length body) from the connection."""
    while b"\r\n\r\n" not in buffer:
        buffer += await conn.receive()
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(buffer) < end + length:
        buffer += await conn.receive()
    request = bytes(buffer[: end + length])
    del buffer[: end + length]
    return request


async def test_keep_alive_reuses_one_connection_and_sends_the_request_whole() -> None:
    connections, seen = 0, []

    async def handler(conn: anyio.abc.SocketStream) -> None:
        nonlocal connections
        connections += 1
        buffer = bytearray()
        async with conn:
            while True:
                seen.append(await read_request(conn, buffer))
                await conn.send(OK)

    async with listening(handler) as port, KeepAliveTransport() as transport:
        for i in range(5):
            request = httpx.Request("POST", f"http://127.0.0.1:{port}/a/b?x=1", json={"i": i})
            response = await fetch(transport, request)
            assert response.status_code == 200 and response.json() == {}
            assert response.request is request
    assert connections == 1
    assert (transport.stats.opened, transport.stats.reused) == (1, 4)
    assert seen[4].startswith(b"POST /a/b?x=1 HTTP/1.1\r\n")
    assert b"\r\nhost: 127.0.0.1:" in seen[4].lower()
    assert seen[4].endswith(b'\r\n\r\n{"i":4}')


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    connections = 0

    async def handler(conn: anyio.abc.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with conn:
            await read_request(conn, bytearray())
            await conn.send(OK)  # and hang up without saying so

    async with listening(handler) as port, KeepAliveTransport() as transport:
        for _ in range(3):
            response = await fetch(transport, httpx.Request("GET", f"http://127.0.0.1:{port}/"))
            assert response.status_code == 200
            await anyio.sleep(0.05)  # let the hang-up arrive
    assert connections == 3
    assert transport.stats.dropped == 2


@pytest.mark.parametrize(
    ("answer", "body", "reused"),
    [
        (b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"4;ext=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nX-Trailer: y\r\n\r\n", b'{"a":1}', True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc", b"abc", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc", b"abc", False),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz", b"z", True),
    ],
)  # fmt: skip
async def test_bodies_by_chunks_length_and_close(answer: bytes, body: bytes, reused: bool) -> None:
    async def handler(conn: anyio.abc.SocketStream) -> None:
        buffer = bytearray()
        async with conn:
            while True:
                await read_request(conn, buffer)
                for i in range(0, len(answer), 7):  # in pieces, as a network may
                    await conn.send(answer[i : i + 7])

    async with listening(handler) as port, KeepAliveTransport() as transport:
        for _ in range(2):
            response = await fetch(transport, httpx.Request("GET", f"http://127.0.0.1:{port}/"))
            assert response.content == body
    assert transport.stats.reused == (1 if reused else 0)


async def test_a_body_without_a_length_is_read_to_the_close() -> None:
    async def handler(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            await read_request(conn, bytearray())
            await conn.send(b"HTTP/1.1 200 OK\r\n\r\nall of it")

    async with listening(handler) as port, KeepAliveTransport() as transport:
        response = await fetch(transport, httpx.Request("GET", f"http://127.0.0.1:{port}/"))
    assert response.content == b"all of it"


async def test_errors_arrive_as_httpx_errors() -> None:
    async def hang_up(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            await read_request(conn, bytearray())

    async def silent(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            await read_request(conn, bytearray())
            await anyio.sleep(10)

    async def garbage(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            await read_request(conn, bytearray())
            await conn.send(b"SMTP ready\r\n\r\n")

    async with KeepAliveTransport() as transport:
        async with listening(hang_up) as port:
            with pytest.raises(httpx.RemoteProtocolError, match="closed the connection"):
                await fetch(transport, httpx.Request("GET", f"http://127.0.0.1:{port}/"))
        async with listening(garbage) as port:
            with pytest.raises(httpx.RemoteProtocolError, match="bad status line"):
                await fetch(transport, httpx.Request("GET", f"http://127.0.0.1:{port}/"))
        async with listening(silent) as port:
            quick = {"timeout": {"connect": 5.0, "read": 0.05, "write": 0.05, "pool": 5.0}}
            request = httpx.Request("GET", f"http://127.0.0.1:{port}/", extensions=quick)
            with pytest.raises(httpx.ReadTimeout):
                await fetch(transport, request)
        closed = port  # nothing listens there any more
        with pytest.raises(httpx.ConnectError):
            await fetch(transport, httpx.Request("GET", f"http://127.0.0.1:{closed}/"))
        with pytest.raises(httpx.UnsupportedProtocol):
            await fetch(transport, httpx.Request("GET", "ftp://127.0.0.1/"))
        header = httpx.Request("GET", f"http://127.0.0.1:{closed}/", headers={"Expect": "x"})
        with pytest.raises(httpx.LocalProtocolError):
            await fetch(transport, header)
    assert transport.stats.reused == 0


async def test_queue_calls_over_tls_with_the_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Submit, status and result on the lean transport over TLS; the stream stays on httpx."""
    config = EmulatorConfig(time_scale=0.001, service=ServiceTime(fixed_s=1.0))
    async with serve(Emulator(config), tls=True) as served:
        assert served.cert_file is not None
        async with KeepAliveTransport() as untrusting:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await fetch(untrusting, httpx.Request("GET", served.base_url + "/_emulator/stats"))
        monkeypatch.setenv("SSL_CERT_FILE", str(served.cert_file))
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        calls = open_call_transport(served.base_url, max_idle=4)
        assert isinstance(calls, KeepAliveTransport)
        async with calls, httpx.AsyncHTTPTransport() as streams:
            client = QueueClient(
                streams, queue_url=served.base_url, key=SecretStr(DEFAULT_KEY), calls=calls
            )
            ack = await client.submit("fal-ai/flux-lora", {"prompt": "lean over tls"})
            async with client.stream(ack) as events:
                statuses = [type(status).__name__ async for status in events]
            status = await client.status(ack)
            result = await client.result(ack)
    assert statuses[-1] == "Completed" and type(status).__name__ == "Completed"
    assert result.status_code == 200 and result.body["prompt"] == "lean over tls"
    assert calls.stats.opened == 1 and calls.stats.reused == 2


def test_a_proxy_keeps_every_call_on_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert open_call_transport("https://queue.fal.run", max_idle=4) is None
