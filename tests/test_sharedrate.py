"""A key's AIMD level shared by processes through the gate directory
(runner.execution.sharedrate): a 429 seen by one process slows the others on the key."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest

from runner.emulator.settings import DEFAULT_KEY
from runner.execution.ratelimit import AdaptiveRate
from runner.execution.sharedrate import FileLevel
from runner.fal.key import fingerprint
from tests.scenario import manifest
from tests.torture_support import child_env

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_throttle_in_one_holder_lowers_the_level_of_another(tmp_path: Path) -> None:
    clock = Clock()
    seen_429, other = FileLevel(tmp_path, clock=clock), FileLevel(tmp_path, clock=clock)
    assert other.level() == 1.0
    seen_429.throttle()
    assert other.level() == 0.5
    seen_429.throttle()  # a volley of 429s inside the cooldown counts once
    assert other.level() == 0.5
    clock.now += 2.5
    other.throttle()
    assert seen_429.level() == 0.25
    for _ in range(50):  # successes raise it back, a step each, up to the full level
        other.success()
    assert seen_429.level() == 1.0


async def test_the_rate_follows_the_shared_level(tmp_path: Path) -> None:
    clock = Clock()

    async def sleep(seconds: float) -> None:
        clock.now += seconds

    level = FileLevel(tmp_path)
    rate = AdaptiveRate(10.0, level=level, clock=clock, sleep=sleep)
    await rate.acquire()
    assert rate.rate_per_s == 10.0
    FileLevel(tmp_path).throttle()  # another process on the key saw a 429
    await rate.acquire()
    assert rate.rate_per_s == 5.0
    # Its own 429 inside the cooldown of the other's: one signal, not two.
    assert rate.on_throttle() is False and rate.rate_per_s == 5.0
    before = clock.now
    await rate.acquire()
    assert clock.now - before == pytest.approx(1 / 5.0)  # a token every 0.2 s now


@pytest.mark.timeout(120)
async def test_a_429_seen_by_another_process_slows_this_one(tmp_path: Path) -> None:
    path = manifest(tmp_path, 8)
    gates = tmp_path / "gates"
    argv = [sys.executable, "-m", "runner", "run", str(path), "--ledger", str(tmp_path / "run"),
            "--emulator", "--emulator-time-scale", "0.002", "--emulator-faults",
            "submit_429=@1+2+3", "--shards", "2", "--gate-dir", str(gates), "--no-download",
            "--quiet"]  # fmt: skip
    level = FileLevel(gates / fingerprint(DEFAULT_KEY))
    ours = AdaptiveRate(10.0, level=level)
    await ours.acquire()
    assert ours.rate_per_s == 10.0
    done = await anyio.run_process(argv, env=child_env(), check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()[-1500:]
    # Its 429s halved the key's level (once: they came within the cooldown); its
    # successes since have raised it a step of 1/50 each, at most 8 of them.
    shared = level.level()
    assert 0.5 <= shared <= 0.5 + 8 / 50 + 1e-9, shared
    await ours.acquire()
    assert ours.rate_per_s == pytest.approx(10.0 * shared)
