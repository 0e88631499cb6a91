"""The webhook receiver: signature checks, JWKS caching, the Starlette app, the real server.

Deliveries are signed here with ``cryptography`` directly, following the byte layout in
the spec (docs/spec fal-queue.md, Webhooks), independently of runner.webhook's code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.errors import FalError, ProtocolError, UsageError
from runner.jwks import DEFAULT_JWKS_URL, JwksCache, StaticKeys, parse_jwks
from runner.webhook import (
    DeliveredIds,
    WebhookEvent,
    WebhookHeaders,
    WebhookRejected,
    WebhookStats,
    build_app,
    verify_signature,
    webhook_server,
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
    return {"kty": "OKP", "crv": "Ed25519", "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode()}


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


def test_header_names_are_case_insensitive() -> None:
    body = event_body()
    headers = {name.lower(): value for name, value in sign(FAL_KEY, body).items()}
    verify_signature(body=body, headers=headers, public_keys=[FAL_KEY.public_key()], now_s=NOW)


def test_every_key_is_tried_so_a_rotated_key_verifies() -> None:
    body = event_body()
    keys = [FAL_KEY.public_key(), ROTATED_KEY.public_key()]
    verify_signature(body=body, headers=sign(ROTATED_KEY, body), public_keys=keys, now_s=NOW)


@pytest.mark.parametrize("age_s", [-300, 0, 300])
def test_timestamps_within_the_skew_are_accepted(age_s: int) -> None:
    body = event_body()
    headers = sign(FAL_KEY, body, timestamp=NOW - age_s)
    verify_signature(body=body, headers=headers, public_keys=[FAL_KEY.public_key()], now_s=NOW)


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
    ("signed for another request id", BODY, sign(FAL_KEY, BODY, request_id="req-2")
     | {"X-Fal-Webhook-Request-Id": "req-1"}, "bad_signature"),
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
