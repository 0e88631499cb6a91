"""runner.fal.transport over real loopback sockets: the lean readability check, the pool
dropping connections the server closed, httpx's error types, TLS, and the proxy choice."""

from __future__ import annotations

import select
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import httpcore
import httpx
import pytest
from pydantic import SecretStr

from runner.emulator import DEFAULT_KEY, Emulator, EmulatorConfig, ServiceTime, serve
from runner.fal.client import QueueClient
from runner.fal.transport import (
    LeanBackend,
    LeanStream,
    PoolTransport,
    environment_proxy,
    fetch,
    open_transport,
)

pytestmark = pytest.mark.anyio
LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"

Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]


@asynccontextmanager
async def listening(handler: Handler) -> AsyncIterator[int]:
    """A raw TCP server on loopback running ``handler`` per connection; yields the port."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


async def read_request(conn: anyio.abc.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await conn.receive()
    return data


async def test_lean_stream_readability_follows_the_socket() -> None:
    events: dict[str, anyio.Event] = {k: anyio.Event() for k in ("send", "sent", "close")}

    async def handler(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            await events["send"].wait()
            await conn.send(b"x")
            events["sent"].set()
            await events["close"].wait()

    async with listening(handler) as port:
        stream = await LeanBackend().connect_tcp("127.0.0.1", port, timeout=5)
        assert isinstance(stream, LeanStream)
        assert stream.get_extra_info("is_readable") is False  # idle, nothing sent
        events["send"].set()
        await events["sent"].wait()
        with anyio.fail_after(5):
            while not stream.get_extra_info("is_readable"):  # noqa: ASYNC110 (the check itself)
                await anyio.sleep(0.001)
        assert await stream.read(10, timeout=5) == b"x"
        assert stream.get_extra_info("is_readable") is False
        events["close"].set()  # the server hangs up: readable (a read would return b"")
        with anyio.fail_after(5):
            while not stream.get_extra_info("is_readable"):  # noqa: ASYNC110 (the check itself)
                await anyio.sleep(0.001)
        assert stream.get_extra_info("socket") is not None  # other keys pass through
        await stream.aclose()
        assert stream.get_extra_info("is_readable") is True  # closed: the pool drops it


class _Inner(httpcore.AsyncNetworkStream):
    """A stream that only answers get_extra_info, counting readability questions."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock, self.asked = sock, 0

    def get_extra_info(self, info: str) -> object:
        if info == "is_readable":
            self.asked += 1
            return False
        return self.sock if info == "socket" else None


def test_without_poll_the_inner_stream_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair()
    with a, b:
        monkeypatch.delattr(select, "poll")
        inner = _Inner(a)
        assert LeanStream(inner).is_readable() is False and inner.asked == 1
    no_socket = _Inner(None)
    assert LeanStream(no_socket).is_readable() is True and no_socket.asked == 0


async def test_the_pool_replaces_a_connection_the_server_closed_while_idle() -> None:
    """The server answers one request per connection and hangs up without saying so;
    the next call must go out on a new connection, not fail on the dead one."""
    connections = 0

    async def handler(conn: anyio.abc.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with conn:
            await read_request(conn)
            await conn.send(OK)

    async with listening(handler) as port, PoolTransport(limits=LIMITS) as transport:
        url = f"http://127.0.0.1:{port}/x"
        for _ in range(3):
            response = await fetch(transport, httpx.Request("POST", url, json={"a": 1}))
            assert response.status_code == 200 and response.json() == {}
            assert response.request.method == "POST"
            await anyio.sleep(0.05)  # let the hang-up arrive before the next call
    assert connections == 3


async def test_keep_alive_reuses_one_connection() -> None:
    connections = 0

    async def handler(conn: anyio.abc.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with conn:
            while True:
                await read_request(conn)
                await conn.send(OK)

    async with listening(handler) as port, PoolTransport(limits=LIMITS) as transport:
        for _ in range(5):
            response = await fetch(transport, httpx.Request("GET", f"http://127.0.0.1:{port}/"))
            assert response.status_code == 200
    assert connections == 1


async def test_errors_arrive_as_httpx_errors() -> None:
    async def hang_up(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            await read_request(conn)

    async def silent(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            await read_request(conn)
            await anyio.sleep(10)

    async with PoolTransport(limits=LIMITS) as transport:
        async with listening(hang_up) as port:
            with pytest.raises(httpx.RemoteProtocolError) as remote:
                await fetch(transport, httpx.Request("GET", f"http://127.0.0.1:{port}/"))
            assert isinstance(remote.value.__cause__, httpcore.RemoteProtocolError)
        async with listening(silent) as port:
            quick = {"timeout": {"connect": 5.0, "read": 0.05, "write": 5.0, "pool": 5.0}}
            request = httpx.Request("GET", f"http://127.0.0.1:{port}/", extensions=quick)
            with pytest.raises(httpx.ReadTimeout):
                await fetch(transport, request)
        closed = port  # nothing listens there any more
        with pytest.raises(httpx.ConnectError):
            await fetch(transport, httpx.Request("GET", f"http://127.0.0.1:{closed}/"))


async def test_queue_calls_over_tls_and_the_status_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default transport trusts ``SSL_CERT_FILE`` as httpx does (and certifi without)."""
    config = EmulatorConfig(time_scale=0.001, service=ServiceTime(fixed_s=1.0))
    async with serve(Emulator(config), tls=True) as served:
        assert served.cert_file is not None
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            async with PoolTransport(limits=LIMITS) as untrusting:
                await fetch(untrusting, httpx.Request("GET", served.base_url + "/_emulator/stats"))
        monkeypatch.setenv("SSL_CERT_FILE", str(served.cert_file))
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        transport = open_transport(served.base_url, limits=LIMITS)
        assert isinstance(transport, PoolTransport)
        async with transport:
            client = QueueClient(transport, queue_url=served.base_url, key=SecretStr(DEFAULT_KEY))
            ack = await client.submit("fal-ai/flux-lora", {"prompt": "over tls"})
            async with client.stream(ack) as events:
                statuses = [type(status).__name__ async for status in events]
            result = await client.result(ack)
    assert statuses[-1] == "Completed"
    assert result.status_code == 200 and result.body["prompt"] == "over tls"


def test_the_environment_proxy_is_used_unless_the_host_is_exempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    assert environment_proxy("https://queue.fal.run") is None
    assert isinstance(open_transport("https://queue.fal.run", limits=LIMITS), PoolTransport)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert environment_proxy("https://queue.fal.run") == "http://proxy.internal:3128"
    assert environment_proxy("http://127.0.0.1:8000") is None  # no proxy for http
    chosen = open_transport("https://queue.fal.run", limits=LIMITS)
    assert isinstance(chosen, httpx.AsyncHTTPTransport)
    monkeypatch.setenv("ALL_PROXY", "http://all.internal:3128")
    assert environment_proxy("http://127.0.0.1:8000") == "http://all.internal:3128"
    monkeypatch.setenv("NO_PROXY", "queue.fal.run,127.0.0.1")
    assert environment_proxy("https://queue.fal.run") is None
    assert environment_proxy("http://127.0.0.1:8000") is None
