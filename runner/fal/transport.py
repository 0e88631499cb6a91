"""The HTTP transport under the runner's calls: httpcore's pool behind httpx's interface,
with a cheaper idle-connection check, and :func:`fetch` for one whole call.

Why not ``httpx.AsyncHTTPTransport`` as is: every time httpcore's pool hands out or takes
back a connection it asks each pooled connection whether it has expired, and for an idle
one that means asking the anyio stream for its raw socket. anyio answers by building a
dict of attribute getters and calling ``getpeername()``, then httpcore makes a poll
object. Over ~20 pooled connections at a few hundred calls per second that was ~20% of
the runner's CPU (py-spy over ``bench/bench_overhead.py``). :class:`LeanBackend` wraps
httpcore's own anyio backend and keeps each stream's socket and poll object, so the check
is one ``poll(0)`` with the same answer. httpx does not let its transport take a network
backend, hence :class:`PoolTransport`: the same request and response mapping and the same
exception mapping as httpx's, over a pool built with that backend.

Both lean on httpcore's internals: the stream's undocumented ``"socket"`` extra-info key and
the pool asking ``get_extra_info("is_readable")``. Should a release change either, the pool
would quietly stop using the ``poll(0)`` path, so :func:`lean_check_engaged` checks it once
per process with a canary (two keep-alive calls to a throwaway server on 127.0.0.1, counting
the checks the ``poll(0)`` path answered; see :class:`ReadabilityChecks`), and
:func:`open_transport` falls back to ``httpx.AsyncHTTPTransport`` when it is not engaged.

:func:`fetch` sends one request straight to a transport and reads the whole answer. The
queue's short calls skip ``AsyncClient``'s auth, redirect and cookie layers, which they
do not use: the key is a header, and the queue neither redirects nor sets cookies.

:class:`CallTimeouts` turns each kind of call's timeouts into the request extension the
transport reads. :func:`open_transport` builds the default transport. When the environment
names a proxy for the queue's origin (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, less
``NO_PROXY``) it is httpx's own transport through that proxy instead, for every call of
the run.
"""

# httpcore's stream and backend interface takes ``timeout`` arguments; these pass them on.
# ruff: noqa: ASYNC109

from __future__ import annotations

import functools
import logging
import select
import socket
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import httpcore
import httpx

from runner.fal.keepalive import KeepAliveTransport

log = logging.getLogger(__name__)

# httpcore's errors and httpx's, most specific first (the first match wins).
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CallTimeouts:
    """Per-kind timeouts. ``stream_idle_s`` bounds silence on the SSE stream; the queue
    sends a keep-alive every 15 s, so a longer silence means the stream is dead."""

    connect_s: float = 5.0
    submit_s: float = 30.0
    read_s: float = 30.0
    stream_idle_s: float = 45.0

    def extensions(self) -> dict[str, dict[str, dict[str, float | None]]]:
        """Each kind's timeouts as the request extension a transport reads."""
        kinds = {"submit": self.submit_s, "read": self.read_s, "stream": self.stream_idle_s}
        return {
            kind: {"timeout": httpx.Timeout(seconds, connect=self.connect_s).as_dict()}
            for kind, seconds in kinds.items()
        }


@contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for core, ours in _ERRORS:
            if isinstance(exc, core):
                raise ours(str(exc)) from exc
        raise


@dataclass(slots=True)
class ReadabilityChecks:
    """How a :class:`LeanBackend`'s streams answered the pool's idle checks: ``lean`` by
    their own ``poll(0)``, ``delegated`` by asking httpcore's stream (no socket found through
    its extra info, or no ``poll()`` on this platform)."""

    lean: int = 0
    delegated: int = 0


class LeanStream(httpcore.AsyncNetworkStream):
    """httpcore's stream with its socket kept: ``is_readable`` is one ``poll(0)``."""

    def __init__(
        self, inner: httpcore.AsyncNetworkStream, checks: ReadabilityChecks | None = None
    ) -> None:
        self._inner = inner
        self._checks = checks if checks is not None else ReadabilityChecks()
        self._socket: socket.socket | None = inner.get_extra_info("socket")
        self._poll: Any = None
        if self._socket is not None and self._socket.fileno() >= 0 and hasattr(select, "poll"):
            self._poll = select.poll()
            self._poll.register(self._socket.fileno(), select.POLLIN)

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
        tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return LeanStream(tls, self._checks)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return self.is_readable()
        return self._inner.get_extra_info(info)

    def is_readable(self) -> bool:
        """Whether a read would return at once: data, or the end of a connection the server
        closed. A closed socket counts as readable, as in httpcore, so the pool drops it.
        Without a socket or ``poll()``, httpcore's stream answers (its own, slower way)."""
        if self._poll is None:
            self._checks.delegated += 1
            return self._inner.get_extra_info("is_readable") is True
        if self._socket is None or self._socket.fileno() < 0:
            return True
        self._checks.lean += 1
        return bool(self._poll.poll(0))


class LeanBackend(httpcore.AsyncNetworkBackend):
    """httpcore's anyio backend, its streams wrapped in :class:`LeanStream`; ``checks``
    tallies how all of them answered the pool's idle checks."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()
        self.checks = ReadabilityChecks()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return LeanStream(stream, self.checks)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return LeanStream(stream, self.checks)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterator[bytes] | Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            with _mapped():
                await self._stream.aclose()


class PoolTransport(httpx.AsyncBaseTransport):
    """An httpx transport over ``httpcore.AsyncConnectionPool`` with :class:`LeanBackend`
    (HTTP/1.1, TLS verified as httpx verifies it: certifi, or ``SSL_CERT_FILE``)."""

    def __init__(
        self,
        *,
        limits: httpx.Limits,
        ssl_context: ssl.SSLContext | None = None,
        backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context if ssl_context is not None else httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend if backend is not None else LeanBackend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _mapped():
            answer = await self._pool.handle_async_request(core)
        return httpx.Response(
            status_code=answer.status,
            headers=answer.headers,
            stream=_ResponseStream(answer.stream),
            extensions=answer.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url``'s origin, or None."""
    target = httpx.URL(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(target.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(target.host):
        return None
    return proxy


# The canary's server: one fixed, empty answer per request, over keep-alive.
_CANARY_ANSWER = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
# Loopback answers in milliseconds; past this the canary gives up and the verdict is "no".
_CANARY_TIMEOUT_S = 2.0


async def _answer_forever(conn: anyio.abc.SocketStream) -> None:
    async with conn:
        data = b""
        while True:
            try:
                data += await conn.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            while b"\r\n\r\n" in data:
                _, data = data.split(b"\r\n\r\n", 1)
                await conn.send(_CANARY_ANSWER)


async def count_lean_checks(
    *, inner: httpcore.AsyncNetworkBackend | None = None
) -> ReadabilityChecks:
    """Two calls, one after the other, through a :class:`PoolTransport` over a
    :class:`LeanBackend` (wrapping ``inner``, httpcore's anyio backend by default) to a
    throwaway server on 127.0.0.1; how the pool's idle checks were answered."""
    backend = LeanBackend(inner)
    with anyio.fail_after(_CANARY_TIMEOUT_S):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 (not Django)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, _answer_forever)
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            # Plain HTTP: a bare TLS context spares loading certifi's bundle (~40 ms).
            bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            async with PoolTransport(limits=limits, ssl_context=bare, backend=backend) as transport:
                for _ in range(2):
                    await fetch(transport, httpx.Request("GET", f"http://127.0.0.1:{port}/"))
            tg.cancel_scope.cancel()
    return backend.checks


def probe_lean_check(*, inner: httpcore.AsyncNetworkBackend | None = None) -> bool:
    """The canary, uncached: whether :func:`count_lean_checks` saw the ``poll(0)`` path
    answer. It runs on an event loop of its own in a worker thread, so a caller already
    inside one may call it; that caller's loop waits for it (a few ms, once per process).
    Any failure (no loopback, a timeout, a changed httpcore) is a "no", noted at debug."""
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lean-canary") as worker:
            canary = functools.partial(count_lean_checks, inner=inner)
            checks = worker.submit(anyio.run, canary).result()
    except Exception as exc:
        log.debug("lean transport canary failed: %r", exc)
        return False
    elapsed_ms = (time.perf_counter() - started) * 1000
    log.debug("lean transport canary: %s in %.1f ms", checks, elapsed_ms)
    return checks.lean > 0


@functools.cache
def lean_check_engaged() -> bool:
    """:func:`probe_lean_check`'s verdict, found once per process and kept."""
    return probe_lean_check()


def open_transport(
    queue_url: str,
    *,
    limits: httpx.Limits,
    lean_engaged: Callable[[], bool] = lean_check_engaged,
    ssl_context: ssl.SSLContext | None = None,
) -> httpx.AsyncBaseTransport:
    """:class:`PoolTransport`; httpx's own through the environment's proxy; or httpx's own
    when ``lean_engaged`` says the lean idle check would not be used, where PoolTransport
    is only httpx's work copied, for no gain and with more to go wrong.

    ``ssl_context``: a TLS context to share (building one loads the CA bundle, ~0.1-0.3
    CPU s); None: httpx's default, built here."""
    verify: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
    proxy = environment_proxy(queue_url)
    if proxy is not None:
        return httpx.AsyncHTTPTransport(limits=limits, proxy=proxy, verify=verify)
    if not lean_engaged():
        log.debug(
            "the lean idle-connection check is not in use with httpcore %s; "
            "using httpx.AsyncHTTPTransport",
            httpcore.__version__,
        )
        return httpx.AsyncHTTPTransport(limits=limits, verify=verify)
    return PoolTransport(limits=limits, ssl_context=ssl_context)


def open_call_transport(
    queue_url: str, *, max_idle: int, ssl_context: ssl.SSLContext | None = None
) -> httpx.AsyncBaseTransport | None:
    """The lean keep-alive transport for the queue's one-shot calls
    (:class:`runner.fal.keepalive.KeepAliveTransport`), or None when the environment names
    a proxy for the queue (then every call goes through :func:`open_transport`'s)."""
    if environment_proxy(queue_url) is not None:
        return None
    return KeepAliveTransport(max_idle=max_idle, ssl_context=ssl_context)


async def fetch(transport: httpx.AsyncBaseTransport, request: httpx.Request) -> httpx.Response:
    """Send ``request`` and read its whole answer; the connection goes back to the pool."""
    response = await transport.handle_async_request(request)
    try:
        await response.aread()
    finally:
        await response.aclose()
    response.request = request
    return response
