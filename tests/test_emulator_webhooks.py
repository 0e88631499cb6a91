"""Webhook signing, bodies and the dispatcher's retries and faults, on virtual time."""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from anyio import wait_all_tasks_blocked
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from starlette.applications import Starlette

from runner.emulator.webhooks import (
    WebhookDispatcher,
    WebhookSigner,
    backoff_s,
    jwks_routes,
    webhook_body,
)

T0 = 1_900_000_000.0
URL = "http://receiver.test/hook"


def public_keys(jwks: dict[str, Any]) -> list[Ed25519PublicKey]:
    keys = []
    for jwk in jwks["keys"]:
        assert (jwk["kty"], jwk["crv"]) == ("OKP", "Ed25519")
        x = jwk["x"]
        assert "=" not in x
        keys.append(
            Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "=" * (-len(x) % 4)))
        )
    return keys


def verify(jwks: dict[str, Any], headers: httpx.Headers | dict[str, str], body: bytes) -> bool:
    """An independent verifier: the message is rebuilt here from the spec, not from the signer."""
    message = "\n".join(
        [
            headers["x-fal-webhook-request-id"],
            headers["x-fal-webhook-user-id"],
            headers["x-fal-webhook-timestamp"],
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode("utf-8")
    signature = bytes.fromhex(headers["x-fal-webhook-signature"])
    for key in public_keys(jwks):
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return True
    return False


# -- signer ------------------------------------------------------------------------------------


def test_signature_verifies_with_the_published_key() -> None:
    signer = WebhookSigner(user_id="user-1")
    body = b'{"request_id":"r1","status":"OK"}'
    headers = {k.lower(): v for k, v in signer.sign("r1", 1_700_000_123, body).items()}
    assert headers["x-fal-webhook-timestamp"] == "1700000123"
    assert headers["x-fal-webhook-user-id"] == "user-1"
    assert len(headers["x-fal-webhook-signature"]) == 128
    assert verify(signer.jwks(), headers, body)


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("body", b'{"request_id":"r1","status":"ERROR"}'),
        ("x-fal-webhook-request-id", "r2"),
        ("x-fal-webhook-user-id", "someone-else"),
        ("x-fal-webhook-timestamp", "1700000124"),
    ],
)
def test_signature_fails_when_anything_signed_changes(field_name: str, value: Any) -> None:
    signer = WebhookSigner(user_id="user-1")
    body = b'{"request_id":"r1","status":"OK"}'
    headers = {k.lower(): v for k, v in signer.sign("r1", 1_700_000_123, body).items()}
    if field_name == "body":
        body = value
    else:
        headers[field_name] = value
    assert not verify(signer.jwks(), headers, body)


def test_signer_publishes_the_key_it_was_given_under_a_stable_kid() -> None:
    private = Ed25519PrivateKey.generate()
    a, b = WebhookSigner(private, user_id="u"), WebhookSigner(private, user_id="u")
    assert a.jwks() == b.jwks()
    assert a.jwks()["keys"][0]["kid"] == a.kid
    assert WebhookSigner(user_id="u").jwks() != a.jwks()
    assert "PRIVATE" not in repr(a)


@pytest.mark.anyio
async def test_jwks_route_serves_the_signer_key() -> None:
    signer = WebhookSigner(user_id="u")
    transport = httpx.ASGITransport(app=Starlette(routes=jwks_routes(signer)))
    async with httpx.AsyncClient(transport=transport, base_url="http://emu") as http:
        response = await http.get("/rest/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.json() == signer.jwks()


# -- body --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ok", "payload", "error", "expected"),
    [
        (
            True,
            {"images": [], "seed": 1},
            None,
            {"status": "OK", "payload": {"images": [], "seed": 1}},
        ),
        (
            False,
            {"detail": "Request timed out"},
            "Request timed out",
            {
                "status": "ERROR",
                "payload": {"detail": "Request timed out"},
                "error": "Request timed out",
            },
        ),
        (False, None, "boom", {"status": "ERROR", "payload": None, "error": "boom"}),
    ],
)
def test_webhook_body_shape(
    ok: bool, payload: Any, error: str | None, expected: dict[str, Any]
) -> None:
    body = json.loads(webhook_body("req-1", "gw-1", ok, payload, error))
    assert body == {"request_id": "req-1", "gateway_request_id": "gw-1", **expected}


def test_unserialisable_payload_becomes_payload_error() -> None:
    body = json.loads(webhook_body("r", "g", True, {"x": object()}, None))
    assert body["payload"] is None
    assert "serialize" in body["payload_error"]
    assert body["status"] == "OK"


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [(1, 1.0, 2.0), (2, 1.0, 4.0), (3, 0.5, 4.0), (10, 1.0, 100.0), (4, 1.5, 24.0)],
)
def test_backoff_doubles_and_caps(attempt: int, jitter: float, expected: float) -> None:
    assert backoff_s(attempt, base_s=2.0, max_s=100.0, jitter=jitter) == expected


# -- dispatcher, on virtual time --------------------------------------------------------------


class VirtualTime:
    """A clock plus a sleep that only returns when :meth:`drain` moves time forward."""

    def __init__(self) -> None:
        self.now = T0
        self.sleeps: list[float] = []
        self._heap: list[tuple[float, int, anyio.Event]] = []
        self._seq = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        self.sleeps.append(delay_s)
        event = anyio.Event()
        self._seq += 1
        heapq.heappush(self._heap, (self.now + delay_s, self._seq, event))
        await event.wait()

    async def drain(self) -> None:
        """Wake sleepers one at a time in wake-time order until nothing is left to run."""
        while True:
            await wait_all_tasks_blocked()
            if not self._heap:
                return
            wake, _, event = heapq.heappop(self._heap)
            self.now = max(self.now, wake)
            event.set()


@dataclass
class Receiver:
    """A webhook endpoint that records each POST and fails the first ``fail_first`` times."""

    fail_first: dict[str, int] = field(default_factory=dict)
    status: int = 500
    seen: list[tuple[str, float, bool]] = field(default_factory=list)
    jwks: dict[str, Any] = field(default_factory=dict)
    clock: VirtualTime | None = None

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        request_id = request.headers["x-fal-webhook-request-id"]
        assert json.loads(body)["request_id"] == request_id
        self.seen.append(
            (
                request_id,
                float(request.headers["x-fal-webhook-timestamp"]),
                verify(self.jwks, request.headers, body),
            )
        )
        remaining = self.fail_first.get(request_id, 0)
        if remaining:
            self.fail_first[request_id] = remaining - 1
            return httpx.Response(self.status)
        return httpx.Response(200)

    @property
    def order(self) -> list[str]:
        return [request_id for request_id, _, _ in self.seen]


@asynccontextmanager
async def dispatcher(
    receiver: Receiver, time: VirtualTime, *, seed: int = 0, **options: Any
) -> AsyncIterator[WebhookDispatcher]:
    signer = WebhookSigner(user_id="user-1")
    receiver.jwks = signer.jwks()
    async with httpx.AsyncClient(transport=httpx.MockTransport(receiver.handle)) as client:
        hooks = WebhookDispatcher(
            client,
            signer,
            clock=time.clock,
            sleep=time.sleep,
            rng=random.Random(seed),
            **options,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(hooks.run)
            yield hooks
            await time.drain()
            hooks.close()


def body_for(request_id: str) -> bytes:
    return webhook_body(request_id, f"gw-{request_id}", True, {"images": []}, None)


async def submit_all(hooks: WebhookDispatcher, count: int) -> list[str]:
    ids = [f"req-{i:03d}" for i in range(count)]
    for request_id in ids:
        hooks.submit(URL, request_id, body_for(request_id))
    return ids


@pytest.mark.anyio
async def test_delivery_is_signed_and_stamped_with_the_injected_clock() -> None:
    receiver, time = Receiver(), VirtualTime()
    async with dispatcher(receiver, time) as hooks:
        await submit_all(hooks, 1)
    assert receiver.seen == [("req-000", T0, True)]
    assert hooks.stats()["delivered"] == 1


@pytest.mark.anyio
async def test_non_2xx_is_retried_with_doubling_backoff_until_accepted() -> None:
    receiver, time = Receiver(fail_first={"req-000": 3}), VirtualTime()
    async with dispatcher(receiver, time, backoff_base_s=10.0, backoff_max_s=1000.0) as hooks:
        await submit_all(hooks, 1)
    assert receiver.order == ["req-000"] * 4
    assert len(time.sleeps) == 3
    for attempt, slept in enumerate(time.sleeps, start=1):
        assert 0.5 * 10.0 * 2 ** (attempt - 1) <= slept <= 1.5 * 10.0 * 2 ** (attempt - 1)
    timestamps = [ts for _, ts, _ in receiver.seen]
    assert timestamps == sorted(timestamps) and timestamps[0] == T0 < timestamps[-1]
    stats = hooks.stats()
    assert (stats["attempts"], stats["delivered"], stats["rejected"], stats["failed"]) == (
        4,
        1,
        3,
        0,
    )


@pytest.mark.anyio
async def test_gives_up_after_max_attempts() -> None:
    receiver, time = Receiver(fail_first={"req-000": 99}, status=503), VirtualTime()
    async with dispatcher(receiver, time, max_attempts=4, backoff_base_s=1.0) as hooks:
        await submit_all(hooks, 1)
    assert len(receiver.seen) == 4
    assert len(time.sleeps) == 3
    assert (hooks.stats()["failed"], hooks.stats()["delivered"]) == (1, 0)


@pytest.mark.anyio
async def test_no_answer_is_retried() -> None:
    calls: list[str] = []

    async def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        if len(calls) < 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(204)

    time = VirtualTime()
    async with httpx.AsyncClient(transport=httpx.MockTransport(flaky)) as client:
        hooks = WebhookDispatcher(
            client,
            WebhookSigner(user_id="u"),
            clock=time.clock,
            sleep=time.sleep,
            rng=random.Random(1),
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(hooks.deliver, URL, "r", b"{}")
            await time.drain()
        hooks.close()
    assert len(calls) == 3
    stats = hooks.stats()
    assert (stats["no_answer"], stats["delivered"], stats["attempts"]) == (2, 1, 3)


@pytest.mark.anyio
async def test_a_url_that_cannot_work_is_not_retried() -> None:
    time = VirtualTime()
    async with httpx.AsyncClient() as client:
        hooks = WebhookDispatcher(
            client,
            WebhookSigner(user_id="u"),
            clock=time.clock,
            sleep=time.sleep,
            rng=random.Random(1),
        )
        await hooks.deliver("ftp://nowhere/hook", "r", b"{}")
        hooks.close()
    assert (hooks.stats()["attempts"], hooks.stats()["failed"], time.sleeps) == (1, 1, [])


async def faulty_run(
    seed: int, count: int = 200, **options: Any
) -> tuple[list[str], dict[str, int]]:
    receiver, time = Receiver(), VirtualTime()
    async with dispatcher(receiver, time, seed=seed, **options) as hooks:
        await submit_all(hooks, count)
    assert all(valid for _, _, valid in receiver.seen)
    return receiver.order, hooks.stats()


@pytest.mark.anyio
async def test_loss_and_duplication_are_deterministic_under_a_seed() -> None:
    first, stats = await faulty_run(7, lose_rate=0.25, duplicate_rate=0.2)
    second, _ = await faulty_run(7, lose_rate=0.25, duplicate_rate=0.2)
    other, _ = await faulty_run(8, lose_rate=0.25, duplicate_rate=0.2)
    assert first == second
    assert sorted(first) != sorted(other)
    assert 25 <= stats["lost"] <= 75 and 20 <= stats["duplicated"] <= 65
    assert len(first) == stats["delivered"] == 200 - stats["lost"] + stats["duplicated"]
    assert len(set(first)) == 200 - stats["lost"]
    counts = {request_id: first.count(request_id) for request_id in set(first)}
    assert sum(1 for n in counts.values() if n == 2) == stats["duplicated"]


@pytest.mark.anyio
async def test_reordering_is_deterministic_under_a_seed_and_loses_nothing() -> None:
    ids = [f"req-{i:03d}" for i in range(30)]
    first, stats = await faulty_run(3, 30, reorder_window_s=30.0)
    second, _ = await faulty_run(3, 30, reorder_window_s=30.0)
    plain, _ = await faulty_run(3, 30)
    assert first == second
    assert first != ids and sorted(first) == ids
    assert plain == ids
    assert stats["held"] == 30 and stats["delivered"] == 30


@pytest.mark.anyio
async def test_delay_holds_every_delivery() -> None:
    receiver, time = Receiver(), VirtualTime()
    async with dispatcher(receiver, time, delay_s=5.0) as hooks:
        await submit_all(hooks, 3)
    assert [ts for _, ts, _ in receiver.seen] == [T0 + 5.0] * 3
    assert time.sleeps == [5.0] * 3


@pytest.mark.anyio
async def test_submit_never_blocks_and_counts_overflow() -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(Receiver().handle)) as client:
        hooks = WebhookDispatcher(
            client, WebhookSigner(user_id="u"), rng=random.Random(0), max_pending=2
        )
        for request_id in ("a", "b", "c"):
            hooks.submit(URL, request_id, b"{}")
        hooks.close()
        hooks.submit(URL, "after-close", b"{}")
    assert (hooks.stats()["submitted"], hooks.stats()["overflowed"]) == (4, 2)


@pytest.mark.anyio
async def test_run_returns_after_close_once_queued_deliveries_are_done() -> None:
    receiver = Receiver()
    signer = WebhookSigner(user_id="u")
    receiver.jwks = signer.jwks()
    async with httpx.AsyncClient(transport=httpx.MockTransport(receiver.handle)) as client:
        hooks = WebhookDispatcher(client, signer, rng=random.Random(0))
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                await tg.start(hooks.run)
                for request_id in ("a", "b"):
                    hooks.submit(URL, request_id, body_for(request_id))
                hooks.close()
            # the task group exits only because run() returned by itself
    assert sorted(receiver.order) == ["a", "b"]
    assert hooks.stats()["overflowed"] == 0
