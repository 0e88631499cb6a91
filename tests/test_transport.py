"""runner.fal.transport over real loopback sockets: the lean readability check and the
canary that guards it, the pool dropping connections the server closed, httpx's error
types, TLS, and the transport choice (proxy, or httpx's own when the lean check is off)."""

# The socket-hiding fake implements httpcore's interface, whose methods take ``timeout``.
# ruff: noqa: ASYNC109

from __future__ import annotations

import logging
import select
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

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
    ReadabilityChecks,
    count_lean_checks,
    environment_proxy,
    fetch,
    lean_check_engaged,
    open_transport,
    probe_lean_check,
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
        inner, checks = _Inner(a), ReadabilityChecks()
        assert LeanStream(inner, checks).is_readable() is False and inner.asked == 1
        assert checks == ReadabilityChecks(lean=0, delegated=1)


def test_without_a_socket_the_inner_stream_answers() -> None:
    """No socket through the extra info (a changed httpcore): httpcore's own check answers,
    rather than "readable", which would have the pool drop every idle connection."""
    no_socket, checks = _Inner(None), ReadabilityChecks()
    assert LeanStream(no_socket, checks).is_readable() is False and no_socket.asked == 1
    assert checks == ReadabilityChecks(lean=0, delegated=1)


async def test_a_keep_alive_round_trip_is_answered_by_the_lean_poll() -> None:
    """The guard against a silent fallback: if a new httpcore stops handing over the socket
    or stops asking ``get_extra_info("is_readable")``, the lean count stays at 0 here."""
    connections = 0

    async def handler(conn: anyio.abc.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with conn:
            while True:
                await read_request(conn)
                await conn.send(OK)

    backend = LeanBackend()
    async with listening(handler) as port, PoolTransport(limits=LIMITS, backend=backend) as pool:
        for _ in range(2):
            response = await fetch(pool, httpx.Request("GET", f"http://127.0.0.1:{port}/"))
            assert response.status_code == 200
    assert connections == 1
    assert backend.checks.lean > 0 and backend.checks.delegated == 0


class _SocketHidingStream(httpcore.AsyncNetworkStream):
    """httpcore's real stream, minus the ``"socket"`` extra info (as if a release renamed it)."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _SocketHidingStream(
            await self._inner.start_tls(ssl_context, server_hostname, timeout)
        )

    def get_extra_info(self, info: str) -> object:
        return None if info == "socket" else self._inner.get_extra_info(info)


class _SocketHidingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _SocketHidingStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


async def test_the_canary_counts_lean_and_delegated_checks() -> None:
    engaged = await count_lean_checks()
    assert engaged.lean > 0 and engaged.delegated == 0
    hidden = await count_lean_checks(inner=_SocketHidingBackend())
    assert hidden.lean == 0 and hidden.delegated > 0


def test_the_canary_finds_the_lean_check_engaged_here() -> None:
    assert probe_lean_check() is True
    assert lean_check_engaged() is True
    assert lean_check_engaged.cache_info().currsize == 1  # once per process


def test_the_canary_says_no_when_the_socket_is_hidden(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="runner.fal.transport"):
        assert probe_lean_check(inner=_SocketHidingBackend()) is False
    assert "lean=0" in caplog.text


def test_without_the_lean_check_open_transport_is_httpx_own(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    with caplog.at_level(logging.DEBUG, logger="runner.fal.transport"):
        chosen = open_transport("https://queue.fal.run", limits=LIMITS, lean_engaged=lambda: False)
    assert type(chosen) is httpx.AsyncHTTPTransport
    [note] = [r for r in caplog.records if r.name == "runner.fal.transport"]
    assert note.levelno == logging.DEBUG and "not in use" in note.getMessage()
    caplog.clear()
    lean = open_transport("https://queue.fal.run", limits=LIMITS, lean_engaged=lambda: True)
    assert isinstance(lean, PoolTransport) and not caplog.records


def test_a_proxy_is_chosen_without_running_the_canary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    def unexpected() -> bool:
        raise AssertionError("the canary ran")

    chosen = open_transport("https://queue.fal.run", limits=LIMITS, lean_engaged=unexpected)
    assert isinstance(chosen, httpx.AsyncHTTPTransport)


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
