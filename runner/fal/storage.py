"""fal storage: the client of its upload protocol (REST token and initiate, CDN v3 uploads).

    StorageClient.upload(path, ...)   CDN v3: token (cached until expiry), simple POST up to
      -> Uploaded                     ``multipart_threshold``, else multipart; the initiate
                                      (signed URL) flow when the CDN path fails

Each flow is retried as a read (:func:`runner.fal.retry.call_with_retry`); httpx errors become
:mod:`runner.errors` at the one ``_send`` boundary. The key goes only to the REST origin, the
CDN token only to the CDN; neither is logged, and both are redacted from error bodies.
Which files to upload, and when to reuse an earlier upload, is :mod:`runner.media.uploads`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import anyio
import httpx
from pydantic import SecretStr

from runner.errors import AuthError, FalError, HTTPStatusError, ProtocolError, TransportError
from runner.fal.key import REDACTED, redactor
from runner.fal.protocol import NOT_SENT_ERRORS
from runner.fal.retry import RetryPolicies, RetryPolicy, call_with_retry

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadSettings:
    multipart_threshold: int = 100 * MiB  # larger files go multipart
    part_size: int = 10 * MiB
    ttl_s: float = 7 * 86_400.0  # asked of the CDN (object lifecycle); the cache trusts it
    min_remaining_s: float = 3_600.0  # a cached URL closer to expiry is uploaded again
    policy: RetryPolicy = field(default_factory=lambda: RetryPolicies().upload)
    timeout_s: float = 120.0


@dataclass(frozen=True, slots=True)
class CdnToken:
    token: str = field(repr=False)
    token_type: str
    base_url: str
    expires_at_s: float


@dataclass(frozen=True, slots=True)
class Uploaded:
    url: str
    expires_at_s: float | None
    via: str  # "simple" | "multipart" | "initiate"


class StorageClient:
    """fal's storage protocol over one injected httpx.AsyncClient, with retries as reads."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        rest_url: str,
        cdn_url: str,
        key: SecretStr,
        settings: UploadSettings | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._http = http
        self._rest = rest_url.rstrip("/")
        self._cdn = cdn_url.rstrip("/")
        self._key = key
        self._redact_key = redactor(key)
        self.settings = settings or UploadSettings()
        self._wall_clock = wall_clock
        self._clock = clock
        self._sleep = sleep
        self._token: CdnToken | None = None
        self._token_lock = anyio.Lock()

    @property
    def origin(self) -> str:
        """The storage an upload's URL belongs to (uploads.jsonl keeps them apart)."""
        return self._rest

    def __repr__(self) -> str:
        return f"StorageClient(rest_url={self._rest!r}, cdn_url={self._cdn!r}, key={self._key!r})"

    async def upload(self, path: Path, *, size: int, content_type: str) -> Uploaded:
        """Upload one file; the CDN first, the initiate flow if that fails."""
        try:
            if size > self.settings.multipart_threshold:
                return await self._retry(lambda: self._multipart(path, size, content_type))
            return await self._retry(lambda: self._simple(path, content_type))
        except AuthError:
            raise
        except FalError:
            return await self._retry(lambda: self._initiate(path, content_type))

    # -- the three flows ---------------------------------------------------------------------

    async def _simple(self, path: Path, content_type: str) -> Uploaded:
        token = await self._cdn_token()
        data = await anyio.Path(path).read_bytes()
        headers = self._upload_headers(token, content_type, path.name)
        response = await self._send("POST", f"{self._cdn}/files/upload", content=data,
                                    headers=headers)  # fmt: skip
        return Uploaded(self._field(response, "access_url"), self._expiry(), "simple")

    async def _multipart(self, path: Path, size: int, content_type: str) -> Uploaded:
        token = await self._cdn_token()
        headers = self._upload_headers(token, content_type, path.name)
        started = await self._send("POST", f"{token.base_url}/files/upload/multipart",
                                   headers=headers)  # fmt: skip
        access_url = self._field(started, "access_url")
        upload_id = self._field(started, "uploadId")
        auth = {"Authorization": headers["Authorization"]}
        parts = []
        part_size = self.settings.part_size
        for number, offset in enumerate(range(0, size, part_size), start=1):
            chunk = await anyio.to_thread.run_sync(_read_part, path, offset, part_size)
            answer = await self._send(
                "PUT", f"{access_url}/multipart/{upload_id}/{number}", content=chunk, headers=auth
            )
            etag = answer.headers.get("etag")
            if not etag:
                raise ProtocolError(f"multipart part {number} was answered without an ETag")
            parts.append({"partNumber": number, "etag": etag})
        done = await self._send(
            "POST", f"{access_url}/multipart/{upload_id}/complete", json={"parts": parts},
            headers=auth,
        )  # fmt: skip
        return Uploaded(self._field(done, "access_url", default=access_url), self._expiry(),
                        "multipart")  # fmt: skip

    async def _initiate(self, path: Path, content_type: str) -> Uploaded:
        response = await self._send(
            "POST",
            f"{self._rest}/storage/upload/initiate",
            params={"storage_type": "gcs"},
            json={"file_name": path.name, "content_type": content_type},
            headers={**self._key_header(), **self._lifecycle()},
        )
        upload_url = self._field(response, "upload_url")
        file_url = self._field(response, "file_url")
        data = await anyio.Path(path).read_bytes()
        await self._send("PUT", upload_url, content=data, headers={"Content-Type": content_type})
        return Uploaded(file_url, self._expiry(), "initiate")

    # -- token, headers ----------------------------------------------------------------------

    async def _cdn_token(self) -> CdnToken:
        async with self._token_lock:
            token = self._token
            if token is None or token.expires_at_s - self._wall_clock() < 60.0:
                token = self._token = await self._fetch_token()
            return token

    async def _fetch_token(self) -> CdnToken:
        response = await self._send(
            "POST", f"{self._rest}/storage/auth/token", params={"storage_type": "fal-cdn-v3"},
            json={}, headers=self._key_header(),
        )  # fmt: skip
        try:
            body = response.json()
            expires = datetime.fromisoformat(str(body["expires_at"])).timestamp()
            return CdnToken(str(body["token"]), str(body.get("token_type") or "Bearer"),
                            str(body["base_url"]).rstrip("/"), expires)  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError("storage token answer is malformed") from exc

    def _key_header(self) -> dict[str, str]:
        return {"Authorization": f"Key {self._key.get_secret_value()}"}

    def _lifecycle(self) -> dict[str, str]:
        value = json.dumps({"expiration_duration_seconds": int(self.settings.ttl_s)})
        return {"X-Fal-Object-Lifecycle": value, "X-Fal-Object-Lifecycle-Preference": value}

    def _upload_headers(self, token: CdnToken, content_type: str, name: str) -> dict[str, str]:
        return {
            "Authorization": f"{token.token_type} {token.token}",
            "Content-Type": content_type,
            "X-Fal-File-Name": name,
            **self._lifecycle(),
        }

    def _expiry(self) -> float:
        return self._wall_clock() + self.settings.ttl_s

    # -- the one HTTP boundary ---------------------------------------------------------------

    async def _retry(self, fn: Callable[[], Awaitable[Uploaded]]) -> Uploaded:
        return await call_with_retry(fn, policy=self.settings.policy, kind="read",
                                     clock=self._clock, sleep=self._sleep)  # fmt: skip

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(
                method, url, timeout=self.settings.timeout_s, **kwargs
            )
        except httpx.TransportError as exc:
            sent = not isinstance(exc, NOT_SENT_ERRORS)
            raise TransportError(f"{method} {_short(url)}: {type(exc).__name__}",
                                 sent=sent) from exc  # fmt: skip
        if response.is_success:
            return response
        self._raise_for(response, method, url)

    def _raise_for(self, response: httpx.Response, method: str, url: str) -> NoReturn:
        code = response.status_code
        where = f"{method} {_short(url)}: HTTP {code}"
        if code in (401, 403):
            raise AuthError(f"{where}: storage refused the key")
        body = self._redact(response.text)[:2000]
        snippet = " ".join(body[:200].split())
        raise HTTPStatusError(f"{where}: {snippet}", status_code=code, body=body)

    def _field(self, response: httpx.Response, name: str, default: str | None = None) -> str:
        try:
            value = response.json().get(name, default)
        except (ValueError, AttributeError) as exc:
            raise ProtocolError(
                f"storage answer to {_short(str(response.url))} is not JSON"
            ) from exc
        if not isinstance(value, str) or not value:
            raise ProtocolError(f"storage answer to {_short(str(response.url))} lacks {name}")
        return value

    def _redact(self, text: str) -> str:
        text = self._redact_key(text)
        token = self._token.token if self._token else ""
        return text.replace(token, REDACTED) if len(token) >= 4 else text


def _read_part(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def _short(url: str) -> str:
    """A URL without its query (signed URLs carry credentials there)."""
    base = url.partition("?")[0]
    return base if len(base) <= 100 else base[:97] + "..."
