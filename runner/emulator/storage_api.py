"""fal's storage wire protocol over a :class:`~runner.emulator.filestore.FileStore`.

:func:`storage_routes` speaks the protocol the official ``fal-client`` uses:

- ``POST /rest/storage/auth/token?storage_type=fal-cdn-v3`` (``Authorization: Key``) -> CDN token
- ``POST /cdn/files/upload`` (``Authorization: Bearer``): raw bytes -> ``{"access_url"}``
- ``POST /cdn/files/upload/multipart`` -> ``{"access_url", "uploadId"}``; ``PUT
  {access_url}/multipart/{uploadId}/{n}`` -> ``ETag``; ``POST {access_url}/multipart/{id}/complete``
- ``POST /rest/storage/upload/initiate?storage_type=gcs`` (``Key``) -> ``{"upload_url",
  "file_url"}``; ``PUT upload_url`` with the bytes (the URL itself is the credential, as a
  signed GCS URL is).

A :class:`~runner.emulator.filestore.StorageError` raised by the store becomes a JSON
``{"detail"}`` answer with its status code.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from runner.emulator.filestore import Clock, FileStore, StorageError


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
