"""fal's storage and CDN upload side, in memory.

:class:`FileStore` owns uploaded bytes (keyed by the path under ``/cdn/files/``), bounded by a
total size, plus the state of multipart and initiate-style uploads in flight.
:func:`storage_routes` speaks the wire protocol the official ``fal-client`` uses:

- ``POST /rest/storage/auth/token?storage_type=fal-cdn-v3`` (``Authorization: Key``) -> CDN token
- ``POST /cdn/files/upload`` (``Authorization: Bearer``): raw bytes -> ``{"access_url"}``
- ``POST /cdn/files/upload/multipart`` -> ``{"access_url", "uploadId"}``; ``PUT
  {access_url}/multipart/{uploadId}/{n}`` -> ``ETag``; ``POST {access_url}/multipart/{id}/complete``
- ``POST /rest/storage/upload/initiate?storage_type=gcs`` (``Key``) -> ``{"upload_url",
  "file_url"}``; ``PUT upload_url`` with the bytes (the URL itself is the credential, as a
  signed GCS URL is).

Serving ``GET /cdn/files/...`` lives in :mod:`runner.emulator.images`, which reads this store.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

Clock = Callable[[], float]
"""Wall-clock time in unix seconds (``time.time`` in production, a fake in tests)."""

MAX_PARTS = 10_000
_COUNTERS = [
    "tokens_issued",
    "uploads_simple",
    "uploads_multipart",
    "uploads_initiate",
    "uploaded_bytes",
    "multipart_started",
    "multipart_parts",
    "initiated",
    "evicted",
    "expired",
    "rejected_too_large",
    "auth_rejected",
]
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class StorageError(Exception):
    """An upload the store refuses; ``status_code`` is the HTTP answer to give."""

    def __init__(self, message: str, *, status_code: int) -> None:
        self.status_code = status_code
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One uploaded file: its bytes and how to serve them."""

    key: str
    data: bytes
    content_type: str
    created_at: float
    expires_at: float | None = None

    @property
    def etag(self) -> str:
        return '"' + hashlib.md5(self.data, usedforsecurity=False).hexdigest() + '"'


@dataclass(slots=True)
class _Multipart:
    key: str
    content_type: str
    expires_in_s: float | None
    parts: dict[int, bytes] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts.values())


@dataclass(frozen=True, slots=True)
class _Reservation:
    key: str
    content_type: str
    expires_in_s: float | None


def safe_file_name(name: str | None, default: str = "upload.bin") -> str:
    """A file name that is safe as one URL path segment."""
    cleaned = _SAFE_NAME.sub("_", (name or "").rsplit("/", 1)[-1]).strip("._")
    return cleaned[:120] or default


def _part_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


class FileStore:
    """In-memory uploaded files, bounded by ``max_total_bytes`` (oldest evicted first).

    Bytes of multipart uploads still in flight count against the bound too; they are never
    evicted, so an upload that cannot fit is refused with 413 instead.
    """

    def __init__(self, *, max_total_bytes: int = 512 * 1024 * 1024, clock: Clock) -> None:
        self.max_total_bytes = max_total_bytes
        self._clock = clock
        self._files: OrderedDict[str, StoredFile] = OrderedDict()
        self._multiparts: dict[str, _Multipart] = {}
        self._reserved: OrderedDict[str, _Reservation] = OrderedDict()
        self._stored_bytes = 0
        self._pending_bytes = 0
        self._counts: Counter[str] = Counter()

    # -- files -------------------------------------------------------------------------------

    def new_key(self, file_name: str | None) -> str:
        return f"up/{secrets.token_hex(12)}/{safe_file_name(file_name)}"

    def put(
        self,
        data: bytes,
        *,
        content_type: str,
        file_name: str | None = None,
        key: str | None = None,
        expires_in_s: float | None = None,
        via: str = "simple",
    ) -> StoredFile:
        """Store ``data``; raises :class:`StorageError` (413) when it can never fit."""
        self._make_room(len(data))
        now = self._clock()
        stored = StoredFile(
            key=key or self.new_key(file_name),
            data=data,
            content_type=content_type or "application/octet-stream",
            created_at=now,
            expires_at=None if expires_in_s is None else now + expires_in_s,
        )
        old = self._files.pop(stored.key, None)
        if old is not None:
            self._stored_bytes -= len(old.data)
        self._files[stored.key] = stored
        self._stored_bytes += len(data)
        self._counts[f"uploads_{via}"] += 1
        self._counts["uploaded_bytes"] += len(data)
        return stored

    def get(self, key: str) -> StoredFile | None:
        """The file at ``key``, or None when unknown, evicted or expired."""
        stored = self._files.get(key)
        if stored is None:
            return None
        if stored.expires_at is not None and self._clock() >= stored.expires_at:
            self._files.pop(key)
            self._stored_bytes -= len(stored.data)
            self._counts["expired"] += 1
            return None
        return stored

    def _make_room(self, size: int) -> None:
        if size + self._pending_bytes > self.max_total_bytes:
            self._counts["rejected_too_large"] += 1
            raise StorageError("upload exceeds the storage limit", status_code=413)
        while self._files and self._stored_bytes + self._pending_bytes + size > (
            self.max_total_bytes
        ):
            _, evicted = self._files.popitem(last=False)
            self._stored_bytes -= len(evicted.data)
            self._counts["evicted"] += 1

    # -- multipart ---------------------------------------------------------------------------

    def begin_multipart(
        self, *, content_type: str, file_name: str | None, expires_in_s: float | None = None
    ) -> tuple[str, str]:
        """Start a multipart upload; returns ``(key, upload_id)``."""
        upload_id = secrets.token_hex(16)
        self._multiparts[upload_id] = _Multipart(
            self.new_key(file_name), content_type, expires_in_s
        )
        self._counts["multipart_started"] += 1
        return self._multiparts[upload_id].key, upload_id

    def put_part(self, key: str, upload_id: str, part_number: int, data: bytes) -> str:
        """Store one part (1-based); returns its quoted md5 ETag."""
        upload = self._multipart(key, upload_id)
        if not 1 <= part_number <= MAX_PARTS:
            raise StorageError(f"part number must be 1..{MAX_PARTS}", status_code=400)
        previous = upload.parts.pop(part_number, b"")
        self._pending_bytes -= len(previous)
        if len(data) + self._pending_bytes > self.max_total_bytes:
            self._counts["rejected_too_large"] += 1
            raise StorageError("upload exceeds the storage limit", status_code=413)
        upload.parts[part_number] = data
        self._pending_bytes += len(data)
        self._counts["multipart_parts"] += 1
        return _part_etag(data)

    def complete_multipart(self, key: str, upload_id: str, parts: Any) -> StoredFile:
        """Assemble the listed parts in part-number order after checking each ETag.

        The official client lists parts in the order its concurrent PUTs finished, so the
        list is sorted here rather than required to be ascending; duplicates, unknown parts
        and ETag mismatches are refused with 400.
        """
        upload = self._multipart(key, upload_id)
        numbers = _parse_parts(parts, upload)
        data = b"".join(upload.parts[n] for n in numbers)
        del self._multiparts[upload_id]
        self._pending_bytes -= upload.size
        return self.put(
            data,
            content_type=upload.content_type,
            key=key,
            expires_in_s=upload.expires_in_s,
            via="multipart",
        )

    def _multipart(self, key: str, upload_id: str) -> _Multipart:
        upload = self._multiparts.get(upload_id)
        if upload is None or upload.key != key:
            raise StorageError("unknown multipart upload", status_code=404)
        return upload

    # -- initiate (signed URL) ---------------------------------------------------------------

    def reserve(
        self, *, content_type: str, file_name: str | None, expires_in_s: float | None = None
    ) -> tuple[str, str]:
        """Reserve a key for a later PUT; returns ``(key, upload_token)``."""
        token = secrets.token_urlsafe(24)
        self._reserved[token] = _Reservation(self.new_key(file_name), content_type, expires_in_s)
        while len(self._reserved) > 10_000:
            self._reserved.popitem(last=False)
        self._counts["initiated"] += 1
        return self._reserved[token].key, token

    def fulfil(self, token: str, data: bytes, content_type: str | None) -> StoredFile:
        """Store the bytes PUT to a reserved upload URL."""
        reservation = self._reserved.pop(token, None)
        if reservation is None:
            raise StorageError("unknown or used upload URL", status_code=403)
        return self.put(
            data,
            content_type=content_type or reservation.content_type,
            key=reservation.key,
            expires_in_s=reservation.expires_in_s,
            via="initiate",
        )

    def count(self, name: str) -> None:
        self._counts[name] += 1

    def stats(self) -> dict[str, int]:
        """Counters for the emulator's stats endpoint."""
        out = {name: self._counts[name] for name in _COUNTERS}
        out["files"] = len(self._files)
        out["stored_bytes"] = self._stored_bytes
        out["pending_bytes"] = self._pending_bytes
        return out


def _parse_parts(parts: Any, upload: _Multipart) -> list[int]:
    if not isinstance(parts, list) or not parts:
        raise StorageError("parts must be a non-empty list", status_code=400)
    seen: set[int] = set()
    for item in parts:
        number = item.get("partNumber") if isinstance(item, dict) else None
        etag = item.get("etag") if isinstance(item, dict) else None
        if not isinstance(number, int) or not isinstance(etag, str):
            raise StorageError("each part needs partNumber and etag", status_code=400)
        if number in seen:
            raise StorageError(f"part {number} listed twice", status_code=400)
        seen.add(number)
        data = upload.parts.get(number)
        if data is None:
            raise StorageError(f"part {number} was not uploaded", status_code=400)
        if etag.strip('"') != _part_etag(data).strip('"'):
            raise StorageError(f"etag mismatch for part {number}", status_code=400)
    return sorted(seen)


# -- HTTP --------------------------------------------------------------------------------------


def origin(request: Request) -> str:
    """The request's own scheme and host, which every URL handed out carries."""
    return f"{request.url.scheme}://{request.url.netloc}"


def _lifecycle_s(request: Request) -> float | None:
    raw = request.headers.get("x-fal-object-lifecycle") or request.headers.get(
        "x-fal-object-lifecycle-preference"
    )
    if not raw:
        return None
    try:
        value = json.loads(raw).get("expiration_duration_seconds")
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) and value > 0 else None


def _error(message: str, status_code: int) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status_code)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 before reading when it says it is over ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise StorageError("upload exceeds the storage limit", status_code=413)
    return await request.body()


@dataclass
class _Service:
    files: FileStore
    key: str | None
    clock: Clock
    token_lifetime_s: float
    tokens: OrderedDict[str, float] = field(default_factory=OrderedDict)

    def key_ok(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "key" or not value:
            return False
        return self.key is None or hmac.compare_digest(value.encode(), self.key.encode())

    def bearer_ok(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        expires_at = self.tokens.get(value) if scheme.lower() == "bearer" else None
        return expires_at is not None and self.clock() < expires_at

    def refuse(self) -> JSONResponse:
        self.files.count("auth_rejected")
        return _error("Unauthorized", 401)

    async def token(self, request: Request) -> Response:
        if not self.key_ok(request):
            return self.refuse()
        if request.query_params.get("storage_type", "fal-cdn-v3") != "fal-cdn-v3":
            return _error("unsupported storage_type", 400)
        now = self.clock()
        while self.tokens and (
            len(self.tokens) >= 10_000 or next(iter(self.tokens.values())) <= now
        ):
            self.tokens.popitem(last=False)
        token = secrets.token_urlsafe(32)
        expires_at = now + self.token_lifetime_s
        self.tokens[token] = expires_at
        self.files.count("tokens_issued")
        return JSONResponse(
            {
                "token": token,
                "token_type": "Bearer",
                "base_url": f"{origin(request)}/cdn",
                "expires_at": datetime.fromtimestamp(expires_at, tz=UTC).isoformat(),
            }
        )

    async def upload(self, request: Request) -> Response:
        if not self.bearer_ok(request):
            return self.refuse()
        stored = self.files.put(
            await _body(request, self.files.max_total_bytes),
            content_type=request.headers.get("content-type", "application/octet-stream"),
            file_name=request.headers.get("x-fal-file-name"),
            expires_in_s=_lifecycle_s(request),
        )
        return JSONResponse({"access_url": f"{origin(request)}/cdn/files/{stored.key}"})

    async def multipart_start(self, request: Request) -> Response:
        if not self.bearer_ok(request):
            return self.refuse()
        key, upload_id = self.files.begin_multipart(
            content_type=request.headers.get("content-type", "application/octet-stream"),
            file_name=request.headers.get("x-fal-file-name"),
            expires_in_s=_lifecycle_s(request),
        )
        return JSONResponse(
            {"access_url": f"{origin(request)}/cdn/files/{key}", "uploadId": upload_id}
        )

    async def multipart_part(self, request: Request) -> Response:
        if not self.bearer_ok(request):
            return self.refuse()
        params = request.path_params
        etag = self.files.put_part(
            params["key"],
            params["upload_id"],
            params["part_number"],
            await _body(request, self.files.max_total_bytes),
        )
        return Response(b"", headers={"ETag": etag})

    async def multipart_complete(self, request: Request) -> Response:
        if not self.bearer_ok(request):
            return self.refuse()
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error("body must be JSON", 400)
        parts = body.get("parts") if isinstance(body, dict) else None
        params = request.path_params
        stored = self.files.complete_multipart(params["key"], params["upload_id"], parts)
        return JSONResponse({"access_url": f"{origin(request)}/cdn/files/{stored.key}"})

    async def initiate(self, request: Request) -> Response:
        if not self.key_ok(request):
            return self.refuse()
        if request.query_params.get("storage_type", "gcs") != "gcs":
            return _error("unsupported storage_type", 400)
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return _error("body must be JSON", 400)
        if not isinstance(body, dict):
            return _error("body must be a JSON object", 400)
        content_type = str(body.get("content_type") or "application/octet-stream")
        key, token = self.files.reserve(
            content_type=content_type,
            file_name=body.get("file_name") if isinstance(body.get("file_name"), str) else None,
            expires_in_s=_lifecycle_s(request),
        )
        base = origin(request)
        return JSONResponse(
            {
                "upload_url": f"{base}/cdn/signed-upload/{token}",
                "file_url": f"{base}/cdn/files/{key}",
            }
        )

    async def signed_put(self, request: Request) -> Response:
        self.files.fulfil(
            request.path_params["token"],
            await _body(request, self.files.max_total_bytes),
            request.headers.get("content-type"),
        )
        return Response(b"", status_code=200)


def _guard(
    handler: Callable[[Request], Any],
) -> Callable[[Request], Any]:
    async def guarded(request: Request) -> Response:
        try:
            response: Response = await handler(request)
        except StorageError as exc:
            return _error(str(exc), exc.status_code)
        return response

    return guarded


def storage_routes(
    files: FileStore,
    *,
    key: str | SecretStr | None,
    clock: Clock,
    token_lifetime_s: float = 3600.0,
) -> list[BaseRoute]:
    """Routes for the storage REST API (under ``/rest``) and CDN uploads (under ``/cdn``).

    ``key`` is the accepted FAL key (``None`` accepts any ``Key`` credential); ``clock`` gives
    unix seconds for token expiry.
    """
    secret = key.get_secret_value() if isinstance(key, SecretStr) else key
    svc = _Service(files, secret, clock, token_lifetime_s)
    mp = "/cdn/files/{key:path}/multipart/{upload_id}"
    return [
        Route("/rest/storage/auth/token", _guard(svc.token), methods=["POST"]),
        Route("/rest/storage/upload/initiate", _guard(svc.initiate), methods=["POST"]),
        Route("/cdn/files/upload", _guard(svc.upload), methods=["POST"]),
        Route("/cdn/files/upload/multipart", _guard(svc.multipart_start), methods=["POST"]),
        Route(mp + "/complete", _guard(svc.multipart_complete), methods=["POST"]),
        Route(mp + "/{part_number:int}", _guard(svc.multipart_part), methods=["PUT"]),
        Route("/cdn/signed-upload/{token}", _guard(svc.signed_put), methods=["PUT"]),
    ]
