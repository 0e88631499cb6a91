"""Helpers for scenario tests: a runner wired to an in-process emulator."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from runner.config import RunConfig, build_config
from runner.emulator import DEFAULT_KEY, Emulator, EmulatorConfig, FaultConfig
from runner.execution.engine import Hooks, execute
from runner.execution.summary import RunReport
from runner.fal.retry import RetryPolicies, RetryPolicy

EMULATOR_URL = "http://emulator"
# The production rules with millisecond waits, so fault storms do not cost test time.
FAST_SUBMIT = RetryPolicy(attempts=8, base_s=0.005, max_s=0.05)
FAST_READ = RetryPolicy(attempts=20, timeout_s=30.0, base_s=0.005, max_s=0.05)
FAST_POLICIES = RetryPolicies(submit=FAST_SUBMIT, read=FAST_READ)


def manifest(tmp_path: Path, rows: int, *, name: str = "m.csv", extra: str = "") -> Path:
    path = tmp_path / name
    lines = ["id,endpoint,prompt,image_size,seed" + ("," + extra if extra else "")]
    for i in range(rows):
        lines.append(f"r{i},fal-ai/flux-lora,prompt number {i},square,{i}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_config(path: Path, run_dir: Path, **overrides: Any) -> RunConfig:
    values: dict[str, Any] = {
        "manifest": path,
        "run_dir": run_dir,
        "key": SecretStr(DEFAULT_KEY),
        "queue_url": EMULATOR_URL,
        # Storage follows the queue to the emulator: a test never names a real fal host.
        "rest_url": f"{EMULATOR_URL}/rest",
        "cdn_url": f"{EMULATOR_URL}/cdn",
        "api_url": f"{EMULATOR_URL}/api",
        "concurrency": 2,
        "rate_per_s": 1000.0,
        "quiet": True,
    }
    values.update(overrides)
    return build_config(values)


@asynccontextmanager
async def emulator(
    *, concurrency: int = 2, time_scale: float = 0.005, faults: FaultConfig | None = None,
    **kw: Any,
) -> AsyncIterator[Emulator]:  # fmt: skip
    # Results stay as long as a test runs, unless a test is about expiry.
    kw.setdefault("result_retention_s", 1e9)
    config = EmulatorConfig(
        concurrency=concurrency, time_scale=time_scale, faults=faults or FaultConfig(), **kw
    )
    emu = Emulator(config)
    async with emu.running():
        yield emu


async def run(
    emu: Emulator, config: RunConfig, *, policies: RetryPolicies = FAST_POLICIES
) -> RunReport:
    hooks = Hooks(
        transport=httpx.ASGITransport(app=emu.app),
        stream=io.StringIO(),
        handle_signals=False,
        policies=policies,
    )
    return await execute(config, hooks=hooks)
