"""Remote input images' sizes, read from their first bytes (``--probe-inputs``): a Range
request for the header, a full GET only when a server ignores Range or the header does not
fit. Any HTTP error means "unknown", never a failure."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import cast

import httpx

from runner.endpoints.imageinfo import ImageInfoError, read_image_info_bytes

PROBE_HEAD_BYTES = 64 * 1024
PROBE_MAX_BYTES = 64 * 1024 * 1024


async def probe_size(
    http: httpx.AsyncClient,
    url: str,
    *,
    head_bytes: int = PROBE_HEAD_BYTES,
    max_bytes: int = PROBE_MAX_BYTES,
) -> tuple[int, int] | None:
    """A remote image's size from its first ``head_bytes`` (a Range request); a server
    that ignores Range, or a header that does not fit, costs a full GET. None if unknown."""
    try:
        data, complete = await _get(http, url, {"Range": f"bytes=0-{head_bytes - 1}"}, head_bytes)
        size = _size(data)
        if size is None and not complete:
            data, complete = await _get(http, url, {}, max_bytes)
            size = _size(data) if complete else None
    except httpx.HTTPError:
        return None
    return size


async def _get(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], limit: int
) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of a GET; the bool says whether that is the whole file."""
    chunks: list[bytes] = []
    got = 0
    stopped = False
    async with http.stream("GET", url, headers=headers) as response:
        if response.status_code not in (200, 206):
            return b"", True
        body = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
        async with contextlib.aclosing(body) as stream:  # closed even when we stop early
            async for chunk in stream:
                chunks.append(chunk)
                got += len(chunk)
                if got >= limit:
                    stopped = True
                    break
        total = _total_size(response)
    data = b"".join(chunks)[:limit]
    if response.status_code == 200:
        return data, not stopped
    return data, total is not None and len(data) >= total


def _total_size(response: httpx.Response) -> int | None:
    if response.status_code == 206:
        total = response.headers.get("content-range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = response.headers.get("content-length", "")
    return int(length) if length.isdigit() else None


def _size(data: bytes) -> tuple[int, int] | None:
    try:
        info = read_image_info_bytes(data)
    except ImageInfoError:
        return None
    return info.width, info.height
