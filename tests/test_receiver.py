"""What a stranger's post can cost the receiver, before any signature is checked.

A post is answered from its headers alone unless they could be a fresh delivery (all four
signature headers, well formed, timestamp within the window); only then is its body read:
at most ``max_body_bytes`` of it (1 MiB by default), at most ``max_body_reads`` bodies at a
time, each within ``body_timeout_s``. Checked in process (httpx's ASGITransport pulls a
streamed body only as the app reads it, so a test can count what was read) and on a real
socket (the answer comes before the body is sent; memory stays flat while it is sent).
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from runner.emulator.webhooks import WebhookSigner, webhook_body
from runner.fal.jwks import StaticKeys
from runner.fal.receiver import webhook_server
from runner.fal.webhook import DEFAULT_MAX_BODY_BYTES, WebhookEvent, WebhookStats, build_app

NOW = 1_790_000_000
MiB = 1 << 20
FAL_KEY = Ed25519PrivateKey.generate()
FAL = WebhookSigner(FAL_KEY, user_id="user-1")
FORGER = WebhookSigner(user_id="user-1")  # well-formed headers, a key fal never published
KEYS = StaticKeys([FAL_KEY.public_key()])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn is asyncio-only; the in-process tests share the fixture


class PulledBody:
    """A streamed request body that counts the chunks the server pulled."""

    def __init__(self, chunks: int, size: int = MiB) -> None:
        self.chunks, self.size, self.pulled = chunks, size, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            yield b"x" * self.size


class App:
    """build_app behind httpx.ASGITransport, its clock at NOW."""

    def __init__(self, **limits: Any) -> None:
        self.stats = WebhookStats()
        self.send, self.events = anyio.create_memory_object_stream[WebhookEvent](16)
        app = build_app(
            keys=KEYS, events=self.send, stats=self.stats, wall_clock=lambda: NOW, **limits
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://webhook.test"
        )

    async def aclose(self) -> None:
        await self.client.aclose()
        self.send.close()
        self.events.close()


@pytest.fixture
async def app() -> AsyncIterator[App]:
    served = App()
    yield served
    await served.aclose()


def delivery(request_id: str, timestamp: float) -> tuple[bytes, dict[str, str]]:
    body = webhook_body(request_id, request_id, True, {"images": []}, None)
    return body, FAL.sign(request_id, int(timestamp), body)


def unfresh(kind: str) -> tuple[dict[str, str], str]:
    """Headers that cannot be a fresh delivery, and the reason they are refused for."""
    signed = FAL.sign("req-1", NOW, b"")
    if kind == "unsigned":
        return {}, "missing_header"
    if kind == "no_request_id":
        return {k: v for k, v in signed.items() if k != "X-Fal-Webhook-Request-Id"}, (
            "missing_header"
        )
    if kind == "signature_not_hex":
        return {**signed, "X-Fal-Webhook-Signature": "zz" * 64}, "bad_signature_format"
    if kind == "stale":
        return FAL.sign("req-1", NOW - 3600, b""), "stale"
    assert kind == "future"
    return FAL.sign("req-1", NOW + 3600, b""), "future"


UNFRESH = ["unsigned", "no_request_id", "signature_not_hex", "stale", "future"]


# --- in process ------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("kind", UNFRESH)
async def test_a_post_that_cannot_be_a_fresh_delivery_is_answered_with_its_body_unread(
    app: App, kind: str, declared: bool
) -> None:
    headers, reason = unfresh(kind)
    body = PulledBody(chunks=64)
    if declared:
        headers = {**headers, "Content-Length": str(64 * MiB)}
    response = await app.client.post("/", content=body, headers=headers)
    assert (response.status_code, response.json()) == (401, {"outcome": reason})
    assert body.pulled == 0
    assert app.stats.rejected == {reason: 1}


@pytest.mark.anyio
async def test_a_fresh_looking_post_is_read_no_further_than_1_mib_by_default(app: App) -> None:
    assert MiB == DEFAULT_MAX_BODY_BYTES
    fresh = FORGER.sign("req-1", NOW, b"")
    declared = PulledBody(chunks=4)
    headers = {**fresh, "Content-Length": str(4 * MiB)}
    response = await app.client.post("/", content=declared, headers=headers)
    assert (response.status_code, declared.pulled) == (413, 0)
    chunked = PulledBody(chunks=64, size=64 * 1024)
    response = await app.client.post("/", content=chunked, headers=fresh)
    assert (response.status_code, response.json()) == (413, {"outcome": "too_large"})
    assert chunked.pulled == 17  # 16 chunks are exactly 1 MiB: the 17th is one too many
    assert app.stats.rejected == {"too_large": 2}


@pytest.mark.anyio
async def test_at_most_max_body_reads_bodies_are_read_at_once() -> None:
    served = App(max_body_reads=2, body_timeout_s=60.0)
    gate = anyio.Event()
    answers: dict[str, int] = {}

    async def stalled() -> AsyncIterator[bytes]:
        yield b"{"
        await gate.wait()
        yield b"}"

    async def post(name: str, content: Any, headers: dict[str, str]) -> None:
        response = await served.client.post("/", content=content, headers=headers)
        answers[name] = response.status_code

    body, headers = delivery("req-1", NOW)
    waiting = PulledBody(chunks=1, size=2)
    try:
        async with anyio.create_task_group() as tg:
            for name in ("slow-1", "slow-2"):
                tg.start_soon(post, name, stalled(), FORGER.sign(name, NOW, b"{}"))
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(post, "genuine", body, headers)
            tg.start_soon(post, "third", waiting, FORGER.sign("req-3", NOW, b""))
            await anyio.wait_all_tasks_blocked()
            assert answers == {} and waiting.pulled == 0  # both readers are taken
            gate.set()
        assert answers == {"slow-1": 401, "slow-2": 401, "genuine": 200, "third": 401}
        assert waiting.pulled == 1
        assert [served.events.receive_nowait().request_id] == ["req-1"]
    finally:
        await served.aclose()


@pytest.mark.parametrize(
    "limits",
    [{"max_body_bytes": -1}, {"max_body_reads": 0}, {"body_timeout_s": 0.0}],
    ids=["negative size", "no reader", "no time"],
)
def test_limits_that_would_refuse_everything_are_a_value_error(limits: dict[str, Any]) -> None:
    send, receive = anyio.create_memory_object_stream[WebhookEvent](1)
    with send, receive, pytest.raises(ValueError, match="max_body_reads"):
        build_app(keys=KEYS, events=send, **limits)


# --- on a real socket ------------------------------------------------------------------


async def answer_of(stream: ByteStream) -> tuple[int, Any]:
    """Read one HTTP/1.1 answer with a Content-Length: its status and JSON body."""
    reader = BufferedByteReceiveStream(stream)
    head = (await reader.receive_until(b"\r\n\r\n", 65536)).decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in head[1:])
    body = await reader.receive_exactly(int(fields["content-length"]))
    return int(head[0].split()[1]), json.loads(body)


def request_head(port: int, headers: dict[str, str]) -> bytes:
    lines = ["POST /hook HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def send_chunked(stream: ByteStream, total: int) -> None:
    chunk = bytes(MiB)  # one buffer, sent over and over: the sender allocates nothing
    for _ in range(total // MiB):
        await stream.send(b"100000\r\n")
        await stream.send(chunk)
        await stream.send(b"\r\n")
    await stream.send(b"0\r\n\r\n")


@pytest.mark.anyio
async def test_the_server_answers_a_huge_post_before_any_of_its_body_is_sent() -> None:
    fresh = FORGER.sign("req-1", int(time.time()), b"")
    async with webhook_server("127.0.0.1", 0, keys=KEYS) as receiver, receiver.events:
        answers = []
        for headers in ({}, fresh):
            async with await anyio.connect_tcp("127.0.0.1", receiver.port) as stream:
                huge = {**headers, "Content-Length": str(1 << 40)}  # a terabyte, never sent
                await stream.send(request_head(receiver.port, huge))
                with anyio.fail_after(10):
                    answers.append(await answer_of(stream))
    assert answers == [(401, {"outcome": "missing_header"}), (413, {"outcome": "too_large"})]


@pytest.mark.anyio
async def test_a_client_still_sending_a_huge_body_gets_the_answer_and_keeps_its_connection() -> (
    None
):
    # The answer is sent while the client is still sending; the server then reads the rest
    # and drops it, so the client reads the answer (not a reset) and may post again.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield b"x" * MiB

    async with (
        webhook_server("127.0.0.1", 0, keys=KEYS) as receiver,
        receiver.events,
        httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as http,
    ):
        url = receiver.local_url
        fresh = FORGER.sign("req-1", int(time.time()), b"")
        statuses = [
            (await http.post(url, content=b"x" * 16 * MiB)).status_code,
            (await http.post(url, content=b"x" * 16 * MiB, headers=fresh)).status_code,
            (await http.post(url, content=chunks(), headers=fresh)).status_code,
        ]
        body, headers = delivery("req-1", time.time())
        statuses.append((await http.post(url, content=body, headers=headers)).status_code)
        assert statuses == [401, 413, 413, 200]
        assert receiver.events.receive_nowait().request_id == "req-1"
        assert receiver.stats.rejected == {"missing_header": 1, "too_large": 2}


@pytest.mark.anyio
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "fresh-looking"])
async def test_a_huge_post_holds_no_more_memory_than_the_cap(signed: bool) -> None:
    headers = FORGER.sign("req-1", int(time.time()), b"") if signed else {}
    headers["Transfer-Encoding"] = "chunked"
    async with (
        webhook_server("127.0.0.1", 0, keys=KEYS) as receiver,
        receiver.events,
        await anyio.connect_tcp("127.0.0.1", receiver.port) as stream,
    ):
        tracemalloc.start()
        try:
            await stream.send(request_head(receiver.port, headers))
            await send_chunked(stream, 32 * MiB)
            with anyio.fail_after(10):
                status, _ = await answer_of(stream)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert status == (413 if signed else 401)
    assert peak < 4 * MiB, f"{peak / MiB:.1f} MiB held while 32 MiB were posted"


@pytest.mark.anyio
async def test_a_slow_body_is_answered_408_and_frees_its_reader() -> None:
    async with (
        webhook_server("127.0.0.1", 0, keys=KEYS, max_body_reads=1, body_timeout_s=0.3) as receiver,
        receiver.events,
    ):
        fresh = FORGER.sign("req-1", int(time.time()), b"")
        async with await anyio.connect_tcp("127.0.0.1", receiver.port) as stream:
            await stream.send(request_head(receiver.port, {**fresh, "Content-Length": "100"}))
            await stream.send(b"{" * 10)  # then nothing: it holds the only reader
            with anyio.fail_after(10):
                assert await answer_of(stream) == (408, {"outcome": "slow_body"})
        body, headers = delivery("req-1", time.time())
        async with httpx.AsyncClient() as http:
            response = await http.post(receiver.local_url, content=body, headers=headers)
        assert response.status_code == 200
        assert receiver.stats.rejected == {"slow_body": 1}
