"""What the shards run in one process share (runner.scale.shards): one reading of the
manifest, one price table per key, commit rounds over their ledgers; so a sharded run
costs about what the same run unsharded costs, call for call."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import runner.execution.jobsource as jobsource
from runner.errors import LedgerError, ManifestError
from runner.execution.engine import Hooks, execute
from runner.ledger import JobState, Ledger, LedgerEvent, read_events
from runner.ledger.commits import CommitGroup
from runner.ledger.journal import SegmentWriter
from runner.manifest.batches import iter_manifest_jobs
from runner.manifest.identity import shard_of
from runner.manifest.jobs import Job
from runner.scale.feed import ManifestFeed
from runner.scale.shards import execute_sharded
from tests.scenario import FAST_POLICIES, emulator, manifest, run_config

pytestmark = pytest.mark.anyio


def _hooks(emu: Any) -> Hooks:
    return Hooks(
        transport=httpx.ASGITransport(app=emu.app),
        stream=io.StringIO(),
        handle_signals=False,
        policies=FAST_POLICIES,
    )


async def _calls(tmp_path: Path, name: str, rows: int, shards: int | None) -> dict[str, int]:
    path = manifest(tmp_path, rows)
    config = run_config(path, tmp_path / name, shards=shards, concurrency=4, download=False)
    async with emulator(concurrency=4, time_scale=0.002) as emu:
        run = execute_sharded if shards is not None else execute
        report = await run(config, hooks=_hooks(emu))
        calls = dict(emu.stats.calls)
    assert report.exit_code == 0, report.message
    assert report.tally.completed == rows
    return calls


async def test_sixteen_shards_make_the_calls_of_one_run(tmp_path: Path) -> None:
    plain = await _calls(tmp_path, "plain", 64, None)
    sharded = await _calls(tmp_path, "sharded", 64, 16)
    # The key's prices are asked once, not once per shard (16 before).
    assert sharded.get("platform", 0) == plain.get("platform", 0) == 1, (plain, sharded)
    for kind in sorted(set(plain) | set(sharded)):
        mine, theirs = sharded.get(kind, 0), plain.get(kind, 0)
        assert abs(mine - theirs) <= max(2, theirs // 20), (kind, plain, sharded)


async def test_sixteen_shards_read_the_manifest_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readings: list[Path] = []
    real = iter_manifest_jobs

    def counted(path: Path, *args: Any, **kwargs: Any) -> Iterator[Any]:
        readings.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(jobsource, "iter_manifest_jobs", counted)
    path = manifest(tmp_path, 48)
    config = run_config(path, tmp_path / "run", shards=16, download=False)
    async with emulator(concurrency=2, time_scale=0.002) as emu:
        report = await execute_sharded(config, hooks=_hooks(emu))
    assert report.tally.completed == 48
    # Once to admit, once to count, as unsharded (each shard read it twice: 32 readings).
    assert len(readings) == 2, readings


def _of(batches: list[list[Any]]) -> list[str]:
    return [item.row_id for batch in batches for item in batch if isinstance(item, Job)]


async def test_the_feed_hands_each_shard_its_jobs_in_order(tmp_path: Path) -> None:
    path = manifest(tmp_path, 200)
    config = run_config(path, tmp_path / "run", shards=3, download=False)
    feed = ManifestFeed(config, [0, 1, 2], depth=1)
    got: dict[int, list[list[Any]]] = {0: [], 1: [], 2: []}

    async def read(shard: int, stop_after: int | None) -> None:
        source = feed.source(shard)
        while batch := await source.next_batch():
            got[shard].append(batch)
            if stop_after is not None and len(got[shard]) >= stop_after:
                source.close()  # this shard stops admitting: the others must not wait on it
                return

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed.run)
            tg.start_soon(read, 0, 1)
            tg.start_soon(read, 1, None)
            tg.start_soon(read, 2, None)
    mine = {k: [f"r{i}" for i in range(200) if shard_of(f"r{i}", 3) == k] for k in range(3)}
    for shard in (1, 2):
        assert _of(got[shard]) == mine[shard]
    assert len(got[0]) == 1
    # The bar's count: every shard's, from one more pass.
    counts: dict[int, tuple[int, Decimal]] = {}

    async def count(shard: int) -> None:
        counts[shard] = await feed.source(shard).count(lambda job: Decimal("0.5"))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed.run_count)
            for shard in range(3):
                tg.start_soon(count, shard)
    assert counts == {k: (len(mine[k]), Decimal("0.5") * len(mine[k])) for k in range(3)}
    assert feed.passes == 2
    feed.close()


async def test_a_manifest_error_reaches_every_shard(tmp_path: Path) -> None:
    config = run_config(tmp_path / "missing.csv", tmp_path / "run", shards=2, download=False)
    feed = ManifestFeed(config, [0, 1])
    errors: list[BaseException] = []

    async def read(shard: int) -> None:
        try:
            await feed.source(shard).next_batch()
        except ManifestError as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed.run)
            tg.start_soon(read, 0)
            tg.start_soon(read, 1)
    feed.close()
    assert len(errors) == 2


def _event(key: str) -> LedgerEvent:
    return LedgerEvent(job_key=key, state=JobState.QUEUED, at=datetime.now(UTC))


async def test_commit_rounds_fsync_several_ledgers_per_trip(tmp_path: Path) -> None:
    group = CommitGroup()
    ledgers = [Ledger.open(tmp_path / f"s{k}") for k in range(8)]
    for ledger in ledgers:
        ledger.commits = group

    async def shard(k: int, ledger: Ledger) -> None:
        for i in range(5):
            ledger.append(_event(f"s{k}-{i}"))
            await ledger.commit()
            # Durable once commit returns: the contract of an unshared commit.
            assert ledger.committed_seq == ledger.last_seq

    try:
        async with anyio.create_task_group() as tg:
            for k, ledger in enumerate(ledgers):
                tg.start_soon(shard, k, ledger)
    finally:
        group.close()
        for ledger in ledgers:
            ledger.close()
    assert group.flushes == 40
    assert group.rounds < group.flushes / 2, (group.rounds, group.flushes)
    for k in range(8):
        keys = read_events(tmp_path / f"s{k}").table.column("job_key").to_pylist()
        assert keys == [f"s{k}-{i}" for i in range(5)]


async def test_a_ledger_that_cannot_commit_fails_only_its_own_waiter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = SegmentWriter.sync

    def sync(self: SegmentWriter) -> None:
        if self.path.is_relative_to(tmp_path / "bad"):
            raise OSError(5, "Input/output error")  # a disk that fails this directory
        real(self)

    group = CommitGroup()
    good, bad = Ledger.open(tmp_path / "good"), Ledger.open(tmp_path / "bad")
    good.commits = bad.commits = group
    monkeypatch.setattr(SegmentWriter, "sync", sync)
    good.append(_event("g"))
    bad.append(_event("b"))
    outcomes: dict[str, str] = {}

    async def commit(name: str, ledger: Ledger) -> None:
        try:
            await ledger.commit()
            outcomes[name] = "ok"
        except LedgerError:
            outcomes[name] = "error"

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(commit, "good", good)
            tg.start_soon(commit, "bad", bad)
    finally:
        group.close()
        good.close()
        with pytest.raises(LedgerError):
            bad.close()
    assert outcomes == {"good": "ok", "bad": "error"}
    assert read_events(tmp_path / "good").table.column("job_key").to_pylist() == ["g"]
