"""runner.fal.calls over real loopback sockets: the lean path sends the bytes httpx sends, and
reads answers (errors, compressed bodies, charsets) as the httpx path reads them."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import httpx
import pytest
from pydantic import SecretStr

from runner.errors import HTTPStatusError, ProtocolError
from runner.fal.client import QueueClient
from runner.fal.keepalive import KeepAliveTransport
from runner.fal.protocol import Completed
from tests.test_keepalive import listening, read_request

pytestmark = pytest.mark.anyio
KEY = "key-id:secret-for-calls"
RESULT = {
    "images": [{"url": "https://x/y.png", "width": 8, "height": 8, "content_type": "image/png"}],
    "seed": 3,
    "has_nsfw_concepts": [False],
    "timings": {"inference": 0.1},
}
Answerer = Callable[[bytes, int], bytes]


def answer(code: int, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {code} X", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def queue(request: bytes, port: int) -> bytes:
    """Just enough of the queue: an ack for a POST, COMPLETED, the result, a cancel."""
    line = request.split(b"\r\n", 1)[0].decode()
    method, target = line.split(" ")[:2]
    base = f"http://127.0.0.1:{port}/fal-ai/flux-lora/requests/r-1"
    if method == "POST":
        ack = {"request_id": "r-1", "status_url": f"{base}/status", "response_url": base,
               "cancel_url": f"{base}/cancel", "queue_position": 0}  # fmt: skip
        return answer(200, json.dumps(ack).encode(), "Content-Type: application/json")
    if method == "PUT":
        return answer(202, b'{"status": "CANCELLATION_REQUESTED"}')
    if target.startswith("/fal-ai/flux-lora/requests/r-1/status"):
        return answer(200, b'{"status": "COMPLETED", "logs": null}')
    return answer(200, json.dumps(RESULT).encode(), "X-Fal-Request-Id: r-1")


@asynccontextmanager
async def serving(answerer: Answerer) -> AsyncIterator[tuple[int, list[bytes]]]:
    seen: list[bytes] = []
    where = {"port": 0}

    async def handler(conn: anyio.abc.SocketStream) -> None:
        buffer = bytearray()
        async with conn:
            while True:
                request = await read_request(conn, buffer)
                seen.append(request)
                await conn.send(answerer(request, where["port"]))

    async with listening(handler) as port:
        where["port"] = port
        yield port, seen


class Detour(httpx.AsyncBaseTransport):
    """The same connections, but not a KeepAliveTransport: the client builds httpx requests."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)


def client_for(port: int, calls: httpx.AsyncBaseTransport) -> QueueClient:
    return QueueClient(
        httpx.MockTransport(lambda request: httpx.Response(599)),  # streams: unused here
        queue_url=f"http://127.0.0.1:{port}",
        key=SecretStr(KEY),
        calls=calls,
    )


async def every_call(client: QueueClient) -> None:
    ack = await client.submit(
        "fal-ai/flux-lora/dev", {"prompt": "ünïcode, \"quoted\"", "n": [1, 2.5, None]},
        webhook_url="https://hooks.example/path?a=1&b=two words", priority="low",
        start_timeout_s=30, extra_headers={"X-Trace": "t-1"},
    )  # fmt: skip
    await client.submit("fal-ai/flux-lora", {"prompt": "plain"})
    assert isinstance(await client.status(ack), Completed)
    await client.status(ack, logs=True)
    assert (await client.result(ack)).request_id == "r-1"
    assert (await client.peek_result(ack)).result is not None
    assert await client.cancel(ack) == "CANCELLATION_REQUESTED"


async def test_the_lean_path_sends_the_bytes_httpx_sends() -> None:
    async with serving(queue) as (port, seen), KeepAliveTransport() as transport:
        await every_call(client_for(port, transport))
        lean = list(seen)
        seen.clear()
        await every_call(client_for(port, Detour(transport)))
        through_httpx = list(seen)
    assert len(lean) == 7
    for mine, theirs in zip(lean, through_httpx, strict=True):
        assert mine == theirs
    assert lean[0].startswith(b"POST /fal-ai/flux-lora/dev?fal_webhook=https%3A%2F%2F")
    assert b"\r\nX-Fal-Queue-Priority: low\r\n" in lean[0]
    assert lean[-1].startswith(b"PUT ") and b"\r\nContent-Length: 0\r\n" in lean[-1]


async def test_a_url_httpx_would_rewrite_goes_through_httpx() -> None:
    async with serving(queue) as (port, seen), KeepAliveTransport() as transport:
        client = client_for(port, transport)
        ref = client.urls_for("fal-ai/flux-lora", "r-1")
        odd = ref.model_copy(update={"response_url": ref.response_url + "/x/../"})
        await client.result(odd)
    assert seen[0].startswith(b"GET /fal-ai/flux-lora/requests/r-1/ HTTP/1.1\r\n")


@pytest.mark.parametrize("lean", [True, False])
async def test_answers_read_the_same_on_both_paths(lean: bool) -> None:
    def answers(request: bytes, port: int) -> bytes:
        target = request.split(b" ", 2)[1]
        if b"/status" in target:
            return answer(429, "trop de requêtes".encode("latin-1"),
                          "Content-Type: text/plain; charset=latin-1", "Retry-After: 7",
                          "X-Fal-Request-Id: r-9")  # fmt: skip
        if request.startswith(b"POST"):
            return answer(200, b"not json")
        return answer(200, gzip.compress(json.dumps(RESULT).encode()), "Content-Encoding: gzip")

    async with serving(answers) as (port, _), KeepAliveTransport() as transport:
        client = client_for(port, transport if lean else Detour(transport))
        ref = client.urls_for("fal-ai/flux-lora", "r-1")
        with pytest.raises(HTTPStatusError) as caught:
            await client.status(ref)
        with pytest.raises(ProtocolError, match=r"POST http://127.0.0.1:\d+/fal-ai/x: submit ack"):
            await client.submit("fal-ai/x", {})
        result = await client.result(ref)
    error = caught.value
    assert (error.status_code, error.retry_after_s, error.request_id) == (429, 7.0, "r-9")
    assert error.body == "trop de requêtes"
    assert result.body == RESULT
