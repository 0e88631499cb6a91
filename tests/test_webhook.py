"""The webhook receiver: signature checks, JWKS caching, the Starlette app, the real server.

Deliveries are signed here with ``cryptography`` directly, following the byte layout in
the spec (docs/spec fal-queue.md, Webhooks), independently of runner.fal.webhook's code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import signal
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.emulator.webhooks import WebhookDispatcher, WebhookSigner, webhook_body
from runner.errors import FalError, ProtocolError, UsageError
from runner.fal.jwks import DEFAULT_JWKS_URL, JwksCache, StaticKeys, parse_jwks
from runner.fal.receiver import webhook_server
from runner.fal.webhook import (
    DeliveredIds,
    WebhookEvent,
    WebhookHeaders,
    WebhookRejected,
    WebhookStats,
    build_app,
    verify_signature,
)

NOW = 1_790_000_000
FAL_KEY = Ed25519PrivateKey.generate()
ROTATED_KEY = Ed25519PrivateKey.generate()
FORGER_KEY = Ed25519PrivateKey.generate()
JWKS_URL = "https://jwks.test/.well-known/jwks.json"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn is asyncio-only; the in-process tests share the fixture


class FakeClock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def sign(
    key: Ed25519PrivateKey,
    body: bytes,
    *,
    request_id: str = "req-1",
    user_id: str = "user-1",
    timestamp: int | str = NOW,
) -> dict[str, str]:
    digest = hashlib.sha256(body).hexdigest()
    message = f"{request_id}\n{user_id}\n{timestamp}\n{digest}".encode()
    return {
        "X-Fal-Webhook-Request-Id": request_id,
        "X-Fal-Webhook-User-Id": user_id,
        "X-Fal-Webhook-Timestamp": str(timestamp),
        "X-Fal-Webhook-Signature": key.sign(message).hex(),
    }


def jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
    }


def event_body(request_id: str = "req-1", **extra: Any) -> bytes:
    event: dict[str, Any] = {
        "request_id": request_id,
        "gateway_request_id": f"gw-{request_id}",
        "status": "OK",
        "payload": {"images": [{"url": "https://v3.fal.media/files/x.png"}], "seed": 7},
    }
    event.update(extra)
    return json.dumps(event).encode()


# --- verify_signature ------------------------------------------------------------------


def test_valid_signature_is_accepted_and_headers_returned() -> None:
    body = event_body()
    parsed = verify_signature(
        body=body, headers=sign(FAL_KEY, body), public_keys=[FAL_KEY.public_key()], now_s=NOW
    )
    assert parsed == WebhookHeaders(
        request_id="req-1",
        user_id="user-1",
        timestamp=str(NOW),
        timestamp_s=NOW,
        signature=bytes.fromhex(sign(FAL_KEY, body)["X-Fal-Webhook-Signature"]),
    )


def as_parsed(headers: dict[str, str]) -> WebhookHeaders:
    """What verify_signature should return for headers made by :func:`sign`."""
    timestamp = headers["X-Fal-Webhook-Timestamp"]
    return WebhookHeaders(
        request_id=headers["X-Fal-Webhook-Request-Id"],
        user_id=headers["X-Fal-Webhook-User-Id"],
        timestamp=timestamp,
        timestamp_s=int(timestamp),
        signature=bytes.fromhex(headers["X-Fal-Webhook-Signature"]),
    )


def test_header_names_are_case_insensitive() -> None:
    body = event_body()
    sent = sign(FAL_KEY, body, request_id="req-lower", user_id="user-lower")
    headers = {name.lower(): value for name, value in sent.items()}
    parsed = verify_signature(
        body=body, headers=headers, public_keys=[FAL_KEY.public_key()], now_s=NOW
    )
    assert parsed == as_parsed(sent)


def test_every_key_is_tried_so_a_rotated_key_verifies() -> None:
    body = event_body()
    headers = sign(ROTATED_KEY, body)
    # The first key alone refuses it, so accepting it below means the second key was tried.
    with pytest.raises(WebhookRejected, match="bad_signature"):
        verify_signature(body=body, headers=headers, public_keys=[FAL_KEY.public_key()], now_s=NOW)
    keys = [FAL_KEY.public_key(), ROTATED_KEY.public_key()]
    parsed = verify_signature(body=body, headers=headers, public_keys=keys, now_s=NOW)
    assert parsed == as_parsed(headers)


@pytest.mark.parametrize("age_s", [-300, 0, 300])
def test_timestamps_within_the_skew_are_accepted(age_s: int) -> None:
    body = event_body()
    headers = sign(FAL_KEY, body, timestamp=NOW - age_s)
    parsed = verify_signature(
        body=body, headers=headers, public_keys=[FAL_KEY.public_key()], now_s=NOW
    )
    assert (parsed.timestamp, parsed.timestamp_s) == (str(NOW - age_s), NOW - age_s)
    assert parsed == as_parsed(headers)


def _without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != name}


def _with(headers: dict[str, str], name: str, value: str) -> dict[str, str]:
    return {**headers, name: value}


BODY = event_body()
SIGNED = sign(FAL_KEY, BODY)
SIG = "X-Fal-Webhook-Signature"
REJECTIONS: list[tuple[str, bytes, dict[str, str], str]] = [
    ("forged with another key", BODY, sign(FORGER_KEY, BODY), "bad_signature"),
    ("tampered body", BODY.replace(b'"seed": 7', b'"seed": 8'), SIGNED, "bad_signature"),
    (
        "signed for another request id",
        BODY,
        sign(FAL_KEY, BODY, request_id="req-2") | {"X-Fal-Webhook-Request-Id": "req-1"},
        "bad_signature",
    ),
    ("replayed 301 s later", BODY, sign(FAL_KEY, BODY, timestamp=NOW - 301), "stale"),
    ("replayed a day later", BODY, sign(FAL_KEY, BODY, timestamp=NOW - 86_400), "stale"),
    ("timestamp 301 s ahead", BODY, sign(FAL_KEY, BODY, timestamp=NOW + 301), "future"),
    ("no request id", BODY, _without(SIGNED, "X-Fal-Webhook-Request-Id"), "missing_header"),
    ("no user id", BODY, _without(SIGNED, "X-Fal-Webhook-User-Id"), "missing_header"),
    ("no timestamp", BODY, _without(SIGNED, "X-Fal-Webhook-Timestamp"), "missing_header"),
    ("no signature", BODY, _without(SIGNED, SIG), "missing_header"),
    ("empty signature", BODY, _with(SIGNED, SIG, ""), "missing_header"),
    ("non-hex signature", BODY, _with(SIGNED, SIG, "zz" * 64), "bad_signature_format"),
    ("short signature", BODY, _with(SIGNED, SIG, SIGNED[SIG][:126]), "bad_signature_format"),
    ("long signature", BODY, _with(SIGNED, SIG, SIGNED[SIG] + "00"), "bad_signature_format"),
    ("spaced signature", BODY, _with(SIGNED, SIG, " " + SIGNED[SIG][1:]), "bad_signature_format"),
    ("float timestamp", BODY, sign(FAL_KEY, BODY, timestamp=f"{NOW}.5"), "bad_timestamp"),
    ("signed timestamp", BODY, sign(FAL_KEY, BODY, timestamp=f"+{NOW}"), "bad_timestamp"),
    ("word timestamp", BODY, sign(FAL_KEY, BODY, timestamp="now"), "bad_timestamp"),
]


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_bad_deliveries_are_rejected_with_their_reason(
    body: bytes, headers: dict[str, str], reason: str
) -> None:
    with pytest.raises(WebhookRejected) as caught:
        verify_signature(body=body, headers=headers, public_keys=[FAL_KEY.public_key()], now_s=NOW)
    assert caught.value.reason == reason


def test_no_keys_means_no_delivery_verifies() -> None:
    with pytest.raises(WebhookRejected, match="bad_signature"):
        verify_signature(body=BODY, headers=SIGNED, public_keys=[], now_s=NOW)


@settings(max_examples=50, deadline=None)
@given(body=st.binary(min_size=1, max_size=200), data=st.data())
def test_any_flipped_body_byte_breaks_the_signature(body: bytes, data: st.DataObject) -> None:
    headers = sign(FAL_KEY, body)
    position = data.draw(st.integers(0, len(body) - 1))
    flipped = body[:position] + bytes([body[position] ^ 0x01]) + body[position + 1 :]
    with pytest.raises(WebhookRejected, match="bad_signature"):
        verify_signature(
            body=flipped, headers=headers, public_keys=[FAL_KEY.public_key()], now_s=NOW
        )


# --- WebhookEvent ----------------------------------------------------------------------


def test_event_parses_ok_and_error_deliveries_and_tolerates_extras() -> None:
    ok = WebhookEvent.model_validate_json(event_body(extra_field=1))
    assert (ok.request_id, ok.status, ok.payload["seed"]) == ("req-1", "OK", 7)
    failed = WebhookEvent.model_validate_json(
        json.dumps(
            {
                "request_id": "req-9",
                "status": "ERROR",
                "error": "Invalid status code: 422",
                "payload": {"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]},
            }
        )
    )
    assert (failed.status, failed.error, failed.gateway_request_id) == (
        "ERROR",
        "Invalid status code: 422",
        None,
    )
    unserialisable = WebhookEvent.model_validate(
        {"request_id": "r", "status": "OK", "payload": None, "payload_error": {"why": "too big"}}
    )
    assert unserialisable.payload is None
    assert unserialisable.payload_error == '{"why": "too big"}'


# --- DeliveredIds ----------------------------------------------------------------------


def test_delivered_ids_forget_the_oldest_beyond_capacity() -> None:
    seen = DeliveredIds(capacity=2)
    for request_id in ("a", "b", "a", "c"):
        seen.add(request_id)
    assert ("a" in seen, "b" in seen, "c" in seen, len(seen)) == (True, False, True, 2)


# --- JWKS ------------------------------------------------------------------------------


class JwksServer:
    """A fake JWKS endpoint behind httpx.MockTransport: serves ``keys``, or fails."""

    def __init__(self, *keys: Ed25519PrivateKey) -> None:
        self.keys = list(keys)
        self.status_code = 200
        self.down = False
        self.requests = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        assert str(request.url) == JWKS_URL
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if self.status_code != 200:
            return httpx.Response(self.status_code, text="unavailable")
        rsa = {"kty": "RSA", "n": "AQAB", "e": "AQAB"}
        return httpx.Response(200, json={"keys": [rsa, *(jwk(k) for k in self.keys)]})


@pytest.fixture
async def http_factory() -> AsyncIterator[Callable[[JwksServer], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(server: JwksServer) -> httpx.AsyncClient:
        clients.append(httpx.AsyncClient(transport=httpx.MockTransport(server.handler)))
        return clients[-1]

    yield make
    for client in clients:
        await client.aclose()


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def raws(keys: Any) -> list[bytes]:
    return [k.public_bytes(Encoding.Raw, PublicFormat.Raw) for k in keys]


def test_default_jwks_url_is_fals() -> None:
    assert DEFAULT_JWKS_URL == "https://rest.fal.ai/.well-known/jwks.json"


def test_parse_jwks_keeps_only_well_formed_ed25519_keys() -> None:
    document = {
        "keys": [
            {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
            {"kty": "OKP", "crv": "X25519", "x": jwk(FAL_KEY)["x"]},
            {"kty": "OKP", "crv": "Ed25519", "x": "c2hvcnQ"},
            {"kty": "OKP", "crv": "Ed25519", "x": 12},
            "junk",
            jwk(FAL_KEY),
            jwk(ROTATED_KEY),
        ]
    }
    assert raws(parse_jwks(document)) == [raw(FAL_KEY), raw(ROTATED_KEY)]


@pytest.mark.parametrize(
    "document",
    [[], {"keys": {}}, {"nokeys": []}, {"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}],
)
def test_parse_jwks_refuses_documents_without_usable_keys(document: Any) -> None:
    with pytest.raises(ProtocolError):
        parse_jwks(document)


@pytest.mark.anyio
async def test_jwks_is_cached_for_its_ttl_then_refetched(http_factory: Any) -> None:
    server, clock = JwksServer(FAL_KEY), FakeClock(1000.0)
    cache = JwksCache(http_factory(server), JWKS_URL, clock=clock, ttl_s=3600)
    assert raws(await cache.keys()) == [raw(FAL_KEY)]
    clock.now_s += 3599
    await cache.keys()
    assert server.requests == 1
    server.keys = [ROTATED_KEY]
    clock.now_s += 1
    assert raws(await cache.keys()) == [raw(ROTATED_KEY)]
    assert server.requests == cache.fetches == 2


@pytest.mark.anyio
async def test_refetch_after_a_miss_is_rate_limited_to_once_a_minute(http_factory: Any) -> None:
    server, clock = JwksServer(FAL_KEY), FakeClock(1000.0)
    cache = JwksCache(http_factory(server), JWKS_URL, clock=clock)
    await cache.keys()
    clock.now_s += 60
    server.keys = [FAL_KEY, ROTATED_KEY]
    fresh = await cache.refresh_after_miss()
    assert fresh is not None and raws(fresh) == [raw(FAL_KEY), raw(ROTATED_KEY)]
    for _ in range(100):  # a flood of forged deliveries inside the minute
        assert await cache.refresh_after_miss() is None
    clock.now_s += 59.9
    assert await cache.refresh_after_miss() is None
    assert server.requests == 2
    clock.now_s += 0.1
    assert await cache.refresh_after_miss() is not None
    assert server.requests == 3


@pytest.mark.anyio
async def test_a_miss_right_after_the_first_fetch_does_not_refetch(http_factory: Any) -> None:
    server, clock = JwksServer(FAL_KEY), FakeClock(1000.0)
    cache = JwksCache(http_factory(server), JWKS_URL, clock=clock)
    await cache.keys()
    assert await cache.refresh_after_miss() is None
    assert server.requests == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("down", "status_code", "said"),
    [(True, 200, "ConnectError"), (False, 503, "HTTP 503")],
    ids=["connection refused", "http 503"],
)
async def test_jwks_unavailable_without_cached_keys_raises_and_retries_a_minute_later(
    http_factory: Any, down: bool, status_code: int, said: str
) -> None:
    server, clock = JwksServer(FAL_KEY), FakeClock(1000.0)
    server.down, server.status_code = down, status_code
    cache = JwksCache(http_factory(server), JWKS_URL, clock=clock)
    with pytest.raises(FalError, match=f"webhook keys unavailable from {JWKS_URL}: .*{said}"):
        await cache.keys()
    with pytest.raises(FalError):
        await cache.keys()
    assert server.requests == 1
    server.down, server.status_code = False, 200
    clock.now_s += 60
    assert raws(await cache.keys()) == [raw(FAL_KEY)]


@pytest.mark.anyio
async def test_stale_keys_keep_serving_while_the_jwks_is_down(http_factory: Any) -> None:
    server, clock = JwksServer(FAL_KEY), FakeClock(1000.0)
    cache = JwksCache(http_factory(server), JWKS_URL, clock=clock, ttl_s=100)
    await cache.keys()
    server.down = True
    clock.now_s += 100
    assert raws(await cache.keys()) == [raw(FAL_KEY)]
    assert raws(await cache.keys()) == [raw(FAL_KEY)]
    assert server.requests == 2  # the failed refresh is not retried on every delivery


@pytest.mark.anyio
async def test_jwks_that_is_not_json_is_a_protocol_failure(http_factory: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        cache = JwksCache(http, JWKS_URL, clock=FakeClock(0.0))
        with pytest.raises(FalError, match="not JSON"):
            await cache.keys()


# --- the receiver app (in process) -----------------------------------------------------


class Harness:
    """The app behind httpx.ASGITransport, its event stream and its counters."""

    def __init__(self, keys: Any, *, queue_size: int = 16, max_body_bytes: int = 1 << 20):
        self.clock = FakeClock(float(NOW))
        self.stats = WebhookStats()
        self.send, self.events = anyio.create_memory_object_stream[WebhookEvent](queue_size)
        app = build_app(
            keys=keys,
            events=self.send,
            stats=self.stats,
            wall_clock=self.clock,
            max_body_bytes=max_body_bytes,
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://webhook.test"
        )

    async def post(
        self, body: bytes, headers: dict[str, str], path: str = "/", **kwargs: Any
    ) -> httpx.Response:
        return await self.client.post(path, content=body, headers=headers, **kwargs)

    async def deliver(self, request_id: str, key: Ed25519PrivateKey = FAL_KEY) -> httpx.Response:
        body = event_body(request_id)
        ts = int(self.clock())
        return await self.post(body, sign(key, body, request_id=request_id, timestamp=ts))

    def forwarded_events(self) -> list[WebhookEvent]:
        events = []
        while True:
            try:
                events.append(self.events.receive_nowait())
            except anyio.WouldBlock:
                return events

    def forwarded(self) -> list[str]:
        return [event.request_id for event in self.forwarded_events()]

    async def aclose(self) -> None:
        await self.client.aclose()
        self.send.close()
        self.events.close()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness(StaticKeys([FAL_KEY.public_key()]))
    yield h
    await h.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/", "/hooks/fal", "/tunnel/abc/def?x=1"])
async def test_a_valid_delivery_is_answered_200_and_forwarded(harness: Harness, path: str) -> None:
    body = event_body("req-7")
    response = await harness.post(body, sign(FAL_KEY, body, request_id="req-7"), path)
    assert response.status_code == 200
    event = harness.events.receive_nowait()
    assert event == WebhookEvent.model_validate_json(body)
    assert event.payload["images"][0]["url"] == "https://v3.fal.media/files/x.png"
    assert (harness.stats.received, harness.stats.valid, harness.stats.forwarded) == (1, 1, 1)


@pytest.mark.anyio
async def test_a_duplicate_delivery_is_answered_200_and_forwarded_once(harness: Harness) -> None:
    answers = [(await harness.deliver("req-1")).status_code for _ in range(3)]
    harness.clock.now_s += 3600  # fal's retry an hour later, freshly signed
    answers.append((await harness.deliver("req-1")).status_code)
    assert answers == [200, 200, 200, 200]
    assert harness.forwarded() == ["req-1"]
    assert (harness.stats.duplicates, harness.stats.forwarded) == (3, 1)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
async def test_bad_signatures_are_answered_401_and_not_forwarded(
    harness: Harness, body: bytes, headers: dict[str, str], reason: str
) -> None:
    response = await harness.post(body, headers)
    assert (response.status_code, response.json()) == (401, {"outcome": reason})
    assert harness.forwarded() == []
    assert harness.stats.rejected == {reason: 1}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[]", b'{"status": "OK"}', b'{"request_id": "r", "status": "DONE"}'],
    ids=["broken json", "not an object", "no request id", "unknown status"],
)
async def test_signed_but_malformed_json_is_answered_400(harness: Harness, body: bytes) -> None:
    response = await harness.post(body, sign(FAL_KEY, body))
    assert (response.status_code, response.json()) == (400, {"outcome": "malformed"})
    assert harness.forwarded() == []


@pytest.mark.anyio
async def test_other_methods_are_not_allowed(harness: Harness) -> None:
    assert (await harness.client.get("/")).status_code == 405
    assert harness.stats.received == 0


@pytest.mark.anyio
async def test_a_full_event_stream_answers_503_so_fal_retries_later() -> None:
    h = Harness(StaticKeys([FAL_KEY.public_key()]), queue_size=1)
    try:
        assert (await h.deliver("req-1")).status_code == 200
        assert (await h.deliver("req-2")).status_code == 503
        assert h.forwarded() == ["req-1"]
        assert (await h.deliver("req-2")).status_code == 200  # fal's retry, room again
        assert h.forwarded() == ["req-2"]
        assert h.stats.rejected == {"busy": 1}
        assert (h.stats.forwarded, h.stats.duplicates) == (2, 0)
    finally:
        await h.aclose()


@pytest.mark.anyio
async def test_a_closed_event_stream_answers_503(harness: Harness) -> None:
    harness.events.close()
    assert (await harness.deliver("req-1")).status_code == 503
    assert harness.stats.rejected == {"closed": 1}


class CountingBody:
    """A streamed request body that records how many chunks the server pulled."""

    def __init__(self, chunks: int, size: int) -> None:
        self.chunks, self.size, self.pulled = chunks, size, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            yield b"x" * self.size


@pytest.mark.anyio
async def test_a_declared_oversized_body_is_refused_413_before_reading() -> None:
    h = Harness(StaticKeys([FAL_KEY.public_key()]), max_body_bytes=1000)
    try:
        body = CountingBody(chunks=4, size=300)
        headers = {**sign(FAL_KEY, b"x" * 1200), "Content-Length": "1200"}
        response = await h.client.post("/", content=body, headers=headers)
        assert (response.status_code, response.json()) == (413, {"outcome": "too_large"})
        assert body.pulled == 0
        assert h.stats.rejected == {"too_large": 1}
    finally:
        await h.aclose()


@pytest.mark.anyio
async def test_a_chunked_oversized_body_is_refused_413_while_streaming() -> None:
    h = Harness(StaticKeys([FAL_KEY.public_key()]), max_body_bytes=1000)
    try:
        body = CountingBody(chunks=100, size=300)
        response = await h.client.post("/", content=body, headers=sign(FAL_KEY, b""))
        assert response.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.request.headers
        assert response.status_code == 413
        assert body.pulled == 4  # stopped at the first chunk past 1000 bytes
        assert h.forwarded() == []
    finally:
        await h.aclose()


@pytest.mark.anyio
async def test_a_body_at_the_limit_is_accepted() -> None:
    body = event_body("req-1")
    h = Harness(StaticKeys([FAL_KEY.public_key()]), max_body_bytes=len(body))
    try:
        assert (await h.post(body, sign(FAL_KEY, body))).status_code == 200
    finally:
        await h.aclose()


@pytest.mark.anyio
async def test_the_receiver_follows_a_key_rotation_with_one_rate_limited_refetch(
    http_factory: Any,
) -> None:
    server, jwks_clock = JwksServer(FAL_KEY), FakeClock(0.0)
    cache = JwksCache(http_factory(server), JWKS_URL, clock=jwks_clock)
    h = Harness(cache)
    try:
        assert (await h.deliver("req-1")).status_code == 200
        assert server.requests == 1
        server.keys = [FAL_KEY, ROTATED_KEY]  # fal publishes a new key and signs with it
        jwks_clock.now_s += 120
        assert (await h.deliver("req-2", ROTATED_KEY)).status_code == 200
        assert server.requests == 2
        forged = [(await h.deliver(f"f{i}", FORGER_KEY)).status_code for i in range(20)]
        assert forged == [401] * 20
        assert server.requests == 2  # forged traffic cannot make it refetch within a minute
        jwks_clock.now_s += 60
        assert (await h.deliver("f-late", FORGER_KEY)).status_code == 401
        assert server.requests == 3
        assert h.forwarded() == ["req-1", "req-2"]
        assert h.stats.rejected == {"bad_signature": 21}
    finally:
        await h.aclose()


@pytest.mark.anyio
async def test_headers_are_checked_before_any_key_is_fetched(http_factory: Any) -> None:
    server = JwksServer(FAL_KEY)
    h = Harness(JwksCache(http_factory(server), JWKS_URL, clock=FakeClock(0.0)))
    try:
        assert (await h.post(BODY, _without(SIGNED, SIG))).status_code == 401
        stale = sign(FAL_KEY, BODY, timestamp=NOW - 1000)
        assert (await h.post(BODY, stale)).status_code == 401
        assert server.requests == 0
    finally:
        await h.aclose()


@pytest.mark.anyio
async def test_unreachable_keys_answer_503_so_fal_retries(http_factory: Any) -> None:
    server = JwksServer(FAL_KEY)
    server.down = True
    h = Harness(JwksCache(http_factory(server), JWKS_URL, clock=FakeClock(0.0)))
    try:
        response = await h.deliver("req-1")
        assert (response.status_code, response.json()) == (503, {"outcome": "keys_unavailable"})
        assert h.forwarded() == []
    finally:
        await h.aclose()


# --- the real server on loopback -------------------------------------------------------


class Consumer:
    """The engine's side: reads events until the stream ends."""

    def __init__(self) -> None:
        self.events: list[WebhookEvent] = []
        self.got_one = anyio.Event()
        self.ended = False

    async def run(self, events: Any) -> None:
        async with events:
            async for event in events:
                self.events.append(event)
                self.got_one.set()
        self.ended = True


@pytest.mark.anyio
async def test_the_server_on_loopback_receives_verifies_and_shuts_down_cleanly() -> None:
    keys = StaticKeys([FAL_KEY.public_key()])
    sigint_before = signal.getsignal(signal.SIGINT)
    consumer = Consumer()
    async with (
        anyio.create_task_group() as tg,
        webhook_server("127.0.0.1", 0, keys=keys, wall_clock=FakeClock(NOW)) as receiver,
        httpx.AsyncClient() as http,
    ):
        tg.start_soon(consumer.run, receiver.events)
        assert receiver.port > 0
        assert receiver.local_url == f"http://127.0.0.1:{receiver.port}/"
        assert signal.getsignal(signal.SIGINT) is sigint_before  # uvicorn left Ctrl-C alone
        body = event_body("req-1")
        answers = []
        for path, key in [("tunnel/x", FAL_KEY), ("", FAL_KEY), ("", FORGER_KEY)]:
            url = receiver.local_url + path
            response = await http.post(url, content=body, headers=sign(key, body))
            answers.append(response.status_code)
        assert answers == [200, 200, 401]
        await consumer.got_one.wait()
        assert (receiver.stats.forwarded, receiver.stats.duplicates) == (1, 1)
        assert receiver.stats.rejected == {"bad_signature": 1}
    assert consumer.ended  # the stream ended with the server
    assert [(e.request_id, e.status) for e in consumer.events] == [("req-1", "OK")]
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.post(receiver.local_url, content=body)


@pytest.mark.anyio
async def test_the_server_refuses_an_oversized_chunked_body_on_loopback() -> None:
    keys = StaticKeys([FAL_KEY.public_key()])
    async with (
        webhook_server(
            "127.0.0.1", 0, keys=keys, max_body_bytes=10_000, wall_clock=FakeClock(NOW)
        ) as receiver,
        receiver.events,
        httpx.AsyncClient() as http,
    ):
        body = CountingBody(chunks=8, size=4096)
        response = await http.post(receiver.local_url, content=body, headers=sign(FAL_KEY, b""))
        assert response.status_code == 413
        assert receiver.stats.rejected == {"too_large": 1}


@pytest.mark.anyio
async def test_a_cancelled_server_closes_its_port_at_once() -> None:
    keys = StaticKeys([FAL_KEY.public_key()])
    async with httpx.AsyncClient() as http:
        with anyio.CancelScope() as scope:
            async with webhook_server("127.0.0.1", 0, keys=keys) as receiver, receiver.events:
                await http.post(receiver.local_url, content=b"{}")  # leaves a keep-alive open
                scope.cancel()
                await anyio.sleep_forever()
        with pytest.raises(httpx.ConnectError):
            await http.post(receiver.local_url, content=b"{}")


@pytest.mark.anyio
async def test_a_port_already_in_use_is_a_usage_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"cannot listen for webhooks on 127.0.0.1:{port}"):
            async with webhook_server("127.0.0.1", port, keys=StaticKeys([])):
                pass


@pytest.mark.anyio
async def test_concurrent_copies_of_one_delivery_are_forwarded_once(harness: Harness) -> None:
    answers: list[int] = []

    async def deliver() -> None:
        answers.append((await harness.deliver("req-1")).status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(deliver)
    assert answers == [200] * 20
    assert harness.forwarded() == ["req-1"]
    assert (harness.stats.forwarded, harness.stats.duplicates) == (1, 19)


# --- against the emulator's independent signer -----------------------------------------


@pytest.mark.anyio
async def test_the_emulators_signed_deliveries_verify_against_its_jwks() -> None:
    signer = WebhookSigner(user_id="user-42")
    jwks_transport = httpx.MockTransport(lambda request: httpx.Response(200, json=signer.jwks()))
    slept: list[float] = []

    async def no_sleep(seconds: float) -> None:
        slept.append(seconds)

    async with httpx.AsyncClient(transport=jwks_transport) as jwks_http:
        h = Harness(JwksCache(jwks_http, JWKS_URL, clock=FakeClock(0.0)))
        try:
            dispatcher = WebhookDispatcher(
                h.client, signer, clock=h.clock, sleep=no_sleep, rng=random.Random(5),
                duplicate_rate=1.0,
            )  # fmt: skip
            bodies = [
                webhook_body("req-1", "gw-1", True, {"images": [], "seed": 3}, None),
                webhook_body("req-2", "gw-2", False, {"detail": "boom"}, "Invalid status"),
                webhook_body("req-3", "gw-3", True, {"x": float("nan")}, None),
            ]
            async with anyio.create_task_group() as tg:
                await tg.start(dispatcher.run)
                for number, body in enumerate(bodies, start=1):
                    dispatcher.submit("http://webhook.test/hook", f"req-{number}", body)
                dispatcher.close()
            events = sorted(h.forwarded_events(), key=lambda e: e.request_id)
        finally:
            await h.aclose()
    assert [(e.request_id, e.gateway_request_id, e.status) for e in events] == [
        ("req-1", "gw-1", "OK"),
        ("req-2", "gw-2", "ERROR"),
        ("req-3", "gw-3", "OK"),
    ]
    assert events[0].payload == {"images": [], "seed": 3}
    assert (events[1].error, events[1].payload) == ("Invalid status", {"detail": "boom"})
    assert events[2].payload is None and events[2].payload_error is not None
    stats = dispatcher.stats()
    assert (stats["delivered"], stats["duplicated"], stats["rejected"]) == (6, 3, 0)
    assert (h.stats.forwarded, h.stats.duplicates, h.stats.rejected) == (3, 3, {})
    assert slept == []


@pytest.mark.anyio
async def test_an_emulator_signer_with_an_unpublished_key_is_refused_and_retried(
    harness: Harness,
) -> None:
    impostor = WebhookSigner(user_id="user-42")  # its key is not in the receiver's key set

    async def no_sleep(seconds: float) -> None:
        pass

    dispatcher = WebhookDispatcher(
        harness.client, impostor, clock=harness.clock, sleep=no_sleep, rng=random.Random(5),
        max_attempts=3,
    )  # fmt: skip
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run)
        dispatcher.submit("http://webhook.test/", "req-1", event_body("req-1"))
        dispatcher.close()
    assert (dispatcher.stats()["rejected"], dispatcher.stats()["failed"]) == (3, 1)
    assert harness.stats.rejected == {"bad_signature": 3}
    assert harness.forwarded() == []


@pytest.mark.anyio
async def test_a_large_data_uri_result_is_verified_off_the_event_loop_and_forwarded() -> None:
    data_uri = "data:image/png;base64," + base64.b64encode(bytes(3 * 1024 * 1024)).decode()
    body = event_body("req-big", payload={"images": [{"url": data_uri}]})
    assert len(body) > 4 * 1024 * 1024
    h = Harness(StaticKeys([FAL_KEY.public_key()]), max_body_bytes=8 * 1024 * 1024)
    try:
        headers = sign(FAL_KEY, body, request_id="req-big")
        assert (await h.post(body[:-2] + b" }", headers)).status_code == 401
        assert (await h.post(body, headers)).status_code == 200
        [event] = h.forwarded_events()
        assert event.payload["images"][0]["url"] == data_uri
    finally:
        await h.aclose()
