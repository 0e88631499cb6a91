"""The queue's status stream: an incremental server-sent-events parser, and each event's
``data`` read as a status (:func:`runner.fal.protocol.parse_status`). Pure: no I/O."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator

from runner.errors import ProtocolError
from runner.fal.protocol import Status, parse_status


class SSEParser:
    """Incremental server-sent-events parser: feed bytes in any chunking, get ``data`` payloads.

    Follows the WHATWG rules the queue needs: lines end in LF, CRLF or CR; ``:`` lines are
    comments (keep-alives); ``data`` lines of one event are joined with LF; an event is
    dispatched on a blank line; ``event``/``id``/``retry`` fields are ignored.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._pending = ""
        self._data: list[str] = []
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[str]:
        """Consume a chunk; return the data of each event completed by it."""
        try:
            text = self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise ProtocolError("status stream is not valid UTF-8") from exc
        return list(self._consume(text))

    def _consume(self, text: str) -> Iterator[str]:
        if self._skip_lf and text.startswith("\n"):
            text = text[1:]  # second half of a CRLF split across chunks
        self._skip_lf = False
        buf = self._pending + text
        start = i = 0
        while i < len(buf):
            ch = buf[i]
            if ch == "\r" or ch == "\n":
                event = self._line(buf[start:i])
                if event is not None:
                    yield event
                if ch == "\r" and i + 1 < len(buf) and buf[i + 1] == "\n":
                    i += 1
                elif ch == "\r" and i + 1 == len(buf):
                    self._skip_lf = True
                start = i + 1
            i += 1
        self._pending = buf[start:]

    def _line(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


def parse_event_status(data: str) -> Status:
    """Parse one SSE ``data`` payload as a status."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise ProtocolError("status stream event is not JSON") from exc
    return parse_status(obj)
