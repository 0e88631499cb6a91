"""Signed webhook delivery, as fal does it, with faults to test receivers against.

- :class:`WebhookSigner` signs with Ed25519 and publishes its public key as a JWKS
  (``GET /rest/.well-known/jwks.json`` via :func:`jwks_routes`).
- :func:`webhook_body` builds fal's webhook JSON.
- :class:`WebhookDispatcher` POSTs deliveries from a bounded queue with retries and exponential
  backoff, and can lose, duplicate, delay or reorder them; every random choice comes from the
  injected ``rng`` in submission order, so a seed reproduces the same faults.

This module is written independently of the runner's own verifier on purpose, so that a
misreading of the byte layout cannot be mirrored on both sides.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from anyio.abc import TaskStatus
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class WebhookSigner:
    """Signs webhook deliveries for one user id with one Ed25519 key."""

    def __init__(self, private_key: Ed25519PrivateKey | None = None, *, user_id: str) -> None:
        self._key = private_key or Ed25519PrivateKey.generate()
        self.user_id = user_id
        self._public_raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.kid = hashlib.sha256(self._public_raw).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"WebhookSigner(user_id={self.user_id!r}, kid={self.kid!r})"

    def message(self, request_id: str, timestamp: int, body: bytes) -> bytes:
        """The exact bytes signed: ids, unix-seconds timestamp and body hash, one per line."""
        digest = hashlib.sha256(body).hexdigest()
        return f"{request_id}\n{self.user_id}\n{int(timestamp)}\n{digest}".encode()

    def sign(self, request_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The four ``X-Fal-Webhook-*`` headers for one delivery of ``body``."""
        signature = self._key.sign(self.message(request_id, timestamp, body))
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": self.user_id,
            "X-Fal-Webhook-Timestamp": str(int(timestamp)),
            "X-Fal-Webhook-Signature": signature.hex(),
        }

    def jwks(self) -> dict[str, Any]:
        """The public key as a JSON Web Key Set."""
        key = {"kty": "OKP", "crv": "Ed25519", "x": _b64url(self._public_raw), "kid": self.kid}
        return {"keys": [key]}


def jwks_routes(signer: WebhookSigner) -> list[BaseRoute]:
    """``GET /rest/.well-known/jwks.json`` serving ``signer``'s public key."""

    async def jwks(request: Request) -> JSONResponse:
        return JSONResponse(signer.jwks(), headers={"Cache-Control": "max-age=86400"})

    return [Route("/rest/.well-known/jwks.json", jwks, methods=["GET"])]


def webhook_body(
    request_id: str,
    gateway_request_id: str,
    ok: bool,
    payload: Any,
    error: str | None,
) -> bytes:
    """fal's webhook JSON; a payload that is not JSON-serialisable becomes ``payload_error``."""
    body: dict[str, Any] = {
        "request_id": request_id,
        "gateway_request_id": gateway_request_id,
        "status": "OK" if ok else "ERROR",
    }
    try:
        json.dumps(payload, allow_nan=False)
        body["payload"] = payload
    except (TypeError, ValueError) as exc:
        body["payload"] = None
        body["payload_error"] = f"Failed to serialize the payload: {exc}"
    if error is not None:
        body["error"] = error
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def backoff_s(attempt: int, *, base_s: float, max_s: float, jitter: float) -> float:
    """Wait after failed attempt ``attempt`` (1-based): doubling, capped, scaled by ``jitter``."""
    return min(max_s, base_s * 2.0 ** (attempt - 1)) * jitter


@dataclass(frozen=True, slots=True)
class _Plan:
    """Every random decision for one submitted delivery, drawn up front."""

    lose: bool
    copies: int
    hold_s: float
    rng_seed: int


@dataclass(frozen=True, slots=True)
class _Delivery:
    url: str
    request_id: str
    body: bytes


class WebhookDispatcher:
    """Delivers signed webhooks, retrying on non-2xx answers and on no answer.

    ``submit`` queues without blocking (a full queue counts the delivery as ``overflowed``);
    ``run`` consumes the queue inside the caller's task group. Faults: ``lose_rate`` drops a
    delivery, ``duplicate_rate`` sends it twice, ``delay_s`` holds every delivery, and
    ``reorder_window_s`` holds each for a random time within the window so later ones overtake.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        signer: WebhookSigner,
        *,
        clock: Clock = time.time,
        sleep: Sleep = anyio.sleep,
        rng: random.Random,
        max_attempts: int = 10,
        backoff_base_s: float = 7.0,
        backoff_max_s: float = 1800.0,
        attempt_timeout_s: float = 15.0,
        lose_rate: float = 0.0,
        duplicate_rate: float = 0.0,
        delay_s: float = 0.0,
        reorder_window_s: float = 0.0,
        max_pending: int = 10_000,
        max_concurrency: int = 64,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._client = client
        self._signer = signer
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.attempt_timeout_s = attempt_timeout_s
        self.lose_rate = lose_rate
        self.duplicate_rate = duplicate_rate
        self.delay_s = delay_s
        self.reorder_window_s = reorder_window_s
        self._max_concurrency = max_concurrency
        self._send, self._receive = anyio.create_memory_object_stream[_Delivery](max_pending)
        self._counts: Counter[str] = Counter()
        self._started = False

    def submit(self, url: str, request_id: str, body: bytes) -> None:
        """Queue one delivery for :meth:`run`; never blocks."""
        self._counts["submitted"] += 1
        try:
            self._send.send_nowait(_Delivery(url, request_id, body))
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._counts["overflowed"] += 1

    def close(self) -> None:
        """Stop accepting deliveries; :meth:`run` returns once the queued ones are done.

        Call it on shutdown even if :meth:`run` never started, so the queue is released.
        """
        self._send.close()
        if not self._started:
            self._receive.close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver queued webhooks until :meth:`close` (or cancellation)."""
        self._started = True
        limiter = anyio.CapacityLimiter(self._max_concurrency)

        async def bounded(item: _Delivery, plan: _Plan) -> None:
            async with limiter:
                await self._execute(item, plan)

        async with anyio.create_task_group() as tg, self._receive:
            task_status.started()
            async for item in self._receive:
                tg.start_soon(bounded, item, self._plan())

    async def deliver(self, url: str, request_id: str, body: bytes) -> None:
        """Deliver one webhook now (faults included), retrying as configured."""
        self._counts["submitted"] += 1
        await self._execute(_Delivery(url, request_id, body), self._plan())

    def _plan(self) -> _Plan:
        rng = self._rng
        lose = rng.random() < self.lose_rate
        copies = 2 if rng.random() < self.duplicate_rate else 1
        hold_s = rng.uniform(0.0, self.reorder_window_s) if self.reorder_window_s > 0 else 0.0
        return _Plan(lose, copies, hold_s, rng.getrandbits(64))

    async def _execute(self, item: _Delivery, plan: _Plan) -> None:
        if plan.lose:
            self._counts["lost"] += 1
            return
        wait_s = self.delay_s + plan.hold_s
        if plan.hold_s > 0:
            self._counts["held"] += 1
        if wait_s > 0:
            await self._sleep(wait_s)
        rng = random.Random(plan.rng_seed)
        for copy in range(plan.copies):
            if copy:
                self._counts["duplicated"] += 1
            await self._attempts(item, rng)

    async def _attempts(self, item: _Delivery, rng: random.Random) -> None:
        for attempt in range(1, self.max_attempts + 1):
            self._counts["attempts"] += 1
            outcome = await self._post(item)
            if outcome is True:
                self._counts["delivered"] += 1
                return
            if outcome is None:
                break
            if attempt < self.max_attempts:
                jitter = rng.uniform(0.5, 1.5)
                await self._sleep(
                    backoff_s(
                        attempt, base_s=self.backoff_base_s, max_s=self.backoff_max_s, jitter=jitter
                    )
                )
        self._counts["failed"] += 1

    async def _post(self, item: _Delivery) -> bool | None:
        """True when delivered, False to retry, None when retrying cannot help (bad URL)."""
        timestamp = math.floor(self._clock())
        headers = {"Content-Type": "application/json"}
        headers |= self._signer.sign(item.request_id, timestamp, item.body)
        try:
            response = await self._client.post(
                item.url, content=item.body, headers=headers, timeout=self.attempt_timeout_s
            )
        except httpx.UnsupportedProtocol:
            self._counts["bad_url"] += 1
            return None
        except httpx.InvalidURL:
            self._counts["bad_url"] += 1
            return None
        except httpx.HTTPError:
            self._counts["no_answer"] += 1
            return False
        if 200 <= response.status_code < 300:
            return True
        self._counts["rejected"] += 1
        return False

    def stats(self) -> dict[str, int]:
        """Delivery counters for the emulator's stats endpoint."""
        names = (
            "submitted",
            "attempts",
            "delivered",
            "failed",
            "lost",
            "duplicated",
            "held",
            "overflowed",
            "no_answer",
            "rejected",
            "bad_url",
        )
        return {name: self._counts[name] for name in names}
