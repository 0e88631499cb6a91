"""Shared test configuration.

Async tests run on asyncio by default (the CLI runs on asyncio); RUNNER_TEST_BACKENDS=
asyncio,trio runs them on both anyio backends. On trio, 7 tests fail today (measured
2026-11-21): the webhook receiver and the emulator's server are uvicorn, which is asyncio
only, and httpx leaves its inner byte-stream generators (aiter_raw, BoundAsyncStream) for
the garbage collector when a status stream or upload response is left early, which trio
reports as a ResourceWarning (an error under filterwarnings=error).
"""

from __future__ import annotations

import os

import pytest

BACKENDS = [b for b in os.environ.get("RUNNER_TEST_BACKENDS", "asyncio").split(",") if b]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
