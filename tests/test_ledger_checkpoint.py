"""Checkpoints: events wait in the journal, not in memory; no tiny parts pile up."""

from __future__ import annotations

import gc
import tracemalloc
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from runner.errors import LedgerError
from runner.ledger import JobState, Ledger, LedgerEvent, LedgerState, compact, read_events
from runner.ledger.journal import list_segments
from runner.ledger.parts import part_rows, scan_parts

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def event(i: int) -> LedgerEvent:
    return LedgerEvent(
        f"{i:032x}", JobState.SUBMITTING, NOW, row_id=f"row-{i}", line=i, source="m.csv",
        endpoint="fal-ai/flux/dev", request='{"prompt":"' + "a cat " * 15 + '"}',
        metadata={"sku": f"SKU-{i}"}, estimated_usd=Decimal("0.025"), attempt=1,
    )  # fmt: skip


def part_sizes(run_dir: Path) -> list[int]:
    return [part_rows(p.path) for p in scan_parts(run_dir / "ledger")[0]]


def test_committed_events_are_not_held_in_memory_until_the_checkpoint(tmp_path: Path) -> None:
    events = [event(i) for i in range(3000)]
    with Ledger.open(tmp_path, checkpoint_events=10**6) as ledger:
        ledger.append(events[0])
        ledger.commit_sync()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for e in events[1:]:
                ledger.append(e)
                ledger.commit_sync()
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # An event kept as a dict until the checkpoint costs ~700 bytes.
        assert held < 50 * len(events), held
        assert part_sizes(tmp_path) == []
    assert part_sizes(tmp_path) == [3000]
    assert read_events(tmp_path).table["job_key"].to_pylist() == [e.job_key for e in events]


@pytest.mark.anyio
async def test_concurrent_committers_write_one_part_per_checkpoint(tmp_path: Path) -> None:
    threshold = 40

    async def worker(ledger: Ledger, task: int) -> None:
        for i in range(task, 2000, 16):
            ledger.append(event(i))
            await ledger.commit()

    ledger = Ledger.open(tmp_path, checkpoint_events=threshold)
    async with ledger:
        async with anyio.create_task_group() as tg:
            for task in range(16):
                tg.start_soon(worker, ledger, task)
        sizes = part_sizes(tmp_path)
    # Every part written during the run is a full checkpoint; none of a few events.
    assert sizes and min(sizes) >= threshold, sizes
    assert sum(part_sizes(tmp_path)) == 2000


def test_small_parts_from_closes_are_merged_not_piled_up(tmp_path: Path) -> None:
    n = 0
    for _run in range(6):  # six short runs, each closing with fewer events than a checkpoint
        with Ledger.open(tmp_path, checkpoint_events=50) as ledger:
            for _ in range(13):
                ledger.append(event(n))
                ledger.commit_sync()
                n += 1
    sizes = part_sizes(tmp_path)
    assert sum(sizes) == n and all(s < 50 for s in sizes[-1:]), sizes
    assert len(sizes) <= 2 and all(s >= 50 for s in sizes[:-1]), sizes
    assert list(read_events(tmp_path).table["seq"].to_pylist()) == list(range(1, n + 1))
    before = LedgerState.load(tmp_path).jobs
    assert compact(tmp_path) == len(sizes) or len(sizes) == 1
    assert LedgerState.load(tmp_path).jobs.equals(before)


def test_a_journal_that_does_not_read_back_is_kept(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path, checkpoint_events=10**6)
    for i in range(20):
        ledger.append(event(i))
    ledger.commit_sync()
    segment = list_segments(tmp_path / "journal")[0]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0x01  # a bit flipped on disk after the fsync
    segment.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match="does not read back"):
        ledger.checkpoint_sync()
    assert segment.exists() and part_sizes(tmp_path) == []
    with pytest.raises(LedgerError):
        ledger.close()
