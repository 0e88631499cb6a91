"""Broken answers the emulator's faults send: a gateway's error page, a connection cut mid-answer.

- :func:`nginx_error`: what fal's ingress answers when it, not the app, fails: a
  502/503/504 with an HTML body naming nginx and no ``x-fal-request-id``, which
  fal-client treats as retryable.
- :class:`AbortResponse`: an answer that is lost. The response is started with a
  Content-Length it never reaches, then the handler raises an httpx transport error
  (after ``hang_s`` for a timeout). In-process, httpx's ASGI transport re-raises that
  exception to the client (``httpx.RemoteProtocolError`` / ``httpx.ReadTimeout``);
  under uvicorn the started response makes it close the socket mid-body, which the
  client sees as the same kinds of error. :class:`QuietAborts` keeps uvicorn from
  logging a traceback for each.
"""

from __future__ import annotations

import logging

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

NGINX_BODY = (
    "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
REASONS = {502: "Bad Gateway", 503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}


class EmulatedDisconnect(httpx.RemoteProtocolError):
    """The emulator dropped the connection mid-answer (a fault)."""


class EmulatedTimeout(httpx.ReadTimeout):
    """The emulator stopped answering mid-answer (a fault)."""


class QuietAborts(logging.Filter):
    """Drops uvicorn's traceback for the emulator's deliberate aborts."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, EmulatedDisconnect | EmulatedTimeout)


class AbortResponse(Response):
    """Starts a 200 that never completes, then breaks the connection.

    uvicorn answers a handler that raises before the response starts with a clean 500,
    so the response is started first and cut short after ``partial``.
    """

    def __init__(
        self,
        kind: str,
        hang_s: float = 0.0,
        *,
        after: str = "the submit was accepted",
        partial: bytes = b'{"status": "IN_Q',
    ) -> None:
        super().__init__()
        self.kind = kind
        self.hang_s = hang_s
        self.after = after
        self.partial = partial

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"1024")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.partial, "more_body": True})
        if self.kind == "timeout":
            await anyio.sleep(self.hang_s)
            raise EmulatedTimeout(f"emulated: no answer after {self.after}")
        raise EmulatedDisconnect(f"emulated: connection reset after {self.after}")


def nginx_error(code: int) -> Response:
    """A gateway's answer: HTML naming nginx, no ``x-fal-request-id`` (fal-client retries it)."""
    html = NGINX_BODY.format(code=code, reason=REASONS[code])
    return Response(html, status_code=code, media_type="text/html")
