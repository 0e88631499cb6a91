"""File-lock slot leases: the slots of one key shared by processes on one machine
(runner.execution.lease), tested with several ``runner run --shard K`` processes against one
emulator on loopback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

from runner.execution.lease import FileSlots

pytestmark = pytest.mark.anyio


async def test_slots_are_shared_by_two_holders_of_one_directory(tmp_path: Path) -> None:
    first = FileSlots(tmp_path / "gate", 2, poll_s=0.001)
    second = FileSlots(tmp_path / "gate", 2, poll_s=0.001)
    await first.acquire()
    await first.acquire()
    with anyio.move_on_after(0.05) as waited:
        await second.acquire()
    assert waited.cancelled_caught  # both slots are held by `first`
    first.release()
    with anyio.fail_after(1):
        await second.acquire()
    assert (first.held, second.held) == (1, 1)
    first.close()
    second.close()


async def test_a_dead_holder_frees_its_slot(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    code = (
        "import anyio, os, sys; from pathlib import Path; from runner.execution.lease import "
        "FileSlots\ns = FileSlots(Path(sys.argv[1]), 1)\nanyio.run(s.acquire)\n"
        "print('held', flush=True)\nos.kill(os.getpid(), 9)\n"
    )
    result = await anyio.run_process([sys.executable, "-c", code, str(gate)], check=False)
    assert result.stdout == b"held\n" and result.returncode == -9
    with anyio.fail_after(1):
        slots = FileSlots(gate, 1, poll_s=0.001)
        await slots.acquire()
    slots.close()


_HOLDER = """
import anyio, sys, time
from pathlib import Path
from runner.execution.lease import FileSlots

async def main() -> None:
    slots = FileSlots(Path(sys.argv[1]), 2, poll_s=0.001)
    with open(sys.argv[2], "a") as log:
        for _ in range(40):
            await slots.acquire()
            start = time.monotonic()
            await anyio.sleep(0.003)
            print(start, time.monotonic(), file=log)
            log.flush()
            slots.release()

anyio.run(main)
"""


def _overlap(tmp_path: Path) -> tuple[list[tuple[float, int]], int]:
    """Every hold's start and end from the logs, and the most held at once."""
    marks = []
    for log in tmp_path.glob("*.log"):
        for line in log.read_text().splitlines():
            start, end = map(float, line.split())
            marks += [(start, 1), (end, -1)]
    held = peak = 0
    for _at, step in sorted(marks, key=lambda m: (m[0], m[1])):
        held += step
        peak = max(peak, held)
    return marks, peak


async def test_holders_in_four_processes_never_exceed_the_count(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}

    async def holder(n: int) -> None:
        argv = [sys.executable, "-c", _HOLDER, str(tmp_path / "gate"), str(tmp_path / f"{n}.log")]
        # The logs are the evidence (asyncio may report a fast child's exit as 255).
        done = await anyio.run_process(argv, env=env, check=False)
        assert not done.stderr, done.stderr.decode()[-1000:]

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(holder, n)
    marks, peak = _overlap(tmp_path)
    assert len(marks) == 2 * 4 * 40
    assert peak == 2  # held side by side, never by three
