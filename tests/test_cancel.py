"""``runner cancel``: the queue the run used, the key that submitted, and an exit code that
never says success when a cancel failed (runner.execution.cancel, runner.scale.cancel)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from runner.cli import main
from runner.emulator.server import serve
from runner.errors import EXIT_JOBS_FAILED, EXIT_OK, EXIT_USAGE
from runner.execution.cancel import CancelOutcome
from runner.fal.key import fingerprint
from runner.ledger.meta import write_run_meta
from runner.ledger.schema import JobState, LedgerEvent, utcnow
from runner.ledger.store import Ledger
from runner.scale.cancel import cancel_sharded
from runner.scale.keys import parse_keys
from runner.scale.layout import shard_dir
from tests.accounts_support import Accounts

pytestmark = pytest.mark.anyio

KEY_A = "alpha-key-id-0001:aaaaaaaaaaaaaaaaaaaaaaaaaaaa"
KEY_B = "bravo-key-id-0002:bbbbbbbbbbbbbbbbbbbbbbbbbbbb"
STRANGER = "other-key-id-0003:cccccccccccccccccccccccccccc"  # no account knows it: 401
ENDPOINT = "fal-ai/flux-lora"
SECRETS = ("aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc")


@asynccontextmanager
async def served() -> AsyncIterator[tuple[Accounts, str]]:
    """Two accounts (KEY_A, KEY_B) on a real loopback port; jobs slow enough to stay queued."""
    accounts = Accounts({KEY_A: 1, KEY_B: 1}, time_scale=100.0)
    async with serve(accounts) as server:  # type: ignore[arg-type]
        yield accounts, server.base_url


async def in_flight(base_url: str, key: str, run_dir: Path, n: int, **meta: Any) -> None:
    """``n`` requests submitted with ``key``, recorded queued in ``run_dir``'s ledger, and its
    run.json saying ``meta`` (queue_url, key_fingerprint, emulator ...)."""
    ids = []
    async with httpx.AsyncClient(headers={"Authorization": f"Key {key}"}) as http:
        for i in range(n):
            answer = await http.post(f"{base_url}/{ENDPOINT}", json={"prompt": f"p{i}"})
            ids.append(answer.json()["request_id"])
    with Ledger.open(run_dir) as ledger:
        for i, rid in enumerate(ids):
            ledger.append(LedgerEvent(job_key=f"job{i}", state=JobState.QUEUED, at=utcnow(),
                                      endpoint=ENDPOINT, request_id=rid))  # fmt: skip
        ledger.commit_sync()
    config = {"queue_url": meta.pop("queue_url", base_url), "emulator": meta.pop("emulator", False)}
    write_run_meta(run_dir, {"config": config, **meta})


def cancels(accounts: Accounts, key: str) -> int:
    return int(accounts.by_key[key].snapshot()["calls"].get("cancel", 0))


async def cli(*argv: str) -> int:
    return await anyio.to_thread.run_sync(main, list(argv))


async def test_cancel_asks_the_queue_the_run_used_not_fal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAL_KEY", KEY_A)
    run_dir = tmp_path / "run"
    async with served() as (accounts, url):
        await in_flight(url, KEY_A, run_dir, 3, key_fingerprint=fingerprint(KEY_A))
        code = await cli("cancel", str(run_dir))  # no --queue-url: run.json's
        assert cancels(accounts, KEY_A) == 3
    out = capsys.readouterr().out
    assert "3 in flight: cancelled 3, failed 0" in out
    assert code == EXIT_OK


async def test_an_explicit_queue_url_wins_over_run_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAL_KEY", KEY_A)
    run_dir = tmp_path / "run"
    async with served() as (accounts, url):
        # run.json names a port nothing listens on (the discard port): never asked.
        await in_flight(url, KEY_A, run_dir, 2, queue_url="http://127.0.0.1:9")
        code = await cli("cancel", str(run_dir), "--queue-url", url)
        assert cancels(accounts, KEY_A) == 2
    assert code == EXIT_OK, capsys.readouterr()


async def test_cancel_exits_1_and_counts_when_cancels_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused key: every cancel failed, which is neither success nor silence."""
    monkeypatch.setenv("FAL_KEY", STRANGER)
    run_dir = tmp_path / "run"
    async with served() as (_accounts, url):
        await in_flight(url, KEY_A, run_dir, 3)  # an old run.json: no fingerprint recorded
        code = await cli("cancel", str(run_dir), "--queue-url", url)
    out = capsys.readouterr().out
    assert code == EXIT_JOBS_FAILED
    assert "3 in flight: cancelled 0, failed 3" in out
    assert "3 of 3 cancels failed: those jobs may still run" in out
    assert "refused the key" in out
    assert not any(s in out for s in SECRETS)


async def test_cancel_uses_the_key_that_submitted_from_a_keys_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAL_KEY", KEY_A)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY_B}\n")
    run_dir = tmp_path / "run"
    async with served() as (accounts, url):
        await in_flight(url, KEY_B, run_dir, 2, key_fingerprint=fingerprint(KEY_B))
        code = await cli("cancel", str(run_dir), "--keys-file", str(keys))
        assert (cancels(accounts, KEY_A), cancels(accounts, KEY_B)) == (0, 2)
    assert code == EXIT_OK, capsys.readouterr()


async def test_cancel_without_the_key_that_submitted_sends_nothing_and_says_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAL_KEY", KEY_A)
    run_dir = tmp_path / "run"
    async with served() as (accounts, url):
        await in_flight(url, KEY_B, run_dir, 2, key_fingerprint=fingerprint(KEY_B))
        code = await cli("cancel", str(run_dir))
        assert cancels(accounts, KEY_A) == cancels(accounts, KEY_B) == 0
    out = capsys.readouterr().out
    assert code == EXIT_JOBS_FAILED
    assert f"submitted with key {fingerprint(KEY_B)}" in out and "failed 2" in out
    assert not any(s in out for s in SECRETS)


async def test_nothing_in_flight_needs_no_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    run_dir = tmp_path / "run"
    with Ledger.open(run_dir) as ledger:
        ledger.append(LedgerEvent(job_key="j", state=JobState.COMPLETED, at=utcnow()))
        ledger.commit_sync()
    assert await cli("cancel", str(run_dir)) == EXIT_OK
    assert "nothing in flight" in capsys.readouterr().out


async def test_a_run_on_the_embedded_emulator_has_nothing_left_to_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAL_KEY", KEY_A)
    run_dir = tmp_path / "run"
    async with served() as (accounts, url):
        await in_flight(url, KEY_A, run_dir, 1, emulator=True)
        assert await cli("cancel", str(run_dir)) == EXIT_USAGE
        assert cancels(accounts, KEY_A) == 0
    assert "embedded emulator" in capsys.readouterr().err


async def test_a_sharded_cancel_goes_on_past_a_shard_whose_key_is_missing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run_meta(run_dir, {"shards": 2})
    async with served() as (accounts, url):
        for shard, key in enumerate([KEY_A, KEY_B]):
            await in_flight(url, key, shard_dir(run_dir, shard), 2,
                            key_fingerprint=fingerprint(key))  # fmt: skip
        # Only KEY_B given: shard 0's jobs fail to cancel, shard 1's are cancelled.
        outcome = await cancel_sharded(run_dir, keys=parse_keys(KEY_B))
        assert (cancels(accounts, KEY_A), cancels(accounts, KEY_B)) == (0, 2)
    assert (outcome.in_flight, outcome.cancelled, outcome.failed) == (4, 2, 2)
    assert outcome.exit_code == EXIT_JOBS_FAILED
    assert any(f"shard 0: shard 0 was submitted with key {fingerprint(KEY_A)}" in e
               for e in outcome.errors)  # fmt: skip


def test_the_outcome_fails_when_any_cancel_failed() -> None:
    assert CancelOutcome(in_flight=3, cancelled=3).exit_code == EXIT_OK
    assert CancelOutcome(in_flight=3, cancelled=2, failed=1).exit_code == EXIT_JOBS_FAILED


async def test_a_refused_key_from_a_keys_file_is_named_by_its_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run_meta(run_dir, {"shards": 1})
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{STRANGER}\n")
    async with served() as (_accounts, url):
        await in_flight(url, KEY_A, shard_dir(run_dir, 0), 2,
                        key_fingerprint=fingerprint(STRANGER))  # fmt: skip
        outcome = await cancel_sharded(run_dir, keys=parse_keys(keys.read_text(), source=str(keys)))
    assert (outcome.in_flight, outcome.failed) == (2, 2)
    [error] = outcome.errors
    assert f"(check the key on {keys} line 1, {fingerprint(STRANGER)})" in error, error
    assert "FAL_KEY" not in error and not any(s in error for s in SECRETS)


async def test_a_cancel_is_its_own_line_in_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its events carry its own run id and run.json says what it did: the report does not
    list them as an older runner's events ("before run ids", status unknown)."""
    monkeypatch.setenv("FAL_KEY", KEY_A)
    run_dir = tmp_path / "run"
    async with served() as (_accounts, url):
        await in_flight(url, KEY_A, run_dir, 2, key_fingerprint=fingerprint(KEY_A))
        assert await cli("cancel", str(run_dir)) == EXIT_OK
    capsys.readouterr()
    assert await cli("report", str(run_dir)) == EXIT_OK
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "runner cancel:" in x)  # (the fixture's own
    assert "before run ids" not in line  # events, written without a run id, are the other)
    assert "2 in flight: cancelled 2, failed 0" in line and line.rstrip().endswith("exit 0")
