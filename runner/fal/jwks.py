"""fal's webhook signing keys: fetching, parsing and caching the JWKS.

fal signs webhooks with Ed25519 and publishes the public keys as a JSON Web Key Set.
:class:`JwksCache` fetches it over the shared ``httpx.AsyncClient``, keeps it for a day,
and refetches once when a signature does not verify (fal rotated its key), but at most
once per ``min_refetch_interval_s`` so that forged deliveries cannot hammer the JWKS.
:class:`StaticKeys` serves a fixed set (tests, the emulator's own key).

httpx errors and malformed key sets are translated here, once, into the project's
:class:`~runner.errors.FalError` subclasses.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import anyio
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from runner.errors import FalError, HTTPStatusError, ProtocolError, TransportError

DEFAULT_JWKS_URL = "https://rest.fal.ai/.well-known/jwks.json"
"""fal's published webhook keys; ``--webhook-jwks-url`` overrides it."""

_ED25519_KEY_BYTES = 32

log = logging.getLogger(__name__)


class KeySource(Protocol):
    """Where the webhook receiver gets the public keys it verifies against."""

    async def keys(self) -> Sequence[Ed25519PublicKey]:
        """The current keys; raises :class:`FalError` when none can be had."""
        ...

    async def refresh_after_miss(self) -> Sequence[Ed25519PublicKey] | None:
        """Fresh keys after a signature failed to verify, or None if none may be fetched now."""
        ...


class StaticKeys:
    """A fixed key set that never changes."""

    def __init__(self, keys: Sequence[Ed25519PublicKey]) -> None:
        self._keys = tuple(keys)

    async def keys(self) -> Sequence[Ed25519PublicKey]:
        return self._keys

    async def refresh_after_miss(self) -> Sequence[Ed25519PublicKey] | None:
        return None


def parse_jwks(document: Any) -> tuple[Ed25519PublicKey, ...]:
    """The Ed25519 keys of a JWKS document; keys of other types are skipped.

    Raises :class:`ProtocolError` when the document is not a key set or holds no
    usable Ed25519 key.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ProtocolError('JWKS is not an object with a "keys" list')
    keys: list[Ed25519PublicKey] = []
    for entry in document["keys"]:
        if not isinstance(entry, dict):
            continue
        if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue
        key = _ed25519_from_x(entry.get("x"))
        if key is None:
            log.warning("JWKS: skipping an Ed25519 key with a malformed 'x'")
            continue
        keys.append(key)
    if not keys:
        raise ProtocolError("JWKS holds no usable Ed25519 key")
    return tuple(keys)


def _ed25519_from_x(x: Any) -> Ed25519PublicKey | None:
    if not isinstance(x, str):
        return None
    try:
        # JWK uses unpadded base64url; restore the padding before decoding.
        raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != _ED25519_KEY_BYTES:
        return None
    return Ed25519PublicKey.from_public_bytes(raw)


class JwksCache:
    """The JWKS at ``url``, cached for ``ttl_s``, refetched on a miss at most once a minute.

    ``clock`` is a monotonic clock in seconds (injected in tests). When a refresh fails
    and keys are already known, the stale keys keep serving (logged) rather than
    refusing every webhook while fal's key endpoint is down.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str = DEFAULT_JWKS_URL,
        *,
        clock: Callable[[], float] = time.monotonic,
        ttl_s: float = 86_400.0,
        min_refetch_interval_s: float = 60.0,
        timeout_s: float = 10.0,
    ) -> None:
        self._http = http
        self._url = url
        self._clock = clock
        self._ttl_s = ttl_s
        self._min_refetch_interval_s = min_refetch_interval_s
        self._timeout_s = timeout_s
        self._keys: tuple[Ed25519PublicKey, ...] = ()
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._last_failure: str | None = None
        self._lock = anyio.Lock()
        self.fetches = 0
        """How many times the JWKS was requested (for stats and tests)."""

    @property
    def url(self) -> str:
        return self._url

    async def keys(self) -> Sequence[Ed25519PublicKey]:
        async with self._lock:
            if self._is_fresh():
                return self._keys
            if self._may_fetch():
                await self._fetch_or_keep_stale()
            if self._keys:
                return self._keys
            raise FalError(f"webhook keys unavailable from {self._url}: {self._last_failure}")

    async def refresh_after_miss(self) -> Sequence[Ed25519PublicKey] | None:
        async with self._lock:
            if not self._may_fetch():
                return None
            return self._keys if await self._fetch_or_keep_stale() else None

    def _is_fresh(self) -> bool:
        return (
            self._fetched_at is not None
            and bool(self._keys)
            and self._clock() - self._fetched_at < self._ttl_s
        )

    def _may_fetch(self) -> bool:
        return (
            self._last_attempt is None
            or self._clock() - self._last_attempt >= self._min_refetch_interval_s
        )

    async def _fetch_or_keep_stale(self) -> bool:
        """Fetch the keys; on failure keep the ones known. True when the fetch succeeded."""
        self._last_attempt = self._clock()
        try:
            keys = await self._fetch()
        except FalError as exc:
            self._last_failure = str(exc)
            log.warning("webhook keys fetch failed (%s); keeping %d known", exc, len(self._keys))
            return False
        self._keys = keys
        self._fetched_at = self._clock()
        self._last_failure = None
        return True

    async def _fetch(self) -> tuple[Ed25519PublicKey, ...]:
        self.fetches += 1
        try:
            response = await self._http.get(self._url, timeout=self._timeout_s)
        except httpx.TransportError as exc:
            raise TransportError(
                f"JWKS request failed: {type(exc).__name__}",
                sent=not isinstance(exc, httpx.ConnectError),
            ) from exc
        if response.status_code != httpx.codes.OK:
            raise HTTPStatusError(
                f"JWKS request answered HTTP {response.status_code}",
                status_code=response.status_code,
                body=response.text[:500],
            )
        try:
            document = response.json()
        except ValueError as exc:
            raise ProtocolError("JWKS is not JSON") from exc
        return parse_jwks(document)
