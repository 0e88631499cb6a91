"""Where a queue request lives: its submit URL from an endpoint id, and its status, result,
cancel and stream URLs from the endpoint and request ids alone (to re-attach to a request
the ledger recorded without its acknowledgement). Pure: strings in, strings out."""

from __future__ import annotations

import re

import httpx

from runner.errors import UsageError
from runner.fal.protocol import RequestUrls

NAMESPACES = frozenset({"workflows", "comfy"})  # ids shaped namespace/owner/app[/path]
_SEGMENT = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*")


def submit_url(queue: str, endpoint_id: str) -> str:
    """``{queue}/{owner}/{app}[/{path}]``: the full id, sub-path included."""
    return f"{queue}/{'/'.join(_segments(endpoint_id))}"


def request_urls(queue: str, endpoint_id: str, request_id: str) -> RequestUrls:
    """A request's URLs from its ids alone (owner/app only, no sub-path)."""
    parts = _segments(endpoint_id)
    app = parts[:3] if parts[0] in NAMESPACES else parts[:2]
    if not _SEGMENT.fullmatch(request_id):
        raise UsageError(f"not a request id: {request_id!r}")
    base = f"{queue}/{'/'.join(app)}/requests/{request_id}"
    return RequestUrls(
        request_id=request_id,
        status_url=f"{base}/status",
        response_url=base,
        cancel_url=f"{base}/cancel",
    )


def stream_url(status_url: str) -> str:
    """The status stream of a request: its status URL with ``/stream``, no query."""
    url = httpx.URL(status_url)
    return str(url.copy_with(path=url.path.rstrip("/") + "/stream", query=None))


def _segments(endpoint_id: str) -> list[str]:
    parts = endpoint_id.strip("/").split("/")
    minimum = 3 if parts[0] in NAMESPACES else 2
    if len(parts) < minimum or not all(_SEGMENT.fullmatch(p) for p in parts):
        raise UsageError(f"endpoint id must look like owner/app[/path], got {endpoint_id!r}")
    return parts
