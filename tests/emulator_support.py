"""Shared helpers for the emulator's tests: a fake clock, an in-process client, tiny images."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from PIL import Image

from runner.emulator import DEFAULT_KEY, Emulator, EmulatorConfig, ServiceTime

T0 = 1_900_000_000.0
AUTH = {"Authorization": f"Key {DEFAULT_KEY}"}
SCALE = 0.01  # clock seconds per emulated second
JOB_S = 10.0  # emulated seconds per job with the fixed service time
JOB_CLOCK_S = JOB_S * SCALE


class FakeClock:
    """Unix seconds that only move when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_emulator(clock: FakeClock, **overrides: Any) -> Emulator:
    """Fixed 10 s (emulated) jobs at time scale 0.01, one slot unless told otherwise."""
    http = overrides.pop("http_client", None)
    options: dict[str, Any] = {
        "time_scale": SCALE,
        "concurrency": 1,
        "service": ServiceTime(fixed_s=JOB_S),
    }
    options.update(overrides)
    return Emulator(EmulatorConfig(**options), clock=clock, http_client=http)


@asynccontextmanager
async def in_process(emulator: Emulator, *, auth: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=emulator.app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://emulator", headers=AUTH if auth else {}
    ) as client:
        yield client


def png_bytes(width: int, height: int, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(out, format=fmt)
    return out.getvalue()


def data_uri(width: int, height: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(width, height)).decode()
