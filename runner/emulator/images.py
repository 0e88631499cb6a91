"""Output images and input images of the emulator, and ``GET /cdn/files/...``.

:class:`ImageStore` registers each output image when a job completes but renders it only when
someone asks for its bytes (a GET, ``file_size``), deterministically from (seed, salt, size,
format; :mod:`runner.emulator.rendering`), and keeps the latest renders in a byte-bounded LRU
cache. It also serves the files that
:class:`~runner.emulator.filestore.FileStore` holds, with ``Range`` and ``HEAD`` support, and reads
the size of input images (``data:`` URIs, its own CDN URLs, or any http(s) URL).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import secrets
import threading
import urllib.parse
from collections import Counter, OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, cast

import anyio.to_thread
import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from runner.emulator.filestore import Clock, FileStore
from runner.emulator.rendering import (
    CONTENT_TYPES,
    EXTENSIONS,
    MAX_SIDE,
    normalize_format,
    render,
)
from runner.endpoints.imageinfo import ImageInfoError, read_image_info_bytes

OUTPUT_PREFIX = "out/"
_CDN_PATH = "/cdn/files/"


class InputImageError(ValueError):
    """An input image that cannot be fetched or whose dimensions cannot be read."""


@dataclass(frozen=True, slots=True)
class _Output:
    width: int
    height: int
    fmt: str
    seed: int
    salt: str
    expires_at: float | None
    black: bool = False

    def render(self) -> bytes:
        return render(
            width=self.width, height=self.height, fmt=self.fmt, seed=self.seed, salt=self.salt,
            black=self.black,
        )  # fmt: skip


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range a single-range ``Range`` header asks for.

    None means "serve it all" (no header, a malformed one, or several ranges, which RFC 9110
    lets a server ignore); raises ValueError when the range cannot be satisfied.
    """
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    start_s, sep, end_s = header[len("bytes=") :].strip().partition("-")
    if not sep or not (start_s or end_s) or not (start_s + end_s).isdigit():
        return None
    if not start_s:
        suffix = int(end_s)
        if suffix == 0 or size == 0:
            raise ValueError("empty suffix range")
        return max(0, size - suffix), size - 1
    start = int(start_s)
    end = int(end_s) if end_s else size - 1
    if start >= size or end < start:
        raise ValueError("range not satisfiable")
    return start, min(end, size - 1)


def serve_bytes(request: Request, data: bytes, content_type: str, etag: str) -> Response:
    """A 200/206/416 answer for ``data`` honouring ``Range``; headers only for HEAD."""
    headers = {"Accept-Ranges": "bytes", "ETag": etag, "Cache-Control": "public, max-age=3600"}
    try:
        wanted = parse_range(request.headers.get("range"), len(data))
    except ValueError:
        headers["Content-Range"] = f"bytes */{len(data)}"
        return Response(b"", status_code=416, headers=headers)
    status = 200
    if wanted is not None:
        start, end = wanted
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        data, status = data[start : end + 1], 206
    headers["Content-Length"] = str(len(data))
    body = b"" if request.method == "HEAD" else data
    return Response(body, status_code=status, headers=headers, media_type=content_type)


class ImageStore:
    """Registered outputs (rendered lazily) plus serving of every file under ``/cdn/files/``.

    ``retention_s`` (None = forever) is how long an output stays readable after it was
    registered, measured on ``clock``; the registry itself keeps at most ``max_outputs``
    entries (oldest dropped) and the render cache at most ``cache_max_bytes``.
    Methods are safe to call from worker threads (``anyio.to_thread``) as well.
    """

    def __init__(
        self,
        files: FileStore,
        *,
        clock: Clock,
        retention_s: float | None = None,
        cache_max_bytes: int = 64 * 1024 * 1024,
        max_outputs: int = 200_000,
        max_input_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.files = files
        self._clock = clock
        self.retention_s = retention_s
        self.cache_max_bytes = cache_max_bytes
        self.max_outputs = max_outputs
        self.max_input_bytes = max_input_bytes
        self._outputs: OrderedDict[str, _Output] = OrderedDict()
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    # -- outputs -----------------------------------------------------------------------------

    def add_output(
        self,
        *,
        width: int,
        height: int,
        fmt: str,
        seed: int,
        salt: str,
        base_url: str,
        retention_s: float | None = None,
        black: bool = False,
    ) -> dict[str, Any]:
        """Register one output and return fal's image JSON (without ``file_size``).

        ``base_url`` is the emulator's origin (``http://127.0.0.1:8123``); the image id to pass
        to :meth:`file_size` is the returned ``file_name``. ``retention_s`` overrides the
        store's retention for this image (fal's object lifecycle preference).
        """
        fmt = normalize_format(fmt)
        if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
            raise ValueError(f"image size {width}x{height} is out of range")
        image_id = f"{secrets.token_hex(16)}.{EXTENSIONS[fmt]}"
        now = self._clock()
        keep_s = self.retention_s if retention_s is None else retention_s
        expires_at = None if keep_s is None else now + keep_s
        output = _Output(width, height, fmt, seed, salt, expires_at, black)
        with self._lock:
            self._outputs[image_id] = output
            while len(self._outputs) > self.max_outputs:
                self._outputs.popitem(last=False)
            self._counts["outputs"] += 1
        return {
            "url": f"{base_url.rstrip('/')}{_CDN_PATH}{OUTPUT_PREFIX}{image_id}",
            "width": width,
            "height": height,
            "content_type": CONTENT_TYPES[fmt],
            "file_name": image_id,
        }

    def file_size(self, image_id: str) -> int:
        """Byte size of a registered output, rendering it now if needed; KeyError if unknown."""
        data = self.output_bytes(image_id)
        if data is None:
            raise KeyError(image_id)
        return len(data)

    def data_uri(
        self, *, width: int, height: int, fmt: str, seed: int, salt: str, black: bool = False
    ) -> str:
        """The rendered image as a ``data:`` URI (for ``sync_mode``); not registered."""
        fmt = normalize_format(fmt)
        data = render(width=width, height=height, fmt=fmt, seed=seed, salt=salt, black=black)
        with self._lock:
            self._counts["renders"] += 1
        return f"data:{CONTENT_TYPES[fmt]};base64,{base64.b64encode(data).decode('ascii')}"

    def _live_output(self, image_id: str) -> _Output | None:
        with self._lock:
            output = self._outputs.get(image_id)
            if output is None:
                return None
            if output.expires_at is not None and self._clock() >= output.expires_at:
                del self._outputs[image_id]
                self._counts["expired"] += 1
                return None
            return output

    def _cached(self, image_id: str) -> bytes | None:
        with self._lock:
            data = self._cache.get(image_id)
            if data is not None:
                self._cache.move_to_end(image_id)
                self._counts["cache_hits"] += 1
            return data

    def output_bytes(self, image_id: str) -> bytes | None:
        """The encoded bytes of a live output (rendered and cached on first use), else None."""
        output = self._live_output(image_id)
        if output is None:
            return None
        data = self._cached(image_id)
        if data is not None:
            return data
        data = output.render()
        with self._lock:
            self._counts["renders"] += 1
            if len(data) <= self.cache_max_bytes and image_id not in self._cache:
                self._cache[image_id] = data
                self._cache_bytes += len(data)
                while self._cache_bytes > self.cache_max_bytes:
                    _, evicted = self._cache.popitem(last=False)
                    self._cache_bytes -= len(evicted)
        return data

    def stats(self) -> dict[str, int]:
        """Counters for the emulator's stats endpoint."""
        with self._lock:
            out = {k: self._counts[k] for k in ("outputs", "renders", "cache_hits", "expired")}
            out |= {
                "served": self._counts["served"],
                "not_found": self._counts["not_found"],
                "live_outputs": len(self._outputs),
                "cache_bytes": self._cache_bytes,
            }
        return out

    # -- serving -----------------------------------------------------------------------------

    async def _find(self, path: str) -> tuple[bytes, str] | None:
        if path.startswith(OUTPUT_PREFIX):
            image_id = path[len(OUTPUT_PREFIX) :]
            output = self._live_output(image_id)
            if output is None:
                return None
            data = self._cached(image_id)
            if data is None:
                data = await anyio.to_thread.run_sync(self.output_bytes, image_id)
            return (data, CONTENT_TYPES[output.fmt]) if data is not None else None
        stored = self.files.get(path)
        return None if stored is None else (stored.data, stored.content_type)

    async def _serve(self, request: Request) -> Response:
        found = await self._find(request.path_params["path"])
        with self._lock:
            self._counts["served" if found else "not_found"] += 1
        if found is None:
            return Response(b'{"detail": "Not Found"}', 404, media_type="application/json")
        data, content_type = found
        etag = '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'
        return serve_bytes(request, data, content_type, etag)

    def routes(self) -> list[BaseRoute]:
        """``GET``/``HEAD /cdn/files/{path}``: outputs and uploaded files; public."""
        return [Route(_CDN_PATH + "{path:path}", self._serve, methods=["GET"])]

    # -- inputs ------------------------------------------------------------------------------

    def content_id(self, url: str) -> str | None:
        """What an input image served here *is*, whatever its URL: an uploaded file's sha256,
        an output's (seed, salt). None for a URL this emulator does not hold. FLUX's output
        depends on the input's pixels, not on the URL an upload happened to get."""
        path = urllib.parse.urlsplit(url).path
        if not url.startswith(("http://", "https://")) or not path.startswith(_CDN_PATH):
            return None
        key = path[len(_CDN_PATH) :]
        output = (
            self._live_output(key[len(OUTPUT_PREFIX) :]) if key.startswith(OUTPUT_PREFIX) else None
        )
        if output is not None:
            return f"output:{output.seed}/{output.salt}/{output.black}"
        stored = self.files.get(key)
        return None if stored is None else "sha256:" + hashlib.sha256(stored.data).hexdigest()

    async def read_input_size(self, url: str, client: httpx.AsyncClient) -> tuple[int, int]:
        """(width, height) of an input image; raises :class:`InputImageError`.

        ``data:`` URIs are decoded, this emulator's own ``/cdn/files/`` URLs are resolved from
        its stores without HTTP, and other http(s) URLs are fetched with ``client``.
        """
        if url.startswith("data:"):
            data = decode_data_uri(url)
        elif url.startswith(("http://", "https://")):
            path = urllib.parse.urlsplit(url).path
            key = path[len(_CDN_PATH) :] if path.startswith(_CDN_PATH) else None
            output = self._live_output(key[len(OUTPUT_PREFIX) :]) if key else None
            if output is not None:
                return output.width, output.height
            stored = self.files.get(key) if key else None
            data = stored.data if stored is not None else await self._fetch(url, client)
        else:
            raise InputImageError(f"unsupported image URL {_short(url)}")
        try:
            info = read_image_info_bytes(data)
        except ImageInfoError as exc:
            raise InputImageError(f"cannot read image {_short(url)}: {exc}") from exc
        return info.width, info.height

    async def _fetch(self, url: str, client: httpx.AsyncClient) -> bytes:
        try:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InputImageError(
                        f"image {_short(url)} answered HTTP {response.status_code}"
                    )
                chunks: list[bytes] = []
                size = 0
                body = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
                async with contextlib.aclosing(body) as stream:
                    async for chunk in stream:
                        size += len(chunk)
                        if size > self.max_input_bytes:
                            raise InputImageError(f"image {_short(url)} is too large")
                        chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise InputImageError(f"cannot fetch image {_short(url)}: {exc}") from exc
        return b"".join(chunks)


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a ``data:[<mime>][;base64],<data>`` URI; InputImageError if malformed."""
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:"):
        raise InputImageError("malformed data URI")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputImageError("data URI is not valid base64") from exc
    return urllib.parse.unquote_to_bytes(payload)


def _short(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."
