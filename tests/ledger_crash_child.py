"""A ledger writer for tests/test_ledger_crash.py, meant to be SIGKILLed.

    python tests/ledger_crash_child.py RUN_DIR PREFIX CRASH

Concurrent tasks each walk jobs through submitting -> queued -> completed,
committing after every event, and print ``<seq> <job_key> <state> <request_id>``
(flushed) once the commit returned. CRASH injects a SIGKILL at a chosen
point: ``none``, or ``<point>:<n>`` for the n-th call of that point:

    fsync         before an fsync (journal line written, not yet synced)
    replace       right after a part's rename, before the journal is dropped
    torn_part     mid part write (half the file on disk, then killed)
    torn_journal  mid journal append (half the bytes written)
    unlink        before deleting a journal segment
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pyarrow.parquet as pq

from runner.ledger import JobState, Ledger, LedgerEvent
from runner.ledger.journal import SegmentWriter

TASKS = 4
MAX_JOBS = 400


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def counting(n: int, before: Callable[..., Any], real: Callable[..., Any]) -> Callable[..., Any]:
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n:
            return before(real, *args, **kwargs)
        return real(*args, **kwargs)

    return wrapper


def kill_first(real: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    die()


def kill_after(real: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    real(*args, **kwargs)
    die()


def torn_part(real: Callable[..., Any], table: Any, handle: Any, **kwargs: Any) -> Any:
    real(table, handle, **kwargs)
    handle.flush()
    os.ftruncate(handle.fileno(), handle.tell() // 2)
    die()


def torn_journal(real: Callable[..., Any], writer: SegmentWriter, data: bytes) -> Any:
    real(writer, data[: max(1, len(data) // 2)])
    die()


def install(crash: str) -> None:
    if crash == "none":
        return
    point, n_text = crash.split(":")
    n = int(n_text)
    if point == "fsync":
        os.fsync = counting(n, kill_first, os.fsync)
    elif point == "replace":
        os.replace = counting(n, kill_after, os.replace)
    elif point == "unlink":
        Path.unlink = counting(n, kill_first, Path.unlink)  # type: ignore[method-assign]
    elif point == "torn_part":
        pq.write_table = counting(n, torn_part, pq.write_table)
    elif point == "torn_journal":
        SegmentWriter.write = counting(n, torn_journal, SegmentWriter.write)  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown crash point {point}")


def report(seq: int, key: str, state: str, request_id: str) -> None:
    sys.stdout.write(f"{seq} {key} {state} {request_id}\n")
    sys.stdout.flush()


async def worker(ledger: Ledger, prefix: str, task: int) -> None:
    for i in range(task, MAX_JOBS, TASKS):
        key = f"{prefix}-{i:04d}"
        request_id = f"req-{key}"
        now = datetime.now(UTC)
        steps = [
            LedgerEvent(
                key, JobState.SUBMITTING, now, row_id=key, endpoint="fal-ai/flux/dev", attempt=1
            ),
            LedgerEvent(key, JobState.QUEUED, now, request_id=request_id),
            LedgerEvent(key, JobState.COMPLETED, now, completed_at=now),
        ]
        for event in steps:
            seq = ledger.append(event)
            await ledger.commit()
            report(seq, key, event.state.value, request_id)


async def main(run_dir: Path, prefix: str) -> None:
    ledger = Ledger.open(run_dir, checkpoint_events=30)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    async with anyio.create_task_group() as tg:
        for task in range(TASKS):
            tg.start_soon(worker, ledger, prefix, task)
    await ledger.aclose()


if __name__ == "__main__":
    install(sys.argv[3])
    anyio.run(main, Path(sys.argv[1]), sys.argv[2])
