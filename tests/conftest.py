"""Shared test configuration.

Async tests run on asyncio by default; RUNNER_TEST_BACKENDS=asyncio,trio runs them on
both anyio backends (the core uses anyio APIs only, so both must pass).
"""

from __future__ import annotations

import os

import pytest

BACKENDS = [b for b in os.environ.get("RUNNER_TEST_BACKENDS", "asyncio").split(",") if b]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
