"""Shards: a job's shard is a hash of its row identity; a sharded run directory is one run;
every shard on a key admits through one gate (runner.scale.shards)."""

from __future__ import annotations

import io
import json
import re
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from runner.errors import EXIT_BUDGET, UsageError
from runner.execution.engine import Hooks
from runner.ledger.fold import shard_dirs
from runner.ledger.views import status_summary
from runner.manifest.identity import shard_of
from runner.scale.layout import refuse_mismatch
from runner.scale.shards import execute_sharded
from tests.scenario import FAST_POLICIES, emulator, manifest, run_config

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("identity", "shards", "expected"),
    [("r1", 1, 0), ("r1", 8, shard_of("r1", 8)), ("~3f2a9c04b1d7e6a8", 16, None)],
)
def test_shard_of_is_stable_and_in_range(identity: str, shards: int, expected: int | None) -> None:
    got = shard_of(identity, shards)
    assert 0 <= got < shards
    assert got == shard_of(identity, shards)
    if expected is not None:
        assert got == expected


def test_shard_of_spreads_rows_evenly() -> None:
    counts = [0] * 8
    for i in range(8000):
        counts[shard_of(f"row-{i}", 8)] += 1
    assert min(counts) > 850 and max(counts) < 1150, counts


def _hooks(emu: object) -> Hooks:
    return Hooks(
        transport=httpx.ASGITransport(app=emu.app),  # type: ignore[attr-defined]
        stream=io.StringIO(),
        handle_signals=False,
        policies=FAST_POLICIES,
    )


async def test_sharded_run_completes_each_job_once_within_one_window(tmp_path: Path) -> None:
    path = manifest(tmp_path, 60)
    run_dir = tmp_path / "run"
    config = run_config(path, run_dir, shards=4, concurrency=2, download=False)
    # Slow enough (about 30 ms a job) that each shard alone would fill a window.
    async with emulator(concurrency=2, time_scale=0.01) as emu:
        report = await execute_sharded(config, hooks=_hooks(emu))
        raw = emu.stats
    assert report.exit_code == 0, report.message
    assert report.tally.completed == 60
    assert [p.name for p in shard_dirs(run_dir)] == ["0", "1", "2", "3"]
    assert raw.duplicates == 0
    # Four shards, one key: the key's window (3 x 2 slots), not four of them.
    assert raw.peak_outstanding <= config.in_flight_limit, raw.peak_outstanding
    summary = status_summary(run_dir)
    assert summary.by_state == {"completed": 60}


async def test_changing_the_shard_count_is_refused(tmp_path: Path) -> None:
    path = manifest(tmp_path, 6)
    run_dir = tmp_path / "run"
    async with emulator(concurrency=2, time_scale=0.002) as emu:
        await execute_sharded(
            run_config(path, run_dir, shards=2, download=False), hooks=_hooks(emu)
        )
    with pytest.raises(UsageError, match="split into 2 shards, not 3"):
        refuse_mismatch(run_dir, 3)
    with pytest.raises(UsageError, match="--shards 2"):
        refuse_mismatch(run_dir, None)


async def test_one_shard_runs_only_its_jobs(tmp_path: Path) -> None:
    path = manifest(tmp_path, 40)
    run_dir = tmp_path / "run"
    mine = sum(1 for i in range(40) if shard_of(f"r{i}", 3) == 1)
    config = run_config(path, run_dir, shards=3, shard=1, download=False)
    async with emulator(concurrency=2, time_scale=0.002) as emu:
        report = await execute_sharded(config, hooks=_hooks(emu))
    assert report.tally.completed == mine
    assert [p.name for p in shard_dirs(run_dir)] == ["1"]
    assert status_summary(run_dir).by_state == {"completed": mine}


def test_cli_runs_and_reads_a_sharded_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from runner.cli import main

    path = manifest(tmp_path, 30)
    run_dir = tmp_path / "run"
    run = ["run", str(path), "--ledger", str(run_dir), "--emulator", "--quiet",
           "--emulator-time-scale", "0.002", "--no-download", "--rate", "1000"]  # fmt: skip
    assert main([*run, "--shards", "3"]) == 0
    capsys.readouterr()
    assert main(["status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["jobs"] == 30, status
    assert main(["export", str(run_dir), "--format", "jsonl", "--out", "-"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 30
    assert main(["compact", str(run_dir)]) == 0
    assert not (run_dir / "ledger").exists()  # each shard compacted, nothing at the top
    # Another shard count, or none, is refused with the count to use.
    assert main([*run, "--shards", "4"]) == 2
    assert "split into 3 shards, not 4" in capsys.readouterr().err
    assert main(run) == 2
    assert "run it with --shards 3" in capsys.readouterr().err
    # A rerun with the same count finds every job done.
    assert main([*run, "--shards", "3"]) == 0


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_shard_messages_reach_the_live_stream_with_their_shard(
    tmp_path: Path, log_format: str
) -> None:
    path = manifest(tmp_path, 40)
    config = run_config(path, tmp_path / "run", shards=2, download=False,
                        max_cost_usd=Decimal("0.35"), log_format=log_format)  # fmt: skip
    async with emulator(concurrency=2, time_scale=0.002) as emu:
        hooks = _hooks(emu)
        report = await execute_sharded(config, hooks=hooks)
    assert isinstance(hooks.stream, io.StringIO)
    out = hooks.stream.getvalue()
    assert report.exit_code == EXIT_BUDGET, report.message
    if log_format == "json":
        events = [json.loads(line) for line in out.splitlines()]
        said = [e["text"] for e in events if e["event"] == "message"]
        # One progress view: the shards' own progress events are not relayed.
        assert {e["event"] for e in events} == {"message", "progress"}
    else:
        said = [line.removeprefix("runner: ") for line in out.splitlines()]
    budget = [s for s in said if re.fullmatch(r"shard [01]: budget reached: the next job .*", s)]
    assert budget, out
    assert not [s for s in said if re.match(r"shard \d+: \d+/", s)]  # nor their count lines
