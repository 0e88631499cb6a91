"""Several fal accounts for tests: one emulator per key, behind one address.

Requests are routed by their ``Authorization: Key ...`` header to the emulator whose key it
is (an unknown key goes to the first, which answers 401), so each key has its own slots,
queue and stats, as separate fal accounts do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from pydantic import SecretStr

from runner.emulator import Emulator, EmulatorConfig

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Router:
    """The ASGI app in front (a class with an async ``__call__``, so uvicorn sees ASGI 3)."""

    def __init__(self, by_key: Mapping[str, Emulator]) -> None:
        self.by_key = by_key
        self.first = next(iter(by_key.values()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        emu = self.first
        if scope["type"] == "http":
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    emu = self.by_key.get(value.decode().partition(" ")[2], emu)
        await emu.app(scope, receive, send)


class Accounts:
    """Emulators by key, and one ASGI app in front of them (``app``, ``running()``): what
    :func:`runner.emulator.server.serve` and ``httpx.ASGITransport`` need of an emulator."""

    def __init__(self, concurrency_by_key: Mapping[str, int], *, time_scale: float) -> None:
        self.by_key = {
            key: Emulator(
                EmulatorConfig(
                    key=SecretStr(key), concurrency=n, time_scale=time_scale,
                    result_retention_s=1e9,
                )
            )
            for key, n in concurrency_by_key.items()
        }  # fmt: skip
        self.app = Router(self.by_key)
        self.config = self.app.first.config

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Accounts]:
        async with AsyncExitStack() as stack:
            for emu in self.by_key.values():
                await stack.enter_async_context(emu.running())
            yield self
