"""One short queue call, from a method and a URL to a whole :class:`~runner.fal.http1.Answer`.

:class:`Caller` sends the queue's one-shot calls (submit, status, result, cancel) for
:class:`runner.fal.client.QueueClient`. On the lean transport
(:class:`runner.fal.keepalive.KeepAliveTransport`) the request goes as bytes: the head's
fixed lines (host, key, user agent) are encoded once, a URL on the queue's origin whose
path needs no escaping is used as it is, and the body is ``json.dumps`` of the payload
exactly as httpx encodes it. That spares an ``httpx.Request`` (a URL parse and a header
table) and an ``httpx.Response`` per call, which together cost as much as the exchange.
Any other transport, or a URL the lean path cannot send verbatim, gets an
``httpx.Request``, so the bytes on the wire are the same either way: ``Host``,
``Authorization``, ``User-Agent``, any extra headers, then ``Content-Length`` and
``Content-Type`` for a JSON body.

Errors are httpx's; the client translates them at its one boundary.
"""

from __future__ import annotations

import json as jsonlib
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any, Literal

import anyio
import httpx
from pydantic import SecretStr

from runner.fal.http1 import Answer
from runner.fal.keepalive import KeepAliveTransport
from runner.fal.transport import CallTimeouts, fetch

Kind = Literal["submit", "read"]
_DEFAULT_PORTS = {b"http": 80, b"https": 443}
# A path and query httpx would send unchanged: RFC 3986 characters and valid escapes only.
_VERBATIM = re.compile(r"/(?:[A-Za-z0-9\-._~:/?@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
_JSON_LINES = b"Content-Type: application/json\r\n"
# httpx's JSON body encoding, one encoder for every call.
_BODY = jsonlib.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


class Caller:
    """The queue's one-shot calls over ``transport``, at most ``max_requests`` at a time."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        queue: httpx.URL,
        key: SecretStr,
        user_agent: str,
        timeouts: CallTimeouts,
        max_requests: int | None = None,
    ) -> None:
        self._transport = transport
        self._key = key
        self._user_agent = user_agent
        self._extensions = timeouts.extensions()
        # Bound requests in flight, not only jobs: httpcore's pool does work proportional
        # to its size on every request, and the lean one keeps as many connections as the
        # most requests ever in flight. Streams (one long request per job) are not counted.
        # A semaphore that takes a free place without a checkpoint: a CapacityLimiter also
        # tracks its borrowers, which cost as much as a call's own parsing.
        self._requests = anyio.Semaphore(max_requests, fast_acquire=True) if max_requests else None
        self._lean = transport if isinstance(transport, KeepAliveTransport) else None
        scheme = queue.raw_scheme
        self._origin = (scheme, queue.raw_host, queue.port or _DEFAULT_PORTS.get(scheme, 0))
        self._prefix = f"{queue.scheme}://{queue.netloc.decode('ascii')}/"
        self._host = b"Host: " + queue.netloc + b"\r\n"
        self._fixed = b"".join(b"%s: %s\r\n" % (name.encode(), value.encode())
                               for name, value in self.headers().items())  # fmt: skip
        self._timeout_s = {"submit": timeouts.submit_s, "read": timeouts.read_s}
        self._connect_s = timeouts.connect_s
        self._queries: dict[tuple[tuple[str, str], ...], str] = {}

    def headers(self) -> dict[str, str]:
        """The headers every queue request carries (the stream adds its own)."""
        return {
            "Authorization": f"Key {self._key.get_secret_value()}",
            "User-Agent": self._user_agent,
        }

    async def send(
        self,
        method: str,
        url: str,
        *,
        kind: Kind,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        if self._requests is None:
            return await self._send(method, url, kind, json, params, headers)
        async with self._requests:
            return await self._send(method, url, kind, json, params, headers)

    async def _send(
        self,
        method: str,
        url: str,
        kind: Kind,
        json: Any,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
    ) -> Answer:
        target = self._target(url, params) if self._lean is not None else None
        if target is None:
            request = httpx.Request(
                method,
                url,
                json=json,
                params=params,
                headers={**self.headers(), **headers} if headers else self.headers(),
                extensions=self._extensions[kind],
            )
            return Answer.of(await fetch(self._transport, request))
        assert self._lean is not None
        # The order httpx gives them: Host (and a bodiless POST or PUT's zero length), the
        # client's headers, then the JSON body's length and type.
        head = b"%s %s HTTP/1.1\r\n%s" % (method.encode("ascii"), target, self._host)
        if json is None and method in ("POST", "PUT", "PATCH"):
            head += b"Content-Length: 0\r\n"
        head += self._fixed
        if headers:
            head += _header_lines(headers)
        if json is not None:
            data = _BODY(json).encode()
            head += b"Content-Length: %d\r\n" % len(data) + _JSON_LINES + b"\r\n" + data
        else:
            head += b"\r\n"
        status, raw, content = await self._lean.call(
            self._origin, head, method=method, label=f"{method} {url}",
            timeout_s=self._timeout_s[kind], connect_timeout_s=self._connect_s,
        )  # fmt: skip
        return Answer.parsed(status, raw, content, method, url)

    def _target(self, url: str, params: Mapping[str, str] | None) -> bytes | None:
        """The request target to send verbatim, or None when httpx must build it."""
        if not url.startswith(self._prefix):
            return None
        path = url[len(self._prefix) - 1 :]
        if _VERBATIM.fullmatch(path) is None or "/." in path:
            return None  # httpx would escape it, or remove dot segments
        if params:
            if "?" in path:
                return None  # httpx merges the two queries
            path += "?" + self._query(params)
        return path.encode("ascii")

    def _query(self, params: Mapping[str, str]) -> str:
        """``urlencode`` of the parameters, as httpx encodes them (a few shapes a run)."""
        items = tuple(params.items())
        query = self._queries.get(items)
        if query is None:
            query = urllib.parse.urlencode(items)
            if len(self._queries) < 64:
                self._queries[items] = query
        return query


def _header_lines(headers: Mapping[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        raw_name, raw_value = name.encode("ascii"), value.encode("ascii")
        if b"\r" in raw_value or b"\n" in raw_value or b"\r" in raw_name or b"\n" in raw_name:
            raise httpx.LocalProtocolError("header with a line break")
        if raw_name.lower() == b"expect":
            raise httpx.LocalProtocolError("Expect is not supported here")
        lines.append(b"%s: %s\r\n" % (raw_name, raw_value))
    return b"".join(lines)
