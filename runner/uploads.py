"""fal storage: upload local input files once, and resolve a job's payload to send.

    InputResolver.resolve(job)      check the job's local files (InputChecker), then
      -> payload | InputFailure     replace each one by a URL (Uploader) in a copy
    Uploader.url_for(file)          --inline-inputs: a small image becomes a data: URI;
                                    else sha256 -> run_dir/uploads.jsonl cache -> upload
    StorageClient.upload(...)       CDN v3: token (cached until expiry), simple POST up to
                                    ``multipart_threshold``, else multipart; the initiate
                                    (signed URL) flow when the CDN path fails

Uploads are deduplicated by content: one upload per sha256 per run directory, shared by
concurrent workers (one lock per hash), and reused by a resume until the URL expires.
The job's identity (``job_key``) is untouched: only the payload *sent* carries the URL.
The key goes only to the REST origin, the CDN token only to the CDN; neither is logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import anyio
import httpx
from pydantic import SecretStr

from runner.errors import AuthError, FalError, HTTPStatusError, ProtocolError, TransportError
from runner.inputs import InputChecker, InputRef, LocalFile
from runner.jobs import Job
from runner.protocol import NOT_SENT_ERRORS
from runner.retry import RetryPolicy, call_with_retry

MiB = 1024 * 1024
CACHE_FILE = "uploads.jsonl"


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadSettings:
    multipart_threshold: int = 100 * MiB  # larger files go multipart
    part_size: int = 10 * MiB
    ttl_s: float = 7 * 86_400.0  # asked of the CDN (object lifecycle); the cache trusts it
    min_remaining_s: float = 3_600.0  # a cached URL closer to expiry is uploaded again
    policy: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=5, timeout_s=120.0))
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
            raise AuthError(f"{where}: storage refused the key (check FAL_KEY)")
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
        secret = self._key.get_secret_value()
        for piece in (secret, secret.partition(":")[2], self._token.token if self._token else ""):
            if len(piece) >= 4:
                text = text.replace(piece, "[redacted]")
        return text


def _read_part(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def _short(url: str) -> str:
    """A URL without its query (signed URLs carry credentials there)."""
    base = url.partition("?")[0]
    return base if len(base) <= 100 else base[:97] + "..."


# -- the content cache ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CachedUpload:
    sha256: str
    url: str
    expires_at_s: float | None
    size_bytes: int
    via: str
    storage: str = ""  # the REST origin uploaded through: fal's, or one emulator's


class UploadCache:
    """``run_dir/uploads.jsonl``: append-only, the last line per (storage, sha256) wins."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[tuple[str, str], CachedUpload] = {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                entry = CachedUpload(**json.loads(line))
            except (ValueError, TypeError):
                continue  # a torn last line after a crash: that upload is simply redone
            self._entries[entry.storage, entry.sha256] = entry

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self, sha256: str, *, storage: str, now_s: float, min_remaining_s: float
    ) -> CachedUpload | None:
        """A live URL for this content on this storage, or None (never seen, or expiring)."""
        entry = self._entries.get((storage, sha256))
        if entry is None:
            return None
        if entry.expires_at_s is not None and entry.expires_at_s - now_s < min_remaining_s:
            return None
        return entry

    async def add(self, entry: CachedUpload) -> None:
        self._entries[entry.storage, entry.sha256] = entry
        line = json.dumps(asdict(entry), sort_keys=True) + "\n"
        await anyio.to_thread.run_sync(self._append, line)

    def _append(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- from a local file to a URL -------------------------------------------------------------------


@dataclass(slots=True)
class UploadCounts:
    uploads: int = 0
    uploaded_bytes: int = 0
    reused: int = 0  # URLs taken from the cache (this run or an earlier one)
    inlined: int = 0
    hashed: int = 0


class Uploader:
    """A URL for each local file: inline, cached, or uploaded once per content hash."""

    def __init__(
        self,
        storage: StorageClient,
        cache: UploadCache,
        *,
        inline_max_bytes: int | None = None,
        wall_clock: Callable[[], float] = time.time,
        max_concurrent: int = 4,
    ) -> None:
        self.storage = storage
        self.cache = cache
        self.inline_max_bytes = inline_max_bytes
        self._wall_clock = wall_clock
        self._limit = anyio.CapacityLimiter(max_concurrent)
        self._locks: dict[object, anyio.Lock] = {}
        self._hashes: dict[tuple[Path, int, int], str] = {}
        self._inline: dict[tuple[Path, int, int], str] = {}
        self.counts = UploadCounts()

    def summary(self) -> str | None:
        c = self.counts
        if not (c.uploads or c.reused or c.inlined):
            return None
        return f"inputs: {c.uploads} uploaded ({c.uploaded_bytes} B), {c.reused} reused, " + (
            f"{c.inlined} inlined"
        )

    def _lock(self, key: object) -> anyio.Lock:
        return self._locks.setdefault(key, anyio.Lock())

    async def url_for(self, ref: InputRef, found: LocalFile) -> str:
        identity = (found.path, found.size_bytes, found.mtime_ns)
        inline = self.inline_max_bytes is not None and ref.kind != "lora"
        if inline and found.size_bytes <= (self.inline_max_bytes or 0):
            return await self._data_uri(identity, found)
        sha = await self._sha256(identity)
        async with self._lock(sha):
            settings = self.storage.settings
            now = self._wall_clock()
            cached = self.cache.get(sha, storage=self.storage.origin, now_s=now,
                                    min_remaining_s=settings.min_remaining_s)  # fmt: skip
            if cached is not None:
                self.counts.reused += 1
                return cached.url
            async with self._limit:
                done = await self.storage.upload(
                    found.path, size=found.size_bytes, content_type=found.content_type
                )
            self.counts.uploads += 1
            self.counts.uploaded_bytes += found.size_bytes
            await self.cache.add(CachedUpload(sha, done.url, done.expires_at_s, found.size_bytes,
                                              done.via, self.storage.origin))  # fmt: skip
            return done.url

    async def _sha256(self, identity: tuple[Path, int, int]) -> str:
        async with self._lock(("sha", identity)):
            sha = self._hashes.get(identity)
            if sha is None:
                sha = await anyio.to_thread.run_sync(file_sha256, identity[0])
                self._hashes[identity] = sha
                self.counts.hashed += 1
            return sha

    async def _data_uri(self, identity: tuple[Path, int, int], found: LocalFile) -> str:
        async with self._lock(("inline", identity)):
            uri = self._inline.get(identity)
            if uri is None:
                data = await anyio.Path(found.path).read_bytes()
                uri = f"data:{found.content_type};base64,{base64.b64encode(data).decode('ascii')}"
                self._inline[identity] = uri
            self.counts.inlined += 1
            return uri


# -- a job's payload to send ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InputFailure:
    """Why a job cannot be sent: its bad local files, one line each."""

    message: str


class InputResolver:
    """Checks a job's local files and gives the payload to send, with URLs in their place."""

    def __init__(self, checker: InputChecker, uploader: Uploader) -> None:
        self.checker = checker
        self.uploader = uploader

    async def resolve(self, job: Job) -> Mapping[str, Any] | InputFailure:
        """The payload to POST, or an InputFailure. Raises FalError when an upload fails."""
        refs = self.checker.refs(job)
        if not refs:
            return job.payload
        if all(self.checker.is_cached(r) for r in refs):
            files, problems = self.checker.check(job)
        else:
            files, problems = await anyio.to_thread.run_sync(self.checker.check, job)
        if problems:
            return InputFailure("; ".join(p.message for p in problems))
        urls: dict[str, str] = {}
        for ref, found in files:
            try:
                urls[ref.column] = await self.uploader.url_for(ref, found)
            except OSError as exc:  # the file changed or vanished since it was checked
                return InputFailure(f"{ref.column}={ref.value}: cannot read file: {exc.strerror}")
        return substitute(job.payload, urls)


def substitute(payload: Mapping[str, Any], urls: Mapping[str, str]) -> dict[str, Any]:
    """A copy of ``payload`` with the values at ``urls``' columns replaced."""
    out = dict(payload)
    for column, url in urls.items():
        name, _, rest = column.partition("[")
        if not rest:
            out[name] = url
        elif name == "loras":
            index = int(rest.partition("]")[0])
            loras = [dict(lora) for lora in out["loras"]]
            loras[index]["path"] = url
            out["loras"] = loras
        else:
            index = int(rest.partition("]")[0])
            values = list(out[name])
            values[index] = url
            out[name] = values
    return out
