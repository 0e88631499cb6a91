"""One HTTP/1.1 exchange as bytes: the request head, an incremental response parser, the answer.

Shared by both drivers of :mod:`runner.fal.keepalive` (an asyncio protocol fed by the event
loop, and an anyio byte stream read in a loop): each feeds a :class:`ResponseParser` the
bytes as they arrive until it says the response is whole. :class:`Answer` is what the
:class:`runner.fal.client.QueueClient` reads: a status code, headers by lower-case name, the
body. It is built straight from the parsed bytes on the lean path and from an
``httpx.Response`` on any other transport, so the client has one code path for both.

Errors are httpx's (``RemoteProtocolError`` and ``LocalProtocolError``): the client
translates httpx's tree at its one boundary.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import httpx

HEAD_LIMIT = 64 * 1024  # bytes of status line and headers (or a chunk line) before refusing
_NO_BODY = frozenset({204, 304})
RawHeaders = list[tuple[bytes, bytes]]


def request_head(method: str, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``METHOD target HTTP/1.1`` and the header lines, ending with the blank line.

    A name or value with a line break, or ``Expect`` (this client never waits for a
    ``100 Continue``), is refused rather than sent."""
    lines = [method.encode("ascii") + b" " + (target or b"/") + b" HTTP/1.1"]
    for name, value in headers:
        if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
            raise httpx.LocalProtocolError("header with a line break")
        if name.lower() == b"expect":
            raise httpx.LocalProtocolError("Expect is not supported here")
        lines.append(name + b": " + value)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


_HEAD, _LENGTH, _CHUNKS, _TO_CLOSE, _DONE = range(5)
_CHUNK_SIZE, _TRAILERS = -1, -2  # what a chunked body expects next, besides chunk data


class ResponseParser:
    """Feed it the bytes of one response in any pieces; :meth:`feed` says when it is whole.

    1xx answers are skipped. The body is read by ``Content-Length``, by chunks (trailers
    read and dropped), or to the close; ``HEAD`` answers and 204/304 have none. Bytes past
    the end of the response (:attr:`spare`) make the connection unfit for reuse.
    """

    __slots__ = ("_buf", "_chunk", "_length", "_method", "_parts", "_state", "body", "headers",
                 "keep", "status")  # fmt: skip

    def __init__(self, method: str) -> None:
        self._method = method
        self._buf = bytearray()
        self._state = _HEAD
        self._length = 0
        self._chunk = _CHUNK_SIZE
        self._parts: list[bytes] = []
        self.status = 0
        self.headers: RawHeaders = []
        self.body = b""
        self.keep = False

    @property
    def spare(self) -> bool:
        return bool(self._buf)

    def feed(self, data: bytes) -> bool:
        """Take more bytes; True once the response is whole. Raises on a broken one."""
        self._buf += data
        while True:
            state = self._state
            if state == _LENGTH:
                if len(self._buf) < self._length:
                    return False
                self._take_body(self._length)
            elif state == _HEAD:
                if not self._head():
                    return False
            elif state == _CHUNKS:
                if not self._chunks():
                    return False
            else:
                return state == _DONE

    def feed_eof(self) -> None:
        """The server closed: that ends a body read to the close; anything else unfinished
        is a protocol error."""
        if self._state == _TO_CLOSE:
            self.body = bytes(self._buf)
            self._buf.clear()
            self._state = _DONE
        elif self._state == _HEAD:
            raise httpx.RemoteProtocolError("server closed the connection before answering")
        elif self._state != _DONE:
            raise httpx.RemoteProtocolError("server closed the connection mid-body")

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def _take_body(self, size: int) -> None:
        self.body = bytes(self._buf[:size])
        del self._buf[:size]
        self._state = _DONE

    def _head(self) -> bool:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > HEAD_LIMIT:
                raise httpx.RemoteProtocolError("response head too long")
            return False
        raw = bytes(buf[:end])
        del buf[: end + 4]
        status, version, headers = parse_head(raw)
        if status < 200:
            return True  # an informational answer (none expected): the real one follows
        self.status, self.headers = status, headers
        length: int | None = None
        chunked = False
        keep = version == b"HTTP/1.1"
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0:
                    raise httpx.RemoteProtocolError(f"bad Content-Length {value!r}")
            elif lower == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
            elif lower == b"connection":
                token = value.lower()
                keep = b"close" not in token and (keep or b"keep-alive" in token)
        self.keep = keep
        if self._method == "HEAD" or status in _NO_BODY:
            self._state = _DONE
        elif chunked:
            self._state = _CHUNKS
        elif length is not None:
            self._state, self._length = _LENGTH, length
        else:
            self._state, self.keep = _TO_CLOSE, False
        return True

    def _line(self) -> bytes | None:
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > HEAD_LIMIT:
                raise httpx.RemoteProtocolError("chunk line too long")
            return None
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        return line

    def _chunks(self) -> bool:
        """Consume what the buffer holds of a chunked body; True when the body is whole."""
        while True:
            if self._chunk >= 0:  # chunk data, then its CRLF
                if len(self._buf) < self._chunk + 2:
                    return False
                if self._buf[self._chunk : self._chunk + 2] != b"\r\n":
                    raise httpx.RemoteProtocolError("chunk not followed by CRLF")
                self._parts.append(bytes(self._buf[: self._chunk]))
                del self._buf[: self._chunk + 2]
                self._chunk = _CHUNK_SIZE
                continue
            line = self._line()
            if line is None:
                return False
            if self._chunk == _TRAILERS:
                if not line:  # the blank line after the trailers ends the body
                    self.body, self._parts = b"".join(self._parts), []
                    self._state = _DONE
                    return True
                continue
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                size = -1
            if size < 0:
                raise httpx.RemoteProtocolError(f"bad chunk size {size_text[:20]!r}")
            self._chunk = _TRAILERS if size == 0 else size


def parse_head(raw: bytes) -> tuple[int, bytes, RawHeaders]:
    """Status code, version and header pairs of a response head (without the blank line)."""
    first, _, rest = raw.partition(b"\r\n")
    parts = first.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"bad status line {first[:80]!r}")
    headers: RawHeaders = []
    for line in rest.split(b"\r\n") if rest else ():
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"bad header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return int(parts[1]), parts[0], headers


class Answer:
    """A whole response as the queue client reads it. ``headers`` are keyed by lower-case
    name (repeated ones joined with ``", "``, as httpx joins them)."""

    __slots__ = ("content", "headers", "method", "status_code", "url")

    def __init__(
        self, status_code: int, headers: dict[str, str], content: bytes, method: str, url: str
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self.method = method
        self.url = url

    @classmethod
    def parsed(
        cls, status_code: int, raw: RawHeaders, body: bytes, method: str, url: str
    ) -> Answer:
        """From the parsed bytes; a compressed body (never asked for) is decoded by httpx."""
        headers: dict[str, str] = {}
        for name, value in raw:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        coding = headers.get("content-encoding")
        if coding is not None and coding.strip().lower() != "identity":
            body = httpx.Response(status_code, headers=raw, content=body).content
        return cls(status_code, headers, body, method, url)

    @classmethod
    def of(cls, response: httpx.Response) -> Answer:
        """From a read ``httpx.Response`` (any other transport)."""
        headers = {name.lower(): value for name, value in response.headers.items()}
        request = response.request
        return cls(response.status_code, headers, response.content, request.method,
                   str(request.url))  # fmt: skip

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        """The body as text: the charset the answer names, else UTF-8; bad bytes replaced."""
        if not self.content:
            return ""
        charset = "utf-8"
        for param in self.headers.get("content-type", "").split(";")[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset" and value.strip():
                charset = value.strip().strip("\"'")
        try:
            return self.content.decode(charset, errors="replace")
        except LookupError:  # a charset Python does not know
            return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)
